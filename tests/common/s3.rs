//! A real S3 server for the tests: s3s-fs (crates.io; an S3 API over a directory),
//! installed by `scripts/install-s3s-fs` into `target/tools/bin` (scripts/test does it).
//! Missing, it fails the test that needs it with how to install it: never a skip.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "drishya-test-access";
pub const SECRET_KEY: &str = "drishya-test-secret-not-a-real-one";
pub const BUCKET: &str = "drishya-artefacts";

pub fn binary() -> PathBuf {
    let path = std::env::var_os("S3S_FS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs"));
    assert!(
        path.exists(),
        "the S3 server for this test is missing ({}): run scripts/install-s3s-fs (scripts/test does), \
         or point S3S_FS_BIN at an s3s-fs binary",
        path.display()
    );
    path
}

/// An S3 server on loopback over a directory; the bucket exists. Killed on drop.
pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    pub root: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = super::process::free_port();
        let mut server = S3Server { child: None, port, root };
        server.restart();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it with SIGKILL (an outage); the data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port over the same data; returns once it accepts.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "s3s-fs did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The objects stored under `prefix` of the bucket (relative paths, sorted).
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        let base = self.root.path().join(BUCKET);
        let mut found = Vec::new();
        let mut stack = vec![base.join(prefix)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&base) {
                    let rel = rel.to_string_lossy().into_owned();
                    // s3s-fs keeps its own metadata beside the objects.
                    if !rel.contains(".s3s") && !rel.ends_with(".tmp") {
                        found.push(rel);
                    }
                }
            }
        }
        found.sort();
        found
    }

    /// The app's settings (config keys) for a store in this bucket under `prefix`.
    pub fn settings(&self, prefix: &str) -> Vec<(&'static str, String)> {
        vec![
            ("storage_url", format!("s3://{BUCKET}/{prefix}")),
            ("aws_endpoint_url", self.endpoint()),
            ("aws_access_key_id", ACCESS_KEY.to_string()),
            ("aws_secret_access_key", SECRET_KEY.to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_allow_http", "true".to_string()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
