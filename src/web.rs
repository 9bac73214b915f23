//! Web plumbing: static files, response headers, the thread pool size.

use std::path::{Path, PathBuf};

use rocket::fairing::AdHoc;
use rocket::fs::{FileServer, Options};
use rocket::http::Header;
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

/// Security headers on every answer; long caching for versioned static assets.
pub fn headers() -> AdHoc {
    AdHoc::on_response("Response headers", |request, response| {
        Box::pin(async move {
            response.set_header(Header::new("X-Content-Type-Options", "nosniff"));
            response.set_header(Header::new("X-Frame-Options", "DENY"));
            response.set_header(Header::new("Referrer-Policy", "same-origin"));
            if request.uri().path().starts_with("/static/") {
                let versioned = request.uri().query().is_some_and(|q| q.as_str().starts_with("v="));
                let cache = if versioned { "public, max-age=31536000, immutable" } else { "no-cache" };
                response.set_header(Header::new("Cache-Control", cache));
            }
        })
    })
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
