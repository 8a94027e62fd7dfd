//! A simulated Azure confidential-VM vTPM: a real TPM 2.0 simulator (swtpm) provisioned the way
//! Azure provisions a CVM's vTPM (platform-evidence §6.2, §6.3), and the paravisor's part of
//! the HCL: after the guest writes NV 0x01400002 the next read of NV 0x01400001 returns an HCL
//! report whose runtime claims echo that user-data and whose SNP report (signed by the
//! emulator's simulated VCEK) binds SHA-256(claims). At every start a simulated firmware
//! measures a boot into PCRs 0–7 and writes its TCG event log (`tcg_log`), as a VM's would.
//!
//! The paravisor sits between the guest and swtpm as a TCP relay on the two ports of the swtpm
//! TCTI (commands P, control P + 1). It watches the command stream: when a TPM2_NV_Write of
//! the user-data index succeeds, it rewrites the HCL report over the same swtpm connection
//! before it hands the guest the answer, so the refresh is never racy.
//!
//! Also the TPM structure parsers the emulator's MAA needs (TPM2B_PUBLIC, TPMS_ATTEST): written
//! here from the TPM 2.0 specification (Part 2), independent of the module's.

use crate::pki;
use crate::snp::{self, PlatformConfig};
use crate::tcg_log;
use crate::util::{b64url, random_bytes};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use x509_cert::Certificate;

/// NV index of the HCL report, of the guest's user-data and of the AK certificate; the AK.
pub const NV_HCL_REPORT: u32 = 0x0140_0001;
pub const NV_USER_DATA: u32 = 0x0140_0002;
pub const NV_AK_CERT: u32 = 0x01C1_01D0;
pub const AK_HANDLE: u32 = 0x8100_0003;
/// swtpm's largest NV index (TPM2_PT_NV_INDEX_MAX = 0x800, §6.9); real HCL reports are 2600
/// bytes of which ~2000 are used, so the simulated one is kept under 2048.
pub const HCL_INDEX_SIZE: usize = 2048;
const HW_REPORT_OFFSET: usize = 32;
const CLAIMS_OFFSET: usize = 1236;
const TPM_CC_NV_WRITE: u32 = 0x0000_0137;
const TPM_RH_OWNER: u32 = 0x4000_0001;
const TPM_RS_PW: u32 = 0x4000_0009;
const TPM_ST_SESSIONS: u16 = 0x8002;
/// A TPM command or response larger than this is not TPM traffic.
const MAX_TPM_MESSAGE: usize = 8192;

pub const TPM_ALG_RSA: u16 = 0x0001;
pub const TPM_ALG_SHA256: u16 = 0x000b;
pub const TPM_ALG_NULL: u16 = 0x0010;
pub const TPM_GENERATED: u32 = 0xff54_4347;
pub const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// TPMA_OBJECT bits.
pub const ATTR_FIXED_TPM: u32 = 1 << 1;
pub const ATTR_FIXED_PARENT: u32 = 1 << 4;
pub const ATTR_SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
pub const ATTR_RESTRICTED: u32 = 1 << 16;
pub const ATTR_DECRYPT: u32 = 1 << 17;
pub const ATTR_SIGN: u32 = 1 << 18;

// ---- TPM structures ------------------------------------------------------------------------

/// A big-endian reader over untrusted bytes: every read is bounds-checked.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, at: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| format!("{} is truncated at byte {}", self.what, self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        let hi = u64::from(self.u32()?);
        Ok(hi << 32 | u64::from(self.u32()?))
    }
    /// A TPM2B: u16 size, then the bytes.
    pub fn sized(&mut self) -> Result<&'a [u8], String> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    pub fn end(&self) -> Result<(), String> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(format!(
                "{} has {} trailing bytes",
                self.what,
                self.bytes.len() - self.at
            ))
        }
    }
}

/// An RSA key's TPM2B_PUBLIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicArea {
    pub name_alg: u16,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    /// Modulus, big-endian; exponent (65537 when the TPM's field is 0).
    pub n: Vec<u8>,
    pub e: u32,
    /// The TPMT_PUBLIC bytes (for the TPM name).
    pub tpmt: Vec<u8>,
}

impl RsaPublicArea {
    pub fn parse(tpm2b: &[u8], what: &'static str) -> Result<RsaPublicArea, String> {
        let mut outer = Reader::new(tpm2b, what);
        let tpmt = outer.sized()?;
        outer.end()?;
        let mut r = Reader::new(tpmt, what);
        if r.u16()? != TPM_ALG_RSA {
            return Err(format!("{what} is not an RSA key"));
        }
        let name_alg = r.u16()?;
        let attributes = r.u32()?;
        let auth_policy = r.sized()?.to_vec();
        let symmetric = r.u16()?;
        if symmetric != TPM_ALG_NULL {
            r.u16()?; // key bits
            r.u16()?; // mode
        }
        let scheme = r.u16()?;
        if scheme != TPM_ALG_NULL {
            r.u16()?; // hash of the scheme
        }
        let bits = r.u16()?;
        let e = match r.u32()? {
            0 => 65537,
            e => e,
        };
        let n = r.sized()?.to_vec();
        r.end()?;
        if n.len() * 8 != bits as usize {
            return Err(format!(
                "{what}: modulus of {} bits, keyBits says {bits}",
                n.len() * 8
            ));
        }
        Ok(RsaPublicArea {
            name_alg,
            attributes,
            auth_policy,
            n,
            e,
            tpmt: tpmt.to_vec(),
        })
    }

    /// The TPM name: nameAlg ‖ H(TPMT_PUBLIC) (SHA-256 names only).
    pub fn name(&self) -> Option<Vec<u8>> {
        (self.name_alg == TPM_ALG_SHA256).then(|| {
            let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
            name.extend_from_slice(&Sha256::digest(&self.tpmt));
            name
        })
    }

    pub fn rsa_key(&self) -> Result<rsa::RsaPublicKey, String> {
        rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(&self.n),
            rsa::BigUint::from(self.e),
        )
        .map_err(|e| format!("not a usable RSA key: {e}"))
    }
}

/// What a TPMS_ATTEST attests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttestedInfo {
    /// SHA-256 PCR selection (indices) and the digest of their concatenated values.
    Quote {
        pcrs: Vec<u32>,
        digest: Vec<u8>,
    },
    Certify {
        name: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    pub extra_data: Vec<u8>,
    pub info: AttestedInfo,
}

impl Attest {
    pub fn parse(bytes: &[u8], what: &'static str) -> Result<Attest, String> {
        let mut r = Reader::new(bytes, what);
        if r.u32()? != TPM_GENERATED {
            return Err(format!("{what} is not TPM-generated (magic)"));
        }
        let typ = r.u16()?;
        r.sized()?; // qualifiedSigner
        let extra_data = r.sized()?.to_vec();
        r.take(17)?; // clockInfo
        r.u64()?; // firmwareVersion
        let info = match typ {
            TPM_ST_ATTEST_QUOTE => {
                let count = r.u32()?;
                if count > 16 {
                    return Err(format!("{what}: {count} PCR banks"));
                }
                let mut pcrs = Vec::new();
                for _ in 0..count {
                    let hash = r.u16()?;
                    let size = r.u8()? as usize;
                    let select = r.take(size)?;
                    if hash != TPM_ALG_SHA256 {
                        if select.iter().any(|b| *b != 0) {
                            return Err(format!("{what}: PCRs of a bank other than SHA-256"));
                        }
                        continue;
                    }
                    for (byte, bits) in select.iter().enumerate() {
                        for bit in 0..8 {
                            if bits & (1 << bit) != 0 {
                                pcrs.push((byte * 8 + bit) as u32);
                            }
                        }
                    }
                }
                let digest = r.sized()?.to_vec();
                AttestedInfo::Quote { pcrs, digest }
            }
            TPM_ST_ATTEST_CERTIFY => {
                let name = r.sized()?.to_vec();
                r.sized()?; // qualifiedName
                AttestedInfo::Certify { name }
            }
            other => return Err(format!("{what}: attestation type 0x{other:04x}")),
        };
        r.end()?;
        Ok(Attest { extra_data, info })
    }
}

// ---- the HCL report --------------------------------------------------------------------------

/// The parts of the simulated CVM that do not change at run time.
#[derive(Clone)]
pub struct CvmIdentity {
    /// The AK (0x81000003), as HCLAkPub.
    pub ak_n: Vec<u8>,
    pub ak_e: u32,
    /// vm-configuration.vmUniqueId (upper-case GUID, like Azure's).
    pub vm_id: String,
}

/// The runtime-claims JSON of the HCL (`keys` with HCLAkPub, `user-data`, `vm-configuration`),
/// serialised once: these exact bytes are hashed into the SNP report.
pub fn runtime_claims(id: &CvmIdentity, user_data: &[u8; 64]) -> Vec<u8> {
    let e = id.ak_e.to_be_bytes();
    let first = e.iter().position(|b| *b != 0).unwrap_or(3);
    let claims = json!({
        "keys": [{
            "e": b64url(&e[first..]),
            "key_ops": ["sign"],
            "kid": "HCLAkPub",
            "kty": "RSA",
            "n": b64url(&id.ak_n),
        }],
        "user-data": hex::encode_upper(user_data),
        "vm-configuration": {
            "console-enabled": false,
            "secure-boot": true,
            "tpm-enabled": true,
            "vmUniqueId": id.vm_id,
        },
    });
    claims.to_string().into_bytes()
}

/// The hardware under the paravisor.
#[derive(Clone)]
pub enum Isolation {
    /// SEV-SNP: reports signed by the emulator's simulated VCEK.
    Snp(p384::ecdsa::SigningKey),
    /// TDX: TDREPORTs of the simulated TDX module.
    Tdx(Arc<crate::tdx::TdxKeys>),
}

impl Isolation {
    /// The HCL report_type (§6.3).
    pub fn report_type(&self) -> u32 {
        match self {
            Isolation::Snp(_) => 2,
            Isolation::Tdx(_) => 4,
        }
    }
}

/// An HCL report (v1) of HCL_INDEX_SIZE bytes: header, the hardware report (SNP report, or
/// TDREPORT then zeros) whose report data is SHA-256(claims) ‖ 0³², the variable-data header,
/// the claims, zero padding (§6.3).
pub fn hcl_report(
    id: &CvmIdentity,
    user_data: &[u8; 64],
    platform: &PlatformConfig,
    isolation: &Isolation,
) -> Result<Vec<u8>, String> {
    let claims = runtime_claims(id, user_data);
    let end = CLAIMS_OFFSET + claims.len();
    if end > HCL_INDEX_SIZE {
        return Err(format!(
            "HCL report of {end} bytes does not fit the {HCL_INDEX_SIZE}-byte NV index"
        ));
    }
    let mut report_data = [0u8; 64];
    report_data[..32].copy_from_slice(&Sha256::digest(&claims));
    let hardware = match isolation {
        Isolation::Snp(vcek) => snp::build_report(platform, &report_data, vcek)?,
        Isolation::Tdx(keys) => crate::tdx::build_tdreport(platform, &report_data, keys)?,
    };
    let data_size = 20 + claims.len() as u32;
    let mut out = vec![0u8; HCL_INDEX_SIZE];
    out[0..4].copy_from_slice(b"HCLA");
    out[4..8].copy_from_slice(&1u32.to_le_bytes());
    out[8..12].copy_from_slice(&(32 + snp::REPORT_LEN as u32 + data_size).to_le_bytes());
    out[12..16].copy_from_slice(&2u32.to_le_bytes());
    out[HW_REPORT_OFFSET..HW_REPORT_OFFSET + hardware.len()].copy_from_slice(&hardware);
    let var = HW_REPORT_OFFSET + snp::REPORT_LEN;
    out[var..var + 4].copy_from_slice(&data_size.to_le_bytes());
    out[var + 4..var + 8].copy_from_slice(&1u32.to_le_bytes());
    out[var + 8..var + 12].copy_from_slice(&isolation.report_type().to_le_bytes());
    out[var + 12..var + 16].copy_from_slice(&1u32.to_le_bytes()); // SHA-256
    out[var + 16..var + 20].copy_from_slice(&(claims.len() as u32).to_le_bytes());
    out[CLAIMS_OFFSET..end].copy_from_slice(&claims);
    Ok(out)
}

/// The CVM guest as seen by the SNP firmware: like the configured platform, but launched
/// without HOST_DATA (a CVM has no container security policy; MAA's compliance rule then says
/// azure-compliant-cvm).
pub fn cvm_platform(platform: &PlatformConfig) -> PlatformConfig {
    let mut p = platform.clone();
    p.host_data = Some(hex::encode([0u8; 32]));
    p
}

// ---- the vTPM CA -----------------------------------------------------------------------------

/// The simulated "Azure Virtual TPM" CA that certifies AKs (P-256, made per start).
pub struct VtpmCa {
    pub key: p256::ecdsa::SigningKey,
    pub cert: Certificate,
}

impl VtpmCa {
    pub fn new() -> Result<VtpmCa, String> {
        let (key, _) = pki::new_p256()?;
        let cert = pki::issue_named_ca(
            &key,
            "CN=skr-emulator simulated Azure Virtual TPM CA,O=skr-emulator",
        )?;
        Ok(VtpmCa { key, cert })
    }

    /// The AK certificate (DER) for the AK's RSA public key.
    pub fn issue_ak_cert(&self, ak: &rsa::RsaPublicKey, vm_id: &str) -> Result<Vec<u8>, String> {
        let cert = pki::issue_leaf_for(
            &self.cert,
            &self.key,
            &format!("CN={vm_id},O=skr-emulator simulated vTPM AK"),
            pki::spki_of(ak)?,
        )?;
        pki::cert_der(&cert)
    }
}

// ---- swtpm -----------------------------------------------------------------------------------

/// A swtpm process serving `DIR/vtpm` on two loopback ports; killed when dropped (and by the
/// kernel when the emulator dies: PR_SET_PDEATHSIG).
pub struct Swtpm {
    child: Child,
    pub port: u16,
}

/// Two free consecutive ports (the swtpm TCTI's control port is the command port + 1), bound.
fn free_port_pair() -> Result<(TcpListener, TcpListener), String> {
    for _ in 0..200 {
        let first = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = first.local_addr().map_err(|e| e.to_string())?.port();
        if port == u16::MAX {
            continue;
        }
        if let Ok(second) = TcpListener::bind(("127.0.0.1", port + 1)) {
            return Ok((first, second));
        }
    }
    Err("no two consecutive free ports on 127.0.0.1".into())
}

impl Swtpm {
    /// A fresh TPM (new state, like a new VM) in `dir`.
    pub fn start(dir: &Path) -> Result<Swtpm, String> {
        let state = dir.join("state");
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state)
            .map_err(|e| format!("cannot create {}: {e}", state.display()))?;
        // Only the SHA-256 bank, whatever the host's swtpm_setup.conf says: the bank
        // AzureGuest quotes, and the only one the simulated boot extends and logs.
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--pcr-banks", "sha256", "--tpmstate"])
            .arg(&state)
            .output()
            .map_err(|e| format!("swtpm_setup (Debian package swtpm-tools) cannot run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "swtpm_setup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        for _ in 0..20 {
            let (a, b) = free_port_pair()?;
            let port = a.local_addr().map_err(|e| e.to_string())?.port();
            drop((a, b));
            let mut cmd = Command::new("swtpm");
            cmd.arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; the child only asks to die with its parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("swtpm (Debian package swtpm) cannot run: {e}"))?;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port race: try another pair
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Swtpm { child, port });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err("swtpm did not start".into())
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- provisioning (tss-esapi over libtss2, like the guest agent's provisioning) ------------

fn tss(what: &str) -> impl Fn(tss_esapi::Error) -> String + '_ {
    move |e| format!("vTPM provisioning: {what}: {e}")
}

/// AK at 0x81000003 (RSA-2048, restricted, RSASSA / SHA-256, in the endorsement hierarchy);
/// returns its public key.
pub fn provision_ak(tcti: &str) -> Result<rsa::RsaPublicKey, String> {
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::handles::PersistentTpmHandle;
    use tss_esapi::interface_types::algorithm::{
        HashingAlgorithm, PublicAlgorithm, RsaSchemeAlgorithm,
    };
    use tss_esapi::interface_types::dynamic_handles::Persistent;
    use tss_esapi::interface_types::key_bits::RsaKeyBits;
    use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{
        Public, PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, RsaScheme,
        SymmetricDefinitionObject,
    };
    let mut ctx = tss_esapi::Context::new(
        tss_esapi::tcti_ldr::TctiNameConf::from_str(tcti).map_err(tss("TCTI"))?,
    )
    .map_err(tss("connecting"))?;
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(tss("AK attributes"))?;
    let template = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_scheme(
                    RsaScheme::create(RsaSchemeAlgorithm::RsaSsa, Some(HashingAlgorithm::Sha256))
                        .map_err(tss("AK scheme"))?,
                )
                .with_key_bits(RsaKeyBits::Rsa2048)
                .with_exponent(RsaExponent::default())
                .with_is_signing_key(true)
                .with_restricted(true)
                .build()
                .map_err(tss("AK parameters"))?,
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(tss("AK template"))?;
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
        })
        .map_err(tss("TPM2_CreatePrimary of the AK"))?;
    let persistent = PersistentTpmHandle::new(AK_HANDLE).map_err(tss("AK handle"))?;
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.evict_control(
            Provision::Owner,
            created.key_handle.into(),
            Persistent::Persistent(persistent),
        )
    })
    .map_err(tss("TPM2_EvictControl of the AK"))?;
    ctx.flush_context(created.key_handle.into())
        .map_err(tss("flushing the AK"))?;
    let Public::Rsa {
        unique, parameters, ..
    } = created.out_public
    else {
        return Err("vTPM provisioning: the AK is not RSA".into());
    };
    let e = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(unique.value()),
        rsa::BigUint::from(e),
    )
    .map_err(|e| format!("vTPM provisioning: AK public key: {e}"))
}

/// The simulated firmware's measurements: each event's SHA-256 digest extended into its PCR
/// (the only active bank, see `Swtpm::start`), as the log written beside them records.
pub fn measure_boot(tcti: &str, events: &[tcg_log::BootEvent]) -> Result<(), String> {
    use tss_esapi::handles::PcrHandle;
    use tss_esapi::interface_types::algorithm::HashingAlgorithm;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{Digest as TpmDigest, DigestValues};
    const PCRS: [PcrHandle; 8] = [
        PcrHandle::Pcr0,
        PcrHandle::Pcr1,
        PcrHandle::Pcr2,
        PcrHandle::Pcr3,
        PcrHandle::Pcr4,
        PcrHandle::Pcr5,
        PcrHandle::Pcr6,
        PcrHandle::Pcr7,
    ];
    let mut ctx = tss_esapi::Context::new(
        tss_esapi::tcti_ldr::TctiNameConf::from_str(tcti).map_err(tss("TCTI"))?,
    )
    .map_err(tss("connecting"))?;
    for e in events {
        let pcr = *PCRS
            .get(e.pcr as usize)
            .ok_or_else(|| format!("vTPM boot: PCR {} is not a boot PCR", e.pcr))?;
        let mut digests = DigestValues::new();
        digests.set(
            HashingAlgorithm::Sha256,
            TpmDigest::try_from(Sha256::digest(e.measured()).to_vec()).map_err(tss("digest"))?,
        );
        ctx.execute_with_session(Some(AuthSession::Password), |c| c.pcr_extend(pcr, digests))
            .map_err(tss(&format!("TPM2_PCR_Extend of PCR {}", e.pcr)))?;
    }
    Ok(())
}

/// Define `index` (owner read / write, `size` bytes) and write `data` into it.
pub fn provision_nv(tcti: &str, index: u32, size: usize, data: &[u8]) -> Result<(), String> {
    use tss_esapi::attributes::NvIndexAttributesBuilder;
    use tss_esapi::handles::NvIndexTpmHandle;
    use tss_esapi::interface_types::algorithm::HashingAlgorithm;
    use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{MaxNvBuffer, NvPublicBuilder};
    let mut ctx = tss_esapi::Context::new(
        tss_esapi::tcti_ldr::TctiNameConf::from_str(tcti).map_err(tss("TCTI"))?,
    )
    .map_err(tss("connecting"))?;
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .build()
        .map_err(tss("NV attributes"))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(NvIndexTpmHandle::new(index).map_err(tss("NV handle"))?)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(size)
        .build()
        .map_err(tss("NV public"))?;
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        let h = c.nv_define_space(Provision::Owner, None, public)?;
        for (i, chunk) in data.chunks(1024).enumerate() {
            c.nv_write(
                NvAuth::Owner,
                h,
                MaxNvBuffer::try_from(chunk.to_vec())?,
                (i * 1024) as u16,
            )?;
        }
        Ok(())
    })
    .map_err(tss(&format!("defining and writing NV 0x{index:08x}")))
}

// ---- the paravisor relay ---------------------------------------------------------------------

/// Makes the HCL report for a user-data value (the SNP report signed at that moment).
pub type ReportMaker = dyn Fn(&[u8; 64]) -> Result<Vec<u8>, String> + Send + Sync;

/// What the paravisor reports to, and asks of, the emulator.
pub trait ParavisorHooks: Send + Sync {
    /// Whether to leave this refresh out (an injected fault).
    fn skip_refresh(&self) -> bool;
    /// The outcome of a refresh (`None`: skipped).
    fn refreshed(&self, outcome: Option<Result<(), String>>);
    /// A TPM response code to answer `command` with instead of swtpm (an injected fault).
    fn command_fault(&self, command: &[u8]) -> Option<u32>;
}

/// TPM2_CreatePrimary: the command the injected TPM faults answer (the transfer key's
/// creation, the first TPM work of a login).
pub const TPM_CC_CREATE_PRIMARY: u32 = 0x0000_0131;
/// TPM2_NV_Read: of the HCL report, answered "not written" by an injected fault.
pub const TPM_CC_NV_READ: u32 = 0x0000_014E;
/// TPM_RC_LOCKOUT (dictionary-attack lockout) and TPM_RC_RETRY (busy).
pub const TPM_RC_LOCKOUT: u32 = 0x0000_0921;
pub const TPM_RC_RETRY: u32 = 0x0000_0922;
/// TPM_RC_NV_UNINITIALIZED: what an Azure vTPM answers for an NV index the paravisor has not
/// written yet (Azure's tools print it as "code=330").
pub const TPM_RC_NV_UNINITIALIZED: u32 = 0x0000_014A;

/// The command code of a TPM command (its bytes 6..10).
pub fn command_code(command: &[u8]) -> Option<u32> {
    command
        .get(6..10)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Whether `command` is a TPM2_NV_Read of `index` (handles: authHandle, then nvIndex).
pub fn is_nv_read_of(command: &[u8], index: u32) -> bool {
    command_code(command) == Some(TPM_CC_NV_READ)
        && command.get(14..18) == Some(&index.to_be_bytes()[..])
}

/// A TPM response carrying only `rc`.
pub fn error_response(rc: u32) -> Vec<u8> {
    let mut r = 0x8001u16.to_be_bytes().to_vec(); // TPM_ST_NO_SESSIONS
    r.extend_from_slice(&10u32.to_be_bytes());
    r.extend_from_slice(&rc.to_be_bytes());
    r
}

/// The relay the guest's TCTI talks to (`swtpm:host=127.0.0.1,port=PORT`).
pub struct Paravisor {
    pub port: u16,
}

/// Reads one TPM command or response (header, then the size it announces).
fn read_message(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 10];
    let mut got = 0;
    while got < header.len() {
        match s.read(&mut header[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if !(10..=MAX_TPM_MESSAGE).contains(&size) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("TPM message of {size} bytes"),
        ));
    }
    let mut msg = header.to_vec();
    msg.resize(size, 0);
    s.read_exact(&mut msg[10..])?;
    Ok(Some(msg))
}

fn response_code(response: &[u8]) -> u32 {
    response
        .get(6..10)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(u32::MAX)
}

/// If `command` is a TPM2_NV_Write of the user-data index: (offset, data).
pub fn user_data_write(command: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut r = Reader::new(command, "TPM command");
    if r.u16().ok()? != TPM_ST_SESSIONS {
        return None;
    }
    r.u32().ok()?;
    if r.u32().ok()? != TPM_CC_NV_WRITE {
        return None;
    }
    r.u32().ok()?; // authHandle
    if r.u32().ok()? != NV_USER_DATA {
        return None;
    }
    let auth_size = r.u32().ok()? as usize;
    r.take(auth_size).ok()?;
    let data = r.sized().ok()?.to_vec();
    let offset = r.u16().ok()? as usize;
    Some((offset, data))
}

/// A TPM2_NV_Write of `data` at `offset` into `index` with the owner's (empty) password.
pub fn nv_write_command(index: u32, offset: u16, data: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(data.len() + 40);
    c.extend_from_slice(&TPM_ST_SESSIONS.to_be_bytes());
    c.extend_from_slice(&[0; 4]); // size, below
    c.extend_from_slice(&TPM_CC_NV_WRITE.to_be_bytes());
    c.extend_from_slice(&TPM_RH_OWNER.to_be_bytes());
    c.extend_from_slice(&index.to_be_bytes());
    // Authorization area: one password session with an empty password.
    c.extend_from_slice(&9u32.to_be_bytes());
    c.extend_from_slice(&TPM_RS_PW.to_be_bytes());
    c.extend_from_slice(&0u16.to_be_bytes()); // nonce
    c.push(0); // attributes
    c.extend_from_slice(&0u16.to_be_bytes()); // password
    c.extend_from_slice(&(data.len() as u16).to_be_bytes());
    c.extend_from_slice(data);
    c.extend_from_slice(&offset.to_be_bytes());
    let size = c.len() as u32;
    c[2..6].copy_from_slice(&size.to_be_bytes());
    c
}

fn refresh_report(
    upstream: &mut TcpStream,
    user_data: &[u8; 64],
    maker: &ReportMaker,
) -> Result<(), String> {
    let report = maker(user_data)?;
    for (i, chunk) in report.chunks(1024).enumerate() {
        let cmd = nv_write_command(NV_HCL_REPORT, (i * 1024) as u16, chunk);
        upstream.write_all(&cmd).map_err(|e| e.to_string())?;
        let resp = read_message(upstream)
            .map_err(|e| e.to_string())?
            .ok_or("swtpm closed the connection")?;
        let rc = response_code(&resp);
        if rc != 0 {
            return Err(format!("TPM2_NV_Write of the HCL report: rc 0x{rc:x}"));
        }
    }
    Ok(())
}

/// One connection to swtpm for every guest connection (the tss2 swtpm TCTI opens one per
/// command): commands are serialised on it, as a TPM serialises them anyway, and the relay adds
/// no TCP connect of its own per command. Reconnects after an error.
struct Upstream {
    port: u16,
    stream: Mutex<Option<TcpStream>>,
}

impl Upstream {
    /// Send `command`, return the response; refresh the HCL report on the same connection
    /// first when the command was a successful user-data write.
    fn exchange(
        &self,
        command: &[u8],
        user_data: &Mutex<[u8; 64]>,
        maker: &ReportMaker,
        hooks: &dyn ParavisorHooks,
    ) -> std::io::Result<Vec<u8>> {
        let mut guard = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true)?;
            *guard = Some(s);
        }
        let Some(upstream) = guard.as_mut() else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        let result = (|| {
            upstream.write_all(command)?;
            let response = read_message(upstream)?
                .ok_or(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
            if response_code(&response) == 0 {
                if let Some((offset, data)) = user_data_write(command) {
                    let current = {
                        let mut ud = user_data.lock().unwrap_or_else(|p| p.into_inner());
                        for (i, b) in data.iter().enumerate() {
                            if let Some(slot) = ud.get_mut(offset + i) {
                                *slot = *b;
                            }
                        }
                        *ud
                    };
                    if hooks.skip_refresh() {
                        hooks.refreshed(None);
                    } else {
                        hooks.refreshed(Some(refresh_report(upstream, &current, maker)));
                    }
                }
            }
            Ok(response)
        })();
        if result.is_err() {
            *guard = None;
        }
        result
    }
}

fn relay_commands(
    mut guest: TcpStream,
    upstream: &Upstream,
    user_data: &Mutex<[u8; 64]>,
    maker: &ReportMaker,
    hooks: &dyn ParavisorHooks,
) -> std::io::Result<()> {
    guest.set_nodelay(true)?;
    while let Some(command) = read_message(&mut guest)? {
        if let Some(rc) = hooks.command_fault(&command) {
            guest.write_all(&error_response(rc))?;
            continue;
        }
        let response = upstream.exchange(&command, user_data, maker, hooks)?;
        guest.write_all(&response)?;
    }
    Ok(())
}

fn relay_bytes(guest: TcpStream, upstream_port: u16) -> std::io::Result<()> {
    let upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    let (mut g_read, mut u_write) = (guest.try_clone()?, upstream.try_clone()?);
    let forward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut g_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut g_write) = (upstream, guest);
    let _ = std::io::copy(&mut u_read, &mut g_write);
    let _ = g_write.shutdown(Shutdown::Write);
    let _ = forward.join();
    Ok(())
}

impl Paravisor {
    /// Relays the guest's TCTI to swtpm at `swtpm_port`; serves for the life of the process.
    pub fn start(
        swtpm_port: u16,
        maker: Arc<ReportMaker>,
        hooks: Arc<dyn ParavisorHooks>,
    ) -> Result<Paravisor, String> {
        let (commands, control) = free_port_pair()?;
        let port = commands.local_addr().map_err(|e| e.to_string())?.port();
        let user_data = Arc::new(Mutex::new([0u8; 64]));
        let upstream = Arc::new(Upstream {
            port: swtpm_port,
            stream: Mutex::new(None),
        });
        std::thread::Builder::new()
            .name("vtpm-commands".into())
            .spawn(move || {
                for guest in commands.incoming().flatten() {
                    let (ud, maker, hooks, upstream) = (
                        user_data.clone(),
                        maker.clone(),
                        hooks.clone(),
                        upstream.clone(),
                    );
                    let _ = std::thread::Builder::new()
                        .name("vtpm-session".into())
                        .spawn(move || {
                            let _ = relay_commands(guest, &upstream, &ud, &*maker, &*hooks);
                        });
                }
            })
            .map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("vtpm-control".into())
            .spawn(move || {
                for guest in control.incoming().flatten() {
                    let _ = std::thread::Builder::new()
                        .name("vtpm-control-session".into())
                        .spawn(move || {
                            let _ = relay_bytes(guest, swtpm_port + 1);
                        });
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Paravisor { port })
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

/// A whole simulated CVM vTPM: swtpm, provisioned, behind the paravisor relay.
pub struct SimulatedVtpm {
    /// Held for its drop: swtpm stops with this value.
    _swtpm: Swtpm,
    pub paravisor: Paravisor,
    pub identity: CvmIdentity,
    pub ca: VtpmCa,
    /// The boot's TCG event log (what Linux shows in
    /// /sys/kernel/security/tpm0/binary_bios_measurements).
    pub tcg_log: std::path::PathBuf,
}

/// A random upper-case GUID (Azure's vmUniqueId form).
pub fn random_vm_id() -> String {
    let b: [u8; 16] = random_bytes();
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl SimulatedVtpm {
    /// Start swtpm in `dir`, provision it like an Azure CVM's vTPM, and start the paravisor.
    /// `platform` and `vcek` sign the SNP reports inside the HCL reports.
    pub fn start(
        dir: &Path,
        platform: Arc<dyn Fn() -> PlatformConfig + Send + Sync>,
        isolation: Isolation,
        hooks: Arc<dyn ParavisorHooks>,
    ) -> Result<SimulatedVtpm, String> {
        let swtpm = Swtpm::start(dir)?;
        let tcti = swtpm.tcti();
        // The firmware measures the boot before anything else runs; swtpm starts with its
        // PCRs reset, so every start (a VM boot) measures it again and rewrites the log.
        let boot = tcg_log::simulated_boot();
        measure_boot(&tcti, &boot)?;
        let log_path = dir.join("binary_bios_measurements");
        crate::util::write_atomic(&log_path, &tcg_log::encode(&boot))
            .map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
        let ak = provision_ak(&tcti)?;
        use rsa::traits::PublicKeyParts;
        let identity = CvmIdentity {
            ak_n: ak.n().to_bytes_be(),
            ak_e: ak
                .e()
                .to_bytes_be()
                .iter()
                .fold(0u32, |a, b| a << 8 | u32::from(*b)),
            vm_id: random_vm_id(),
        };
        let ca = VtpmCa::new()?;
        let ak_cert = ca.issue_ak_cert(&ak, &identity.vm_id)?;
        provision_nv(&tcti, NV_AK_CERT, ak_cert.len(), &ak_cert)?;
        let maker: Arc<ReportMaker> = {
            let identity = identity.clone();
            Arc::new(move |user_data: &[u8; 64]| {
                hcl_report(&identity, user_data, &cvm_platform(&platform()), &isolation)
            })
        };
        // The report as the VM booted: user-data all zero.
        provision_nv(&tcti, NV_HCL_REPORT, HCL_INDEX_SIZE, &maker(&[0u8; 64])?)?;
        let paravisor = Paravisor::start(swtpm.port, maker, hooks)?;
        Ok(SimulatedVtpm {
            _swtpm: swtpm,
            paravisor,
            identity,
            ca,
            tcg_log: log_path,
        })
    }
}

/// The evidence claims of `x-ms-isolation-tee.x-ms-runtime` as MAA shows them: the HCL claims
/// JSON, parsed.
pub fn parse_claims(json: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(json).map_err(|e| format!("HCL runtime claims are not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nv_write_commands_round_trip_through_the_relay_parser() {
        let cmd = nv_write_command(NV_USER_DATA, 3, &[1, 2, 3]);
        assert_eq!(user_data_write(&cmd), Some((3, vec![1, 2, 3])));
        assert_eq!(
            u32::from_be_bytes(cmd[2..6].try_into().unwrap()) as usize,
            cmd.len()
        );
        // Another index, or a truncated command: not a user-data write.
        assert_eq!(
            user_data_write(&nv_write_command(NV_HCL_REPORT, 0, &[1])),
            None
        );
        assert_eq!(user_data_write(&cmd[..cmd.len() - 3]), None);
        assert_eq!(user_data_write(&[]), None);
    }

    #[test]
    fn hcl_reports_bind_their_claims_and_fit_swtpm() {
        let platform = PlatformConfig::generate();
        let (vcek, _) = pki::new_p384().unwrap();
        let id = CvmIdentity {
            ak_n: vec![0xc5; 256],
            ak_e: 65537,
            vm_id: random_vm_id(),
        };
        let ud = [0x5a; 64];
        let r = hcl_report(
            &id,
            &ud,
            &cvm_platform(&platform),
            &Isolation::Snp(vcek.clone()),
        )
        .unwrap();
        assert_eq!(r.len(), HCL_INDEX_SIZE);
        assert_eq!(&r[..4], b"HCLA");
        let claims_len = u32::from_le_bytes(r[1232..1236].try_into().unwrap()) as usize;
        let claims = &r[CLAIMS_OFFSET..CLAIMS_OFFSET + claims_len];
        let snp_report = &r[32..32 + snp::REPORT_LEN];
        let rd = snp::Report(snp_report).report_data().to_vec();
        assert_eq!(rd[..32], Sha256::digest(claims)[..]);
        assert!(rd[32..].iter().all(|b| *b == 0));
        let v = parse_claims(claims).unwrap();
        assert_eq!(v["user-data"], hex::encode_upper(ud));
        assert_eq!(v["keys"][0]["kid"], "HCLAkPub");
        assert!(snp::Report(snp_report).host_data().iter().all(|b| *b == 0));
        snp::verify_report_signature(snp_report, vcek.verifying_key()).unwrap();
    }

    #[test]
    fn tpm_structure_parsers_refuse_truncations() {
        // TPMT_PUBLIC: RSA, SHA-256, decrypt, empty policy, NULL sym / scheme, 16 bits, e 0.
        let mut tpmt = vec![];
        tpmt.extend_from_slice(&TPM_ALG_RSA.to_be_bytes());
        tpmt.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        tpmt.extend_from_slice(&ATTR_DECRYPT.to_be_bytes());
        tpmt.extend_from_slice(&0u16.to_be_bytes());
        tpmt.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
        tpmt.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
        tpmt.extend_from_slice(&16u16.to_be_bytes());
        tpmt.extend_from_slice(&0u32.to_be_bytes());
        tpmt.extend_from_slice(&2u16.to_be_bytes());
        tpmt.extend_from_slice(&[0xab, 0xcd]);
        let mut tpm2b = (tpmt.len() as u16).to_be_bytes().to_vec();
        tpm2b.extend_from_slice(&tpmt);
        let p = RsaPublicArea::parse(&tpm2b, "key").unwrap();
        assert_eq!((p.n.clone(), p.e), (vec![0xab, 0xcd], 65537));
        assert_eq!(p.name().unwrap().len(), 34);
        for cut in 0..tpm2b.len() {
            assert!(RsaPublicArea::parse(&tpm2b[..cut], "key").is_err());
        }
        for cut in 0..40 {
            let _ = Attest::parse(&vec![0xffu8; cut], "attest");
        }
    }
}
