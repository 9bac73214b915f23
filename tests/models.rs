//! Model management through the real app: fallback chain, size guard, kind check,
//! URL models, one load for many first requests, bounded queue.

mod common;

use std::sync::Arc;

use common::*;
use drishya::models::ModelManager;
use rocket::http::{ContentType, Status};
use rocket::local::asynchronous::Client as AsyncClient;

fn coffee() -> Vec<u8> {
    read(&shared("images/coffee.png"))
}

const CUP: [i64; 4] = [165, 10, 415, 300];

/// Logged in, coffee.png uploaded.
fn ready(settings: &[(&str, &str)]) -> App {
    let app = app(settings);
    login(&app.client);
    assert_eq!(upload(&app.client, "coffee.png", &coffee()).status(), Status::Ok);
    app
}

fn health(app: &App) -> serde_json::Value {
    json_of(app.client.get("/health").dispatch())
}

#[test]
fn a_model_over_the_size_limit_is_refused_with_an_actionable_message() {
    let app = ready(&[("max_model_mb", "1"), ("box_fallback", "false")]);
    let msg = expect_error(generate_mask(&app.client, CUP), Status::ServiceUnavailable);
    assert!(msg.contains("MAX_MODEL_MB") && msg.contains("quantize"), "{msg}");
    let h = health(&app);
    assert_eq!(h["model_loaded"], false);
    assert_eq!(h["model"]["state"], "failed");
    assert!(h["model"]["skipped"][0]["reason"].as_str().unwrap().contains("over the 1 MB"), "{h}");
    // The service is still up.
    assert_eq!(app.client.get("/get_image").dispatch().status(), Status::Ok);
}

#[test]
fn the_chain_skips_missing_and_foreign_models_and_health_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let relu = dir.path().join("relu.onnx");
    std::fs::write(&relu, relu_onnx()).unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"not a protobuf at all").unwrap();
    let missing = dir.path().join("missing.onnx");
    let models = format!("{},{},{},{}", missing.display(), relu.display(), garbage.display(), u2netp());
    let app = ready(&[("models", &models)]);
    let mask = json_of(generate_mask(&app.client, CUP));
    assert_eq!(mask["model"], "u2netp", "{mask}");
    let h = health(&app);
    assert_eq!(h["model_loaded"], true);
    assert_eq!(h["model"]["name"], "u2netp");
    assert_eq!(h["model"]["kind"], "salient");
    let reasons: Vec<String> =
        h["model"]["skipped"].as_array().unwrap().iter().map(|s| s["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("not found"), "{}", reasons[0]);
    assert!(reasons[1].contains("match neither"), "{}", reasons[1]);
    assert!(reasons[2].contains("could not be loaded"), "{}", reasons[2]);
}

/// `/ready`'s status and answer.
fn readiness(app: &App) -> (Status, serde_json::Value) {
    let response = app.client.get("/ready").dispatch();
    (response.status(), json_of(response))
}

#[test]
fn readiness_walks_the_chain_without_loading_and_health_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let relu = dir.path().join("relu.onnx");
    std::fs::write(&relu, relu_onnx()).unwrap();
    let missing = dir.path().join("missing.onnx");

    // Missing, then a graph of no kind we serve: not ready, and /health says why.
    let broken = app(&[("models", &format!("{},{}", missing.display(), relu.display())), ("box_fallback", "false")]);
    let (status, answer) = readiness(&broken);
    assert_eq!(status, Status::ServiceUnavailable, "{answer}");
    let reason = answer["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not found") && reason.contains("match neither"), "{reason}");
    let h = health(&broken);
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["reasons"][0].as_str().unwrap_or_default().contains("masks cannot be made"), "{h}");

    // A present model after those: ready before anything is loaded, and it stays unloaded.
    let chain = format!("{},{},{}", missing.display(), relu.display(), u2netp());
    let fine = app(&[("models", &chain), ("box_fallback", "false")]);
    let (status, answer) = readiness(&fine);
    assert_eq!(
        (status, answer["state"].as_str(), answer["model"].as_str()),
        (Status::Ok, Some("present"), Some("u2netp"))
    );
    let h = health(&fine);
    assert_eq!((h["status"].as_str(), h["model_loaded"].as_bool()), (Some("healthy"), Some(false)), "{h}");
    login(&fine.client);
    assert_eq!(upload(&fine.client, "coffee.png", &coffee()).status(), Status::Ok);
    assert_eq!(generate_mask(&fine.client, CUP).status(), Status::Ok);
    assert_eq!(readiness(&fine).1["state"], "loaded");

    // Nothing usable but the box fallback is on: ready, and says why only the box.
    let lenient = app(&[("models", &missing.display().to_string()), ("box_fallback", "true")]);
    let (status, answer) = readiness(&lenient);
    assert_eq!((status, answer["state"].as_str()), (Status::Ok, Some("box_fallback")), "{answer}");
    assert_eq!(health(&lenient)["status"], "healthy");
}

#[test]
fn with_no_usable_model_masks_answer_503_or_fall_back_to_the_box_when_configured() {
    let strict = ready(&[("models", "/nonexistent/model.onnx"), ("box_fallback", "false")]);
    let response = generate_mask(&strict.client, CUP);
    assert!(response.headers().get_one("Retry-After").is_some());
    let msg = expect_error(response, Status::ServiceUnavailable);
    assert!(msg.contains("not found"), "{msg}");

    let lenient = ready(&[("models", "/nonexistent/model.onnx"), ("box_fallback", "true")]);
    let mask = json_of(generate_mask(&lenient.client, CUP));
    assert_eq!(mask["kind"], "box");
    assert_eq!(mask["fallback"], true);
    let h = health(&lenient);
    assert_eq!(h["model"]["fallback_to_box"], true);
}

#[test]
fn a_url_model_is_downloaded_once_into_the_cache_and_used() {
    let base = serve_bytes(read(std::path::Path::new(&u2netp())));
    let url = format!("{base}/models/u2netp.onnx?token=secret");
    let app = ready(&[("models", &url)]);
    let mask = json_of(generate_mask(&app.client, CUP));
    assert_eq!(mask["kind"], "salient", "{mask}");
    let cached: Vec<_> = std::fs::read_dir(app.temp.path().join("cache")).unwrap().flatten().collect();
    assert_eq!(cached.len(), 1, "exactly the model, no partial files");
    let h = health(&app).to_string();
    assert!(!h.contains("secret"), "the URL's query never shows: {h}");
}

#[rocket::async_test]
async fn eight_simultaneous_first_requests_cause_exactly_one_load() {
    let (figment, _temp) = test_figment(&[]);
    let client = AsyncClient::tracked(drishya::build(figment)).await.unwrap();
    let login = client
        .post("/login")
        .header(ContentType::Form)
        .body(format!("password={}", PASSWORD.replace(' ', "+")))
        .dispatch()
        .await;
    assert_eq!(login.status(), Status::SeeOther);
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "c.png", content_type: "image/png", bytes: &coffee() }]);
    assert_eq!(client.post("/upload_image").header(ct).body(body).dispatch().await.status(), Status::Ok);
    let body = serde_json::json!({"x_min": 165, "y_min": 10, "x_max": 415, "y_max": 300}).to_string();
    let requests =
        (0..8).map(|_| client.post("/generate_mask").header(ContentType::JSON).body(body.clone()).dispatch());
    let responses = futures_join_all(requests).await;
    for r in &responses {
        assert_eq!(r.status(), Status::Ok);
    }
    let manager = client.rocket().state::<Arc<ModelManager>>().unwrap();
    assert_eq!(manager.load_count(), 1);
}

#[rocket::async_test]
async fn a_full_queue_answers_503_with_retry_after() {
    let (figment, _temp) = test_figment(&[("inference_queue", "0"), ("inference_concurrency", "1")]);
    let client = AsyncClient::tracked(drishya::build(figment)).await.unwrap();
    client
        .post("/login")
        .header(ContentType::Form)
        .body(format!("password={}", PASSWORD.replace(' ', "+")))
        .dispatch()
        .await;
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "c.png", content_type: "image/png", bytes: &coffee() }]);
    assert_eq!(client.post("/upload_image").header(ct).body(body).dispatch().await.status(), Status::Ok);
    let body = serde_json::json!({"x_min": 165, "y_min": 10, "x_max": 415, "y_max": 300}).to_string();
    let requests =
        (0..4).map(|_| client.post("/generate_mask").header(ContentType::JSON).body(body.clone()).dispatch());
    let responses = futures_join_all(requests).await;
    let ok = responses.iter().filter(|r| r.status() == Status::Ok).count();
    let busy: Vec<_> = responses.iter().filter(|r| r.status() == Status::ServiceUnavailable).collect();
    assert!(ok >= 1, "at least one is served");
    assert!(!busy.is_empty(), "with no queue, simultaneous requests are turned away");
    for r in busy {
        let seconds: u64 = r.headers().get_one("Retry-After").unwrap().parse().unwrap();
        assert!(seconds >= 1);
    }
}

/// Polls all futures concurrently on the current task (no extra crate needed).
async fn futures_join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<_> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in handles.iter_mut().zip(outputs.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.unwrap()).collect()
}

#[test]
#[ignore = "slow: loads and runs the MobileSAM graph (run with --include-ignored)"]
fn sam_first_then_u2netp_serves_masks_from_sam() {
    let models = format!("{},{}", mobile_sam(), u2netp());
    let app = ready(&[("models", &models)]);
    let mask = json_of(generate_mask(&app.client, CUP));
    assert_eq!(mask["kind"], "sam", "{mask}");
    assert_eq!(mask["model"], "mobile_sam");
    let h = health(&app);
    assert_eq!(h["model"]["kind"], "sam");
    assert!(h["model"]["file_size_mb"].as_f64().unwrap() > 40.0);
}

#[test]
fn a_failed_load_is_retried_after_the_retry_interval_not_on_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("late.onnx");
    let app = ready(&[("models", model.to_str().unwrap()), ("model_retry_secs", "1"), ("box_fallback", "false")]);
    let manager = app.client.rocket().state::<Arc<ModelManager>>().unwrap();
    expect_error(generate_mask(&app.client, CUP), Status::ServiceUnavailable);
    expect_error(generate_mask(&app.client, CUP), Status::ServiceUnavailable);
    assert_eq!(manager.load_count(), 1, "the second request reuses the failure");
    std::fs::copy(u2netp(), &model).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(generate_mask(&app.client, CUP).status(), Status::Ok);
    assert_eq!(manager.load_count(), 2);
    assert_eq!(health(&app)["model"]["state"], "ready");
}

#[test]
fn an_idle_model_is_unloaded_and_reloaded_on_the_next_request() {
    let app = ready(&[("model_idle_unload_secs", "1")]);
    let manager = app.client.rocket().state::<Arc<ModelManager>>().unwrap();
    assert_eq!(generate_mask(&app.client, CUP).status(), Status::Ok);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while health(&app)["model"]["state"] != "unloaded" {
        assert!(std::time::Instant::now() < deadline, "model was not unloaded: {}", health(&app));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(health(&app)["model_loaded"], false);
    assert_eq!(health(&app)["model"]["idle_unload_secs"], 1);
    assert_eq!(generate_mask(&app.client, CUP).status(), Status::Ok);
    assert_eq!(manager.load_count(), 2);
}

#[rocket::async_test]
async fn image_work_is_bounded_too_uploads_beyond_the_queue_get_503() {
    let (figment, _temp) = test_figment(&[("image_queue", "0"), ("image_concurrency", "1"), ("models", "")]);
    let client = AsyncClient::tracked(drishya::build(figment)).await.unwrap();
    let login =
        client.post("/login").header(ContentType::Form).body(format!("password={}", PASSWORD.replace(' ', "+")));
    assert_eq!(login.dispatch().await.status(), Status::SeeOther);
    // A 2400x1600 PNG keeps a job busy long enough for the others to arrive.
    let big = image::imageops::resize(
        &image::load_from_memory(&coffee()).unwrap().to_rgb8(),
        2400,
        1600,
        image::imageops::FilterType::Nearest,
    );
    let bytes = png_bytes(&big);
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "big.png", content_type: "image/png", bytes: &bytes }]);
    let requests = (0..4).map(|_| client.post("/upload_image").header(ct.clone()).body(body.clone()).dispatch());
    let responses = futures_join_all(requests).await;
    let busy: Vec<_> = responses.iter().filter(|r| r.status() == Status::ServiceUnavailable).collect();
    assert!(responses.iter().any(|r| r.status() == Status::Ok));
    assert!(!busy.is_empty(), "with one job and no queue, simultaneous uploads are turned away");
    for r in busy {
        assert!(r.headers().get_one("Retry-After").is_some());
    }
}
