//! SEV-SNP ATTESTATION_REPORT: the simulated platform's report (built and signed here) and the
//! field reader MAA uses on any report. The raw bytes are the source of truth; offsets follow
//! AMD's layout (platform-evidence.md §2).

use crate::pki::Tcb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha384};
use signature::hazmat::{PrehashSigner, PrehashVerifier};

pub const REPORT_LEN: usize = 0x4A0;
pub const SIGNED_LEN: usize = 0x2A0;
pub const OFF_SIG_R: usize = 0x2A0;
pub const OFF_SIG_S: usize = 0x2E8;

pub const POLICY_SMT: u64 = 1 << 16;
pub const POLICY_MIGRATE_MA: u64 = 1 << 18;
pub const POLICY_DEBUG: u64 = 1 << 19;

/// `DIR/state/platform.json`: what the simulated SEV-SNP guest reports. Edit it (emulator
/// stopped) to simulate another launch measurement, a debug policy, another TCB, …; the VCEK
/// is re-issued on the next start when the TCB or chip id changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// MEASUREMENT, 48 bytes hex.
    pub measurement: String,
    /// The confidential-container security policy; HOST_DATA = SHA-256 of its UTF-8 bytes
    /// (what ACI does), unless `host_data` overrides it.
    pub security_policy: String,
    /// HOST_DATA override, 32 bytes hex.
    #[serde(default)]
    pub host_data: Option<String>,
    /// POLICY (bit 16 SMT, 17 reserved = 1, 18 MIGRATE_MA, 19 DEBUG).
    pub policy: u64,
    pub guest_svn: u32,
    pub vmpl: u32,
    pub family_id: String,
    pub image_id: String,
    pub id_key_digest: String,
    pub author_key_digest: String,
    pub report_id: String,
    pub tcb: Tcb,
    /// CHIP_ID, 64 bytes hex; equals the VCEK's hwID.
    pub chip_id: String,
    pub platform_info: u64,
    /// Processor generation: decides CPUID, the TCB layout (Turin adds FMC) and the VCEK.
    #[serde(default)]
    pub generation: Generation,
}

impl PlatformConfig {
    pub fn generate() -> Self {
        PlatformConfig {
            measurement: crate::util::random_hex(48),
            security_policy: DEFAULT_SECURITY_POLICY.to_string(),
            host_data: None,
            policy: 0x3001F,
            guest_svn: 1,
            vmpl: 0,
            family_id: hex::encode([0u8; 16]),
            image_id: hex::encode([0u8; 16]),
            id_key_digest: hex::encode([0u8; 48]),
            author_key_digest: hex::encode([0u8; 48]),
            report_id: crate::util::random_hex(32),
            tcb: Tcb {
                fmc: None,
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
            },
            chip_id: crate::util::random_hex(64),
            platform_info: 0x3,
            generation: Generation::Milan,
        }
    }

    pub fn host_data(&self) -> Result<[u8; 32], String> {
        match &self.host_data {
            Some(hex_text) => fixed_hex::<32>("host_data", hex_text),
            None => Ok(Sha256::digest(self.security_policy.as_bytes()).into()),
        }
    }

    pub fn chip_id_bytes(&self) -> Result<[u8; 64], String> {
        fixed_hex::<64>("chip_id", &self.chip_id)
    }

    /// CHIP_ID as the report carries it: Turin uses only the first 8 bytes.
    pub fn reported_chip_id(&self) -> Result<[u8; 64], String> {
        let mut chip = self.chip_id_bytes()?;
        if self.generation == Generation::Turin {
            chip[8..].fill(0);
        }
        Ok(chip)
    }

    /// The VCEK's hwID extension for this chip.
    pub fn vcek_hwid(&self) -> Result<Vec<u8>, String> {
        let chip = self.reported_chip_id()?;
        Ok(match self.generation {
            Generation::Turin => chip[..8].to_vec(),
            _ => chip.to_vec(),
        })
    }

    pub fn product_name(&self) -> &'static str {
        match self.generation {
            Generation::Milan => "Milan-B0",
            Generation::Genoa => "Genoa-B1",
            Generation::Turin => "Turin-B0",
        }
    }

    /// TCB_VERSION bytes in this generation's layout.
    pub fn tcb_bytes(&self) -> [u8; 8] {
        let t = self.tcb;
        match self.generation {
            Generation::Turin => [
                t.fmc.unwrap_or(0),
                t.bootloader,
                t.tee,
                t.snp,
                0,
                0,
                0,
                t.microcode,
            ],
            _ => [t.bootloader, t.tee, 0, 0, 0, 0, t.snp, t.microcode],
        }
    }

    /// Checks every field, so that a bad edit is reported at start, not at the first report.
    pub fn validate(&self) -> Result<(), String> {
        fixed_hex::<48>("measurement", &self.measurement)?;
        self.host_data()?;
        fixed_hex::<16>("family_id", &self.family_id)?;
        fixed_hex::<16>("image_id", &self.image_id)?;
        fixed_hex::<48>("id_key_digest", &self.id_key_digest)?;
        fixed_hex::<48>("author_key_digest", &self.author_key_digest)?;
        fixed_hex::<32>("report_id", &self.report_id)?;
        self.chip_id_bytes()?;
        match (self.generation, self.tcb.fmc) {
            (Generation::Turin, None) => return Err("tcb.fmc is required on Turin".into()),
            (Generation::Milan | Generation::Genoa, Some(_)) => {
                return Err("tcb.fmc exists on Turin only".into())
            }
            _ => {}
        }
        Ok(())
    }
}

/// A small rego policy in the shape ACI's confidential containers use; only its hash matters.
pub const DEFAULT_SECURITY_POLICY: &str = "package policy\n\napi_version := \"0.10.0\"\nframework_version := \"0.2.3\"\n\n# skr-emulator simulated UVM: allow everything (development only)\nmount_device := {\"allowed\": true}\nunmount_device := {\"allowed\": true}\nmount_overlay := {\"allowed\": true}\nunmount_overlay := {\"allowed\": true}\ncreate_container := {\"allowed\": true, \"env_list\": null, \"allow_stdio_access\": true}\nexec_in_container := {\"allowed\": true, \"env_list\": null}\nexec_external := {\"allowed\": true, \"env_list\": null, \"allow_stdio_access\": true}\nshutdown_container := {\"allowed\": true}\nsignal_container_process := {\"allowed\": true}\nplan9_mount := {\"allowed\": true}\nplan9_unmount := {\"allowed\": true}\nget_properties := {\"allowed\": true}\ndump_stacks := {\"allowed\": true}\nruntime_logging := {\"allowed\": true}\nload_fragment := {\"allowed\": true}\nscratch_mount := {\"allowed\": true}\nscratch_unmount := {\"allowed\": true}\n";

pub fn fixed_hex<const N: usize>(field: &str, text: &str) -> Result<[u8; N], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("{field}: not hex ({e})"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{field}: {} bytes, expected {N}", b.len()))
}

/// Builds and signs a version-3 report, as the PSP would for this guest.
pub fn build_report(
    cfg: &PlatformConfig,
    report_data: &[u8; 64],
    vcek: &p384::ecdsa::SigningKey,
) -> Result<Vec<u8>, String> {
    let mut r = vec![0u8; REPORT_LEN];
    let tcb = cfg.tcb_bytes();
    r[0x00..0x04].copy_from_slice(&3u32.to_le_bytes());
    r[0x04..0x08].copy_from_slice(&cfg.guest_svn.to_le_bytes());
    r[0x08..0x10].copy_from_slice(&cfg.policy.to_le_bytes());
    r[0x10..0x20].copy_from_slice(&fixed_hex::<16>("family_id", &cfg.family_id)?);
    r[0x20..0x30].copy_from_slice(&fixed_hex::<16>("image_id", &cfg.image_id)?);
    r[0x30..0x34].copy_from_slice(&cfg.vmpl.to_le_bytes());
    r[0x34..0x38].copy_from_slice(&1u32.to_le_bytes());
    r[0x38..0x40].copy_from_slice(&tcb);
    r[0x40..0x48].copy_from_slice(&cfg.platform_info.to_le_bytes());
    // KEY_INFO 0: signed by the VCEK, chip key not masked.
    r[0x50..0x90].copy_from_slice(report_data);
    r[0x90..0xC0].copy_from_slice(&fixed_hex::<48>("measurement", &cfg.measurement)?);
    r[0xC0..0xE0].copy_from_slice(&cfg.host_data()?);
    r[0xE0..0x110].copy_from_slice(&fixed_hex::<48>("id_key_digest", &cfg.id_key_digest)?);
    r[0x110..0x140].copy_from_slice(&fixed_hex::<48>(
        "author_key_digest",
        &cfg.author_key_digest,
    )?);
    r[0x140..0x160].copy_from_slice(&fixed_hex::<32>("report_id", &cfg.report_id)?);
    // No migration agent: REPORT_ID_MA is all ones.
    r[0x160..0x180].fill(0xFF);
    r[0x180..0x188].copy_from_slice(&tcb);
    // CPUID family / model / stepping of the generation.
    let cpuid = match cfg.generation {
        Generation::Milan => [0x19, 0x01, 0x01],
        Generation::Genoa => [0x19, 0x11, 0x01],
        Generation::Turin => [0x1A, 0x02, 0x01],
    };
    r[0x188..0x18B].copy_from_slice(&cpuid);
    r[0x1A0..0x1E0].copy_from_slice(&cfg.reported_chip_id()?);
    r[0x1E0..0x1E8].copy_from_slice(&tcb);
    // CURRENT and COMMITTED firmware version 1.55.21 (build, minor, major).
    r[0x1E8..0x1EB].copy_from_slice(&[21, 55, 1]);
    r[0x1EC..0x1EF].copy_from_slice(&[21, 55, 1]);
    r[0x1F0..0x1F8].copy_from_slice(&tcb);
    sign_report(&mut r, vcek)?;
    Ok(r)
}

pub fn sign_report(report: &mut [u8], key: &p384::ecdsa::SigningKey) -> Result<(), String> {
    let digest = Sha384::digest(&report[..SIGNED_LEN]);
    let sig: p384::ecdsa::Signature = key
        .sign_prehash(&digest)
        .map_err(|e| format!("report signature: {e}"))?;
    let (r, s) = sig.split_bytes();
    report[OFF_SIG_R..OFF_SIG_R + 72].fill(0);
    report[OFF_SIG_S..OFF_SIG_S + 72].fill(0);
    for (i, b) in r.iter().rev().enumerate() {
        report[OFF_SIG_R + i] = *b;
    }
    for (i, b) in s.iter().rev().enumerate() {
        report[OFF_SIG_S + i] = *b;
    }
    Ok(())
}

/// Verifies the ECDSA P-384 signature over the raw bytes 0x000–0x29F (r and s little-endian,
/// 48 significant bytes of each 72-byte field).
pub fn verify_report_signature(
    report: &[u8],
    key: &p384::ecdsa::VerifyingKey,
) -> Result<(), String> {
    if report.len() != REPORT_LEN {
        return Err(format!(
            "report is {} bytes, expected {REPORT_LEN}",
            report.len()
        ));
    }
    let mut r = [0u8; 48];
    let mut s = [0u8; 48];
    for i in 0..48 {
        r[47 - i] = report[OFF_SIG_R + i];
        s[47 - i] = report[OFF_SIG_S + i];
    }
    if report[OFF_SIG_R + 48..OFF_SIG_R + 72]
        .iter()
        .any(|b| *b != 0)
        || report[OFF_SIG_S + 48..OFF_SIG_S + 72]
            .iter()
            .any(|b| *b != 0)
    {
        return Err("report signature has non-zero bytes beyond the P-384 scalar size".into());
    }
    let sig = p384::ecdsa::Signature::from_scalars(r, s)
        .map_err(|_| "report signature is not a valid P-384 signature".to_string())?;
    let digest = Sha384::digest(&report[..SIGNED_LEN]);
    key.verify_prehash(&digest, &sig)
        .map_err(|_| "report signature does not verify with the VCEK public key".to_string())
}

/// Processor generation; decides the TCB_VERSION layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Generation {
    #[default]
    Milan,
    Genoa,
    Turin,
}

/// Decoded TCB_VERSION.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcbVersion {
    pub fmc: Option<u8>,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

pub fn decode_tcb(bytes: &[u8], generation: Generation) -> TcbVersion {
    match generation {
        Generation::Turin => TcbVersion {
            fmc: Some(bytes[0]),
            bootloader: bytes[1],
            tee: bytes[2],
            snp: bytes[3],
            microcode: bytes[7],
        },
        _ => TcbVersion {
            fmc: None,
            bootloader: bytes[0],
            tee: bytes[1],
            snp: bytes[6],
            microcode: bytes[7],
        },
    }
}

/// Read-only view of a report's fields.
pub struct Report<'a>(pub &'a [u8]);

impl Report<'_> {
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.0[off..off + 4].try_into().unwrap_or_default())
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.0[off..off + 8].try_into().unwrap_or_default())
    }
    pub fn version(&self) -> u32 {
        self.u32_at(0x00)
    }
    pub fn guest_svn(&self) -> u32 {
        self.u32_at(0x04)
    }
    pub fn policy(&self) -> u64 {
        self.u64_at(0x08)
    }
    pub fn family_id(&self) -> &[u8] {
        &self.0[0x10..0x20]
    }
    pub fn image_id(&self) -> &[u8] {
        &self.0[0x20..0x30]
    }
    pub fn vmpl(&self) -> u32 {
        self.u32_at(0x30)
    }
    pub fn signature_algo(&self) -> u32 {
        self.u32_at(0x34)
    }
    pub fn key_info(&self) -> u32 {
        self.u32_at(0x48)
    }
    pub fn report_data(&self) -> &[u8] {
        &self.0[0x50..0x90]
    }
    pub fn measurement(&self) -> &[u8] {
        &self.0[0x90..0xC0]
    }
    pub fn host_data(&self) -> &[u8] {
        &self.0[0xC0..0xE0]
    }
    pub fn id_key_digest(&self) -> &[u8] {
        &self.0[0xE0..0x110]
    }
    pub fn author_key_digest(&self) -> &[u8] {
        &self.0[0x110..0x140]
    }
    pub fn report_id(&self) -> &[u8] {
        &self.0[0x140..0x160]
    }
    pub fn reported_tcb(&self) -> &[u8] {
        &self.0[0x180..0x188]
    }
    pub fn cpuid(&self) -> Option<(u8, u8)> {
        (self.version() >= 3).then(|| (self.0[0x188], self.0[0x189]))
    }
    pub fn chip_id(&self) -> &[u8] {
        &self.0[0x1A0..0x1E0]
    }

    /// Generation from CPUID (v3+), else from the VCEK product name, else the CHIP_ID shape
    /// (Turin fills only 8 bytes).
    pub fn generation(&self, product_name: Option<&str>) -> Generation {
        if let Some((family, model)) = self.cpuid() {
            match (family, model) {
                (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => return Generation::Genoa,
                (0x19, _) => return Generation::Milan,
                (0x1A, _) => return Generation::Turin,
                _ => {}
            }
        }
        if let Some(name) = product_name {
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("genoa") {
                return Generation::Genoa;
            }
            if lower.starts_with("turin") {
                return Generation::Turin;
            }
            if lower.starts_with("milan") {
                return Generation::Milan;
            }
        }
        let chip = self.chip_id();
        if chip[8..].iter().all(|b| *b == 0) && chip[..8].iter().any(|b| *b != 0) {
            Generation::Turin
        } else {
            Generation::Milan
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_report_verifies_and_bit_flip_fails() {
        let key = p384::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let cfg = PlatformConfig::generate();
        let rd = [7u8; 64];
        let mut report = build_report(&cfg, &rd, &key).unwrap();
        assert_eq!(report.len(), REPORT_LEN);
        verify_report_signature(&report, key.verifying_key()).unwrap();
        let view = Report(&report);
        assert_eq!(view.version(), 3);
        assert_eq!(view.report_data(), &rd);
        assert_eq!(view.host_data(), &cfg.host_data().unwrap());
        assert_eq!(view.policy() & POLICY_DEBUG, 0);
        assert_eq!(view.generation(None), Generation::Milan);
        let tcb = decode_tcb(view.reported_tcb(), Generation::Milan);
        assert_eq!((tcb.bootloader, tcb.snp, tcb.microcode), (3, 8, 115));
        report[0x95] ^= 1;
        assert!(verify_report_signature(&report, key.verifying_key()).is_err());
    }

    #[test]
    fn turin_and_genoa_reports() {
        let key = p384::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let mut cfg = PlatformConfig::generate();
        cfg.generation = Generation::Turin;
        assert!(cfg.validate().unwrap_err().contains("fmc"));
        cfg.tcb.fmc = Some(2);
        cfg.validate().unwrap();
        let report = build_report(&cfg, &[0u8; 64], &key).unwrap();
        let view = Report(&report);
        assert_eq!(view.generation(None), Generation::Turin);
        assert!(view.chip_id()[8..].iter().all(|b| *b == 0));
        let tcb = decode_tcb(view.reported_tcb(), Generation::Turin);
        assert_eq!(
            (tcb.fmc, tcb.bootloader, tcb.snp, tcb.microcode),
            (Some(2), 3, 8, 115)
        );
        cfg.generation = Generation::Genoa;
        cfg.tcb.fmc = None;
        let report = build_report(&cfg, &[0u8; 64], &key).unwrap();
        assert_eq!(Report(&report).generation(None), Generation::Genoa);
    }

    #[test]
    fn turin_tcb_layout() {
        let t = decode_tcb(&[1, 2, 3, 4, 0, 0, 0, 9], Generation::Turin);
        assert_eq!(
            (t.fmc, t.bootloader, t.tee, t.snp, t.microcode),
            (Some(1), 2, 3, 4, 9)
        );
    }

    #[test]
    fn platform_config_rejects_bad_hex() {
        let mut cfg = PlatformConfig::generate();
        cfg.validate().unwrap();
        cfg.measurement = "abcd".into();
        assert!(cfg.validate().unwrap_err().contains("measurement"));
    }
}
