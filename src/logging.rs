//! The module's `log` backend: stderr, syslog or a file as configured, never stdout (the host
//! may use it). `SKR_PKCS11_LOG=<level>` overrides the configured level. Other crates' records
//! (rustls, reqwest) pass only at warn and above unless the level is trace.
//!
//! Nothing secret is ever formatted into a record: PINs and key bytes are not logged anywhere
//! in the module.

use crate::config::Logging;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, RwLock};

/// Environment variable overriding the configured level (error | warn | info | debug | trace).
pub const LOG_ENV: &str = "SKR_PKCS11_LOG";

enum Sink {
    Stderr,
    Syslog,
    File(Mutex<std::fs::File>),
}

struct Logger {
    sink: RwLock<Sink>,
    level: AtomicUsize,
}

static LOGGER: Logger = Logger {
    sink: RwLock::new(Sink::Stderr),
    level: AtomicUsize::new(log::LevelFilter::Info as usize),
};
static INSTALL: Once = Once::new();

fn level_filter(n: usize) -> log::LevelFilter {
    match n {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

pub fn parse_level(s: &str) -> Option<log::LevelFilter> {
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" | "warning" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => return None,
    })
}

/// UTC timestamp without a date crate: days-from-civil inverted (H. Hinnant's algorithm).
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A record's text on one line: messages may quote service responses (error texts, claim
/// values), whose line breaks or control characters must not split a record or forge another.
fn one_line(msg: &str) -> String {
    msg.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// One line of the stderr and file sinks.
fn line(record: &log::Record) -> String {
    format!(
        "{} skr-pkcs11[{}] {}: {}\n",
        timestamp(),
        std::process::id(),
        record.level(),
        one_line(&record.args().to_string())
    )
}

impl log::Log for Logger {
    fn enabled(&self, md: &log::Metadata) -> bool {
        let max = level_filter(self.level.load(Ordering::Relaxed));
        if md.level() > max {
            return false;
        }
        md.target().starts_with("skr_pkcs11")
            || md.level() <= log::Level::Warn
            || max == log::LevelFilter::Trace
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Some(sink) = read_bounded(&self.sink) else {
            return;
        };
        match &*sink {
            Sink::Syslog => {
                let prio = match record.level() {
                    log::Level::Error => libc::LOG_ERR,
                    log::Level::Warn => libc::LOG_WARNING,
                    log::Level::Info => libc::LOG_INFO,
                    _ => libc::LOG_DEBUG,
                };
                if let Ok(c) = std::ffi::CString::new(one_line(&record.args().to_string())) {
                    crate::sys::syslog(prio, &c);
                }
            }
            Sink::Stderr => {
                let _ = std::io::stderr().write_all(line(record).as_bytes());
            }
            Sink::File(f) => {
                let line = line(record);
                // Bounded: in a forked child the parent's writer may have held it at fork.
                if let Some(mut f) = crate::sync::lock_bounded(f, LOCK_WAIT) {
                    let _ = f.write_all(line.as_bytes());
                }
            }
        }
    }

    fn flush(&self) {
        if let Some(sink) = read_bounded(&self.sink) {
            if let Sink::File(f) = &*sink {
                if let Some(mut f) = crate::sync::lock_bounded(f, LOCK_WAIT) {
                    let _ = f.flush();
                }
            }
        }
    }
}

/// The logger's locks are held only while one line is written; the bound matters only in a
/// forked child whose parent was writing at the moment of fork: drop the line, never hang.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn read_bounded(l: &RwLock<Sink>) -> Option<std::sync::RwLockReadGuard<'_, Sink>> {
    let start = std::time::Instant::now();
    loop {
        match l.try_read() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                std::thread::yield_now()
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

fn write_bounded(l: &RwLock<Sink>) -> Option<std::sync::RwLockWriteGuard<'_, Sink>> {
    let start = std::time::Instant::now();
    loop {
        match l.try_write() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                l.clear_poison();
                return Some(p.into_inner());
            }
            Err(std::sync::TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_micros(200))
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

fn install() {
    INSTALL.call_once(|| {
        // Fails only if the host linked the same `log` instance and set a logger (a Rust host
        // using the rlib): its logger then receives our records, which is what it wants.
        if log::set_logger(&LOGGER).is_ok() {
            OWN_LOGGER.store(true, Ordering::Relaxed);
        }
    });
}

/// Whether `LOGGER` is the process's logger (see `install`).
static OWN_LOGGER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set our level, and with it `log`'s global maximum when the logger is ours: a record above
/// it (every C call's trace line at the default levels) is then dropped by one atomic compare
/// in the caller instead of a call into the logger. A host's own logger keeps its maximum.
fn set_level(level: log::LevelFilter) {
    LOGGER.level.store(level as usize, Ordering::Relaxed);
    if OWN_LOGGER.load(Ordering::Relaxed) {
        log::set_max_level(level);
    }
}

fn env_level() -> Option<log::LevelFilter> {
    std::env::var(LOG_ENV).ok().and_then(|v| parse_level(&v))
}

/// Logging before the configuration is known: stderr, info (or the env override).
pub fn init_default() {
    install();
    set_level(env_level().unwrap_or(log::LevelFilter::Info));
}

/// Apply the configured target and level. A bad target falls back to stderr with a warning
/// (logging must never be the reason C_Initialize fails).
pub fn init(cfg: &Logging) {
    install();
    let level = env_level()
        .or_else(|| parse_level(&cfg.level))
        .unwrap_or(log::LevelFilter::Info);
    set_level(level);
    let mut warning = None;
    let sink = match cfg.target.as_str() {
        "stderr" => Sink::Stderr,
        "syslog" => {
            crate::sys::syslog_open();
            Sink::Syslog
        }
        t => match t.strip_prefix("file:") {
            Some(path) => match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => Sink::File(Mutex::new(f)),
                Err(e) => {
                    warning = Some(format!(
                        "cannot open log file {path}: {e}; logging to stderr. hint: fix logging.target in the config"
                    ));
                    Sink::Stderr
                }
            },
            None => {
                warning = Some(format!(
                    "logging.target {t:?} is not stderr, syslog or file:/path; logging to stderr"
                ));
                Sink::Stderr
            }
        },
    };
    match write_bounded(&LOGGER.sink) {
        Some(mut g) => *g = sink,
        None => {
            warning =
                Some("logging target unchanged: its lock is held (forked while logging)".into())
        }
    }
    if parse_level(&cfg.level).is_none() {
        log::warn!(
            "logging.level {:?} is not error, warn, info, debug or trace; using info",
            cfg.level
        );
    }
    if let Some(w) = warning {
        log::warn!("{w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("DEBUG"), Some(log::LevelFilter::Debug));
        assert_eq!(parse_level("warning"), Some(log::LevelFilter::Warn));
        assert_eq!(parse_level("loud"), None);
    }

    #[test]
    fn a_record_is_one_line_whatever_it_quotes() {
        let l = line(
            &log::Record::builder()
                .args(format_args!(
                    "AKV says: denied\n2026-01-01T00:00:00Z skr-pkcs11[1] INFO: forged\r\0x"
                ))
                .level(log::Level::Error)
                .build(),
        );
        assert_eq!(l.matches('\n').count(), 1, "{l:?}");
        assert!(
            l.ends_with("denied 2026-01-01T00:00:00Z skr-pkcs11[1] INFO: forged  x\n"),
            "{l:?}"
        );
    }

    #[test]
    fn timestamp_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
