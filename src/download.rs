//! Streaming, size-capped, all-or-nothing download of model files over HTTP(S).
//!
//! Models may be configured as `http://` or `https://` URLs; they are fetched on first
//! use into a cache folder. The lessons of the Flask app (a 1 GB model on a 512 MB
//! host) shape this module:
//!
//! * the body is streamed in fixed 1 MiB chunks, never held whole in memory;
//! * a model larger than `max_bytes` is refused, up front when the server announces
//!   its `Content-Length`, otherwise as soon as the stream passes the limit;
//! * connecting and every read have time-outs, so a stalled server cannot hang the
//!   first mask request forever;
//! * bytes go to a temporary sibling `<dest>.part-<unique>`, which is fsynced and
//!   renamed to `dest` only when it is complete (the announced length, within the
//!   limit, the expected SHA-256 when one is given). On any failure the temporary
//!   file is removed and `dest` is left as it was (absent, or the previous file);
//! * progress is logged at least every 10 % (every 8 MiB when the length is
//!   unknown), and URLs are always logged through [`redact_url`]: their user
//!   information, query string and fragment can hold access tokens;
//! * the transfers under way are listed by [`in_progress`] (for `/health`, which the
//!   page polls to show "downloading n %" while the first mask waits for the model).
//!
//! Limits: a body that ends by closing the connection (no `Content-Length`, not
//! chunked) cannot be told apart from a cut-off one, so give `sha256` for such
//! servers; and `read_timeout` bounds each silence, not the total time, so a server
//! that trickles bytes slowly is not cut off (no total limit: big models on slow links
//! legitimately take minutes).
//!
//! Sizes in messages are in MB of 2^20 bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Size of the single buffer the body is streamed through.
const CHUNK_SIZE: usize = 1 << 20;
/// One MB as used in messages (2^20 bytes).
const MB: u64 = 1 << 20;
/// Progress-log interval when the server does not announce the length.
const UNKNOWN_LENGTH_LOG_STEP: u64 = 8 * MB;
/// Temporary files of dead downloads older than this are removed before a new one.
const STALE_PART_AGE: Duration = Duration::from_secs(3600);
/// Marker between the destination file name and the unique suffix of temporary files.
const PART_MARKER: &str = ".part-";
/// Sent as `User-Agent`.
const USER_AGENT: &str = concat!("drishya-model-download/", env!("CARGO_PKG_VERSION"));

/// What to download, where to, and under which limits.
#[derive(Debug, Clone, Copy)]
pub struct DownloadRequest<'a> {
    /// `http://` or `https://` URL of the file. Redirects are followed.
    pub url: &'a str,
    /// Final path of the file; its parent directory is created if missing.
    pub dest: &'a Path,
    /// Expected SHA-256 of the file as 64 hex digits; verified when given.
    pub sha256: Option<&'a str>,
    /// Largest acceptable file size in bytes.
    pub max_bytes: u64,
    /// Limit for resolving the host name and for establishing the connection.
    pub connect_timeout: Duration,
    /// Longest silence accepted from the server: waiting for the response headers,
    /// and between any two reads of the body.
    pub read_timeout: Duration,
}

/// Why a download failed. Every message names the (redacted) URL and, where the
/// operator can do something about it, says what.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The URL is not an `http://` or `https://` URL with a host.
    #[error("invalid model URL `{url}`: {reason}; give an http:// or https:// URL (or a local file path)")]
    BadUrl {
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured SHA-256 is not 64 hexadecimal digits.
    #[error("invalid expected SHA-256 `{value}` for the model: it must be 64 hexadecimal digits; fix the configured checksum or remove it")]
    InvalidSha256 {
        /// The configured value.
        value: String,
    },
    /// The server could not be reached.
    #[error("could not connect to {url} to download the model: {reason}; check the URL, DNS and the network (or proxy) settings")]
    Connect {
        /// The URL, redacted.
        url: String,
        /// The underlying cause.
        reason: String,
    },
    /// A time-out expired while connecting or waiting for data.
    #[error("model download from {url} timed out: {reason}; the server or the network is too slow or stalled: retry later, or raise the download time-out")]
    Timeout {
        /// The URL, redacted.
        url: String,
        /// Which wait expired, and how long it was.
        reason: String,
    },
    /// The server answered with a status other than 200 OK.
    #[error("model download from {url} failed: the server answered HTTP {status}{}", status_hint(*.status))]
    HttpStatus {
        /// The URL, redacted.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The model is larger than allowed.
    #[error("{}", too_large_text(.url, *.size_mb, *.max_mb, *.size_known))]
    TooLarge {
        /// The URL, redacted.
        url: String,
        /// Size of the model in MB, rounded up; a lower bound unless `size_known`.
        size_mb: u64,
        /// The limit in MB, rounded down.
        max_mb: u64,
        /// Whether `size_mb` comes from the announced `Content-Length`.
        size_known: bool,
    },
    /// The connection ended before the whole file arrived.
    #[error("model download from {url} was cut off after {got}{} bytes; the connection dropped: retry", expected_text(*.expected))]
    Truncated {
        /// The URL, redacted.
        url: String,
        /// Bytes received.
        got: u64,
        /// Bytes announced by `Content-Length`, when known.
        expected: Option<u64>,
    },
    /// The downloaded bytes do not have the expected SHA-256.
    #[error("model downloaded from {url} is not the expected file: its SHA-256 is {actual}, expected {expected}; check the URL and the configured checksum")]
    Checksum {
        /// The URL, redacted.
        url: String,
        /// The configured SHA-256 (lowercase hex).
        expected: String,
        /// The SHA-256 of what was received (lowercase hex).
        actual: String,
    },
    /// The server broke the HTTP protocol (bad chunking, too many redirects, ...).
    #[error("model download from {url} failed: {reason}")]
    Protocol {
        /// The URL, redacted.
        url: String,
        /// The underlying cause.
        reason: String,
    },
    /// A local file operation failed (disk full, permissions, ...).
    #[error("model download: could not {action} `{}`: {source}; check that the model cache folder exists, is writable and has free space", .path.display())]
    Io {
        /// What was being done, e.g. "write to".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl DownloadError {
    /// Whether the download was refused because the model exceeds `max_bytes`.
    #[must_use]
    pub fn is_too_large(&self) -> bool {
        matches!(self, DownloadError::TooLarge { .. })
    }
}

/// Downloads `req.url` to `req.dest`, all or nothing, and returns the bytes written.
///
/// On success `dest` holds the complete file (replacing any previous one). On error
/// nothing new is left on disk and a previous `dest` is untouched.
///
/// # Errors
///
/// Every [`DownloadError`] variant: a bad URL or checksum, connection failures and
/// time-outs, a non-200 status, a model over `max_bytes`, a cut-off body, a SHA-256
/// mismatch, a protocol violation, or a local file error.
pub fn download(req: &DownloadRequest) -> Result<u64, DownloadError> {
    let url = redact_url(req.url);
    check_url(req.url, &url)?;
    let expected_sha256 = req.sha256.map(normalise_sha256).transpose()?;
    let response = send_request(req, &url)?;
    let announced = response.body().content_length();
    check_announced_size(announced, req.max_bytes, &url)?;

    let mut part = PartFile::create(req.dest, req.read_timeout)?;
    log_start(&url, req, announced);
    let started = Instant::now();
    let transfer = Transfer { url: &url, max_bytes: req.max_bytes, announced, read_timeout: req.read_timeout };
    // Listed from the first body byte until this function returns, whatever the outcome.
    let _listed = Listed::new(&url, announced);
    let mut reader = response.into_body().into_reader();
    let copied = copy_body(&mut reader, &mut part, &transfer)?;
    verify_checksum(expected_sha256.as_deref(), &copied.sha256, &url)?;
    part.commit(req.dest)?;
    log_done(req.dest, &copied, started.elapsed());
    Ok(copied.bytes)
}

/// A URL with anything that might hold a credential (user information, query
/// string, fragment) replaced by `***`, for logs and error messages.
///
/// `https://user:pw@host/m.onnx?sig=abc` becomes `https://***@host/m.onnx?***`.
///
/// When the part after `://` does not parse as `[userinfo@]host[:port]...` (say, a
/// password with an unescaped `#`), everything after `://` is hidden.
#[must_use]
pub fn redact_url(url: &str) -> String {
    let parts = UrlParts::split(url);
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = parts.scheme {
        out.push_str(scheme);
        out.push_str("://");
        if !plausible_host_port(parts.host_port) {
            out.push_str("***");
            return out;
        }
    }
    if parts.userinfo.is_some() {
        out.push_str("***@");
    }
    out.push_str(parts.host_port);
    out.push_str(parts.path);
    if parts.query.is_some() {
        out.push_str("?***");
    }
    if parts.fragment.is_some() {
        out.push_str("#***");
    }
    out
}

/// The pieces of a URL, as far as this module needs them (no percent-decoding).
#[derive(Debug, Default)]
struct UrlParts<'a> {
    scheme: Option<&'a str>,
    userinfo: Option<&'a str>,
    host_port: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    fragment: Option<&'a str>,
}

impl<'a> UrlParts<'a> {
    /// Splits `scheme://userinfo@host:port/path?query#fragment`; a string without
    /// `://` is all path (plus query and fragment).
    ///
    /// Errs on the side of secrecy for malformed URLs: the user information runs to
    /// the last `@` before any `?` or `#`, even past a `/`, so that an unescaped `/`
    /// in a password (base64 tokens) is still hidden.
    fn split(url: &'a str) -> Self {
        let (scheme, after_scheme) = match url.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, url),
        };
        let (userinfo, rest) = match scheme.and_then(|_| userinfo_end(after_scheme)) {
            Some(at) => (Some(&after_scheme[..at]), &after_scheme[at + 1..]),
            None => (None, after_scheme),
        };
        let (rest, fragment) = split_off(rest, '#');
        let (rest, query) = split_off(rest, '?');
        let (host_port, path) = match scheme {
            Some(_) => rest.split_at(rest.find('/').unwrap_or(rest.len())),
            None => ("", rest),
        };
        UrlParts { scheme, userinfo, host_port, path, query, fragment }
    }
}

/// Whether `s` looks like `host`, `host:port` or `[ipv6]:port` (possibly empty).
fn plausible_host_port(s: &str) -> bool {
    let host_char = |c: char| c.is_ascii_alphanumeric() || "-._~%".contains(c);
    let digits = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    if let Some(bracketed) = s.strip_prefix('[') {
        return match bracketed.split_once(']') {
            Some((ip, rest)) => {
                ip.chars().all(|c| c.is_ascii_hexdigit() || ".:".contains(c))
                    && (rest.is_empty() || rest.strip_prefix(':').is_some_and(digits))
            }
            None => false,
        };
    }
    let (host, port) = split_off(s, ':');
    host.chars().all(host_char) && port.is_none_or(digits)
}

/// Index of the `@` ending the user information: the last one before `?` or `#`.
fn userinfo_end(after_scheme: &str) -> Option<usize> {
    let end = after_scheme.find(['?', '#']).unwrap_or(after_scheme.len());
    after_scheme[..end].rfind('@')
}

/// Splits `s` at the first `sep`, which is dropped.
fn split_off(s: &str, sep: char) -> (&str, Option<&str>) {
    match s.split_once(sep) {
        Some((before, after)) => (before, Some(after)),
        None => (s, None),
    }
}

/// Accepts only `http://` and `https://` URLs with a host and no whitespace.
fn check_url(raw: &str, url: &str) -> Result<(), DownloadError> {
    let bad = |reason: &str| DownloadError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains spaces or control characters"));
    }
    let parts = UrlParts::split(raw);
    let Some(scheme) = parts.scheme else {
        return Err(bad("it has no scheme"));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(bad(&format!("scheme `{scheme}` is not supported")));
    }
    if parts.host_port.is_empty() || parts.host_port.starts_with(':') {
        return Err(bad("it has no host"));
    }
    if !plausible_host_port(parts.host_port) {
        return Err(bad("its host or port is malformed"));
    }
    Ok(())
}

/// Trims and lowercases a configured SHA-256, which must be 64 hex digits.
fn normalise_sha256(value: &str) -> Result<String, DownloadError> {
    let hex = value.trim().to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(DownloadError::InvalidSha256 { value: value.to_owned() })
    }
}

/// Builds a one-off agent with the request's time-outs, status errors turned off and
/// no compression (so `Content-Length` is the length of the file).
fn build_agent(req: &DownloadRequest) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_resolve(Some(req.connect_timeout))
        .timeout_connect(Some(req.connect_timeout))
        .timeout_send_request(Some(req.read_timeout))
        .timeout_recv_response(Some(req.read_timeout))
        .timeout_per_read(Some(req.read_timeout))
        .accept_encoding("identity")
        .user_agent(USER_AGENT)
        .build()
        .into()
}

/// Sends the GET and returns the response if its status is 200 OK.
fn send_request(req: &DownloadRequest, url: &str) -> Result<Response, DownloadError> {
    let response = build_agent(req).get(req.url).call().map_err(|e| request_error(e, url, req))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(DownloadError::HttpStatus { url: url.to_owned(), status });
    }
    Ok(response)
}

/// What `ureq` returns from `call()`.
type Response = ureq::http::Response<ureq::Body>;

/// Maps an error of the request phase (before the body) to a [`DownloadError`].
fn request_error(err: ureq::Error, url: &str, req: &DownloadRequest) -> DownloadError {
    let url = url.to_owned();
    match err {
        ureq::Error::Timeout(which) => DownloadError::Timeout { reason: timeout_reason(which, req), url },
        ureq::Error::Io(e) if is_timeout(&e) => {
            DownloadError::Timeout { reason: format!("no answer within {}", secs(req.read_timeout)), url }
        }
        ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::RequireHttpsOnly(_) => {
            DownloadError::BadUrl { url, reason: "it cannot be parsed".to_owned() }
        }
        ureq::Error::HostNotFound => {
            DownloadError::Connect { url, reason: "the host name could not be resolved".to_owned() }
        }
        ureq::Error::Io(e) => DownloadError::Connect { url, reason: e.to_string() },
        ureq::Error::ConnectionFailed
        | ureq::Error::Tls(_)
        | ureq::Error::ConnectProxyFailed(_)
        | ureq::Error::InvalidProxyUrl => DownloadError::Connect { url, reason: err.to_string() },
        other => DownloadError::Protocol { url, reason: other.to_string() },
    }
}

/// Describes which time-out of the request phase expired.
fn timeout_reason(which: ureq::Timeout, req: &DownloadRequest) -> String {
    match which {
        ureq::Timeout::Resolve => format!("resolving the host name took longer than {}", secs(req.connect_timeout)),
        ureq::Timeout::Connect => format!("no connection within {}", secs(req.connect_timeout)),
        _ => format!("the server sent nothing for {}", secs(req.read_timeout)),
    }
}

/// Whether an I/O error is a socket time-out.
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// Refuses a model whose announced length exceeds the limit, before any body byte.
fn check_announced_size(announced: Option<u64>, max_bytes: u64, url: &str) -> Result<(), DownloadError> {
    match announced {
        Some(size) if size > max_bytes => Err(too_large(url, size, max_bytes, true)),
        _ => Ok(()),
    }
}

/// Builds [`DownloadError::TooLarge`] from byte counts.
fn too_large(url: &str, size: u64, max_bytes: u64, size_known: bool) -> DownloadError {
    DownloadError::TooLarge { url: url.to_owned(), size_mb: size.div_ceil(MB), max_mb: max_bytes / MB, size_known }
}

/// The message of [`DownloadError::TooLarge`].
fn too_large_text(url: &str, size_mb: u64, max_mb: u64, size_known: bool) -> String {
    let what = if size_known {
        format!("is {size_mb} MB, over the {max_mb} MB limit, so it was not downloaded")
    } else {
        format!(
            "is over the {max_mb} MB limit (its size was not announced; the download was \
             stopped at {size_mb} MB and removed)"
        )
    };
    format!(
        "model at {url} {what}: a model that large risks running out of memory; quantize it \
         (e.g. to int8), pick a smaller model, or raise MAX_MODEL_MB if the host has the memory"
    )
}

/// Hint appended to the message of [`DownloadError::HttpStatus`].
fn status_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => " (access denied): check the access token in the URL, or that the file is public",
        404 | 410 => " (not found): check the model URL",
        429 => " (rate limited): retry later",
        300..=399 => " (unfollowed redirect): use the final URL of the file",
        500..=599 => " (server error): retry later",
        _ => " (expected 200 OK)",
    }
}

/// The "of N bytes" part of [`DownloadError::Truncated`].
fn expected_text(expected: Option<u64>) -> String {
    expected.map(|n| format!(" of {n}")).unwrap_or_default()
}

/// A duration for messages, e.g. "1.5 s".
fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A byte count for logs, e.g. "12.3 MB".
fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / MB as f64)
}

/// The fixed facts of one transfer, used while streaming the body.
struct Transfer<'a> {
    url: &'a str,
    max_bytes: u64,
    announced: Option<u64>,
    read_timeout: Duration,
}

/// The outcome of streaming a body into the temporary file.
struct Copied {
    bytes: u64,
    sha256: String,
}

/// Streams `reader` into `part` through one fixed buffer, hashing as it goes and
/// enforcing the size limit and the announced length.
fn copy_body(reader: &mut impl Read, part: &mut PartFile, t: &Transfer) -> Result<Copied, DownloadError> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut hasher = Sha256::new();
    let mut progress = Progress::new(part.dest_name.clone(), t.announced);
    let mut got: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(body_error(e, got, t)),
        };
        let total = got + n as u64;
        if total > t.max_bytes {
            return Err(too_large(t.url, total, t.max_bytes, false));
        }
        let chunk = &buf[..n];
        part.write_all(chunk)?;
        hasher.update(chunk);
        got = total;
        progress.advance(got);
        Listed::update(t.url, got);
    }
    match t.announced {
        Some(expected) if got != expected => {
            Err(DownloadError::Truncated { url: t.url.to_owned(), got, expected: Some(expected) })
        }
        _ => Ok(Copied { bytes: got, sha256: to_hex(&hasher.finalize()) }),
    }
}

/// Maps an error while reading the body to a [`DownloadError`].
fn body_error(err: io::Error, got: u64, t: &Transfer) -> DownloadError {
    let url = t.url.to_owned();
    let stalled = || DownloadError::Timeout {
        url: t.url.to_owned(),
        reason: format!("the server sent nothing for {} after {got} bytes", secs(t.read_timeout)),
    };
    match ureq::Error::from(err) {
        ureq::Error::Timeout(_) => stalled(),
        ureq::Error::Io(e) if is_timeout(&e) => stalled(),
        ureq::Error::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
            ) =>
        {
            DownloadError::Truncated { url, got, expected: t.announced }
        }
        other => DownloadError::Protocol { url, reason: format!("error after {got} bytes: {other}") },
    }
}

/// Compares the received SHA-256 with the expected one, if any.
fn verify_checksum(expected: Option<&str>, actual: &str, url: &str) -> Result<(), DownloadError> {
    match expected {
        Some(expected) if expected != actual => Err(DownloadError::Checksum {
            url: url.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Lowercase hex of a digest.
fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Logs the start of a transfer.
fn log_start(url: &str, req: &DownloadRequest, announced: Option<u64>) {
    let size = announced.map_or_else(|| "size not announced".to_owned(), mb);
    log::info!("downloading model from {url} to {} ({size}, limit {})", req.dest.display(), mb(req.max_bytes));
}

/// Logs a completed transfer with its rate and SHA-256 (handy for pinning it).
fn log_done(dest: &Path, copied: &Copied, elapsed: Duration) {
    let rate = copied.bytes as f64 / MB as f64 / elapsed.as_secs_f64().max(1e-3);
    log::info!(
        "model download complete: {} ({}, {}, {rate:.1} MB/s, sha256 {})",
        dest.display(),
        mb(copied.bytes),
        secs(elapsed),
        copied.sha256
    );
}

/// One model download under way, as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownloadProgress {
    /// The model's URL, redacted.
    pub url: String,
    /// Bytes received so far.
    pub bytes: u64,
    /// The announced length, when the server gave one.
    pub total_bytes: Option<u64>,
    /// Whole percent received (rounded down), when the length is known.
    pub percent: Option<u8>,
}

impl DownloadProgress {
    fn percent_of(bytes: u64, total: Option<u64>) -> Option<u8> {
        total.map(|t| (u128::from(bytes.min(t)) * 100 / u128::from(t.max(1))) as u8)
    }
}

/// The downloads under way in this process. Loads are one at a time (the model slot's
/// lock), so the list holds at most one entry but for tests downloading side by side.
static ACTIVE: Mutex<Vec<DownloadProgress>> = Mutex::new(Vec::new());

/// The model downloads under way now: cheap (a copy of a list of at most a few entries).
#[must_use]
pub fn in_progress() -> Vec<DownloadProgress> {
    ACTIVE.lock().map(|list| list.clone()).unwrap_or_else(|e| e.into_inner().clone())
}

/// A transfer's entry in [`ACTIVE`], removed when dropped. Entries are found by their
/// (redacted) URL: two simultaneous downloads of the same URL share one line, which is
/// all a progress display needs.
struct Listed {
    url: String,
}

impl Listed {
    fn new(url: &str, total: Option<u64>) -> Self {
        let entry = DownloadProgress {
            url: url.to_owned(),
            bytes: 0,
            total_bytes: total,
            percent: DownloadProgress::percent_of(0, total),
        };
        let mut list = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        list.push(entry);
        Listed { url: url.to_owned() }
    }

    /// Records `got` bytes received for `url`. Called per read: an uncontended lock
    /// costs nothing beside a read from the network.
    fn update(url: &str, got: u64) {
        let mut list = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = list.iter_mut().find(|e| e.url == url) {
            entry.bytes = got;
            entry.percent = DownloadProgress::percent_of(got, entry.total_bytes);
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut list = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = list.iter().position(|e| e.url == self.url) {
            list.remove(at);
        }
    }
}

/// Logs download progress every 10 % of a known length, or every 8 MiB.
struct Progress {
    name: String,
    total: Option<u64>,
    step: u64,
    next: u64,
}

impl Progress {
    /// Progress of the download to the file called `name`, `total` bytes if known.
    fn new(name: String, total: Option<u64>) -> Self {
        let step = total.map_or(UNKNOWN_LENGTH_LOG_STEP, |t| (t / 10).max(1));
        Progress { name, total, step, next: step }
    }

    /// Records that `got` bytes have arrived, logging when a mark is passed.
    fn advance(&mut self, got: u64) {
        if got < self.next {
            return;
        }
        self.next = (got / self.step + 1) * self.step;
        match self.total {
            Some(total) => {
                let pct = u128::from(got) * 100 / u128::from(total.max(1));
                log::info!("model download {}: {pct}% ({} of {})", self.name, mb(got), mb(total));
            }
            None => log::info!("model download {}: {} so far", self.name, mb(got)),
        }
    }
}

/// The temporary `<dest>.part-<unique>` file a download is written to. Removed on
/// drop unless [`PartFile::commit`] renamed it to its destination.
struct PartFile {
    path: PathBuf,
    file: Option<File>,
    dest_name: String,
}

impl PartFile {
    /// Creates the parent folder of `dest` if needed, removes temporary files of
    /// downloads that died long ago, and creates a fresh temporary file.
    fn create(dest: &Path, read_timeout: Duration) -> Result<Self, DownloadError> {
        let dest_name = dest
            .file_name()
            .ok_or_else(|| io_error("use as a file name", dest, io::ErrorKind::InvalidInput.into()))?
            .to_string_lossy()
            .into_owned();
        let dir = parent_dir(dest);
        fs::create_dir_all(&dir).map_err(|e| io_error("create the folder", &dir, e))?;
        remove_stale_parts(&dir, &dest_name, STALE_PART_AGE.max(read_timeout * 2));
        let (path, file) = create_unique(&dir, &dest_name)?;
        Ok(PartFile { path, file: Some(file), dest_name })
    }

    /// Appends `chunk` to the file.
    fn write_all(&mut self, chunk: &[u8]) -> Result<(), DownloadError> {
        let path = &self.path;
        match self.file.as_mut() {
            Some(file) => file.write_all(chunk).map_err(|e| io_error("write to", path, e)),
            None => Err(io_error("write to", path, io::ErrorKind::NotConnected.into())),
        }
    }

    /// Flushes the file to disk and renames it to `dest`, replacing any old file.
    fn commit(mut self, dest: &Path) -> Result<(), DownloadError> {
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(|e| io_error("flush to disk", &self.path, e))?;
        }
        fs::rename(&self.path, dest).map_err(|e| io_error("rename the download to", dest, e))?;
        self.path = PathBuf::new();
        sync_dir(&parent_dir(dest));
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        self.file.take();
        if self.path.as_os_str().is_empty() {
            return;
        }
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("could not remove the incomplete download {}: {e}", self.path.display());
        }
    }
}

/// The folder `dest` lives in (`.` for a bare file name).
fn parent_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `<dir>/<name>.part-<pid>-<time>-<counter>` exclusively.
fn create_unique(dir: &Path, name: &str) -> Result<(PathBuf, File), DownloadError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut last_err = io::ErrorKind::AlreadyExists.into();
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{name}{PART_MARKER}{}-{nanos:x}-{n}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = e,
            Err(e) => return Err(io_error("create the temporary file", &path, e)),
        }
    }
    Err(io_error("create a temporary file in", dir, last_err))
}

/// Removes `<name>.part-*` files in `dir` untouched for longer than `min_age`: left
/// by a process killed mid-download (they would otherwise fill the disk, or RAM when
/// the cache is on tmpfs). Best effort; live downloads write far more often.
fn remove_stale_parts(dir: &Path, name: &str, min_age: Duration) {
    let prefix = format!("{name}{PART_MARKER}");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > min_age) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => log::info!("removed stale incomplete download {}", path.display()),
                Err(e) => log::warn!("could not remove stale incomplete download {}: {e}", path.display()),
            }
        }
    }
}

/// Makes a rename in `dir` durable (best effort: not possible on every platform).
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::debug!("could not sync folder {}: {e}", dir.display());
    }
}

/// Builds [`DownloadError::Io`].
fn io_error(action: &'static str, path: &Path, source: io::Error) -> DownloadError {
    DownloadError::Io { action, path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_url("https://user:pw@example.com:8443/a/m.onnx?sig=abc&x=1#frag"),
            "https://***@example.com:8443/a/m.onnx?***#***"
        );
        assert_eq!(redact_url("http://example.com/m.onnx"), "http://example.com/m.onnx");
        assert_eq!(redact_url("http://h?tok=1"), "http://h?***");
        assert_eq!(redact_url("http://u@h/p@q"), "http://***@q");
        assert_eq!(redact_url("http://[::1]:8080/m"), "http://[::1]:8080/m");
        assert_eq!(redact_url("models/m.onnx?x"), "models/m.onnx?***");
        // malformed: unescaped `/`, `#` or `?` in a password must not leak it
        assert_eq!(redact_url("https://u:ab/cd@h/m"), "https://***@h/m");
        assert_eq!(redact_url("https://u:ab#cd@h/m"), "https://***");
        assert_eq!(redact_url("https://u:ab?cd@h/m"), "https://***");
        assert_eq!(redact_url("https://u:ab"), "https://***");
        assert_eq!(redact_url("https://h/m?t=x@y"), "https://h/m?***");
    }

    #[test]
    fn checks_urls() {
        for ok in ["http://h/m.onnx", "HTTPS://h:1/m", "http://u:p@h"] {
            assert!(check_url(ok, ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://h:abc/m",
            "http://u:p#w@h/m",
            "ftp://h/m",
            "file:///m.onnx",
            "/models/m.onnx",
            "http://",
            "http://:80/x",
            "http://h/a b",
        ] {
            assert!(matches!(check_url(bad, bad), Err(DownloadError::BadUrl { .. })), "{bad}");
        }
    }

    #[test]
    fn normalises_sha256() {
        let upper = "AB".repeat(32);
        assert_eq!(normalise_sha256(&upper).ok(), Some("ab".repeat(32)));
        assert!(normalise_sha256("abc").is_err());
        assert!(normalise_sha256(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn too_large_message_is_actionable() {
        let e = too_large("http://h/m", 1003 * MB, 350 * MB, true);
        let msg = e.to_string();
        assert!(e.is_too_large());
        assert!(msg.contains("1003 MB") && msg.contains("350 MB"), "{msg}");
        assert!(msg.contains("quantize") && msg.contains("smaller model") && msg.contains("MAX_MODEL_MB"), "{msg}");
        let streamed = too_large("http://h/m", 350 * MB + 1, 350 * MB, false).to_string();
        assert!(streamed.contains("over the 350 MB limit (its size was not announced"), "{streamed}");
    }

    /// A transfer half-way shows in `in_progress` with its bytes and percent (URL
    /// redacted), and is gone once the download has returned.
    #[test]
    fn lists_a_download_while_it_runs_and_forgets_it_after() {
        use std::io::BufRead;
        use std::net::TcpListener;
        use std::sync::mpsc;

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let body = vec![7u8; 256 * 1024];
        let (len, half) = (body.len() as u64, body.len() / 2);
        let (go_on, resume) = mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = io::BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line != "\r\n" {
                line.clear();
            }
            let mut stream = stream;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            stream.write_all(head.as_bytes()).expect("head");
            stream.write_all(&body[..half]).expect("first half");
            stream.flush().expect("flush");
            resume.recv().expect("resume");
            stream.write_all(&body[half..]).expect("second half");
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("m.onnx");
        let url = format!("http://127.0.0.1:{port}/m.onnx?token=secret");
        let shown = format!("http://127.0.0.1:{port}/m.onnx?***");
        let fetch = {
            let (url, dest) = (url.clone(), dest.clone());
            std::thread::spawn(move || {
                download(&DownloadRequest {
                    url: &url,
                    dest: &dest,
                    sha256: None,
                    max_bytes: 1 << 30,
                    connect_timeout: Duration::from_secs(5),
                    read_timeout: Duration::from_secs(20),
                })
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let seen = loop {
            let entry = in_progress().into_iter().find(|e| e.url == shown);
            if let Some(e) = entry.filter(|e| e.bytes == half as u64) {
                break e;
            }
            assert!(Instant::now() < deadline, "the half-way download never showed: {:?}", in_progress());
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(seen.total_bytes, Some(len));
        assert_eq!(seen.percent, Some(50));
        go_on.send(()).expect("resume the server");
        let got = fetch.join().expect("download thread");
        server.join().expect("server thread");
        assert_eq!(got.ok(), Some(len));
        assert!(in_progress().iter().all(|e| e.url != shown), "still listed after the end: {:?}", in_progress());
        assert!(!format!("{:?}", in_progress()).contains("secret"));
    }

    #[test]
    fn percent_is_whole_and_capped() {
        assert_eq!(DownloadProgress::percent_of(0, Some(3)), Some(0));
        assert_eq!(DownloadProgress::percent_of(2, Some(3)), Some(66));
        assert_eq!(DownloadProgress::percent_of(5, Some(3)), Some(100));
        assert_eq!(DownloadProgress::percent_of(5, None), None);
    }

    #[test]
    fn progress_steps() {
        let mut p = Progress::new("m".into(), Some(1000));
        assert_eq!(p.step, 100);
        p.advance(250);
        assert_eq!(p.next, 300);
        let p = Progress::new("m".into(), None);
        assert_eq!(p.step, UNKNOWN_LENGTH_LOG_STEP);
    }
}
