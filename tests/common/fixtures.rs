//! Where the test fixtures are (../shared: photos, ONNX models, parity references).
//! Shared by the app's tests and the engine's (crates/segment/tests/common includes it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The fixture root: `DRISHYA_SHARED` (relative to the repository, like the scripts), else
/// `../shared` beside the repository.
pub fn shared_root() -> PathBuf {
    // The workspace root, whichever member's tests include this file.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = manifest.ancestors().find(|d| d.join("Cargo.lock").is_file()).unwrap_or(manifest);
    match std::env::var_os("DRISHYA_SHARED") {
        Some(dir) if !dir.is_empty() => repo.join(dir),
        _ => repo.join("../shared"),
    }
}

/// A file under the fixture root. A missing fixture fails the test loudly, never skips it:
/// `scripts/test` decides which tests not to run (and says so) when fixtures are missing.
pub fn shared(rel: &str) -> PathBuf {
    let path = shared_root().join(rel);
    assert!(
        path.exists(),
        "test fixture {} is missing: put ../shared beside the repository or point DRISHYA_SHARED at a copy \
         (scripts/fetch-fixtures DIR fetches the photos and U2-Net-p; the MobileSAM graphs and references come only with ../shared)",
        path.display()
    );
    path
}

pub fn u2netp() -> String {
    shared("models/u2netp.onnx").display().to_string()
}

pub fn mobile_sam() -> String {
    shared("models/mobile_sam").display().to_string()
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
