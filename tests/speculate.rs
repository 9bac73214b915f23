//! Speculative Segment Anything embeddings (`SPECULATIVE_EMBEDDING`): a scene uploaded
//! while MobileSAM is loaded goes through the encoder in the background, within the
//! inference gate, so that its first box runs only the decoder. Real model, real app.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use drishya::models::{ModelManager, Speculated, SpeculationCounts};
use rocket::http::{ContentType, Status};
use rocket::local::asynchronous::Client as AsyncClient;

/// The cup in coffee.png (600x400): the first mask, which loads the model.
const CUP: [i64; 4] = [165, 10, 415, 300];
/// The astronaut's head in astronaut.png (512x512): the second scene's box.
const HEAD: [i64; 4] = [170, 20, 340, 220];

fn coffee() -> Vec<u8> {
    read(&shared("images/coffee.png"))
}

fn astronaut() -> Vec<u8> {
    read(&shared("images/astronaut.png"))
}

fn manager(app: &App) -> &Arc<ModelManager> {
    app.client.rocket().state::<Arc<ModelManager>>().expect("the model manager is managed")
}

fn counts(manager: &ModelManager) -> SpeculationCounts {
    manager.status().speculative
}

/// Speculative runs that have ended, whichever way.
fn settled(c: &SpeculationCounts) -> usize {
    c.done + c.already_cached + c.skipped_busy + c.stale + c.failed
}

fn encoder_runs(manager: &ModelManager) -> usize {
    manager.encoder_runs().expect("the model is loaded")
}

/// Polls until `done` holds, for at most two minutes (the encoder on busy shared cores).
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// MobileSAM with `settings`, logged in, the model loaded by a first mask on coffee.png.
fn loaded(settings: &[(&str, &str)]) -> App {
    let mut all = vec![("models", mobile_sam())];
    all.extend(settings.iter().map(|(k, v)| (*k, v.to_string())));
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = app(&all);
    login(&app.client);
    assert_eq!(upload(&app.client, "coffee.png", &coffee()).status(), Status::Ok);
    let first = json_of(generate_mask(&app.client, CUP));
    assert_eq!(first["kind"], "sam", "{first}");
    assert_eq!(encoder_runs(manager(&app)), 1, "the first mask ran the encoder once");
    assert_eq!(counts(manager(&app)).done, 0, "nothing was loaded when coffee.png came: no speculation");
    app
}

/// The second scene's mask: its answer (without the timing) and overlay.
fn head_mask(app: &App) -> (serde_json::Value, Vec<u8>) {
    let response = generate_mask(&app.client, HEAD);
    assert_eq!(response.status(), Status::Ok);
    let mut answer = json_of(response);
    answer.as_object_mut().expect("an object").remove("elapsed_ms");
    let overlay = app.client.get("/get_mask_visualization").dispatch();
    assert_eq!(overlay.status(), Status::Ok);
    (answer, overlay.into_bytes().expect("a body"))
}

#[test]
#[ignore = "slow: runs the MobileSAM encoder (run with --include-ignored)"]
fn a_scene_uploaded_while_sam_is_loaded_is_embedded_before_its_first_box() {
    let app = loaded(&[]);
    let m = manager(&app);
    assert_eq!(upload(&app.client, "astronaut.png", &astronaut()).status(), Status::Ok);
    assert_eq!(counts(m).done, 0, "the upload answered without waiting for the encoder");
    wait_until("the speculative run has ended", || settled(&counts(m)) == 1);
    assert_eq!(counts(m).done, 1, "{:?}", counts(m));
    assert_eq!(encoder_runs(m), 2, "the speculative run is the one encoder run of the scene");
    let health = json_of(app.client.get("/health").dispatch());
    assert_eq!(health["model"]["speculative"]["done"], 1, "{health}");
    assert_eq!(health["model"]["speculative"]["enabled"], true, "{health}");

    let (answer, overlay) = head_mask(&app);
    assert_eq!(encoder_runs(m), 2, "the mask ran only the decoder");
    let c = counts(m);
    assert_eq!((c.skipped_busy, c.stale, c.failed), (0, 0, 0), "{c:?}");

    // The same mask as without speculation, pixel for pixel.
    let plain = loaded(&[("speculative_embedding", "false")]);
    assert_eq!(upload(&plain.client, "astronaut.png", &astronaut()).status(), Status::Ok);
    let (plain_answer, plain_overlay) = head_mask(&plain);
    assert_eq!(encoder_runs(manager(&plain)), 2, "without speculation the mask ran the encoder");
    assert_eq!(answer, plain_answer);
    assert!(overlay == plain_overlay, "the overlays differ");
}

#[test]
#[ignore = "slow: runs the MobileSAM encoder (run with --include-ignored)"]
fn with_the_switch_off_the_encoder_runs_when_the_box_comes() {
    // "0", as SPECULATIVE_EMBEDDING=0 arrives from the environment.
    let app = loaded(&[("speculative_embedding", "0")]);
    let m = manager(&app);
    assert_eq!(upload(&app.client, "astronaut.png", &astronaut()).status(), Status::Ok);
    assert_eq!(encoder_runs(m), 1, "no encoder run at upload");
    assert_eq!(generate_mask(&app.client, HEAD).status(), Status::Ok);
    assert_eq!(encoder_runs(m), 2, "the encoder ran for the mask");
    // A speculative run, had one started, would have held the place the mask waited for.
    let c = counts(m);
    assert!(!c.enabled && settled(&c) == 0, "{c:?}");
    let health = json_of(app.client.get("/health").dispatch());
    assert_eq!(health["model"]["speculative"]["enabled"], false, "{health}");
}

#[test]
#[ignore = "slow: runs the MobileSAM encoder (run with --include-ignored)"]
fn when_the_inference_place_is_taken_the_upload_queues_no_speculative_work() {
    let app = loaded(&[("inference_concurrency", "1"), ("inference_queue", "2")]);
    let m = manager(&app);
    let gate = m.gate();
    let held = gate.try_enter().expect("the inference place is free");
    let free = gate.free_places();
    assert_eq!(upload(&app.client, "astronaut.png", &astronaut()).status(), Status::Ok);
    assert_eq!(counts(m).skipped_busy, 1, "{:?}", counts(m));
    assert_eq!(gate.free_places(), free, "the skipped run holds no queue place");
    drop(held);
    assert_eq!(encoder_runs(m), 1);
    let mask = json_of(generate_mask(&app.client, HEAD));
    assert_eq!(mask["kind"], "sam", "{mask}");
    assert_eq!(encoder_runs(m), 2, "the mask computed the embedding itself");
    // Queued work would have run before the mask, in the place it waited for.
    assert_eq!(counts(m).done, 0, "nothing ran later either: {:?}", counts(m));
}

/// The session's newest scene is what counts: a run for a scene replaced before it
/// started does not start. Through the manager (the window between an upload and its
/// run's start is too short to hit over HTTP), with the real model and the app's runtime.
#[rocket::async_test]
#[ignore = "slow: runs the MobileSAM encoder (run with --include-ignored)"]
async fn a_scene_replaced_before_its_run_starts_is_not_embedded() {
    let (figment, _temp) = test_figment(&[("models", &mobile_sam())]);
    let client = AsyncClient::tracked(drishya::build(figment)).await.expect("the app ignites");
    let login =
        client.post("/login").header(ContentType::Form).body(format!("password={}", PASSWORD.replace(' ', "+")));
    assert_eq!(login.dispatch().await.status(), Status::SeeOther);
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "c.png", content_type: "image/png", bytes: &coffee() }]);
    assert_eq!(client.post("/upload_image").header(ct).body(body).dispatch().await.status(), Status::Ok);
    let cup = serde_json::json!({"x_min": CUP[0], "y_min": CUP[1], "x_max": CUP[2], "y_max": CUP[3]}).to_string();
    assert_eq!(client.post("/generate_mask").header(ContentType::JSON).body(cup).dispatch().await.status(), Status::Ok);
    let m = client.rocket().state::<Arc<ModelManager>>().expect("managed").clone();
    assert_eq!(m.encoder_runs(), Some(1));

    let scene = || decode(&astronaut()).to_rgb8();
    let first = m.scene_uploaded("one-session");
    let second = m.scene_uploaded("one-session");
    assert_eq!(m.speculate(first, scene(), "first".into()), Speculated::Stale);
    assert_eq!(m.encoder_runs(), Some(1), "the replaced scene did not go through the encoder");
    assert_eq!(counts(&m).stale, 1);

    // The newest one does, and another session's upload does not make it stale.
    let other = m.scene_uploaded("another-session");
    assert_eq!(m.speculate(second, scene(), "second".into()), Speculated::Started);
    drop(other);
    let deadline = Instant::now() + Duration::from_secs(120);
    while settled(&counts(&m)) < 2 {
        assert!(Instant::now() < deadline, "the speculative run did not finish: {:?}", counts(&m));
        rocket::tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counts(&m).done, 1, "{:?}", counts(&m));
    assert_eq!(m.encoder_runs(), Some(2));
}
