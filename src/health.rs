//! `GET /health`: cheap, honest, no login, never fails because of the model.
//!
//! Anonymous callers (load balancers, probes, anyone) see the model locations cut to
//! their file names: the paths of this machine's folders (and a model URL's host and
//! path) are shown to logged-in users only.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rocket::http::Status;
use rocket::serde::json::{json, Json, Value};
use rocket::{Route, State};

use crate::auth::User;
use crate::config::{environment_name, AppConfig};
use crate::download;
use crate::models::{LoadState, ModelManager, Probe};
use crate::storage::{Artefacts, DirHealth};
use crate::sysmem;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Percentage of the filesystem holding `dir` that is used.
fn disk_usage_percent(dir: &Path) -> Option<f64> {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let disk = disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())?;
    let total = disk.total_space() as f64;
    (total > 0.0).then(|| round(100.0 * (total - disk.available_space() as f64) / total, 1))
}

/// Liveness: 200 while the process lives. `status` is `healthy` only when artefacts can
/// be written and masks can be served (or are not known to be impossible yet: a URL
/// model not downloaded, a load in progress); else `degraded`, with `reasons`.
#[get("/health")]
async fn health(
    cfg: &State<AppConfig>,
    store: &State<Arc<Artefacts>>,
    models: &State<Arc<ModelManager>>,
    rocket_cfg: &rocket::Config,
    user: Option<User>,
) -> Json<Value> {
    let (total, available) = sysmem::container_memory();
    let (rss, peak) = sysmem::process_rss();
    let readiness = models.readiness(Probe::Liveness).await;
    let model = models.status();
    let dirs = store_health(store).await;
    let mut reasons = Vec::new();
    if let Some(problem) = &dirs.store_problem {
        reasons.push(problem.clone());
    }
    if readiness.broken() {
        let why = readiness.reason.clone().unwrap_or_else(|| "no model can be loaded".into());
        reasons.push(format!("masks cannot be made: {why}"));
    }
    let healthy = reasons.is_empty();
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let rfc3339 = time::OffsetDateTime::from_unix_timestamp(timestamp as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    let mut answer = json!({
        "status": if healthy { "healthy" } else { "degraded" },
        "reasons": reasons,
        "ready": readiness.ready(),
        "service": "drishya",
        "version": env!("CARGO_PKG_VERSION"),
        "timestamp": rfc3339,
        "environment": environment_name(rocket_cfg.profile.as_str().as_str()),
        "model_loaded": model.state == crate::models::LoadState::Ready,
        "model": model,
        "readiness": readiness,
        "default_password": cfg.uses_default_password(),
        "system": {
            "memory_total_gb": round(total as f64 / GIB, 3),
            "memory_available_gb": round(available as f64 / GIB, 3),
            "memory_limited_by_cgroup": sysmem::cgroup_memory().is_some(),
            "process_rss_mb": round(rss as f64 / MIB, 1),
            "process_peak_rss_mb": round(peak as f64 / MIB, 1),
            "cpu_count": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            // The artefacts' disk, or (with a bucket) the one uploads in flight use.
            "disk_usage_percent": disk_usage_percent(store.root().unwrap_or(&std::env::temp_dir())),
        },
        "directories": dirs,
    });
    // Inside `model`, so that the documented top-level keys stay as they are.
    if let Some(m) = answer.get_mut("model").and_then(Value::as_object_mut) {
        m.insert("download".into(), json!(download::in_progress().into_iter().next()));
        let free = models.gate().free_places();
        let loading = model.state == LoadState::Loading;
        m.insert("queue".into(), queue(cfg.inference_concurrency, cfg.inference_queue, free, loading));
    }
    if user.is_none() {
        without_paths(&mut answer, cfg);
    }
    Json(answer)
}

/// The inference gate as the page shows it while a mask waits: `admitted` requests hold a
/// place (running or waiting), `waiting` of them have no running place yet; during a load
/// every admitted request waits for the model.
fn queue(running_max: usize, waiting_max: usize, free: usize, loading: bool) -> Value {
    let running_max = running_max.max(1);
    let admitted = (running_max + waiting_max).saturating_sub(free);
    let waiting = if loading { admitted } else { admitted.saturating_sub(running_max) };
    json!({ "running_max": running_max, "waiting_max": waiting_max, "admitted": admitted, "waiting": waiting })
}

/// Readiness: 200 when a mask could be served now (a model loaded, or present and
/// within the guards, or the box fallback); 503 with the reason otherwise, so that a
/// deploy whose model is missing never goes live. A chain that starts with a URL model
/// starts its download here.
#[get("/ready")]
async fn ready(
    models: &State<Arc<ModelManager>>,
    store: &State<Arc<Artefacts>>,
    cfg: &State<AppConfig>,
    user: Option<User>,
) -> (Status, Json<Value>) {
    let readiness = models.readiness(Probe::Readiness).await;
    let store_problem = store_health(store).await.store_problem;
    let ok = readiness.ready() && store_problem.is_none();
    let reason = store_problem.or_else(|| readiness.reason.clone());
    let status = if ok { Status::Ok } else { Status::ServiceUnavailable };
    let mut answer = json!({ "ready": ok, "state": readiness.state, "model": readiness.model, "reason": reason });
    if user.is_none() {
        without_paths(&mut answer, cfg);
    }
    (status, Json(answer))
}

/// The last part of a path or URL, without a URL's query (`/models/mobile_sam/` ->
/// `mobile_sam`, `https://host/m/x.onnx?***` -> `x.onnx`).
fn file_name(location: &str) -> &str {
    let path = if location.contains("://") { location.split(['?', '#']).next().unwrap_or(location) } else { location };
    let trimmed = path.trim_end_matches('/');
    trimmed.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or(trimmed)
}

/// Replaces, in every string of `answer`, each configured model location (as configured
/// and as shown, URLs redacted) by its file name, and the model cache folder by its
/// variable's name. Longest first, so that a location inside another is not cut twice.
fn without_paths(answer: &mut Value, cfg: &AppConfig) {
    let mut replacements: Vec<(String, String)> = Vec::new();
    for location in cfg.model_locations() {
        let shown = crate::models::redact(&location);
        let name = file_name(&shown).to_string();
        replacements.push((location, name.clone()));
        replacements.push((shown, name));
    }
    replacements.push((cfg.model_cache_dir.display().to_string(), "MODEL_CACHE_DIR".into()));
    replacements.retain(|(from, to)| !from.is_empty() && from != to);
    replacements.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    replace_in_strings(answer, &replacements);
}

fn replace_in_strings(value: &mut Value, replacements: &[(String, String)]) {
    match value {
        Value::String(text) => {
            for (from, to) in replacements {
                if text.contains(from.as_str()) {
                    *text = text.replace(from.as_str(), to);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| replace_in_strings(v, replacements)),
        Value::Object(map) => map.values_mut().for_each(|v| replace_in_strings(v, replacements)),
        _ => {}
    }
}

/// The artefact store's state, asked off the async workers (a bucket is a network call).
async fn store_health(store: &State<Arc<Artefacts>>) -> DirHealth {
    let store = store.inner().clone();
    let asked = rocket::tokio::task::spawn_blocking(move || store.health()).await;
    asked.unwrap_or_else(|_| DirHealth::unknown())
}

pub fn routes() -> Vec<Route> {
    routes![health, ready]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rocket::async_test]
    async fn queue_counts_the_places_taken_on_the_real_gate() {
        let gate = crate::gate::Gate::new(1, 3);
        assert_eq!(
            queue(1, 3, gate.free_places(), false),
            json!({"running_max": 1, "waiting_max": 3, "admitted": 0, "waiting": 0})
        );
        let _running = gate.enter(1).await.expect("a place");
        let _waiting = [gate.admit(1).expect("queued"), gate.admit(1).expect("queued")];
        let figures = queue(1, 3, gate.free_places(), false);
        assert_eq!((figures["admitted"].as_u64(), figures["waiting"].as_u64()), (Some(3), Some(2)));
        let figures = queue(1, 3, gate.free_places(), true);
        assert_eq!(figures["waiting"].as_u64(), Some(3), "during a load every admitted request waits");
    }

    #[test]
    fn anonymous_answers_show_file_names_only() {
        let cfg = AppConfig {
            models: "/srv/private/mobile_sam/,models/u2netp.onnx,https://u:p@host.example/m/x.onnx?sig=1".into(),
            model_cache_dir: "/var/cache/drishya-models".into(),
            ..AppConfig::default()
        };
        let mut answer = json!({
            "configured": ["/srv/private/mobile_sam/", "models/u2netp.onnx", crate::models::redact("https://u:p@host.example/m/x.onnx?sig=1")],
            "reason": "/srv/private/mobile_sam/: not found; could not write `/var/cache/drishya-models/x.part`",
        });
        without_paths(&mut answer, &cfg);
        let text = answer.to_string();
        for hidden in ["/srv", "private", "models/", "host.example", "/var/cache"] {
            assert!(!text.contains(hidden), "{hidden} shown: {text}");
        }
        assert_eq!(answer["configured"], json!(["mobile_sam", "u2netp.onnx", "x.onnx"]));
        assert!(text.contains("mobile_sam: not found") && text.contains("MODEL_CACHE_DIR/x.part"), "{text}");
    }
}
