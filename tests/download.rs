//! Integration tests of `download`: each test starts its own HTTP/1.1 server on
//! 127.0.0.1 (a thread with hand-written responses) and checks both the result and
//! what is left on disk.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use drishya::download::{download, redact_url, DownloadError, DownloadRequest};
use sha2::{Digest, Sha256};

/// Read time-out used by the tests: short, so failures are fast.
const READ_TIMEOUT: Duration = Duration::from_millis(700);
/// Upper bound for any test that should fail fast on a time-out.
const FAST: Duration = Duration::from_millis(3000);

// ---------------------------------------------------------------- test server --

/// How the test server answers the one request it serves.
#[derive(Clone, Default)]
struct Reply {
    /// Status line and headers, without the blank line; `None`: never answer.
    head: Option<String>,
    /// Body bytes sent after the head.
    body: Vec<u8>,
    /// Send the body with `Transfer-Encoding: chunked` in pieces of this size.
    chunked: Option<usize>,
    /// After the body, keep the connection open (until the client closes) this long.
    stall: Duration,
}

impl Reply {
    /// 200 OK with a `Content-Length` of `announced` and `body` as the body.
    fn ok_announcing(announced: usize, body: &[u8]) -> Self {
        Reply {
            head: Some(format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\nContent-Type: application/octet-stream"
            )),
            body: body.to_vec(),
            ..Reply::default()
        }
    }

    /// 200 OK with the exact body.
    fn ok(body: &[u8]) -> Self {
        Reply::ok_announcing(body.len(), body)
    }

    /// 200 OK, chunked, no length announced.
    fn chunked(body: &[u8], piece: usize) -> Self {
        Reply {
            head: Some("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked".to_owned()),
            body: body.to_vec(),
            chunked: Some(piece),
            ..Reply::default()
        }
    }

    /// 200 OK, no length, the end of the body is the end of the connection.
    fn close_delimited(body: &[u8]) -> Self {
        Reply { head: Some("HTTP/1.1 200 OK\r\nConnection: close".to_owned()), body: body.to_vec(), ..Reply::default() }
    }

    /// An error status with a short text body.
    fn status(line: &str) -> Self {
        Reply {
            head: Some(format!("HTTP/1.1 {line}\r\nContent-Length: 4\r\nContent-Type: text/plain")),
            body: b"nope".to_vec(),
            ..Reply::default()
        }
    }

    /// Accepts the request and never answers.
    fn silent() -> Self {
        Reply { stall: Duration::from_secs(5), ..Reply::default() }
    }

    /// The same reply, then silence for `stall` with the connection open.
    fn then_stall(self, stall: Duration) -> Self {
        Reply { stall, ..self }
    }
}

/// A one-request HTTP server on 127.0.0.1.
struct Server {
    base: String,
    handle: JoinHandle<Option<String>>,
}

impl Server {
    /// Starts serving `reply` to the first connection.
    fn start(reply: Reply) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let handle = thread::spawn(move || serve_one(&listener, &reply));
        Server { base, handle }
    }

    /// URL of `path` on this server.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits for the server thread; returns the request head it received.
    fn request(self) -> String {
        self.handle.join().expect("server thread").expect("no request received")
    }
}

/// Accepts one connection (waiting at most 5 s), reads its request, answers it.
fn serve_one(listener: &TcpListener, reply: &Reply) -> Option<String> {
    let mut stream = accept_within(listener, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = read_request_head(&mut stream)?;
    if let Some(head) = &reply.head {
        let _ = stream.write_all(format!("{head}\r\n\r\n").as_bytes());
        let _ = write_body(&mut stream, reply);
        let _ = stream.flush();
    }
    wait_for_close(&mut stream, reply.stall);
    Some(request)
}

/// `accept()` with a deadline, so a test whose client never connects cannot hang.
fn accept_within(listener: &TcpListener, limit: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).ok()?;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok((stream, _)) = listener.accept() {
            stream.set_nonblocking(false).ok()?;
            return Some(stream);
        }
        thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Reads up to the blank line ending the request head.
fn read_request_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

/// Writes the body, chunk-encoded when asked.
fn write_body(stream: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    let Some(piece) = reply.chunked else {
        return stream.write_all(&reply.body);
    };
    for chunk in reply.body.chunks(piece) {
        stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
        stream.write_all(chunk)?;
        stream.write_all(b"\r\n")?;
    }
    stream.write_all(b"0\r\n\r\n")
}

/// Keeps the connection open for `stall`, or until the client closes it.
fn wait_for_close(stream: &mut TcpStream, stall: Duration) {
    if stall.is_zero() {
        return;
    }
    let _ = stream.set_read_timeout(Some(stall));
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

// --------------------------------------------------------------------- helpers --

/// Deterministic, non-repeating-looking test content.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// Lowercase hex SHA-256.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A request with the tests' defaults: no checksum, 64 MiB limit, short time-outs.
fn request<'a>(url: &'a str, dest: &'a Path) -> DownloadRequest<'a> {
    DownloadRequest {
        url,
        dest,
        sha256: None,
        max_bytes: 64 << 20,
        connect_timeout: Duration::from_secs(1),
        read_timeout: READ_TIMEOUT,
    }
}

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A fresh temporary folder and the model path inside it.
fn workspace() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("model.onnx");
    (dir, dest)
}

/// Asserts that nothing at all was left in `dir`.
fn assert_empty(dir: &Path) {
    assert!(entries(dir).is_empty(), "left behind: {:?}", entries(dir));
}

// ----------------------------------------------------------------------- tests --

#[test]
fn complete_download_writes_exact_bytes_and_no_temp_files() {
    let body = content(3 * 1024 * 1024 + 12345);
    let server = Server::start(Reply::ok(&body));
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("cache/sub/model.onnx");
    let url = server.url("/models/model.onnx");

    let written = download(&request(&url, &dest)).expect("download");

    assert_eq!(written, body.len() as u64);
    assert!(fs::read(&dest).expect("read dest") == body, "content differs");
    assert_eq!(entries(&dir.path().join("cache/sub")), vec!["model.onnx"]);
    let head = server.request();
    assert!(head.starts_with("GET /models/model.onnx HTTP/1.1\r\n"), "{head}");
}

#[test]
fn success_replaces_an_existing_file() {
    let body = content(5000);
    let server = Server::start(Reply::ok(&body));
    let (dir, dest) = workspace();
    fs::write(&dest, b"old model").expect("write old");

    download(&request(&server.url("/m.onnx"), &dest)).expect("download");

    assert_eq!(fs::read(&dest).expect("read"), body);
    assert_eq!(entries(dir.path()), vec!["model.onnx"]);
}

#[test]
fn unknown_length_chunked_download_succeeds() {
    let body = content(200_000);
    let server = Server::start(Reply::chunked(&body, 7_000));
    let (dir, dest) = workspace();

    let written = download(&request(&server.url("/m.onnx"), &dest)).expect("download");

    assert_eq!(written, body.len() as u64);
    assert_eq!(fs::read(&dest).expect("read"), body);
    assert_eq!(entries(dir.path()), vec!["model.onnx"]);
}

#[test]
fn truncated_body_is_rejected_and_previous_file_untouched() {
    let body = content(40_000);
    let server = Server::start(Reply::ok_announcing(100_000, &body));
    let (dir, dest) = workspace();
    fs::write(&dest, b"old model").expect("write old");

    let err = download(&request(&server.url("/m.onnx"), &dest)).expect_err("must fail");

    match &err {
        DownloadError::Truncated { got, expected, .. } => {
            assert_eq!(*got, 40_000);
            assert_eq!(*expected, Some(100_000));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(err.to_string().contains("40000 of 100000"), "{err}");
    assert_eq!(fs::read(&dest).expect("read"), b"old model");
    assert_eq!(entries(dir.path()), vec!["model.onnx"]);
}

#[test]
fn truncated_chunked_body_is_rejected() {
    let mut reply = Reply::chunked(&[], 1);
    reply.chunked = None; // send raw bytes: one chunk header promising more than follows
    reply.body = b"1000\r\nonly a little".to_vec();
    let server = Server::start(reply);
    let (dir, dest) = workspace();

    let err = download(&request(&server.url("/m.onnx"), &dest)).expect_err("must fail");

    assert!(matches!(err, DownloadError::Truncated { expected: None, .. }), "{err:?}");
    assert_empty(dir.path());
}

#[test]
fn stalled_body_times_out_quickly_and_leaves_nothing() {
    let body = content(1000);
    let server = Server::start(Reply::ok_announcing(1_000_000, &body).then_stall(Duration::from_secs(5)));
    let (dir, dest) = workspace();

    let started = Instant::now();
    let err = download(&request(&server.url("/m.onnx"), &dest)).expect_err("must fail");
    let elapsed = started.elapsed();

    assert!(matches!(err, DownloadError::Timeout { .. }), "{err:?}");
    assert!(elapsed >= READ_TIMEOUT.mul_f32(0.9), "gave up too early: {elapsed:?}");
    assert!(elapsed < FAST, "took {elapsed:?}");
    assert!(err.to_string().contains("after 1000 bytes"), "{err}");
    assert_empty(dir.path());
}

#[test]
fn silent_server_times_out_quickly() {
    let server = Server::start(Reply::silent());
    let (dir, dest) = workspace();

    let started = Instant::now();
    let err = download(&request(&server.url("/m.onnx"), &dest)).expect_err("must fail");

    assert!(matches!(err, DownloadError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    assert_empty(dir.path());
}

#[test]
fn not_found_is_http_status_404() {
    let server = Server::start(Reply::status("404 Not Found"));
    let (dir, dest) = workspace();

    let err = download(&request(&server.url("/missing.onnx"), &dest)).expect_err("must fail");

    assert!(matches!(err, DownloadError::HttpStatus { status: 404, .. }), "{err:?}");
    assert!(!err.is_too_large());
    assert!(err.to_string().contains("HTTP 404"), "{err}");
    assert_empty(dir.path());
}

#[test]
fn server_error_is_http_status() {
    let server = Server::start(Reply::status("503 Service Unavailable"));
    let (dir, dest) = workspace();

    let err = download(&request(&server.url("/m.onnx"), &dest)).expect_err("must fail");

    assert!(matches!(err, DownloadError::HttpStatus { status: 503, .. }), "{err:?}");
    assert_empty(dir.path());
}

#[test]
fn oversized_content_length_is_refused_before_the_body() {
    // Announces 10 MiB but sends no body at all: reading the body would hit the
    // time-out, so a quick TooLarge proves the refusal came from the header.
    let mut reply = Reply::ok_announcing(10 << 20, &[]).then_stall(Duration::from_secs(5));
    reply.body.clear();
    let server = Server::start(reply);
    let (dir, dest) = workspace();
    let url = server.url("/big.onnx");
    let req = DownloadRequest { max_bytes: 1 << 20, ..request(&url, &dest) };

    let started = Instant::now();
    let err = download(&req).expect_err("must fail");
    let elapsed = started.elapsed();

    assert!(err.is_too_large(), "{err:?}");
    match &err {
        DownloadError::TooLarge { size_mb, max_mb, size_known, .. } => {
            assert_eq!((*size_mb, *max_mb, *size_known), (10, 1, true));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(elapsed < READ_TIMEOUT / 2, "waited for the body: {elapsed:?}");
    let msg = err.to_string();
    assert!(msg.contains("quantize") && msg.contains("smaller model") && msg.contains("MAX_MODEL_MB"), "{msg}");
    assert_empty(dir.path());
}

#[test]
fn oversized_chunked_body_is_refused_while_streaming() {
    let body = content(300_000);
    let server = Server::start(Reply::chunked(&body, 10_000));
    let (dir, dest) = workspace();
    let url = server.url("/m.onnx");
    let req = DownloadRequest { max_bytes: 100_000, ..request(&url, &dest) };

    let err = download(&req).expect_err("must fail");

    assert!(matches!(err, DownloadError::TooLarge { size_known: false, .. }), "{err:?}");
    assert_empty(dir.path());
}

#[test]
fn oversized_close_delimited_body_is_refused_while_streaming() {
    let body = content(300_000);
    let server = Server::start(Reply::close_delimited(&body));
    let (dir, dest) = workspace();
    let url = server.url("/m.onnx");
    let req = DownloadRequest { max_bytes: 100_000, ..request(&url, &dest) };

    let err = download(&req).expect_err("must fail");

    assert!(matches!(err, DownloadError::TooLarge { size_known: false, .. }), "{err:?}");
    assert_empty(dir.path());
}

#[test]
fn body_exactly_at_the_limit_is_accepted() {
    let body = content(100_000);
    let server = Server::start(Reply::close_delimited(&body));
    let (_dir, dest) = workspace();
    let url = server.url("/m.onnx");
    let req = DownloadRequest { max_bytes: 100_000, ..request(&url, &dest) };

    assert_eq!(download(&req).expect("download"), 100_000);
    assert_eq!(fs::read(&dest).expect("read"), body);
}

#[test]
fn sha256_mismatch_is_rejected_and_leaves_nothing() {
    let body = content(50_000);
    let server = Server::start(Reply::ok(&body));
    let (dir, dest) = workspace();
    let url = server.url("/m.onnx");
    let wrong = sha256_hex(b"something else");
    let req = DownloadRequest { sha256: Some(&wrong), ..request(&url, &dest) };

    let err = download(&req).expect_err("must fail");

    match &err {
        DownloadError::Checksum { expected, actual, .. } => {
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &sha256_hex(&body));
        }
        other => panic!("expected Checksum, got {other:?}"),
    }
    assert_empty(dir.path());
}

#[test]
fn sha256_match_is_accepted() {
    let body = content(50_000);
    let server = Server::start(Reply::ok(&body));
    let (dir, dest) = workspace();
    let url = server.url("/m.onnx");
    let hash = sha256_hex(&body);
    let req = DownloadRequest { sha256: Some(&hash), ..request(&url, &dest) };

    assert_eq!(download(&req).expect("download"), body.len() as u64);
    assert_eq!(fs::read(&dest).expect("read"), body);
    assert_eq!(entries(dir.path()), vec!["model.onnx"]);
}

#[test]
fn malformed_sha256_is_refused_before_connecting() {
    let (dir, dest) = workspace();
    // Nothing listens: the error must come from the checksum, not the network.
    let req = DownloadRequest { sha256: Some("1234"), ..request("http://127.0.0.1:9/m.onnx", &dest) };

    let err = download(&req).expect_err("must fail");

    assert!(matches!(err, DownloadError::InvalidSha256 { .. }), "{err:?}");
    assert_empty(dir.path());
}

#[test]
fn non_http_urls_are_bad_urls() {
    let (dir, dest) = workspace();
    for url in ["ftp://example.com/m.onnx", "file:///models/m.onnx", "/models/m.onnx", "http:///m.onnx", "https//x"] {
        let err = download(&request(url, &dest)).expect_err(url);
        assert!(matches!(err, DownloadError::BadUrl { .. }), "{url}: {err:?}");
    }
    assert_empty(dir.path());
}

#[test]
fn refused_connection_is_connect_error() {
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let (dir, dest) = workspace();
    let url = format!("http://127.0.0.1:{port}/m.onnx");

    let err = download(&request(&url, &dest)).expect_err("must fail");

    assert!(matches!(err, DownloadError::Connect { .. }), "{err:?}");
    assert_empty(dir.path());
}

#[test]
fn stale_partial_files_are_cleaned_up() {
    let body = content(1000);
    let server = Server::start(Reply::ok(&body));
    let (dir, dest) = workspace();
    let stale = dir.path().join("model.onnx.part-1-dead-0");
    let fresh = dir.path().join("model.onnx.part-2-live-0");
    let other = dir.path().join("other.onnx.part-3-dead-0");
    for p in [&stale, &fresh, &other] {
        fs::write(p, b"partial").expect("write part");
    }
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    for p in [&stale, &other] {
        fs::File::options().write(true).open(p).expect("open").set_modified(two_hours_ago).expect("set mtime");
    }

    download(&request(&server.url("/m.onnx"), &dest)).expect("download");

    let left = entries(dir.path());
    assert_eq!(left, vec!["model.onnx", "model.onnx.part-2-live-0", "other.onnx.part-3-dead-0"]);
}

#[test]
fn secrets_in_the_url_never_reach_logs_or_errors() {
    let logs = capture_logs();
    let body = content(20_000);
    let server = Server::start(Reply::ok(&body));
    let (_dir, dest) = workspace();
    let url = server.url("/m.onnx?token=s3cr3t-query").replace("http://", "http://user:hunter2-pw@");

    download(&request(&url, &dest)).expect("download");

    let lines = logs.lock().expect("logs").clone();
    assert!(lines.iter().any(|l| l.contains("/m.onnx?***")), "no redacted URL logged: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("complete")), "no completion logged: {lines:?}");
    for line in &lines {
        assert!(!line.contains("s3cr3t") && !line.contains("hunter2"), "secret logged: {line}");
    }

    let server = Server::start(Reply::status("403 Forbidden"));
    let url = server.url("/m.onnx?token=s3cr3t-query").replace("http://", "http://user:hunter2-pw@");
    let msg = download(&request(&url, &dest)).expect_err("must fail").to_string();
    assert!(msg.contains("HTTP 403") && msg.contains("***@127.0.0.1"), "{msg}");
    assert!(!msg.contains("s3cr3t") && !msg.contains("hunter2"), "secret in error: {msg}");
}

#[test]
fn progress_is_logged_in_tenths() {
    let logs = capture_logs();
    let body = content(2_000_000);
    let server = Server::start(Reply::ok(&body));
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("progress-test.onnx");

    download(&request(&server.url("/m.onnx"), &dest)).expect("download");

    let lines = logs.lock().expect("logs").clone();
    let progress: Vec<&String> = lines.iter().filter(|l| l.contains("progress-test.onnx: ")).collect();
    // The socket may deliver several tenths in one read, but never fewer marks than
    // reads allow; at 2 MB in 1 MiB buffers there are at least two.
    assert!(progress.len() >= 2, "{progress:?}");
    assert!(progress.iter().any(|l| l.contains("100%")), "{progress:?}");
}

#[test]
fn redaction_helper() {
    assert_eq!(redact_url("https://u:p@host/a/m.onnx?sig=x#f"), "https://***@host/a/m.onnx?***#***");
    assert_eq!(redact_url("https://host/a/m.onnx"), "https://host/a/m.onnx");
}

// --------------------------------------------------------------- log capture --

/// A logger that keeps every info-or-higher message in memory.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(record.args().to_string());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the capturing logger once and returns its lines (shared by all tests).
fn capture_logs() -> &'static Mutex<Vec<String>> {
    static LOGGER: OnceLock<&'static Capture> = OnceLock::new();
    let logger = LOGGER.get_or_init(|| {
        let logger: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(logger).expect("set logger");
        log::set_max_level(log::LevelFilter::Info);
        logger
    });
    &logger.0
}
