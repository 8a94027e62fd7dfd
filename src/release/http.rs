//! HTTPS for one login: a blocking reqwest client built inside the login (never carried across
//! fork), rustls with the aws-lc-rs provider and the configured trust anchors, timeouts,
//! retries with full-jitter exponential backoff, capped response bodies. A login's calls
//! together are bounded by `release.deadline_seconds` from the moment its `Http` is built:
//! throttled answers are retried until then (a fleet queued behind a vault's limit gets
//! through), other failures `release.retries` times.

use super::jws::TrustAnchors;
use crate::config::Release;
use crate::error::{Error, Result, Step};
use reqwest::blocking::{Client, RequestBuilder};
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest response body read (MAA tokens are ~10 KiB, release JWS ~15 KiB).
pub const MAX_BODY: usize = 1 << 20;
/// Longest honoured Retry-After.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Shortest wait after a throttled answer: `Retry-After: 0` (or a zero backoff) must not turn
/// the retries until the deadline into a busy loop against the service.
const MIN_THROTTLED_WAIT: Duration = Duration::from_millis(100);

pub struct Http {
    /// For MAA and AKV: honours the proxy environment.
    pub client: Client,
    /// For IMDS (link-local, unsupported behind a proxy).
    pub direct: Client,
    retries: u32,
    backoff: Duration,
    timeout: Duration,
    /// The end of this login's network time (`release.deadline_seconds` after `new`).
    deadline: Instant,
    deadline_seconds: u64,
}

/// A response read to the end (bounded).
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

// Bodies can hold tokens: Debug shows only status and size.
impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Response({}, {} bytes)", self.status, self.body.len())
    }
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// `error.message` (AKV, MAA) or `error_description` (Entra, IMDS), else a short body prefix.
    pub fn error_text(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        let msg = v
            .pointer("/error/message")
            .or_else(|| v.get("error_description"))
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error").filter(|e| e.is_string()))
            .and_then(|m| m.as_str());
        let code = v.pointer("/error/code").and_then(|c| c.as_str());
        match msg {
            Some(m) => {
                let text = match code {
                    Some(c) if !m.contains(c) => format!("{c}: {m}"),
                    _ => m.to_string(),
                };
                text.chars().take(500).collect()
            }
            None => String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
                .chars()
                .filter(|c| !c.is_control())
                .collect(),
        }
    }
}

impl Http {
    pub fn new(release: &Release, anchors: &TrustAnchors) -> Result<Http> {
        let timeout = Duration::from_secs(release.timeout_seconds.max(1));
        let build = |direct: bool| -> Result<Client> {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::config(format!("TLS setup: {e}")))?
                .with_root_certificates(anchors.root_store())
                .with_no_client_auth();
            let mut b = Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(timeout)
                .connect_timeout(timeout)
                .user_agent(concat!("skr-pkcs11/", env!("CARGO_PKG_VERSION")))
                // Redirects could carry the bearer token elsewhere; the services never redirect.
                .redirect(reqwest::redirect::Policy::none());
            if direct {
                b = b.no_proxy();
            }
            b.build()
                .map_err(|e| Error::config(format!("HTTP client setup: {e}")))
        };
        Ok(Http {
            client: build(false)?,
            direct: build(true)?,
            retries: release.retries,
            backoff: Duration::from_millis(release.backoff_ms),
            timeout,
            deadline: Instant::now() + Duration::from_secs(release.deadline_seconds.max(1)),
            deadline_seconds: release.deadline_seconds.max(1),
        })
    }

    /// The client for `url`: direct for loopback and link-local hosts (a local emulator, an
    /// App Service identity endpoint, IMDS), where an environment proxy can only be wrong;
    /// the proxy-aware client otherwise.
    pub fn client_for(&self, url: &str) -> &Client {
        let local = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
            .is_some_and(|h| match h.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || ip.is_link_local(),
                Ok(std::net::IpAddr::V6(ip)) => ip.is_loopback(),
                Err(_) => h.eq_ignore_ascii_case("localhost"),
            });
        if local {
            &self.direct
        } else {
            &self.client
        }
    }

    /// Send with retries on transport errors, timeouts, 408, 429 and 5xx. Other statuses are
    /// returned to the caller. `what` names the call in messages, e.g. `MAA attest`.
    ///
    /// Throttled answers (429, or 503 with Retry-After) are retried for as long as the deadline
    /// allows, waiting Retry-After plus a random share of up to half of it, so that a fleet told
    /// the same Retry-After does not come back in lock-step; other failures count against
    /// `retries`. Nothing outlives the login's deadline: each request's timeout is cut to what
    /// is left, and a wait that would end past it ends the call.
    pub fn send(
        &self,
        step: Step,
        what: &str,
        build: &dyn Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let started = Instant::now();
        let deadline = self.deadline;
        let (mut attempts, mut failures, mut throttled) = (0u32, 0u32, 0u32);
        let mut last_cause = String::from("no time left for a request");
        let mut last_throttled = false;
        let out_of_time = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break true;
            }
            attempts += 1;
            let sent = build()
                .timeout(self.timeout.min(left).max(Duration::from_millis(1)))
                .send();
            let wait = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let body = read_capped(resp)
                        .map_err(|e| Error::integrity(step, format!("{what}: response body: {e}")));
                    let retryable = matches!(status, 408 | 429) || status >= 500;
                    if !retryable {
                        return Ok(Response {
                            status,
                            headers,
                            body: body?,
                        });
                    }
                    let r = Response {
                        status,
                        headers,
                        body: body.unwrap_or_default(),
                    };
                    last_cause = format!("HTTP {status}: {}", r.error_text());
                    let retry_after = r
                        .header("retry-after")
                        .and_then(parse_retry_after)
                        .map(|ra| ra.min(MAX_RETRY_AFTER));
                    last_throttled = status == 429 || (status == 503 && retry_after.is_some());
                    if last_throttled {
                        throttled += 1;
                        let base = retry_after
                            .unwrap_or_else(|| self.backoff_for(throttled - 1))
                            .max(MIN_THROTTLED_WAIT);
                        base + self.jitter(base / 2)
                    } else {
                        failures += 1;
                        if failures > self.retries {
                            break false;
                        }
                        retry_after.unwrap_or_else(|| self.backoff_for(failures - 1))
                    }
                }
                Err(e) => {
                    last_cause = describe_transport(&e);
                    last_throttled = false;
                    failures += 1;
                    if failures > self.retries {
                        break false;
                    }
                    self.backoff_for(failures - 1)
                }
            };
            if Instant::now() + wait >= deadline {
                break true;
            }
            log::debug!("{what}: attempt {attempts} failed ({last_cause}); retrying in {wait:?}");
            std::thread::sleep(wait);
        };
        let spent = started.elapsed().as_secs_f64();
        let (message, hint) = if out_of_time {
            (
                format!(
                    "{what} gave up after {attempts} attempt(s) in {spent:.1} s, at the end of the login's release.deadline_seconds = {}: {last_cause}",
                    self.deadline_seconds
                ),
                if last_throttled {
                    "the service throttled this host until the deadline: let fewer hosts log in at once, raise release.deadline_seconds, or spread the keys over more vaults (a managed HSM allows more releases)"
                } else {
                    "the service is slow or failing; check network access, proxy and DNS from this host, then retry (release.deadline_seconds, release.timeout_seconds)"
                },
            )
        } else {
            (
                format!("{what} failed after {attempts} attempt(s) in {spent:.1} s: {last_cause}"),
                "the service is unreachable, slow or failing; check network access, proxy and DNS from this host, then retry (release.retries, release.timeout_seconds)",
            )
        };
        Err(Error::service(step, message).with_hint(hint))
    }

    /// Full-jitter exponential backoff: uniform in [0, backoff · 2^attempt), capped.
    fn backoff_for(&self, attempt: u32) -> Duration {
        let base = self
            .backoff
            .saturating_mul(1u32 << attempt.min(10))
            .min(MAX_RETRY_AFTER);
        self.jitter(base)
    }

    /// Uniform in [0, span). Jitter only spreads retries: without random bytes, no jitter.
    fn jitter(&self, span: Duration) -> Duration {
        let mut r = [0u8; 4];
        match crate::crypto::random(&mut r) {
            Ok(()) => span.mul_f64(f64::from(u32::from_le_bytes(r)) / 4_294_967_296.0),
            Err(_) => Duration::ZERO,
        }
    }
}

fn read_capped(resp: reqwest::blocking::Response) -> std::result::Result<Vec<u8>, String> {
    let mut body = Vec::new();
    resp.take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("read failed: {e}"))?;
    if body.len() > MAX_BODY {
        return Err(format!("larger than {MAX_BODY} bytes"));
    }
    Ok(body)
}

/// Seconds, or an HTTP date.
pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let when = httpdate_to_unix(v)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(when.saturating_sub(now)))
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to Unix seconds.
pub(crate) fn httpdate_to_unix(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    let year: u64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 {
        return None;
    }
    // Only dates a server can mean: this keeps the arithmetic below in range (the fuzzer found
    // `06 Nov 0068` underflowing it, and huge days or years overflow it).
    if !(1..=31).contains(&day)
        || !(1970..=9999).contains(&year)
        || hms[0] > 23
        || hms[1] > 59
        || hms[2] > 60
    {
        return None;
    }
    // Days from civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

fn describe_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transport error"
    };
    // The full source chain names TLS and DNS causes; URLs carry no secrets (tokens travel in
    // headers and bodies only).
    let mut cause = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        cause.push_str(": ");
        cause.push_str(&s.to_string());
        src = s.source();
    }
    format!("{kind} ({cause})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts_bypass_the_proxy() {
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let h = Http::new(&Release::default(), &anchors).unwrap();
        for (url, direct) in [
            ("https://127.0.0.1:8443/keys/a", true),
            ("http://169.254.169.254/metadata", true),
            ("https://[::1]:1/x", true),
            ("http://localhost:5000/msi/token", true),
            ("https://kv.vault.azure.net/keys/a", false),
            ("https://10.0.0.1/x", false),
        ] {
            assert_eq!(std::ptr::eq(h.client_for(url), &h.direct), direct, "{url}");
        }
    }

    #[test]
    fn error_texts_of_each_service() {
        let r = |body: &str| Response {
            status: 400,
            headers: Default::default(),
            body: body.as_bytes().to_vec(),
        };
        assert_eq!(
            r(r#"{"error":{"code":"InvalidParameter","message":"bad VCEK chain"}}"#).error_text(),
            "InvalidParameter: bad VCEK chain"
        );
        assert_eq!(
            r(r#"{"error":"invalid_resource","error_description":"AADSTS500011: no such resource"}"#).error_text(),
            "AADSTS500011: no such resource"
        );
        assert_eq!(
            r("<html>\nBad gateway</html>").error_text(),
            "<html>Bad gateway</html>"
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            httpdate_to_unix("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(httpdate_to_unix("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            httpdate_to_unix("Fri, 31 Dec 9999 23:59:60 GMT"),
            Some(253402300800)
        );
    }

    /// Fuzzer findings (fuzz/corpus/http_dates/crash-*): out-of-range fields are not dates,
    /// never an arithmetic overflow.
    #[test]
    fn dates_out_of_range_are_refused() {
        for bad in [
            "Sun, 06 Nov 0068 08:49:37 GMT",
            "Sun, 00 Nov 1994 08:49:37 GMT",
            "Sun, 99999999999999999 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 18446744073709551615 08:49:37 GMT",
            "Sun, 06 Nov 1994 99999999999:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
        ] {
            assert_eq!(httpdate_to_unix(bad), None, "{bad}");
            assert_eq!(parse_retry_after(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff_is_full_jitter_below_a_growing_cap() {
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let rel = Release {
            backoff_ms: 100,
            ..Release::default()
        };
        let h = Http::new(&rel, &anchors).unwrap();
        for attempt in 0..4 {
            let base = 100u64 << attempt;
            let waits: Vec<u64> = (0..64)
                .map(|_| h.backoff_for(attempt).as_millis() as u64)
                .collect();
            assert!(
                waits.iter().all(|d| *d < base),
                "attempt {attempt}: {waits:?}"
            );
            // Spread over the whole range (each half is hit with probability 1 - 2^-64).
            assert!(waits.iter().any(|d| *d < base / 2), "{waits:?}");
            assert!(waits.iter().any(|d| *d >= base / 2), "{waits:?}");
        }
        assert!(h.backoff_for(30) <= MAX_RETRY_AFTER);
    }

    /// A plain HTTP server answering `replies` in order, one per connection; returns when each
    /// request arrived (relative to the start).
    fn serve_in_order(replies: Vec<String>) -> (u16, std::thread::JoinHandle<Vec<Duration>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        let server = std::thread::spawn(move || {
            let mut arrivals = Vec::new();
            for reply in replies {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                arrivals.push(started.elapsed());
                s.write_all(reply.as_bytes()).unwrap();
            }
            arrivals
        });
        (port, server)
    }

    fn throttled(retry_after: Option<u64>) -> String {
        let header = retry_after
            .map(|s| format!("Retry-After: {s}\r\n"))
            .unwrap_or_default();
        format!("HTTP/1.1 429 Too Many Requests\r\n{header}Content-Length: 0\r\nConnection: close\r\n\r\n")
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

    /// A fleet queued behind a vault's limit: 429s are retried past `retries`, within the
    /// deadline, with or without Retry-After.
    #[test]
    fn throttled_calls_are_retried_beyond_the_retry_count() {
        let mut replies: Vec<String> = (0..3).map(|_| throttled(Some(0))).collect();
        replies.extend((0..3).map(|_| throttled(None)));
        replies.push(OK.to_string());
        let (port, server) = serve_in_order(replies);
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let rel = Release {
            retries: 1,
            backoff_ms: 1,
            deadline_seconds: 30,
            ..Release::default()
        };
        let h = Http::new(&rel, &anchors).unwrap();
        let url = format!("http://127.0.0.1:{port}/x");
        let r = h
            .send(Step::Release, "AKV release", &|| h.direct.get(&url))
            .unwrap();
        assert_eq!(r.status, 200);
        let arrivals = server.join().unwrap();
        assert_eq!(arrivals.len(), 7);
        // Retry-After: 0 and a 1 ms backoff still leave the service a breather.
        for pair in arrivals.windows(2) {
            assert!(pair[1] - pair[0] >= MIN_THROTTLED_WAIT, "{arrivals:?}");
        }
    }

    /// Retry-After is honoured (never earlier), and the deadline ends the wait: with
    /// Retry-After 1 s and a 2 s deadline, exactly two requests, the second ≥ 1 s later.
    #[test]
    fn retry_after_is_honoured_until_the_deadline() {
        let (port, server) = serve_in_order(vec![throttled(Some(1)), throttled(Some(1))]);
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let rel = Release {
            retries: 5,
            backoff_ms: 1,
            deadline_seconds: 2,
            ..Release::default()
        };
        let h = Http::new(&rel, &anchors).unwrap();
        let url = format!("http://127.0.0.1:{port}/x");
        let started = Instant::now();
        let e = h
            .send(Step::Release, "AKV release", &|| h.direct.get(&url))
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let arrivals = server.join().unwrap();
        assert_eq!(arrivals.len(), 2);
        let gap = arrivals[1] - arrivals[0];
        assert!(
            gap >= Duration::from_secs(1) && gap < Duration::from_secs(2),
            "{gap:?}"
        );
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_FAILED);
        assert!(
            e.message().contains("release.deadline_seconds = 2"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("HTTP 429"), "{}", e.message());
        assert!(e.hint().unwrap().contains("throttled"), "{:?}", e.hint());
    }

    /// A server that accepts and never answers cannot hold a call past the deadline, whatever
    /// the per-request timeout.
    #[test]
    fn a_silent_server_is_cut_off_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (_held, _) = listener.accept().unwrap();
            let _ = done_rx.recv();
        });
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let rel = Release {
            retries: 3,
            backoff_ms: 1,
            timeout_seconds: 60,
            deadline_seconds: 1,
            ..Release::default()
        };
        let h = Http::new(&rel, &anchors).unwrap();
        let url = format!("http://127.0.0.1:{port}/x");
        let started = Instant::now();
        let e = h
            .send(Step::Attestation, "MAA attest", &|| h.direct.get(&url))
            .unwrap_err();
        let took = started.elapsed();
        done_tx.send(()).unwrap();
        server.join().unwrap();
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(e.message().contains("timed out"), "{}", e.message());
        // The deadline is the login's: a later call of the same login has no time left and
        // sends nothing (the listener is gone; a request would fail differently).
        let started = Instant::now();
        let e = h
            .send(Step::Release, "AKV release", &|| h.direct.get(&url))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(
            e.message().contains("after 0 attempt(s)"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("no time left"), "{}", e.message());
    }

    #[test]
    fn exhausted_retries_on_refused_connection_are_a_service_error() {
        // A port nobody listens on: connection refused on every attempt.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let rel = Release {
            retries: 2,
            backoff_ms: 1,
            timeout_seconds: 2,
            ..Release::default()
        };
        let h = Http::new(&rel, &anchors).unwrap();
        let url = format!("http://127.0.0.1:{port}/x");
        let e = h
            .send(Step::Attestation, "MAA attest", &|| h.direct.get(&url))
            .unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_FAILED);
        assert!(
            e.message().contains("after 3 attempt(s)"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("connection failed"), "{}", e.message());
        assert!(e.hint().is_some());
    }

    /// 400 / 403 / 404 come back after one request (no retry); 408 is retried.
    #[test]
    fn client_errors_are_not_retried_but_408_is() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let statuses = [400u16, 403, 404, 408, 200];
        let server = std::thread::spawn(move || {
            let mut served = Vec::new();
            for status in statuses {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                served.push(status);
            }
            served
        });
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let rel = Release {
            retries: 3,
            backoff_ms: 1,
            ..Release::default()
        };
        let h = Http::new(&rel, &anchors).unwrap();
        let url = format!("http://127.0.0.1:{port}/x");
        for want in [400, 403, 404] {
            let r = h
                .send(Step::Release, "AKV", &|| h.direct.get(&url))
                .unwrap();
            assert_eq!(r.status, want);
        }
        // 408 then 200: one call, two requests.
        let r = h
            .send(Step::Release, "AKV", &|| h.direct.get(&url))
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(server.join().unwrap(), statuses.to_vec());
    }

    #[test]
    fn retries_5xx_then_returns_success_and_caps_bodies() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let replies = [
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_string(),
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", MAX_BODY + 10),
            ];
            for (i, reply) in replies.iter().enumerate() {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                s.write_all(reply.as_bytes()).unwrap();
                if i == 3 {
                    let _ = s.write_all(&vec![b'a'; MAX_BODY + 10]);
                }
            }
        });
        let anchors = TrustAnchors::with_extra(&[]).unwrap();
        let rel = Release {
            retries: 3,
            backoff_ms: 1,
            ..Release::default()
        };
        let h = Http::new(&rel, &anchors).unwrap();
        let url = format!("http://127.0.0.1:{port}/x");
        let r = h
            .send(Step::Release, "AKV", &|| h.direct.get(&url))
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"ok");
        let e = h
            .send(Step::Release, "AKV", &|| h.direct.get(&url))
            .unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
        assert!(e.message().contains("larger than"), "{}", e.message());
        server.join().unwrap();
    }
}
