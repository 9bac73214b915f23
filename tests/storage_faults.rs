//! Storage faults through the real app: a full tmpfs (ENOSPC), a read-only mount, a
//! deleted TEMP_DIR. These mount tmpfs, so they need root (CI and the dev machines run as
//! root); without it they fail with a message saying so, they never skip.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use rocket::http::Status;

/// A tmpfs mount that is unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(dir).status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "mounting a tmpfs at {} failed: these tests need root (mount -t tmpfs)",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).status().unwrap();
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &Path) {
    // Write until the filesystem is full.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", dir.join("filler").display()))
        .stderr(std::process::Stdio::null())
        .status();
}

fn coffee() -> Vec<u8> {
    read(&shared("images/coffee.png"))
}

#[test]
fn a_full_temp_dir_answers_507_health_says_so_and_the_app_recovers() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("shm");
    let mount = Tmpfs::mount(&dir, "size=2m");
    let app = app(&[("models", ""), ("artefact_dir", dir.to_str().unwrap())]);
    login(&app.client);
    fill(&dir);
    let msg = expect_error(upload(&app.client, "coffee.png", &coffee()), Status::InsufficientStorage);
    assert!(msg.contains("storage is full"), "{msg}");
    let health = json_of(app.client.get("/health").dispatch());
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["directories"]["temp_dir_writable"], false);
    assert!(
        !dir.join("sessions").read_dir().unwrap().flatten().any(|e| e
            .path()
            .read_dir()
            .unwrap()
            .flatten()
            .any(|f| f.file_name().to_string_lossy().ends_with(".tmp"))),
        "no partial files left"
    );
    std::fs::remove_file(dir.join("filler")).unwrap();
    assert_eq!(upload(&app.client, "coffee.png", &coffee()).status(), Status::Ok);
    assert_eq!(json_of(app.client.get("/health").dispatch())["status"], "healthy");
    drop(app);
    drop(mount);
}

#[test]
fn a_read_only_temp_dir_answers_a_clear_500() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("ro");
    let mount = Tmpfs::mount(&dir, "size=4m");
    let app = app(&[("models", ""), ("artefact_dir", dir.to_str().unwrap())]);
    login(&app.client);
    mount.remount("ro");
    let msg = expect_error(upload(&app.client, "coffee.png", &coffee()), Status::InternalServerError);
    assert!(msg.contains("read-only"), "{msg}");
    assert_eq!(json_of(app.client.get("/health").dispatch())["directories"]["temp_dir_writable"], false);
    mount.remount("rw");
    assert_eq!(upload(&app.client, "coffee.png", &coffee()).status(), Status::Ok);
    drop(app);
    drop(mount);
}

#[test]
fn a_deleted_temp_dir_is_recreated() {
    let app = app(&[("models", "")]);
    login(&app.client);
    let root = app.temp.path().join("artefacts");
    // The server may write into the directory while it is being removed (its housekeeping
    // runs beside the test): removal is retried until the directory is gone.
    let gone = (0..100).any(|_| match std::fs::remove_dir_all(&root) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(_) => {
            std::thread::sleep(std::time::Duration::from_millis(10));
            false
        }
    });
    assert!(gone, "the artefact directory could not be removed");
    assert_eq!(upload(&app.client, "coffee.png", &coffee()).status(), Status::Ok);
    assert!(root.is_dir());
}

/// Bytes in use on the filesystem holding `dir` (tmpfs: RAM).
fn used_bytes(dir: &Path) -> u64 {
    let out = Command::new("df").args(["--block-size=1", "--output=used"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap()
}

#[test]
fn on_tmpfs_the_artefact_cap_holds_through_hundreds_of_sessions() {
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("shm");
    let _tmpfs = Tmpfs::mount(&mount, "size=64m");
    // A 2 MB cap: about four working images. The box is the mask (no model) so the test
    // is about storage alone.
    let cap = 2 * 1024 * 1024;
    let app = app(&[("artefact_dir", &mount.display().to_string()), ("temp_max_mb", "2"), ("models", "")]);
    let coffee = coffee();
    let mut first: Option<rocket::http::Cookie<'static>> = None;
    let mut peak = 0;
    for i in 0..200 {
        // A new session each time, as a stream of new users makes (login starts one).
        login(&app.client);
        assert_eq!(upload(&app.client, "coffee.png", &coffee).status(), Status::Ok, "session {i}");
        assert_eq!(generate_mask(&app.client, [165, 10, 415, 300]).status(), Status::Ok, "session {i}");
        peak = peak.max(used_bytes(&mount));
        assert!(used_bytes(&mount) <= cap, "session {i}: {} bytes on tmpfs over the {cap} cap", used_bytes(&mount));
        if first.is_none() {
            first = app.client.cookies().get_private(drishya::auth::SESSION_COOKIE);
        }
    }
    let health = json_of(app.client.get("/health").dispatch());
    let dirs = &health["directories"];
    assert_eq!(dirs["temp_dir_in_memory"], true, "{dirs}");
    assert!(dirs["artefact_mb"].as_f64().unwrap() <= 2.0, "{dirs}");
    assert!(peak > cap / 2, "the test filled the cap ({peak} bytes)");
    // The first user's session was evicted long ago: a clear 404 that says to upload again.
    assert_eq!(app.client.get("/get_image").dispatch().status(), Status::Ok, "the last session is there");
    app.client.get("/logout").dispatch();
    let first = first.expect("the first session's cookie");
    let msg = expect_error(app.client.get("/get_image").private_cookie(first).dispatch(), Status::NotFound);
    assert!(msg.contains("upload it again"), "{msg}");
}
