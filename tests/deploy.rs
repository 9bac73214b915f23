//! The binary started the way deployments start it: a Flask deployment's `.env`, the
//! release profile, Railway's variables, a missing model. Real processes on real
//! sockets, each with only the environment given here.
//!
//! The binary is `DRISHYA_BIN` when set (scripts/test points it at the release build),
//! else the one cargo built for these tests; both run with `ROCKET_PROFILE=release`, the
//! profile the release build and the Docker image use.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::process::*;

const PASSWORD: &str = "setuftw-but-longer";
/// A Flask SECRET_KEY: any string (the Flask repo's placeholder, 47 characters).
const FLASK_KEY: &str = "your-super-secret-key-change-this-in-production";

fn healthcheck(dir: &Path, env: &[(&str, String)], ready: bool) -> bool {
    let mut command = command(dir, env);
    command.arg("healthcheck");
    if ready {
        command.arg("--ready");
    }
    command.stdout(Stdio::null()).stderr(Stdio::null()).status().expect("healthcheck runs").success()
}

/// The Flask repo's `.env.512mb`, as a Flask user has it (their port, temp dir, key).
fn flask_env_file(port: u16, temp_dir: &Path) -> String {
    format!(
        "# Flask Configuration for 512MB RAM deployment\n\
         FLASK_ENV=production\n\
         SECRET_KEY={FLASK_KEY}\n\n\
         APP_PASSWORD={PASSWORD}\n\
         PORT={port}\n\n\
         WEB_CONCURRENCY=1\nWORKERS=1\n\n\
         TEMP_DIR={}\n\n\
         OMP_NUM_THREADS=1\nMKL_NUM_THREADS=1\nNUMEXPR_NUM_THREADS=1\n\n\
         RAILWAY_ENVIRONMENT=production\n",
        temp_dir.display()
    )
}

#[test]
fn a_flask_deployments_env_file_starts_it_and_the_environment_still_wins() {
    let dir = app_dir();
    let temp_dir = dir.path().join("drishya_temp");
    let (file_port, port) = (free_port(), free_port());
    std::fs::write(dir.path().join(".env"), flask_env_file(file_port, &temp_dir)).unwrap();
    // Railway sets PORT itself: the environment beats the file.
    let mut server = start(dir.path(), &[("PORT", port.to_string())], port);
    let took = health_within(&mut server, Duration::from_secs(1)).expect("/health answers within a second");
    assert!(get(file_port, "/health", None).is_none(), "the .env PORT lost to the environment's");
    let health = get(port, "/health", None).unwrap().json();
    assert_eq!(health["status"], "healthy", "after {took:?}: {health}");
    assert_eq!(health["environment"], "production");
    assert_eq!(health["directories"]["temp_dir_writable"], true);
    assert!(temp_dir.is_dir(), "TEMP_DIR from .env is the artefact dir");
    // The Flask key works as a cookie key: a login holds across requests.
    let cookie = login_at(port, PASSWORD);
    let page = get(port, "/", Some(&cookie)).unwrap();
    assert!(page.text().contains("/logout"), "logged in with a cookie sealed by the derived key");
    let up = upload_coffee(port, &cookie);
    assert_eq!(up.status, 200, "{}", up.text());
}

/// The variables a Railway deploy has, with `MODELS` as given.
fn deploy_env(port: u16, dir: &Path, models: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PORT", port.to_string()),
        ("APP_PASSWORD", PASSWORD.to_string()),
        ("SECRET_KEY", FLASK_KEY.to_string()),
        ("TEMP_DIR", dir.join("artefacts").display().to_string()),
        ("RAILWAY_ENVIRONMENT", "production".to_string()),
        ("MODELS", models.to_string()),
    ]
}

#[test]
fn a_missing_model_in_production_is_live_but_neither_healthy_nor_ready() {
    let dir = app_dir();
    let port = free_port();
    let env = deploy_env(port, dir.path(), "/nonexistent/sam_vit_b.onnx");
    let mut server = start(dir.path(), &env, port);
    health_within(&mut server, Duration::from_secs(5)).expect("/health answers (liveness)");
    let health = get(port, "/health", None).unwrap().json();
    assert_ne!(health["status"], "healthy", "{health}");
    let reasons = health["reasons"].to_string();
    assert!(reasons.contains("sam_vit_b.onnx") && reasons.contains("not found"), "{reasons}");
    let ready = get(port, "/ready", None).unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.json()["reason"].as_str().unwrap_or("").contains("not found"), "{}", ready.text());
    assert!(healthcheck(dir.path(), &env, false), "`drishya healthcheck` (liveness) passes");
    assert!(!healthcheck(dir.path(), &env, true), "`drishya healthcheck --ready` fails");
    // And with the model present, ready before any model was loaded.
    drop(server);
    let port = free_port();
    let env = deploy_env(port, dir.path(), "models/u2netp.onnx");
    let mut server = start(dir.path(), &env, port);
    health_within(&mut server, Duration::from_secs(5)).expect("/health answers");
    let ready = get(port, "/ready", None).unwrap();
    assert_eq!((ready.status, ready.json()["state"].as_str()), (200, Some("present")), "{}", ready.text());
    assert!(healthcheck(dir.path(), &env, true));
    assert_eq!(get(port, "/health", None).unwrap().json()["model_loaded"], false, "readiness loads nothing");
}

#[test]
fn box_fallback_from_the_environment_beats_the_release_profile() {
    // Rocket.toml's [release] says box_fallback = false; the variable must win.
    let dir = app_dir();
    let port = free_port();
    let mut env = deploy_env(port, dir.path(), "/nonexistent/model.onnx");
    env.push(("BOX_FALLBACK", "true".into()));
    let mut server = start(dir.path(), &env, port);
    health_within(&mut server, Duration::from_secs(5)).expect("/health answers");
    let ready = get(port, "/ready", None).unwrap();
    assert_eq!((ready.status, ready.json()["state"].as_str()), (200, Some("box_fallback")), "{}", ready.text());
    let cookie = login_at(port, PASSWORD);
    let up = upload_coffee(port, &cookie);
    assert_eq!(up.status, 200, "{}", up.text());
    let b = br#"{"x_min": 165, "y_min": 10, "x_max": 415, "y_max": 300}"#;
    let mask = request(port, "POST", "/generate_mask", &[("Content-Type", "application/json"), ("Cookie", &cookie)], b)
        .unwrap();
    assert_eq!(mask.status, 200, "{}", mask.text());
    assert_eq!(mask.json()["fallback"], true);
}

/// Runs the binary to its refusal; returns its stderr.
fn refusal(dir: &Path, env: &[(&str, String)]) -> String {
    let output = command(dir, env).output().expect("the binary runs");
    assert!(!output.status.success(), "it must refuse to start");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn configuration_errors_name_the_variable_in_one_line() {
    let dir = app_dir();
    let port = free_port();
    let base = deploy_env(port, dir.path(), "models/u2netp.onnx");
    let with = |key: &'static str, value: &str| {
        let mut env: Vec<_> = base.iter().filter(|(k, _)| *k != key).cloned().collect();
        env.push((key, value.to_string()));
        env
    };
    let lines = |stderr: &str| stderr.lines().filter(|l| l.starts_with("drishya:")).count();

    let stderr = refusal(dir.path(), &with("PORT", "eighty"));
    assert!(stderr.contains("drishya: PORT") || stderr.contains("PORT:"), "{stderr}");
    assert_eq!(lines(&stderr), 1, "{stderr}");

    let stderr = refusal(dir.path(), &with("SECRET_KEY", "tiny-key-9"));
    assert!(stderr.contains("SECRET_KEY is too short"), "{stderr}");
    assert!(!stderr.contains("tiny-key-9"), "the key is never printed: {stderr}");

    let no_key: Vec<_> = base.iter().filter(|(k, _)| *k != "SECRET_KEY").cloned().collect();
    let stderr = refusal(dir.path(), &no_key);
    assert!(stderr.contains("SECRET_KEY is not set"), "{stderr}");

    let stderr = refusal(dir.path(), &with("STORAGE_URL", "gs://somewhere"));
    assert!(stderr.contains("STORAGE_URL is invalid"), "{stderr}");
    assert_eq!(lines(&stderr), 1, "{stderr}");
    // A bucket without credentials; then a plain-http endpoint not allowed.
    let stderr = refusal(dir.path(), &with("STORAGE_URL", "s3://artefacts"));
    assert!(stderr.contains("AWS_ACCESS_KEY_ID") && stderr.contains("AWS_SECRET_ACCESS_KEY"), "{stderr}");
    let mut bucket = with("STORAGE_URL", "s3://artefacts/drishya");
    bucket.extend([
        ("AWS_ACCESS_KEY_ID", "id".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "secret-value-never-printed".to_string()),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_string()),
    ]);
    let stderr = refusal(dir.path(), &bucket);
    assert!(stderr.contains("AWS_ENDPOINT_URL") && stderr.contains("AWS_ALLOW_HTTP"), "{stderr}");
    assert!(!stderr.contains("secret-value-never-printed"), "{stderr}");

    std::fs::write(dir.path().join(".env"), "APP_PASSWORD=fine\nSECRET_KEY=\"unterminated-secret-value\n").unwrap();
    let stderr = refusal(dir.path(), &no_key);
    assert!(stderr.contains(".env line 2") && stderr.contains("SECRET_KEY"), "{stderr}");
    assert!(!stderr.contains("unterminated-secret-value"), "the value is never printed: {stderr}");
}
