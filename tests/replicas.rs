//! Several replicas behind a proxy that does not pin users: three servers (the release
//! binary when `DRISHYA_BIN` names it, as scripts/test does) on loopback share one bucket
//! of a real S3 server (s3s-fs). Users run complete flows whose successive requests go
//! round-robin to different replicas; half-way through, one replica is killed with
//! SIGKILL. Like Railway's proxy, the client sends a request that found no live replica
//! (refused, or cut off by the kill) to the next one. No flow may be lost: every answer
//! a user got stays true on every other replica.
//!
//! Gated: needs s3s-fs (`scripts/install-s3s-fs`); scripts/test installs it and runs this
//! with `--include-ignored`. Without it the test fails, saying how to install it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::*;
use common::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use common::{multipart, read, shared, Part};

const REPLICAS: usize = 3;
const USERS: usize = 4;
const FLOWS_PER_USER: usize = 3;
const PASSWORD: &str = "replicas-share-this-password";
const COOKIE_KEY: &str = "replicas share this SECRET_KEY, long enough for production";
/// The cup in coffee.png, in working-image pixels.
const CUP: [u32; 4] = [165, 10, 415, 300];

/// The replicas and the round-robin over them.
struct Pool {
    ports: Vec<u16>,
    next: AtomicUsize,
    /// Requests that found no live replica and went to the next one.
    rerouted: AtomicUsize,
    /// Requests answered after the kill.
    after_kill: AtomicUsize,
    killed: Mutex<Option<Instant>>,
}

impl Pool {
    /// Sends to the next replica; a replica that does not answer (refused, reset, cut off
    /// mid-answer) passes the request on, as a proxy's retry would. A 503 is waited out.
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        for _ in 0..60 {
            let port = self.ports[self.next.fetch_add(1, Ordering::Relaxed) % self.ports.len()];
            match request(port, method, path, headers, body) {
                None => {
                    self.rerouted.fetch_add(1, Ordering::Relaxed);
                }
                Some(reply) if reply.status == 503 => {
                    let wait = retry_after(&reply).unwrap_or(1).min(2);
                    std::thread::sleep(Duration::from_secs(wait));
                }
                Some(reply) => {
                    if self.killed.lock().unwrap().is_some() {
                        self.after_kill.fetch_add(1, Ordering::Relaxed);
                    }
                    return reply;
                }
            }
        }
        panic!("{method} {path}: no replica answered in 60 tries");
    }
}

fn retry_after(reply: &Reply) -> Option<u64> {
    reply.head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("retry-after").then(|| value.trim().parse().ok())?
    })
}

/// One request of a logged-in user.
fn send_as(pool: &Pool, cookie: &str, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Reply {
    match body {
        Some((content_type, bytes)) => {
            pool.send(method, path, &[("Cookie", cookie), ("Content-Type", content_type)], bytes)
        }
        None => pool.send(method, path, &[("Cookie", cookie)], b""),
    }
}

/// One complete flow in a new session; every step's status is checked (a 404 here would
/// be an artefact lost between replicas).
fn flow(pool: &Pool, scene: &[u8], product: &[u8]) {
    let form = format!("password={PASSWORD}");
    let login = pool.send("POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], form.as_bytes());
    assert_eq!(login.status, 303, "login: {}", login.text());
    let cookie = login.cookie().expect("a session cookie");

    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "coffee.png", content_type: "image/png", bytes: scene }]);
    let uploaded = send_as(pool, &cookie, "POST", "/upload_image", Some((&ct.to_string(), &body)));
    assert_eq!(uploaded.status, 200, "upload: {}", uploaded.text());
    let size = uploaded.json();

    let prompt = serde_json::json!({"x_min": CUP[0], "y_min": CUP[1], "x_max": CUP[2], "y_max": CUP[3]}).to_string();
    let mask = send_as(pool, &cookie, "POST", "/generate_mask", Some(("application/json", prompt.as_bytes())));
    assert_eq!(mask.status, 200, "mask: {}", mask.text());
    assert!(mask.json()["mask_pixels"].as_u64().unwrap_or(0) > 1000, "mask: {}", mask.text());

    let (ct, body) = multipart(&[
        Part::File { name: "product_image", filename: "product.png", content_type: "image/png", bytes: product },
        Part::Text("scale_factor", "1.0"),
    ]);
    let replaced = send_as(pool, &cookie, "POST", "/replace_product", Some((&ct.to_string(), &body)));
    assert_eq!(replaced.status, 200, "replace: {}", replaced.text());

    for path in ["/get_mask_visualization", "/get_result_image", "/download_result"] {
        let got = send_as(pool, &cookie, "GET", path, None);
        assert_eq!(got.status, 200, "{path}: {}", got.text());
        let image = image::load_from_memory(&got.body).expect("a PNG");
        assert_eq!(
            (image.width() as u64, image.height() as u64),
            (size["width"].as_u64().unwrap(), size["height"].as_u64().unwrap()),
            "{path}"
        );
    }
}

#[test]
#[ignore = "needs s3s-fs (scripts/install-s3s-fs); scripts/test runs it"]
fn three_replicas_on_one_bucket_lose_no_flow_when_one_is_killed() {
    let s3 = S3Server::start();
    let dir = app_dir();
    let mut servers: Vec<Server> = (0..REPLICAS)
        .map(|i| {
            let port = free_port();
            let env = vec![
                ("PORT", port.to_string()),
                ("APP_PASSWORD", PASSWORD.to_string()),
                ("SECRET_KEY", COOKIE_KEY.to_string()),
                ("RAILWAY_ENVIRONMENT", "production".to_string()),
                ("MODELS", "models/u2netp.onnx".to_string()),
                ("TEMP_DIR", dir.path().join(format!("replica-{i}")).display().to_string()),
                ("AWS_ALLOW_HTTP", "true".to_string()),
                ("AWS_ENDPOINT_URL", s3.endpoint()),
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
                ("AWS_REGION", "us-east-1".to_string()),
                ("STORAGE_URL", format!("s3://{}/replicas", common::s3::BUCKET)),
            ];
            start(dir.path(), &env, port)
        })
        .collect();
    for server in &mut servers {
        health_within(server, Duration::from_secs(10)).expect("each replica answers /health");
    }
    let pool = Arc::new(Pool {
        ports: servers.iter().map(|s| s.port).collect(),
        next: AtomicUsize::new(0),
        rerouted: AtomicUsize::new(0),
        after_kill: AtomicUsize::new(0),
        killed: Mutex::new(None),
    });
    let scene = Arc::new(read(&shared("images/coffee.png")));
    let product = Arc::new(common::png_bytes(&image::RgbImage::from_fn(120, 200, |x, y| {
        image::Rgb([200, (x * 2) as u8, (y % 255) as u8])
    })));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let users: Vec<_> = (0..USERS)
        .map(|_| {
            let (pool, scene, product, done) = (pool.clone(), scene.clone(), product.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..FLOWS_PER_USER {
                    flow(&pool, &scene, &product);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // Half-way, SIGKILL the second replica, most likely in the middle of a request.
    while done.load(Ordering::SeqCst) < USERS * FLOWS_PER_USER / 2 {
        assert!(started.elapsed() < Duration::from_secs(300), "flows stalled before the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    servers[1].child.kill().expect("SIGKILL");
    let _ = servers[1].child.wait();
    *pool.killed.lock().unwrap() = Some(Instant::now());

    let mut lost = 0;
    for user in users {
        if user.join().is_err() {
            lost += 1;
        }
    }
    let finished = done.load(Ordering::SeqCst);
    eprintln!(
        "replicas: {finished} flows in {:.1} s, {} requests rerouted from a dead replica, {} answered after the kill",
        started.elapsed().as_secs_f64(),
        pool.rerouted.load(Ordering::Relaxed),
        pool.after_kill.load(Ordering::Relaxed),
    );
    assert_eq!(lost, 0, "users whose flow failed (see the panic above)");
    assert_eq!(finished, USERS * FLOWS_PER_USER);
    assert!(pool.rerouted.load(Ordering::Relaxed) > 0, "the dead replica was asked and passed over");
    assert!(pool.after_kill.load(Ordering::Relaxed) >= 10, "flows went on after the kill");
}
