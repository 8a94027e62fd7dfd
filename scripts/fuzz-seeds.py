#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/seed-*, accept-*) from the
real artifacts in testdata/ and the harnesses' test fixtures (testdata/fuzz/). A file named
accept-* must pass every check of its harness: the stable replay (tests/fuzz_corpus.rs,
emulator/tests/fuzz_corpus.rs) asserts it, so the structure-aware seeds provably reach the end
of the parser. Inputs the fuzzer found (crash-*, slow-*) are kept beside them by hand.

The seeds of emulator_tcg_log are the emulator's own simulated-boot logs: emulator/src/tcg_log.rs
writes them (SKR_WRITE_FUZZ_SEEDS=1 cargo test -p skr-emulator --lib tcg_log) and its tests
check that they are current.

The harness constants (MAA_URL, KEY_URL, NONCE, REPORT_DATA, NOW) are src/fuzzing.rs's.
Needs python3-cryptography. Run from anywhere: scripts/fuzz-seeds.py
"""
import base64
import copy
import hashlib
import json
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TD = os.path.join(ROOT, "testdata")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")

MAA_URL = "https://fuzz.attest.azure.net"
KEY_URL = "https://fuzz.vault.azure.net/keys/web/0123456789abcdef0123456789abcdef"
NONCE = "fuzz-nonce"
REPORT_DATA = bytes([0x5A]) * 64
NOW = 1_893_456_000


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def read(path):
    with open(os.path.join(TD, path), "rb") as f:
        return f.read()


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def uint(n):
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def dumps(v):
    return json.dumps(v, separators=(",", ":"), sort_keys=True).encode()


# Deterministic bytes (seeds must not change on every run).
def det(label, n):
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


test_key = serialization.load_der_private_key(read("fuzz/test-key.pk8"), None)
pub = test_key.public_key().public_numbers()
n_b, e_b = uint(pub.n), uint(pub.e)
kid = b64url(hashlib.sha256(
    ('{"e":"%s","kty":"RSA","n":"%s"}' % (b64url(e_b), b64url(n_b))).encode()).digest())
transfer_jwk = {"kid": kid, "kty": "RSA", "key_ops": ["encrypt"], "n": b64url(n_b), "e": b64url(e_b)}
test_key_pkcs8 = read("fuzz/test-key.pk8")
test_jwk_public = {"kty": "RSA-HSM", "n": b64url(n_b), "e": "AQAB"}

# ---- maa_token: 0 token text | 1 claims | 2 header\nclaims | 3 /certs body ----
real_jwt = read("maa/sevsnpvm-token.jwt").strip()
write("maa_token", "seed-real-token", b"\x00" + real_jwt)
real_claims = json.loads(base64.urlsafe_b64decode(real_jwt.split(b".")[1] + b"=="))
claims = dict(real_claims)
claims.update({
    "iss": MAA_URL, "iat": NOW - 60, "nbf": NOW - 60, "exp": NOW + 8 * 3600,
    "nonce": NONCE, "x-ms-sevsnpvm-reportdata": REPORT_DATA.hex(),
    "x-ms-runtime": {"keys": [transfer_jwk]},
})
write("maa_token", "accept-claims", b"\x01" + dumps(claims))
header = {"alg": "RS256", "jku": MAA_URL + "/certs", "kid": "fuzz-maa-signing-key", "typ": "JWT"}
write("maa_token", "accept-header-and-claims", b"\x02" + dumps(header) + b"\n" + dumps(claims))
write("maa_token", "seed-real-claims", b"\x01" + dumps(real_claims))
leaf_b64 = base64.b64encode(read("fuzz/test-leaf.der")).decode()
write("maa_token", "seed-certs", b"\x03" + dumps({"keys": [{"kid": "k1", "kty": "RSA", "x5c": [leaf_b64]}]}))

# ---- azure_guest_response: 0 token text | 1 sealed JSON | 2 claims (signed and sealed) ----
# The harness's "TPM" unwraps every EncryptedInnerKey to its SEAL_KEY; USER_DATA = 0x5a * 64.
tpm_jwk = {"kid": "TpmEphemeralEncryptionKey", "kty": "RSA", "key_ops": ["encrypt"],
           "n": b64url(n_b), "e": b64url(e_b)}
guest_claims = {
    "iss": MAA_URL, "iat": NOW - 60, "nbf": NOW - 60, "exp": NOW + 8 * 3600, "jti": "0" * 64,
    "x-ms-attestation-type": "azurevm", "x-ms-azurevm-attested-pcrs": list(range(8)),
    "x-ms-isolation-tee": {
        "x-ms-attestation-type": "sevsnpvm", "x-ms-compliance-status": "azure-compliant-cvm",
        "x-ms-runtime": {"keys": [dict(test_jwk_public, kid="HCLAkPub", kty="RSA", key_ops=["sign"])],
                         "user-data": (bytes([0x5A]) * 64).hex().upper()}},
    "x-ms-runtime": {"keys": [tpm_jwk], "client-payload": {"nonce": NONCE}},
    "x-ms-ver": "1.0",
}
write("azure_guest_response", "accept-sealed-claims", b"\x02" + dumps(guest_claims))
write("azure_guest_response", "seed-sealed-json", b"\x01" + dumps({
    "EncryptedInnerKey": "AAAA", "AuthenticationData": base64.b64encode(bytes(16)).decode(), "Jwt": "AAAA",
    "EncryptionParams": {"BlockMode": "ChainingModeGCM", "Cipher": "AES", "KeySizeInBits": 256,
                         "Iv": base64.b64encode(bytes([7]) * 12).decode()}}))
write("azure_guest_response", "seed-plain-token", b"\x00" + real_jwt)

# ---- key_hsm / release_response: material wrapped to the test transfer key ----
def key_hsm_text(kek, material, hash_alg=hashes.SHA256(), enc="RSA_AES_KEY_WRAP_256"):
    block = test_key.public_key().encrypt(
        kek, padding.OAEP(mgf=padding.MGF1(hash_alg), algorithm=hash_alg, label=None))
    ct = block + aes_key_wrap_with_padding(kek, material)
    env = {"schema_version": "1.0", "header": {"kid": kid, "alg": "dir", "enc": enc},
           "ciphertext": b64url(ct), "generator": "scripts/fuzz-seeds.py"}
    return b64url(json.dumps(env).encode())


ec_key = ec.derive_private_key(int.from_bytes(det("ec-p256", 32), "big") % (2**255), ec.SECP256R1())
ec_pkcs8 = ec_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
ec_nums = ec_key.public_key().public_numbers()
ec_jwk = {"kty": "EC-HSM", "crv": "P-256", "x": b64url(ec_nums.x.to_bytes(32, "big")),
          "y": b64url(ec_nums.y.to_bytes(32, "big"))}
aes_material = det("aes-256", 32)


def key_hsm_input(flags, kek, material, jwk):
    return (bytes([flags, len(kek)]) + kek + struct.pack("<H", len(material)) + material
            + dumps(jwk))


write("key_hsm", "accept-rsa", key_hsm_input(1, det("kek", 32), test_key_pkcs8, test_jwk_public))
write("key_hsm", "accept-ec-sha1", key_hsm_input(0, det("kek", 16), ec_pkcs8, ec_jwk))
write("key_hsm", "accept-oct-sha384", key_hsm_input(2, det("kek", 32), aes_material,
                                                    {"kty": "oct-HSM", "key_size": 256}))
write("key_hsm", "seed-aes192-kek", key_hsm_input(1, det("kek", 24), det("wrapped", 40), ec_jwk))
write("key_hsm", "seed-wrong-kid", key_hsm_input(5, det("kek", 32), ec_pkcs8, ec_jwk))
mhsm = json.loads(read("akv/mhsm-release-response-payload.decoded.json"))
write("key_hsm", "seed-real-key-hsm", b"\x03" + mhsm["payload"]["response"]["key"]["key"]["key_hsm"].encode())

# release_response: 0 JWS text | 1 payload | 2 header\npayload
write("release_response", "seed-real-jws", b"\x00" + read("akv/vault-release-response.jws").strip())
payload = copy.deepcopy(mhsm["payload"])
payload["request"] = {"api-version": "7.4", "enc": "RSA_AES_KEY_WRAP_256", "kid": KEY_URL, "nonce": NONCE}
payload["response"]["key"]["key"] = dict(test_jwk_public, key_hsm=key_hsm_text(det("kek", 32), test_key_pkcs8),
                                         kid=KEY_URL, key_ops=["sign", "decrypt"])
write("release_response", "accept-payload", b"\x01" + dumps(payload))
x5c = [leaf_b64, base64.b64encode(read("fuzz/test-ca.der")).decode()]
write("release_response", "accept-header-and-payload",
      b"\x02" + dumps({"alg": "RS256", "x5c": x5c}) + b"\n" + dumps(payload))
write("release_response", "seed-real-payload", b"\x01" + dumps(mhsm["payload"]))

# ---- jwk ----
write("jwk", "accept-test-key", dumps(test_jwk_public))
write("jwk", "seed-ec", dumps(ec_jwk))
write("jwk", "seed-oct", dumps({"kty": "oct-HSM", "key_size": 256}))
write("jwk", "seed-transfer-jwk", dumps(transfer_jwk))

# ---- snp_report ----
for name in ["aci/snp_report.bin", "snp/trustee-milan-v2-report.bin", "snp/trustee-milan-vlek-v3-report.bin"]:
    write("snp_report", "seed-" + os.path.basename(name), read(name))
report = bytearray(read("aci/snp_report.bin"))
report[0x50:0x90] = REPORT_DATA
write("snp_report", "accept-report-data", bytes(report))
write("snp_report", "seed-milan-v2-hex", bytes.fromhex(read("snp/milan-v2-report.hex").decode().strip()))

# ---- cvm_evidence: 0 any (describe) | 1 HCL report | 2 TD quote + HCL report | 3 TPMS_ATTEST | 4 claims ----
hcls = ["kinvolk-snp-v1-2048.bin", "trustee-snp-v1-2600.bin", "kinvolk-tdx-v2-2600.bin",
        "trustee-tdx-v2-2600.bin", "cvm-attestation-tools-tdx-v2-2600.bin"]
for name in hcls:
    write("cvm_evidence", "accept-describe-" + name, b"\x00" + read("azure-cvm/hcl/" + name))
    write("cvm_evidence", "seed-hcl-" + name, b"\x01" + read("azure-cvm/hcl/" + name))
write("cvm_evidence", "accept-describe-td-quote", b"\x00" + read("azure-cvm/tdx/trustee-td-quote-v4.bin"))
write("cvm_evidence", "seed-td-quote-and-hcl",
      b"\x02" + read("azure-cvm/tdx/trustee-td-quote-v4.bin") + read("azure-cvm/hcl/trustee-tdx-v2-2600.bin"))
write("cvm_evidence", "seed-td-quote-cvm-tools-and-hcl",
      b"\x02" + read("azure-cvm/tdx/cvm-attestation-tools-td-quote-v4.dat")
      + read("azure-cvm/hcl/cvm-attestation-tools-tdx-v2-2600.bin"))
# kinvolk-quote.bin is a Go-serialised (u64 length, signature, u64 length, TPMS_ATTEST, PCRs).
quote = read("azure-cvm/tpm/kinvolk-quote.bin")
sig_len = int.from_bytes(quote[:8], "little")
msg_len = int.from_bytes(quote[8 + sig_len:16 + sig_len], "little")
tpms_attest = quote[16 + sig_len:16 + sig_len + msg_len]
write("cvm_evidence", "accept-tpms-attest", b"\x03" + tpms_attest)
write("cvm_evidence", "accept-describe-tpms-attest", b"\x00" + tpms_attest)
write("cvm_evidence", "accept-runtime-claims", b"\x04" + read("azure-cvm/tpm/kinvolk-runtime-claims.json"))
write("cvm_evidence", "accept-describe-snp-hex", b"\x00" + read("snp/milan-v2-report.hex"))
for name in ["az-snp-vtpm-evidence-v2.json", "az-snp-vtpm-evidence-genoa.json"]:
    write("cvm_evidence", "accept-describe-kbs-" + name, b"\x00" + read("kbs/" + name))

# ---- collateral: 0 THIM JSON | 1 host-amd-cert-base64 \0 reference-info-base64 ----
write("collateral", "accept-thim", b"\x00" + read("aci/uvm_host_amd_certificate.json"))
write("collateral", "accept-security-context",
      b"\x01" + read("aci/security-context/host-amd-cert-base64") + b"\x00"
      + read("aci/security-context/reference-info-base64"))

# ---- config ----
write("config", "accept-emulator-config", """[platform]
evidence = "emulated"
emulator_url = "https://127.0.0.1:1"
[attestation]
url = "https://127.0.0.1:2"
[identity]
source = "imds"
imds_url = "http://127.0.0.1:3"
[[token]]
label = "fuzz"
[[token.key]]
label = "web"
id = "01"
kid = "https://fuzz.vault.azure.net/keys/web"
""")
with open(os.path.join(ROOT, "packaging/debian/config.toml"), "rb") as f:
    write("config", "seed-packaged-example", f.read())
with open(os.path.join(ROOT, "docs/CONFIG.md")) as f:
    doc = f.read()
block = doc.split("```toml", 1)[1].split("```", 1)[0]
write("config", "seed-config-md", block)

# ---- pem_chain ----
write("pem_chain", "accept-uvm-host-amd-chain", read("aci/uvm_host_amd_certificate.pem"))
write("pem_chain", "accept-milan-chain", read("snp/milan-cert_chain.pem"))
write("pem_chain", "seed-truncated-block", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")

# ---- release_policy: policy \0 claims ----
examples = json.loads(read("policy/published-examples.json"))
for name, entry in examples.items():
    if isinstance(entry, dict) and "policy" in entry:
        write("release_policy", "seed-" + name, dumps(entry["policy"]) + b"\x00" + dumps(real_claims))
for name in ["policy/cvm-platform-skr-policy.json", "policy/cvm-datadisk-skr-policy.json"]:
    write("release_policy", "seed-" + os.path.basename(name), read(name) + b"\x00" + dumps(real_claims))
write("release_policy", "accept-sevsnp-policy", dumps({
    "version": "1.0.0",
    "anyOf": [{"authority": MAA_URL, "allOf": [
        {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
        {"claim": "x-ms-compliance-status", "equals": "azure-compliant-uvm"}]}]})
      + b"\x00" + dumps(dict(real_claims, **{"x-ms-compliance-status": "azure-compliant-uvm"})))

# ---- lease_record (token::lease, the shared key store's record) ----
def lease_entry(index, state, released_at_ms, version, material):
    v = version.encode()
    return (struct.pack("<IBQH", index, state, released_at_ms, len(v)) + v
            + struct.pack("<I", len(material)) + material)

def lease_record(entries):
    return b"SKRL" + bytes([1]) + struct.pack("<I", len(entries)) + b"".join(entries)

write("lease_record", "accept-three-keys", lease_record([
    lease_entry(0, 1, 1764800000000, "0123456789abcdef0123456789abcdef", bytes(range(48))),
    lease_entry(1, 2, 1764800000001, "v2", bytes([7]) * 32),
    lease_entry(2, 3, 1764800000002, "v3", b""),
]))
write("lease_record", "accept-expired", lease_record([lease_entry(0, 4, 5, "", b"")]))
write("lease_record", "accept-empty", lease_record([]))
write("lease_record", "seed-revoked-with-material", lease_record([lease_entry(0, 3, 5, "v", b"x")]))
write("lease_record", "seed-truncated", lease_record([lease_entry(0, 1, 5, "v", b"abc")])[:-1])

# ---- gcm_message (message-based AES-GCM: key size, IV length - 1, fixed bits, CKG_*, tag bits,
# AAD length, AAD, message; src/fuzzing.rs) ----
def gcm_message(key, iv_len, fixed, ckg, tag_bits, aad, msg):
    return bytes([key, iv_len - 1, fixed, ckg, tag_bits, len(aad)]) + aad + msg
write("gcm_message", "accept-caller-iv", gcm_message(2, 12, 0, 0, 128, b"hdr", b"a message under the caller's IV"))
write("gcm_message", "accept-counter", gcm_message(2, 12, 32, 2, 128, b"", b"counted"))
write("gcm_message", "accept-generate-odd-fixed-bits", gcm_message(2, 12, 13, 1, 128, b"a", b"thirteen bits kept"))
write("gcm_message", "accept-random-short-tag", gcm_message(0, 12, 0, 3, 96, b"", b"random IV, 96-bit tag"))
write("gcm_message", "accept-long-iv", gcm_message(1, 16, 0, 0, 120, b"xy", b"a sixteen-byte IV"))
write("gcm_message", "seed-random-with-fixed-field", gcm_message(2, 12, 8, 3, 128, b"", b"refused"))
write("gcm_message", "seed-counter-xor", gcm_message(2, 12, 0, 4, 128, b"", b"refused"))
write("gcm_message", "seed-tag-64", gcm_message(2, 12, 0, 0, 64, b"", b"refused"))

# ---- identity_response (release::identity: challenge line, then token body) ----
CHALLENGE = b'Bearer authorization="https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47", resource="https://vault.azure.net"'
write("identity_response", "accept-imds", CHALLENGE + b"\n" + json.dumps({
    "access_token": "eyJ0eXAiOiJKV1QifQ.e30.c2ln", "client_id": "00000000-0000-0000-0000-000000000000",
    "expires_in": "86399", "expires_on": "1764900000", "ext_expires_in": "86399",
    "not_before": "1764813300", "resource": "https://vault.azure.net", "token_type": "Bearer"}).encode())
write("identity_response", "accept-entra", b'Bearer resource="https://managedhsm.azure.net"\n' + json.dumps({
    "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": "eyJ0eXAiOiJKV1QifQ.e30.c2ln"}).encode())
write("identity_response", "seed-no-token", CHALLENGE + b"\n" + b'{"error":"invalid_request","error_description":"Identity not found"}')
write("identity_response", "seed-not-json", b"Bearer\n<html>502 Bad Gateway</html>")

# ---- platform_response (skr-emulator's simulated platform answer) ----
write("platform_response", "accept-report-and-chain", json.dumps({
    "report": b64url(read("aci/snp_report.bin")),
    "vcek_cert_chain": read("snp/milan-cert_chain.pem").decode()}).encode())
write("platform_response", "seed-no-chain", json.dumps({"report": b64url(read("aci/snp_report.bin"))}).encode())
write("platform_response", "seed-bad-base64", b'{"report":"***","vcek_cert_chain":"-----BEGIN CERTIFICATE-----"}')

# ---- http_dates ----
write("http_dates", "accept-seconds", b"120")
write("http_dates", "accept-imf-fixdate", b"Sun, 06 Nov 1994 08:49:37 GMT")
write("http_dates", "seed-rfc850", b"Sunday, 06-Nov-94 08:49:37 GMT")

# ---- emulator: MAA attest request bodies, Key Vault request bodies ----
example = json.loads(read("maa/attest-sevsnpvm-example.json"))


def find_request(v):
    if isinstance(v, dict):
        if "report" in v and isinstance(v["report"], str):
            return v
        for x in v.values():
            r = find_request(x)
            if r is not None:
                return r
    return None


request = find_request(example)
if request is None:
    sys.exit("no MAA request in maa/attest-sevsnpvm-example.json")
write("emulator_maa_request", "seed-spec-example", dumps(request))
evidence = {"SnpReport": b64url(read("aci/snp_report.bin")),
            "VcekCertChain": b64url(read("aci/uvm_host_amd_certificate.pem"))}
write("emulator_maa_request", "seed-aci-report", dumps({"report": b64url(dumps(evidence))}))
write("emulator_maa_request", "seed-truncated-chain", dumps({"report": b64url(dumps(dict(
    evidence, VcekCertChain=b64url(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"))))}))

# AzureGuest (emulator_azure_guest_request): the outer JSON and AttestationInfo skeletons, with a
# real certificate and a real TD quote inside (nothing signed by the harness's vTPM CA).
b64 = lambda b: base64.b64encode(b).decode()
guest_info = {
    "AttestationProtocolVersion": "2.0", "OSType": b64(b"Linux"), "OSDistro": b64(b"Debian"),
    "OSVersionMajor": 12, "OSVersionMinor": 0, "OSBuild": b64(b"NotApplication"), "TcgLogs": "",
    "ClientPayload": {"nonce": b64(b"n")},
    "TpmInfo": {"AikCert": b64(read("snp/milan-v2-vcek.der")), "AikPub": b64(bytes(2)),
                "PcrQuote": b64(bytes(10)), "PcrSignature": b64(bytes(256)), "EncKeyPub": "",
                "EncKeyCertifyInfo": "", "EncKeyCertifyInfoSignature": "", "PcrSet": list(range(8)),
                "PCRs": [{"Index": i, "Digest": b64(bytes(32))} for i in range(8)]},
    "IsolationInfo": {"Type": "SevSnp", "Evidence": {
        "Proof": b64(dumps({"SnpReport": "", "VcekCertChain": ""})), "RunTimeData": b64(b'{"keys":[]}')}},
}
write("emulator_azure_guest_request", "seed-skeleton", dumps({"AttestationInfo": b64url(dumps(guest_info))}))
guest_info["IsolationInfo"] = {"Type": "Tdx", "Evidence": {
    "Proof": b64(read("azure-cvm/tdx/trustee-td-quote-v4.bin")), "RunTimeData": b64(b"{}")}}
write("emulator_azure_guest_request", "seed-tdx-real-quote",
      dumps({"attestationInfo": base64.urlsafe_b64encode(dumps(guest_info)).decode()}))

# Key Vault: first byte selects the operation (0 create, 1 import, 2 update, 3 release, 4 get),
# the second the service (0 Key Vault, 1 Managed HSM), the rest is the JSON body
# (emulator/src/fuzzing.rs).
policy = {"version": "1.0.0", "anyOf": [{"authority": "https://fuzz.attest.azure.net",
                                         "allOf": [{"claim": "x-ms-attestation-type", "equals": "sevsnpvm"}]}]}
policy_data = {"contentType": "application/json; charset=utf-8", "data": b64url(dumps(policy))}
write("emulator_keyvault_request", "accept-create-ec", b"\x00\x00" + dumps(
    {"kty": "EC-HSM", "crv": "P-256", "attributes": {"exportable": True}, "release_policy": policy_data}))
write("emulator_keyvault_request", "accept-import-rsa", b"\x01\x00" + dumps(
    {"key": {"kty": "RSA-HSM", "n": b64url(n_b), "e": b64url(e_b),
             "d": b64url(uint(test_key.private_numbers().d)),
             "p": b64url(uint(test_key.private_numbers().p)), "q": b64url(uint(test_key.private_numbers().q))},
     "attributes": {"exportable": True}, "release_policy": policy_data}))
write("emulator_keyvault_request", "accept-update", b"\x02\x00" + dumps(
    {"attributes": {"enabled": True}, "tags": {"purpose": "fuzz"}}))
write("emulator_keyvault_request", "seed-release", b"\x03\x00" + dumps(
    {"target": real_jwt.decode(), "enc": "RSA_AES_KEY_WRAP_256", "nonce": NONCE}))
write("emulator_keyvault_request", "accept-create-oct-mhsm", b"\x00\x01" + dumps(
    {"kty": "oct-HSM", "key_size": 256, "attributes": {"exportable": True}, "release_policy": policy_data}))
write("emulator_keyvault_request", "accept-get", b"\x04\x00")
print("seeds written under", CORPUS)
