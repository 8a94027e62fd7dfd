//! The simulated UVM endorsement (`reference-info-base64`): a COSE_Sign1 (CBOR tag 18) with
//! content type application/json, alg PS384 and the signer's certificate in x5chain, shaped
//! like Microsoft's UVM reference info. The emulator's MAA does not require it.

use crate::context::App;
use serde_json::json;
use sha2::Sha384;
use signature::RandomizedSigner;
use signature::SignatureEncoding;

fn head(major: u8, len: u64) -> Vec<u8> {
    let m = major << 5;
    match len {
        0..=23 => vec![m | len as u8],
        24..=0xFF => vec![m | 24, len as u8],
        0x100..=0xFFFF => {
            let mut v = vec![m | 25];
            v.extend_from_slice(&(len as u16).to_be_bytes());
            v
        }
        _ => {
            let mut v = vec![m | 26];
            v.extend_from_slice(&(len as u32).to_be_bytes());
            v
        }
    }
}

fn bstr(bytes: &[u8]) -> Vec<u8> {
    let mut v = head(2, bytes.len() as u64);
    v.extend_from_slice(bytes);
    v
}

fn tstr(text: &str) -> Vec<u8> {
    let mut v = head(3, text.len() as u64);
    v.extend_from_slice(text.as_bytes());
    v
}

fn int(value: i64) -> Vec<u8> {
    if value >= 0 {
        head(0, value as u64)
    } else {
        head(1, (-1 - value) as u64)
    }
}

pub fn reference_info(app: &App) -> Result<Vec<u8>, String> {
    // Protected header: {1 (alg): -38 (PS384), 3 (content type): "application/json",
    // 33 (x5chain): signer certificate}.
    let mut protected = head(5, 3);
    protected.extend(int(1));
    protected.extend(int(-38));
    protected.extend(int(3));
    protected.extend(tstr("application/json"));
    protected.extend(int(33));
    protected.extend(bstr(&app.pki.maa_cert_der));
    let platform = app.platform();
    let payload = json!({
        "x-ms-sevsnpvm-guestsvn": platform.guest_svn.to_string(),
        "x-ms-sevsnpvm-launchmeasurement": platform.measurement,
    })
    .to_string();
    let mut to_sign = head(4, 4);
    to_sign.extend(tstr("Signature1"));
    to_sign.extend(bstr(&protected));
    to_sign.extend(bstr(&[]));
    to_sign.extend(bstr(payload.as_bytes()));
    let signer = rsa::pss::BlindedSigningKey::<Sha384>::new(app.pki.maa_key.clone());
    let sig = signer
        .try_sign_with_rng(&mut rand::rngs::OsRng, &to_sign)
        .map_err(|e| format!("reference info signature: {e}"))?;
    let mut out = head(6, 18);
    out.extend(head(4, 4));
    out.extend(bstr(&protected));
    out.extend(head(5, 0));
    out.extend(bstr(payload.as_bytes()));
    out.extend(bstr(&sig.to_bytes()));
    Ok(out)
}
