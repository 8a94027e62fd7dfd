//! C_Login through the built .so on a simulated Azure SEV-SNP confidential VM
//! (`skr-emulator up --platform cvm-snp`); the checks are in `cvm_common`.
#![cfg(feature = "cvm")]

mod common;
mod cvm_common;

const PLATFORM: &str = "cvm-snp";

#[test]
fn login_releases_rsa_and_aes_that_verify_independently_and_leaves_the_tpm_clean() {
    cvm_common::login_releases_rsa_and_aes_that_verify_independently_and_leaves_the_tpm_clean(
        PLATFORM,
    );
}

#[test]
fn denials_name_the_unmet_isolation_tee_claim_and_leave_the_tpm_clean() {
    cvm_common::denials_name_the_unmet_isolation_tee_claim_and_leave_the_tpm_clean(PLATFORM);
}

#[test]
fn login_faults_give_their_ck_rv_flush_the_tpm_key_and_a_later_login_succeeds() {
    cvm_common::login_faults_give_their_ck_rv_flush_the_tpm_key_and_a_later_login_succeeds(
        PLATFORM,
    );
}

#[test]
fn an_unwritten_hcl_report_is_read_again_then_refused_with_the_code_330_hint() {
    cvm_common::an_unwritten_hcl_report_is_read_again_then_refused_with_the_code_330_hint(PLATFORM);
}
