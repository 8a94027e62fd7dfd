/*
 * skr_pkcs11.h - what a C application needs to know about libskr_pkcs11.so beyond the
 * standard PKCS#11 headers.
 *
 * The module is a standard PKCS#11 3.0 / 2.40 provider. It exports exactly three symbols:
 * C_GetFunctionList (the 2.40 table), C_GetInterfaceList and C_GetInterface ("PKCS 11" 3.0
 * and 2.40; NULL name and version give 3.0). Everything else is reached through the tables.
 *
 * It defines NO vendor-specific attributes, mechanisms, object classes or return values:
 * every value it returns is a standard CKR_* code. The aliases below only name what the
 * standard codes mean when C_Login fails, so applications can tell the classes apart.
 */
#ifndef SKR_PKCS11_H
#define SKR_PKCS11_H

/* ---- Configuration ---- */

/* Environment variable holding the path of the TOML configuration file. */
#define SKR_PKCS11_CONFIG_ENV "SKR_PKCS11_CONFIG"
/* Used when SKR_PKCS11_CONFIG is not set. */
#define SKR_PKCS11_DEFAULT_CONFIG_PATH "/etc/skr-pkcs11/config.toml"
/* Environment variable overriding logging.level (error, warn, info, debug, trace). */
#define SKR_PKCS11_LOG_ENV "SKR_PKCS11_LOG"

/*
 * C_Initialize reads the configuration and does no network I/O. pInitArgs->pReserved must
 * be NULL (it is never read). The module always locks with OS primitives: mutex callbacks
 * (all four, with or without CKF_OS_LOCKING_OK) are accepted and never called; a partial set
 * is CKR_ARGUMENTS_BAD. C_Login runs the key release on a thread of its own (so it works
 * from inside an async runtime); with CKF_LIBRARY_CANT_CREATE_OS_THREADS (GnuTLS sets it) it
 * runs on the caller's thread instead (the HTTP client still uses a helper thread during the
 * login). No module thread outlives C_Login.
 */

/* ---- Slots and tokens ---- */

/* Slot IDs are 1..n in the order of the [[token]] tables of the configuration. */
#define SKR_PKCS11_FIRST_SLOT_ID 1UL

/*
 * Token flags: CKF_LOGIN_REQUIRED | CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED |
 * CKF_WRITE_PROTECTED | CKF_RNG, plus CKF_PROTECTED_AUTHENTICATION_PATH unless the token's
 * configuration sets a local `pin`. C_Login(CKU_USER, NULL, 0) then attests the TEE and
 * releases the token's keys; CKU_SO gives CKR_USER_TYPE_INVALID (the token has no security
 * officer), CKU_CONTEXT_SPECIFIC gives CKR_OPERATION_NOT_INITIALIZED (no key needs it).
 * C_Logout, closing the token's last session and C_Finalize wipe the keys.
 */

/* ---- What a failed C_Login returns (one class, one code) ---- */

/* The TEE could not produce evidence, or the attestation service refused it. */
#define SKR_PKCS11_RV_ATTESTATION_FAILED 0x00000030UL /* CKR_DEVICE_ERROR */
/* A service was unreachable or kept failing (network, timeout, 5xx, throttling): retry later. */
#define SKR_PKCS11_RV_SERVICE_FAILED 0x00000006UL /* CKR_FUNCTION_FAILED */
/* The key release was refused: release policy not met, identity not authorised. */
#define SKR_PKCS11_RV_RELEASE_DENIED 0x00000200UL /* CKR_FUNCTION_REJECTED */
/* A response failed verification, or the configuration is invalid (see the log line). */
#define SKR_PKCS11_RV_INTEGRITY_OR_CONFIG 0x00000005UL /* CKR_GENERAL_ERROR */
/* The token's configured local PIN did not match. */
#define SKR_PKCS11_RV_PIN_INCORRECT 0x000000A0UL /* CKR_PIN_INCORRECT */

/*
 * Every failure an operator must fix is logged once, e.g.
 *   C_Login token="skr" failed: rv=CKR_FUNCTION_REJECTED step=release cause: ...; hint: ...
 * to the configured logging.target (stderr, syslog or file:/path), never to stdout.
 */

#endif /* SKR_PKCS11_H */
