//! Web plumbing: static files, response headers, the thread pool size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rocket::fairing::{AdHoc, Fairing, Info, Kind};
use rocket::fs::{FileServer, Options};
use rocket::http::Header;
use rocket::{Data, Request, Response};
use sha2::{Digest, Sha256};

use crate::config::AppConfig;

/// Where static assets live: `STATIC_DIR`, else `static/` in the working directory
/// (the repository, or /app in Docker).
pub fn static_dir() -> PathBuf {
    std::env::var_os("STATIC_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("static"))
}

/// `Missing`: a missing folder is the configuration stage's one-line refusal naming
/// STATIC_DIR (see `config::checked`), not a panic while the routes are mounted.
pub fn static_files() -> FileServer {
    FileServer::new(static_dir(), Options::Index | Options::Missing)
}

/// A fingerprint of every file under `static/`: pages link `?v=<fingerprint>`, so a
/// changed asset gets a new URL while unchanged ones stay cached for a year.
#[derive(Debug, Clone)]
pub struct AssetVersion(pub String);

pub fn fingerprint(dir: &Path) -> String {
    let mut files = Vec::new();
    collect_files(dir, &mut files);
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        let name = file.strip_prefix(dir).unwrap_or(&file);
        hasher.update(name.to_string_lossy().as_bytes());
        hasher.update(std::fs::read(&file).unwrap_or_default());
    }
    hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Computes the asset fingerprint once, at ignite.
pub fn assets() -> AdHoc {
    AdHoc::on_ignite(
        "Asset fingerprint",
        |rocket| async move { rocket.manage(AssetVersion(fingerprint(&static_dir()))) },
    )
}

/// The Content-Security-Policy of every answer. The pages load only their own scripts and
/// stylesheets from `/static` (no inline script, no inline style, no `style=` attribute:
/// `tests/sessions.rs` reads the templates to keep it so); the UI shows the server's
/// images as `blob:` URLs and talks only to this origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// HSTS for answers to clients on TLS: a year, this host only (subdomains may serve other
/// things over plain http).
pub const STRICT_TRANSPORT_SECURITY: &str = "max-age=31536000";

/// When a request started, for the request log.
struct Started(Instant);

/// Security headers on every answer, long caching for versioned static assets, and the
/// one-line request log (method, path without its query, status, time).
pub struct Headers;

pub fn headers() -> Headers {
    Headers
}

#[rocket::async_trait]
impl Fairing for Headers {
    fn info(&self) -> Info {
        Info { name: "Response headers and request log", kind: Kind::Request | Kind::Response }
    }

    async fn on_request(&self, request: &mut Request<'_>, _: &mut Data<'_>) {
        request.local_cache(|| Started(Instant::now()));
    }

    async fn on_response<'r>(&self, request: &'r Request<'_>, response: &mut Response<'r>) {
        response.set_header(Header::new("X-Content-Type-Options", "nosniff"));
        response.set_header(Header::new("X-Frame-Options", "DENY"));
        response.set_header(Header::new("Referrer-Policy", "same-origin"));
        response.set_header(Header::new("Content-Security-Policy", CONTENT_SECURITY_POLICY));
        if crate::front::is_https(request) {
            response.set_header(Header::new("Strict-Transport-Security", STRICT_TRANSPORT_SECURITY));
        }
        if request.uri().path().starts_with("/static/") {
            let versioned = request.uri().query().is_some_and(|q| q.as_str().starts_with("v="));
            let cache = if versioned { "public, max-age=31536000, immutable" } else { "no-cache" };
            response.set_header(Header::new("Cache-Control", cache));
        }
        let took = request.local_cache(|| Started(Instant::now())).0.elapsed();
        // With LOG_FORMAT=json the request line is `observe`'s, a JSON object.
        if crate::observe::json_request_log(request) {
            return;
        }
        // The path only: a query string may carry a credential (`/login?password=...`).
        log::info!(
            target: "drishya::request",
            "{} {} {} {} ms",
            request.method(),
            request.uri().path(),
            response.status().code,
            took.as_millis()
        );
    }
}

/// Drishya's logger, in place of Rocket's (which prints every request's whole URI, query
/// string and all). It writes what Rocket's would, one line per record on stdout, except
/// Rocket's own per-request lines (the request with its URI, the route matched, the
/// outcome), which the one-line request log of [`Headers`] replaces; any URI left in
/// Rocket's other messages (`No matching routes for GET /x?...`) loses its query.
struct Logger;

/// Rocket's launch banner and configuration: shown at every level, as Rocket does.
fn is_launch_record(metadata: &log::Metadata<'_>) -> bool {
    metadata.target().contains("rocket::launch")
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level() || (log::max_level() > log::LevelFilter::Off && is_launch_record(metadata))
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target();
        let from = |prefix: &str| record.module_path().is_some_and(|m| m.starts_with(prefix));
        // As Rocket: the HTTP and TLS libraries only when debugging.
        if log::max_level() < log::LevelFilter::Trace && (from("hyper") || from("rustls") || from("h2")) {
            return;
        }
        if target.starts_with("rocket::server") && record.level() >= log::Level::Info {
            return;
        }
        let text = record.args().to_string();
        let text = if target.starts_with("rocket") { strip_queries(&text) } else { text };
        // Rocket marks continuation lines with a target ending in `_`.
        let indent = if target.ends_with('_') { "   >> " } else { "" };
        let level = if is_launch_record(record.metadata()) { log::Level::Info } else { record.level() };
        let label = match level {
            log::Level::Error if indent.is_empty() => "Error: ",
            log::Level::Warn if indent.is_empty() => "Warning: ",
            _ => "",
        };
        let line = if crate::observe::json_logs() {
            crate::observe::json_record(level, target, &text)
        } else {
            format!("{indent}{label}{text}\n")
        };
        // One write per line, so that lines from several threads do not interleave.
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}

/// Cuts the query string off every URI-looking word (`/login?password=x` -> `/login`).
pub fn strip_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match word.find('?') {
            Some(q) if word[..q].contains('/') => {
                out.push_str(&word[..q]);
                // Keep a sentence's full stop or colon, and end a colour the cut opened.
                if word.contains('\u{1b}') {
                    out.push_str("\u{1b}[0m");
                }
                if let Some(end) = word.chars().last().filter(|c| matches!(c, '.' | ':' | ',')) {
                    out.push(end);
                }
            }
            _ => out.push_str(word),
        }
    }
    out
}

/// Installs Drishya's logger at `level` (Rocket's `log_level`). It must come before
/// `rocket::custom`, which installs Rocket's logger when none is set yet; later calls (and
/// processes where another logger came first, like the tests') change nothing.
pub fn install_logger(level: rocket::config::LogLevel) {
    static LOGGER: Logger = Logger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level.into());
        // From the first line on: the app's own switch (at ignite) comes after a few.
        if crate::config::configured_log_format() == crate::observe::LogFormat::Json {
            crate::observe::use_json_lines();
        }
    }
}

/// Sizes the global rayon pool (`RAYON_THREADS`, default 1) so that nothing in the
/// process starts more threads than configured.
pub fn threads() -> AdHoc {
    AdHoc::on_ignite("Thread pool", |rocket| async move {
        if let Some(cfg) = rocket.state::<AppConfig>() {
            let threads = match cfg.rayon_threads {
                0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                n => n,
            };
            // Only the first build in a process can size the global pool (tests build many).
            let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
        }
        rocket
    })
}

/// `GET /health` (liveness) or, with `ready`, `GET /ready` (readiness) on this machine's
/// port (as configured: PORT, ROCKET_PORT, Rocket.toml); success when it answers 200
/// within 3 s. Loopback over IPv4, then IPv6 (a server bound to `::1` only).
pub fn healthcheck(ready: bool) -> std::process::ExitCode {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::time::Duration;
    let port = crate::config::configured_port().unwrap_or(8000);
    let path = if ready { "/ready" } else { "/health" };
    let check = |addr: SocketAddr| -> std::io::Result<bool> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    };
    let loopbacks = [SocketAddr::from((Ipv4Addr::LOCALHOST, port)), SocketAddr::from((Ipv6Addr::LOCALHOST, port))];
    if loopbacks.into_iter().any(|addr| check(addr).unwrap_or(false)) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_cut_from_logged_uris() {
        assert_eq!(
            strip_queries("POST /login?password=hunter2 application/x-www-form-urlencoded:"),
            "POST /login application/x-www-form-urlencoded:"
        );
        assert_eq!(strip_queries("No matching routes for GET /x/y?token=abc."), "No matching routes for GET /x/y.");
        assert_eq!(strip_queries("what? no path here"), "what? no path here");
        assert!(!strip_queries("GET \u{1b}[34m/a?k=secret\u{1b}[0m").contains("secret"));
    }
}
