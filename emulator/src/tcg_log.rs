//! The TCG PC Client crypto-agile event log (TCG PC Client Platform Firmware Profile, "PFP",
//! event logging): what a guest sends as `TcgLogs` in AzureGuest evidence, and what the simulated vTPM's
//! firmware writes. Written here from the PFP's structure definitions:
//!
//! * the first record is a TCG_PCR_EVENT in the old SHA-1 layout (PCRIndex, EventType
//!   EV_NO_ACTION, 20 zero digest bytes, EventSize, Event) whose event is TCG_EfiSpecIDEvent:
//!   signature `Spec ID Event03\0`, platform class, spec version 2.0, uintn size, the digest
//!   algorithms (id, size) of every later record, vendor info;
//! * then TCG_PCR_EVENT2 records: PCRIndex, EventType, TPML_DIGEST_VALUES (count, then
//!   (algId, digest) pairs sized by the header), EventSize, Event.
//!
//! Every integer is little-endian. EV_NO_ACTION records extend nothing; the `StartupLocality`
//! one sets PCR 0's reset value to the locality of TPM2_Startup.
//!
//! The parser reads untrusted bytes (MAA's `TcgLogs`): every read is bounds-checked, sizes and
//! counts are capped, and event data and digests are borrowed, never copied: what it allocates
//! is bounded by the caps.

use sha2::{Digest, Sha256};

pub const EV_NO_ACTION: u32 = 0x0000_0003;
pub const EV_SEPARATOR: u32 = 0x0000_0004;
pub const EV_S_CRTM_VERSION: u32 = 0x0000_0008;
pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
pub const EV_EFI_ACTION: u32 = 0x8000_0007;
pub const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000A;
pub const EV_EFI_VARIABLE_BOOT2: u32 = 0x8000_000C;
pub const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00E0;

pub const TPM_ALG_SHA1: u16 = 0x0004;
pub const TPM_ALG_SHA256: u16 = 0x000B;
pub const TPM_ALG_SHA384: u16 = 0x000C;
pub const TPM_ALG_SHA512: u16 = 0x000D;

pub const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
pub const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";

/// Larger than any real boot log (a few KiB on Linux, a few hundred KiB on Windows); the
/// module sends at most this much too.
pub const MAX_LOG_LEN: usize = 4 << 20;
/// More records than any real boot makes.
pub const MAX_EVENTS: usize = 65_536;
/// TPM 2.0 defines fewer hash algorithms than this.
pub const MAX_ALGORITHMS: usize = 16;
/// The largest digest of any TPM hash algorithm (SHA-512, SHA3-512).
const MAX_DIGEST_LEN: usize = 64;
/// PCRs of a PC Client TPM.
pub const PCR_COUNT: usize = 24;

/// One TCG_PCR_EVENT2 record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub pcr: u32,
    pub event_type: u32,
    /// (algId, digest), in the record's order.
    pub digests: Vec<(u16, &'a [u8])>,
    pub data: &'a [u8],
}

/// A parsed crypto-agile event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog<'a> {
    /// (algId, digest size) from the Spec ID event.
    pub algorithms: Vec<(u16, u16)>,
    pub events: Vec<Event<'a>>,
}

/// A little-endian reader over untrusted bytes: every read is bounds-checked.
struct Le<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Le<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| format!("{what} is truncated at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn done(&self) -> bool {
        self.at == self.bytes.len()
    }
}

/// The digest size the TPM defines for `alg`, for the algorithms whose size is fixed.
fn known_size(alg: u16) -> Option<u16> {
    match alg {
        TPM_ALG_SHA1 => Some(20),
        TPM_ALG_SHA256 => Some(32),
        TPM_ALG_SHA384 => Some(48),
        TPM_ALG_SHA512 => Some(64),
        _ => None,
    }
}

/// TCG_EfiSpecIDEvent: the algorithms and their digest sizes.
fn parse_spec_id(data: &[u8]) -> Result<Vec<(u16, u16)>, String> {
    let what = "the Spec ID event";
    let mut r = Le { bytes: data, at: 0 };
    if r.take(16, what)? != SPEC_ID_SIGNATURE {
        return Err(
            "the first event is not a \"Spec ID Event03\" header (not a crypto-agile log)".into(),
        );
    }
    r.u32(what)?; // platformClass
    let (minor, major, _errata) = (r.u8(what)?, r.u8(what)?, r.u8(what)?);
    if (major, minor) != (2, 0) {
        return Err(format!(
            "the Spec ID event says spec version {major}.{minor}, not 2.0"
        ));
    }
    let uintn = r.u8(what)?;
    if !matches!(uintn, 1 | 2) {
        return Err(format!(
            "the Spec ID event's uintnSize {uintn} is not 1 or 2"
        ));
    }
    let count = r.u32(what)? as usize;
    if count == 0 || count > MAX_ALGORITHMS {
        return Err(format!(
            "the Spec ID event lists {count} digest algorithms (1..={MAX_ALGORITHMS})"
        ));
    }
    let mut algorithms: Vec<(u16, u16)> = Vec::with_capacity(count);
    for _ in 0..count {
        let (alg, size) = (r.u16(what)?, r.u16(what)?);
        if size == 0
            || usize::from(size) > MAX_DIGEST_LEN
            || known_size(alg).is_some_and(|s| s != size)
        {
            return Err(format!(
                "the Spec ID event gives algorithm 0x{alg:04x} a digest size of {size}"
            ));
        }
        if algorithms.iter().any(|(a, _)| *a == alg) {
            return Err(format!(
                "the Spec ID event lists algorithm 0x{alg:04x} twice"
            ));
        }
        algorithms.push((alg, size));
    }
    let vendor = r.u8(what)?;
    r.take(usize::from(vendor), what)?;
    if !r.done() {
        return Err(format!(
            "the Spec ID event has {} bytes after its vendor info",
            data.len() - r.at
        ));
    }
    Ok(algorithms)
}

impl<'a> EventLog<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<EventLog<'a>, String> {
        if bytes.len() > MAX_LOG_LEN {
            return Err(format!(
                "the event log has {} bytes, more than any boot makes ({MAX_LOG_LEN})",
                bytes.len()
            ));
        }
        let mut r = Le { bytes, at: 0 };
        // The header record, in the SHA-1 layout.
        let what = "the event log's first record";
        let pcr = r.u32(what)?;
        let event_type = r.u32(what)?;
        let digest = r.take(20, what)?;
        if pcr != 0 || event_type != EV_NO_ACTION || digest.iter().any(|b| *b != 0) {
            return Err(
                "the first record is not the EV_NO_ACTION Spec ID header of a crypto-agile log"
                    .into(),
            );
        }
        let size = r.u32(what)? as usize;
        let algorithms = parse_spec_id(r.take(size, what)?)?;

        let mut events = Vec::new();
        while !r.done() {
            if events.len() == MAX_EVENTS {
                return Err(format!("the event log has more than {MAX_EVENTS} events"));
            }
            let n = events.len() + 1;
            let start = r.at;
            let what = format!("event {n} (at byte {start})");
            let pcr = r.u32(&what)?;
            let event_type = r.u32(&what)?;
            let count = r.u32(&what)? as usize;
            if count > algorithms.len() {
                return Err(format!(
                    "{what} has {count} digests, the header lists {} algorithms",
                    algorithms.len()
                ));
            }
            let mut digests: Vec<(u16, &[u8])> = Vec::with_capacity(count);
            for _ in 0..count {
                let alg = r.u16(&what)?;
                let size = algorithms
                    .iter()
                    .find(|(a, _)| *a == alg)
                    .map(|(_, s)| usize::from(*s))
                    .ok_or_else(|| {
                        format!("{what} has a digest of algorithm 0x{alg:04x}, not in the header")
                    })?;
                if digests.iter().any(|(a, _)| *a == alg) {
                    return Err(format!("{what} has two digests of algorithm 0x{alg:04x}"));
                }
                digests.push((alg, r.take(size, &what)?));
            }
            let size = r.u32(&what)? as usize;
            let data = r.take(size, &what)?;
            events.push(Event {
                pcr,
                event_type,
                digests,
                data,
            });
        }
        Ok(EventLog { algorithms, events })
    }

    /// The SHA-256 PCR values the log replays to: every PCR starts at zero (PCR 0 at the
    /// StartupLocality, when the log has one) and is extended with each record's SHA-256
    /// digest, EV_NO_ACTION records excepted.
    pub fn replay_sha256(&self) -> Result<[[u8; 32]; PCR_COUNT], String> {
        if !self.algorithms.iter().any(|(a, _)| *a == TPM_ALG_SHA256) {
            return Err(
                "the event log has no SHA-256 digests (its header lists no SHA-256)".into(),
            );
        }
        let mut pcrs = [[0u8; 32]; PCR_COUNT];
        let mut pcr0_touched = false;
        for (i, e) in self.events.iter().enumerate() {
            let n = i + 1;
            if e.event_type == EV_NO_ACTION {
                if e.pcr == 0 && e.data.starts_with(STARTUP_LOCALITY_SIGNATURE) {
                    // Only before PCR 0 is first extended or set: it is its reset value.
                    if e.data.len() != 17 {
                        return Err(format!(
                            "event {n}: a StartupLocality event of {} bytes (17)",
                            e.data.len()
                        ));
                    }
                    let locality = e.data[16];
                    if pcr0_touched {
                        return Err(format!(
                            "event {n}: a StartupLocality event after PCR 0 was extended or set"
                        ));
                    }
                    if locality > 4 {
                        return Err(format!("event {n}: StartupLocality {locality} (0..=4)"));
                    }
                    pcrs[0][31] = locality;
                    pcr0_touched = true;
                }
                continue;
            }
            let index = usize::try_from(e.pcr)
                .ok()
                .filter(|p| *p < PCR_COUNT)
                .ok_or_else(|| format!("event {n} extends PCR {}, not one of 0..23", e.pcr))?;
            let digest = e
                .digests
                .iter()
                .find(|(a, _)| *a == TPM_ALG_SHA256)
                .map(|(_, d)| *d)
                .ok_or_else(|| format!("event {n} extends PCR {index} without a SHA-256 digest"))?;
            let mut h = Sha256::new();
            h.update(pcrs[index]);
            h.update(digest);
            pcrs[index] = h.finalize().into();
            pcr0_touched |= index == 0;
        }
        Ok(pcrs)
    }
}

// ---- writing a log ---------------------------------------------------------------------------

/// The header record (TCG_PCR_EVENT carrying TCG_EfiSpecIDEvent) for these algorithms.
pub fn spec_id_record(algorithms: &[(u16, u16)]) -> Vec<u8> {
    let mut spec = SPEC_ID_SIGNATURE.to_vec();
    spec.extend_from_slice(&0u32.to_le_bytes()); // platformClass: client
    spec.extend_from_slice(&[0, 2, 0, 2]); // version 2.0, errata 0, uintnSize 2 (UINT64)
    spec.extend_from_slice(&(algorithms.len() as u32).to_le_bytes());
    for (alg, size) in algorithms {
        spec.extend_from_slice(&alg.to_le_bytes());
        spec.extend_from_slice(&size.to_le_bytes());
    }
    spec.push(0); // no vendor info
    let mut out = 0u32.to_le_bytes().to_vec();
    out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
    out.extend_from_slice(&[0; 20]);
    out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    out.extend_from_slice(&spec);
    out
}

/// One TCG_PCR_EVENT2 record.
pub fn record(pcr: u32, event_type: u32, digests: &[(u16, &[u8])], data: &[u8]) -> Vec<u8> {
    let mut out = pcr.to_le_bytes().to_vec();
    out.extend_from_slice(&event_type.to_le_bytes());
    out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
    for (alg, digest) in digests {
        out.extend_from_slice(&alg.to_le_bytes());
        out.extend_from_slice(digest);
    }
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// One measurement of the simulated boot.
#[derive(Debug, Clone)]
pub struct BootEvent {
    pub pcr: u32,
    pub event_type: u32,
    pub data: Vec<u8>,
    /// What the firmware hashes into the PCR when it is not the event data itself: the
    /// (simulated) firmware volume or image that a blob or application event only describes,
    /// as the PFP defines their digests.
    pub image: Option<Vec<u8>>,
}

impl BootEvent {
    pub fn measured(&self) -> &[u8] {
        self.image.as_deref().unwrap_or(&self.data)
    }
}

/// The log of `events` with SHA-256 digests only: the simulated vTPM's one bank.
pub fn encode(events: &[BootEvent]) -> Vec<u8> {
    let mut out = spec_id_record(&[(TPM_ALG_SHA256, 32)]);
    for e in events {
        let digest = Sha256::digest(e.measured());
        out.extend(record(
            e.pcr,
            e.event_type,
            &[(TPM_ALG_SHA256, &digest)],
            &e.data,
        ));
    }
    out
}

// ---- the simulated boot ------------------------------------------------------------------------

/// An EFI_GUID in its in-memory (mixed-endian) layout.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let (a, b, c) = (d1.to_le_bytes(), d2.to_le_bytes(), d3.to_le_bytes());
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

const EFI_GLOBAL_VARIABLE: [u8; 16] = guid(
    0x8BE4_DF61,
    0x93CA,
    0x11D2,
    [0xAA, 0x0D, 0x00, 0xE0, 0x98, 0x03, 0x2B, 0x8C],
);
const EFI_IMAGE_SECURITY_DATABASE: [u8; 16] = guid(
    0xD719_B2CB,
    0x3D3A,
    0x4596,
    [0xA3, 0xBC, 0xDA, 0xD0, 0x0E, 0x67, 0x65, 0x6F],
);
const EFI_CERT_SHA256: [u8; 16] = guid(
    0xC1C4_1626,
    0x504C,
    0x4092,
    [0xAC, 0xA9, 0x41, 0xF9, 0x36, 0x93, 0x43, 0x28],
);
/// The owner of the simulated Secure Boot entries.
const SIMULATED_OWNER: [u8; 16] = guid(0x77FA_9ABD, 0x0359, 0x4D32, *b"skr-emu\0");

/// UCS-2 with the terminating NUL, as UEFI stores strings.
fn ucs2(text: &str) -> Vec<u8> {
    text.encode_utf16()
        .chain([0])
        .flat_map(|c| c.to_le_bytes())
        .collect()
}

/// UEFI_VARIABLE_DATA: VariableName GUID, UnicodeNameLength and VariableDataLength (UINT64),
/// the name (UCS-2, no NUL), the data.
fn variable(vendor: [u8; 16], name: &str, data: &[u8]) -> Vec<u8> {
    let name: Vec<u16> = name.encode_utf16().collect();
    let mut out = vendor.to_vec();
    out.extend_from_slice(&(name.len() as u64).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend(name.iter().flat_map(|c| c.to_le_bytes()));
    out.extend_from_slice(data);
    out
}

/// Deterministic stand-in bytes for a firmware volume, a key or an image called `label`.
fn simulated(label: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u32;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(b"skr-emulator simulated boot\0");
        h.update(label.as_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// EFI_SIGNATURE_DATA of a SHA-256 entry: owner GUID, hash.
fn sha256_signature(label: &str) -> Vec<u8> {
    let mut out = SIMULATED_OWNER.to_vec();
    out.extend_from_slice(&Sha256::digest(simulated(label, 64)));
    out
}

/// An EFI_SIGNATURE_LIST of SHA-256 entries (no signature header).
fn signature_list(entries: &[Vec<u8>]) -> Vec<u8> {
    let size = 16 + 32;
    let mut out = EFI_CERT_SHA256.to_vec();
    out.extend_from_slice(&((28 + entries.len() * size) as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // SignatureHeaderSize
    out.extend_from_slice(&(size as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

/// A media file-path device path to `path`, then the end node.
fn file_device_path(path: &str) -> Vec<u8> {
    let name = ucs2(path);
    let mut out = vec![0x04, 0x04]; // MEDIA_DEVICE_PATH, MEDIA_FILEPATH_DP
    out.extend_from_slice(&((4 + name.len()) as u16).to_le_bytes());
    out.extend_from_slice(&name);
    out.extend_from_slice(&[0x7F, 0xFF, 0x04, 0x00]); // end of the device path
    out
}

/// UEFI_PLATFORM_FIRMWARE_BLOB2: description, base, length.
fn firmware_blob(description: &str, base: u64, len: usize) -> Vec<u8> {
    let mut out = vec![description.len() as u8];
    out.extend_from_slice(description.as_bytes());
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out
}

/// UEFI_IMAGE_LOAD_EVENT: location, length, link-time address, device path.
fn image_load(location: u64, len: usize, path: &str) -> Vec<u8> {
    let dp = file_device_path(path);
    let mut out = location.to_le_bytes().to_vec();
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(dp.len() as u64).to_le_bytes());
    out.extend_from_slice(&dp);
    out
}

/// The simulated vTPM's boot, in order: a UEFI firmware (S-CRTM version and two firmware
/// volumes in PCR 0), the boot variables (PCR 1), Secure Boot on with its keys (PCR 7), the
/// separators of PCRs 0–7, shim and GRUB (PCR 4) verified by a db entry (PCR 7), and
/// ExitBootServices (PCR 5). Deterministic: every start replays to the same PCR values.
/// Blob and application events measure the simulated volume or image they describe; every
/// other event measures its own data.
pub fn simulated_boot() -> Vec<BootEvent> {
    let ev = |pcr: u32, event_type: u32, data: Vec<u8>| BootEvent {
        pcr,
        event_type,
        data,
        image: None,
    };
    let db_entry = sha256_signature("db: shim signer");
    let mut events = vec![ev(
        0,
        EV_S_CRTM_VERSION,
        ucs2("skr-emulator simulated UEFI 1.0"),
    )];
    for (name, base, len) in [
        ("PEIFV", 0xFFC8_4000u64, 0x4000),
        ("DXEFV", 0xFF00_0000, 0x8000),
    ] {
        events.push(BootEvent {
            image: Some(simulated(name, len)),
            ..ev(
                0,
                EV_EFI_PLATFORM_FIRMWARE_BLOB2,
                firmware_blob(name, base, len),
            )
        });
    }
    for (vendor, name, data) in [
        (EFI_GLOBAL_VARIABLE, "SecureBoot", vec![1u8]),
        (
            EFI_GLOBAL_VARIABLE,
            "PK",
            signature_list(&[sha256_signature("PK")]),
        ),
        (
            EFI_GLOBAL_VARIABLE,
            "KEK",
            signature_list(&[sha256_signature("KEK")]),
        ),
        (
            EFI_IMAGE_SECURITY_DATABASE,
            "db",
            signature_list(std::slice::from_ref(&db_entry)),
        ),
        (
            EFI_IMAGE_SECURITY_DATABASE,
            "dbx",
            signature_list(&[sha256_signature("dbx: revoked")]),
        ),
    ] {
        events.push(ev(
            7,
            EV_EFI_VARIABLE_DRIVER_CONFIG,
            variable(vendor, name, &data),
        ));
    }
    // Boot0000: EFI_LOAD_OPTION (active), its description and file path.
    let path = file_device_path("\\EFI\\ubuntu\\shimx64.efi");
    let mut boot0000 = 1u32.to_le_bytes().to_vec();
    boot0000.extend_from_slice(&(path.len() as u16).to_le_bytes());
    boot0000.extend_from_slice(&ucs2("ubuntu"));
    boot0000.extend_from_slice(&path);
    events.push(ev(
        1,
        EV_EFI_VARIABLE_BOOT2,
        variable(EFI_GLOBAL_VARIABLE, "BootOrder", &[0, 0]),
    ));
    events.push(ev(
        1,
        EV_EFI_VARIABLE_BOOT2,
        variable(EFI_GLOBAL_VARIABLE, "Boot0000", &boot0000),
    ));
    events.push(ev(
        4,
        EV_EFI_ACTION,
        b"Calling EFI Application from Boot Option".to_vec(),
    ));
    for pcr in 0..8 {
        events.push(ev(pcr, EV_SEPARATOR, vec![0; 4]));
    }
    events.push(ev(
        7,
        EV_EFI_VARIABLE_AUTHORITY,
        variable(EFI_IMAGE_SECURITY_DATABASE, "db", &db_entry),
    ));
    for (name, at, len) in [
        ("\\EFI\\ubuntu\\shimx64.efi", 0x7E00_0000u64, 0x3000),
        ("\\EFI\\ubuntu\\grubx64.efi", 0x7D00_0000, 0x5000),
    ] {
        events.push(BootEvent {
            image: Some(simulated(name, len)),
            ..ev(
                4,
                EV_EFI_BOOT_SERVICES_APPLICATION,
                image_load(at, len, name),
            )
        });
    }
    for action in [
        "Exit Boot Services Invocation",
        "Exit Boot Services Returned with Success",
    ] {
        events.push(ev(5, EV_EFI_ACTION, action.as_bytes().to_vec()));
    }
    events
}

/// The SHA-256 PCR values a TPM holds after `events` (extended directly, not through a log).
#[cfg(test)]
pub fn extended_sha256(events: &[BootEvent]) -> [[u8; 32]; PCR_COUNT] {
    let mut pcrs = [[0u8; 32]; PCR_COUNT];
    for e in events {
        let p = e.pcr as usize;
        let mut h = Sha256::new();
        h.update(pcrs[p]);
        h.update(Sha256::digest(e.measured()));
        pcrs[p] = h.finalize().into();
    }
    pcrs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emulator_log() -> Vec<u8> {
        encode(&simulated_boot())
    }

    /// The log of `events` with a SHA-1 and a SHA-256 digest each (or SHA-1 only).
    fn two_bank_log(events: &[BootEvent], with_sha256: bool) -> Vec<u8> {
        let mut algorithms = vec![(TPM_ALG_SHA1, 20)];
        if with_sha256 {
            algorithms.push((TPM_ALG_SHA256, 32));
        }
        let mut out = spec_id_record(&algorithms);
        for e in events {
            let sha1 = sha1::Sha1::digest(e.measured());
            let sha256 = Sha256::digest(e.measured());
            let digests = [(TPM_ALG_SHA1, &sha1[..]), (TPM_ALG_SHA256, &sha256[..])];
            let n = algorithms.len();
            out.extend(record(e.pcr, e.event_type, &digests[..n], &e.data));
        }
        out
    }

    /// The offset in `log` of the SHA-256 digest of event `n` (1-based).
    fn sha256_digest_offset(log: &[u8], n: usize) -> usize {
        let parsed = EventLog::parse(log).unwrap();
        let (_, d) = parsed.events[n - 1]
            .digests
            .iter()
            .find(|(a, _)| *a == TPM_ALG_SHA256)
            .unwrap();
        d.as_ptr() as usize - log.as_ptr() as usize
    }

    fn startup_locality(locality: u8, algorithms: &[(u16, u16)]) -> Vec<u8> {
        let zeros = [0u8; 64];
        let digests: Vec<(u16, &[u8])> = algorithms
            .iter()
            .map(|(a, s)| (*a, &zeros[..usize::from(*s)]))
            .collect();
        let mut data = STARTUP_LOCALITY_SIGNATURE.to_vec();
        data.push(locality);
        record(0, EV_NO_ACTION, &digests, &data)
    }

    #[test]
    fn the_emulators_log_replays_to_the_pcrs_it_extended() {
        let boot = simulated_boot();
        let log = emulator_log();
        let parsed = EventLog::parse(&log).unwrap();
        assert_eq!(parsed.algorithms, vec![(TPM_ALG_SHA256, 32)]);
        assert_eq!(parsed.events.len(), boot.len());
        let replayed = parsed.replay_sha256().unwrap();
        assert_eq!(replayed, extended_sha256(&boot));
        // PCRs 0–7 measured, the others untouched; PCRs 2, 3, 6 hold only their separator.
        assert!(replayed[..8].iter().all(|p| *p != [0; 32]));
        assert!(replayed[8..].iter().all(|p| *p == [0; 32]));
        // The value every PC Client TPM shows for a PCR holding only its separator (what
        // tpm2_eventlog and real machines print for PCRs 2, 3 and 6).
        assert_eq!(
            hex::encode(replayed[2]),
            "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"
        );
        // Events other than blobs and images measure their own data (PFP), so a verifier can
        // check them from the log alone.
        for (e, parsed) in boot.iter().zip(&parsed.events) {
            assert_eq!(parsed.data, e.data.as_slice());
            if e.image.is_none() {
                assert_eq!(parsed.digests[0].1, &Sha256::digest(&e.data)[..]);
            }
        }
    }

    #[test]
    fn a_two_bank_log_replays_its_sha256_bank() {
        let boot = simulated_boot();
        let log = two_bank_log(&boot, true);
        let parsed = EventLog::parse(&log).unwrap();
        assert_eq!(
            parsed.algorithms,
            vec![(TPM_ALG_SHA1, 20), (TPM_ALG_SHA256, 32)]
        );
        assert_eq!(parsed.events[0].digests[0].1.len(), 20);
        assert_eq!(parsed.replay_sha256().unwrap(), extended_sha256(&boot));
        // Without a SHA-256 bank there is nothing to replay.
        let sha1_only = two_bank_log(&boot, false);
        let e = EventLog::parse(&sha1_only)
            .unwrap()
            .replay_sha256()
            .unwrap_err();
        assert!(e.contains("no SHA-256"), "{e}");
    }

    #[test]
    fn a_changed_digest_changes_the_replayed_pcr() {
        let boot = simulated_boot();
        let mut log = emulator_log();
        // The S-CRTM version (PCR 0) and the separator of PCR 3.
        let separator_3 = boot
            .iter()
            .position(|e| e.event_type == EV_SEPARATOR && e.pcr == 3)
            .unwrap()
            + 1;
        for (n, pcr) in [(1, 0), (separator_3, 3)] {
            let at = sha256_digest_offset(&log, n);
            log[at] ^= 1;
            let replayed = EventLog::parse(&log).unwrap().replay_sha256().unwrap();
            let expected = extended_sha256(&boot);
            assert_ne!(replayed[pcr], expected[pcr]);
            log[at] ^= 1;
        }
    }

    #[test]
    fn truncations_and_trailing_bytes_are_refused() {
        let log = emulator_log();
        let header_len = spec_id_record(&[(TPM_ALG_SHA256, 32)]).len();
        // Every cut inside a record, header included, is refused; a cut between records is a
        // shorter, valid log.
        let mut boundaries = vec![header_len];
        let mut at = header_len;
        for e in simulated_boot() {
            at += 4 + 4 + 4 + 2 + 32 + 4 + e.data.len();
            boundaries.push(at);
        }
        assert_eq!(at, log.len());
        for cut in 0..log.len() {
            let r = EventLog::parse(&log[..cut]);
            assert_eq!(r.is_ok(), boundaries.contains(&cut), "cut at {cut}: {r:?}");
        }
        let e = EventLog::parse(&log[..log.len() - 1]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let mut longer = log.clone();
        longer.extend_from_slice(&[0, 0, 0]);
        assert!(EventLog::parse(&longer).is_err());
    }

    #[test]
    fn wrong_spec_id_headers_are_refused() {
        let good = spec_id_record(&[(TPM_ALG_SHA256, 32)]);
        // Offsets in the header record: event data at 32; in it the signature (0..16),
        // version at 20..22, uintnSize 23, count 24..28, the algorithm list from 28.
        for (what, at, value, expected) in [
            ("signature", 32, b'X', "Spec ID Event03"),
            ("spec version", 32 + 21, 1, "spec version"),
            ("uintn size", 32 + 23, 3, "uintnSize"),
            ("SHA-256 size", 32 + 30, 20, "digest size"),
            ("PCR index", 0, 1, "first record"),
            ("event type", 4, 4, "first record"),
            ("SHA-1 digest", 10, 1, "first record"),
        ] {
            let mut bad = good.clone();
            bad[at] = value;
            let e = EventLog::parse(&bad).unwrap_err();
            assert!(e.contains(expected), "{what}: {e}");
        }
        // A SHA-1-format log (its first record an ordinary measurement).
        let mut sha1_log = record(0, EV_SEPARATOR, &[], &[0; 4]);
        sha1_log.truncate(8);
        sha1_log.extend_from_slice(&Sha256::digest([0u8; 4])[..20]);
        sha1_log.extend_from_slice(&[4, 0, 0, 0, 0, 0, 0, 0]);
        assert!(EventLog::parse(&sha1_log).is_err());
        // The same algorithm twice; vendor bytes announced but missing.
        let twice = spec_id_record(&[(TPM_ALG_SHA256, 32), (TPM_ALG_SHA256, 32)]);
        assert!(EventLog::parse(&twice).unwrap_err().contains("twice"));
        let mut vendor = good.clone();
        let last = vendor.len() - 1;
        vendor[last] = 5;
        assert!(EventLog::parse(&vendor).unwrap_err().contains("truncated"));
        assert!(EventLog::parse(&[]).is_err());
    }

    #[test]
    fn absurd_sizes_and_counts_are_refused() {
        let header = spec_id_record(&[(TPM_ALG_SHA256, 32)]);
        // 2^32 - 1 algorithms in the header.
        let mut many = header.clone();
        many[32 + 24..32 + 28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(EventLog::parse(&many)
            .unwrap_err()
            .contains("digest algorithms"));
        // A digest count above the header's algorithms, and one of 2^32 - 1.
        for count in [2u32, u32::MAX] {
            let mut log = header.clone();
            let mut r = record(0, EV_SEPARATOR, &[(TPM_ALG_SHA256, &[0; 32])], &[0; 4]);
            r[8..12].copy_from_slice(&count.to_le_bytes());
            log.extend(r);
            assert!(EventLog::parse(&log).unwrap_err().contains("digests"));
        }
        // An event size of 4 GiB, an algorithm the header does not list, a 65-byte digest.
        let mut log = header.clone();
        let mut r = record(0, EV_SEPARATOR, &[(TPM_ALG_SHA256, &[0; 32])], &[0; 4]);
        let size_at = r.len() - 8;
        r[size_at..size_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        log.extend(r);
        assert!(EventLog::parse(&log).unwrap_err().contains("truncated"));
        let mut log = header.clone();
        log.extend(record(
            0,
            EV_SEPARATOR,
            &[(TPM_ALG_SHA384, &[0; 48])],
            &[0; 4],
        ));
        assert!(EventLog::parse(&log)
            .unwrap_err()
            .contains("not in the header"));
        let big = spec_id_record(&[(0x00ff, 65)]);
        assert!(EventLog::parse(&big).unwrap_err().contains("digest size"));
        // Too many events, too many bytes.
        let mut log = header.clone();
        let empty = record(9, EV_NO_ACTION, &[], &[]);
        for _ in 0..=MAX_EVENTS {
            log.extend_from_slice(&empty);
        }
        assert!(EventLog::parse(&log).unwrap_err().contains("more than"));
        let huge = vec![0u8; MAX_LOG_LEN + 1];
        assert!(EventLog::parse(&huge).unwrap_err().contains("bytes"));
        // A measurement of PCR 24 or without a SHA-256 digest cannot be replayed.
        let two = [(TPM_ALG_SHA1, 20), (TPM_ALG_SHA256, 32)];
        let mut log = spec_id_record(&two);
        log.extend(record(
            24,
            EV_SEPARATOR,
            &[(TPM_ALG_SHA256, &[0; 32])],
            &[0; 4],
        ));
        let e = EventLog::parse(&log).unwrap().replay_sha256().unwrap_err();
        assert!(e.contains("PCR 24"), "{e}");
        let mut log = spec_id_record(&two);
        log.extend(record(
            2,
            EV_SEPARATOR,
            &[(TPM_ALG_SHA1, &[0; 20])],
            &[0; 4],
        ));
        let e = EventLog::parse(&log).unwrap().replay_sha256().unwrap_err();
        assert!(e.contains("without a SHA-256 digest"), "{e}");
    }

    /// The seeds of the `emulator_tcg_log` fuzz target: the emulator's log (accepted), one with a
    /// StartupLocality event (accepted), and malformed ones.
    fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let log = emulator_log();
        let algorithms = [(TPM_ALG_SHA256, 32)];
        let header = spec_id_record(&algorithms).len();
        let mut locality = spec_id_record(&algorithms);
        locality.extend(startup_locality(3, &algorithms));
        locality.extend_from_slice(&log[header..]);
        let mut wrong_spec_id = log.clone();
        wrong_spec_id[32 + 14] = b'2'; // "Spec ID Event02"
        let mut absurd_count = log.clone();
        absurd_count[header + 8..header + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        vec![
            ("accept-simulated-boot", log.clone()),
            ("accept-startup-locality", locality),
            ("seed-truncated", log[..log.len() - 5].to_vec()),
            ("seed-wrong-spec-id", wrong_spec_id),
            ("seed-absurd-digest-count", absurd_count),
        ]
    }

    /// The committed seeds are today's: `SKR_WRITE_FUZZ_SEEDS=1` rewrites them after a change
    /// of the simulated boot.
    #[test]
    fn the_fuzz_seeds_are_the_emulators_current_logs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/emulator_tcg_log");
        let write = std::env::var_os("SKR_WRITE_FUZZ_SEEDS").is_some();
        for (name, bytes) in fuzz_seeds() {
            let path = dir.join(name);
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let accepted = EventLog::parse(&bytes)
                .and_then(|l| l.replay_sha256())
                .is_ok();
            assert_eq!(accepted, name.starts_with("accept-"), "{name}");
            assert!(
                std::fs::read(&path).is_ok_and(|b| b == bytes),
                "{} is stale: rerun with SKR_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
    }

    #[test]
    fn startup_locality_sets_pcr0s_reset_value() {
        let algorithms = [(TPM_ALG_SHA256, 32)];
        let boot = simulated_boot();
        let body = &emulator_log()[spec_id_record(&algorithms).len()..];
        let mut log = spec_id_record(&algorithms);
        log.extend(startup_locality(3, &algorithms));
        log.extend_from_slice(body);
        let replayed = EventLog::parse(&log).unwrap().replay_sha256().unwrap();
        let mut expected = [0u8; 32];
        expected[31] = 3;
        for e in boot.iter().filter(|e| e.pcr == 0) {
            let mut h = Sha256::new();
            h.update(expected);
            h.update(Sha256::digest(e.measured()));
            expected = h.finalize().into();
        }
        assert_eq!(replayed[0], expected);
        assert_eq!(replayed[1..], extended_sha256(&boot)[1..]);
        // Only as PCR 0's reset value: not after PCR 0 was extended, not twice, not 17+ bytes
        // or a locality above 4.
        let mut late = emulator_log();
        late.extend(startup_locality(3, &algorithms));
        let e = EventLog::parse(&late).unwrap().replay_sha256().unwrap_err();
        assert!(e.contains("after PCR 0"), "{e}");
        let mut twice = spec_id_record(&algorithms);
        twice.extend(startup_locality(3, &algorithms));
        twice.extend(startup_locality(0, &algorithms));
        assert!(EventLog::parse(&twice).unwrap().replay_sha256().is_err());
        let mut bad = spec_id_record(&algorithms);
        bad.extend(startup_locality(7, &algorithms));
        let e = EventLog::parse(&bad).unwrap().replay_sha256().unwrap_err();
        assert!(e.contains("StartupLocality 7"), "{e}");
        let mut long = spec_id_record(&algorithms);
        let mut data = STARTUP_LOCALITY_SIGNATURE.to_vec();
        data.extend_from_slice(&[3, 0]);
        long.extend(record(
            0,
            EV_NO_ACTION,
            &[(TPM_ALG_SHA256, &[0; 32])],
            &data,
        ));
        let e = EventLog::parse(&long).unwrap().replay_sha256().unwrap_err();
        assert!(e.contains("18 bytes"), "{e}");
        // Other EV_NO_ACTION events extend nothing.
        let mut other = spec_id_record(&algorithms);
        other.extend(record(
            0,
            EV_NO_ACTION,
            &[(TPM_ALG_SHA256, &[7; 32])],
            b"SP800-155 Event\0",
        ));
        assert_eq!(
            EventLog::parse(&other).unwrap().replay_sha256().unwrap(),
            [[0; 32]; PCR_COUNT]
        );
    }
}
