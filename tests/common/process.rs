//! Real processes on real sockets: the binary started as deployments start it, and a
//! tiny HTTP/1.1 client (one request per connection) to talk to it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{multipart, read, shared, Part};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub fn binary() -> PathBuf {
    std::env::var_os("DRISHYA_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_drishya").into())
}

/// A port below the kernel's ephemeral range, free on every address. A port from bind(0) lies
/// inside that range, where every outgoing connection of a parallel test also takes its local
/// port, and one taken between this check and the server's bind fails its start with "Address
/// already in use"; below it only another test picking the same random port could collide.
/// (scripts/free_port.py does the same for the scripts.)
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 20000;
    // Free on IPv6 (dual stack, so IPv4 too); IPv4 alone only where the kernel has no IPv6.
    let bindable = |port: u16| match std::net::TcpListener::bind(("::", port)) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => false,
        Err(_) => std::net::TcpListener::bind(("0.0.0.0", port)).is_ok(),
    };
    if high.saturating_sub(LOWEST) >= 1000 {
        for _ in 0..200 {
            // std's randomly keyed hasher: a random number without a crate for it.
            let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
            let port = LOWEST + (random % u64::from(high - LOWEST)) as u16;
            if bindable(port) {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("[::]:0")
        .or_else(|_| std::net::TcpListener::bind("0.0.0.0:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A working directory laid out like the image's /app: templates, static, Rocket.toml,
/// models/u2netp.onnx.
pub fn app_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["templates", "static"] {
        std::os::unix::fs::symlink(Path::new(REPO).join(name), dir.path().join(name)).unwrap();
    }
    std::fs::copy(Path::new(REPO).join("Rocket.toml"), dir.path().join("Rocket.toml")).unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::os::unix::fs::symlink(shared("models/u2netp.onnx"), dir.path().join("models/u2netp.onnx")).unwrap();
    dir
}

pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `command` with nothing of this process's environment but PATH, run in `dir`.
pub fn command(dir: &Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(binary());
    command.current_dir(dir).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command.env("ROCKET_PROFILE", "release");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

pub fn start(dir: &Path, env: &[(&str, String)], port: u16) -> Server {
    let child = command(dir, env).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("the binary starts");
    Server { child, port }
}

/// The binary with its standard output and error going to `stdout` and `stderr` (they may
/// be one file, cloned), once `/health` answers (within 10 s).
pub fn start_logged(dir: &Path, env: &[(&str, String)], port: u16, stdout: File, stderr: File) -> Server {
    let child = command(dir, env).stdout(stdout).stderr(stderr).spawn().expect("the binary starts");
    let mut server = Server { child, port };
    health_within(&mut server, Duration::from_secs(10)).expect("/health answers");
    server
}

/// The log at `path` once it holds every one of `needles` (polled every 20 ms, 10 s at most):
/// a request's line may be written just after its answer left, and a server killed before
/// then loses it.
pub fn log_holding(path: &Path, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if needles.iter().all(|needle| text.contains(needle)) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long until `/health` answers 200 (polled every 10 ms), if within `limit`.
pub fn health_within(server: &mut Server, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("the server exited: {status}");
        }
        if get(server.port, "/health", None).is_some_and(|r| r.status == 200) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The session cookie set by this answer (`name=value`), whatever else it sets.
    pub fn cookie(&self) -> Option<String> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("set-cookie")))
            .filter_map(|(_, value)| value.trim().split(';').next())
            .find(|c| c.starts_with(&format!("{}=", drishya::auth::SESSION_COOKIE)))
            .map(str::to_string)
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), or `None` when the
/// server does not answer.
pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<Reply> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (key, value) in headers {
        head.push_str(&format!("{key}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Reply { status, head, body: raw[split + 4..].to_vec() })
}

pub fn get(port: u16, path: &str, cookie: Option<&str>) -> Option<Reply> {
    let headers: Vec<(&str, &str)> = cookie.map(|c| vec![("Cookie", c)]).unwrap_or_default();
    request(port, "GET", path, &headers, b"")
}

pub fn login_at(port: u16, password: &str) -> String {
    let body = format!("password={password}");
    let reply =
        request(port, "POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], body.as_bytes())
            .expect("login answers");
    assert_eq!(reply.status, 303, "login: {}", reply.text());
    reply.cookie().expect("a session cookie")
}

/// `POST /upload_image` with coffee.png, in the session of `cookie`.
pub fn upload_coffee(port: u16, cookie: &str) -> Reply {
    let bytes = read(&shared("images/coffee.png"));
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "coffee.png", content_type: "image/png", bytes: &bytes }]);
    let ct = ct.to_string();
    request(port, "POST", "/upload_image", &[("Content-Type", &ct), ("Cookie", cookie)], &body).expect("upload answers")
}
