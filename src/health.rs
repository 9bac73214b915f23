//! `GET /health`: cheap, honest, no login, never fails because of the model.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rocket::http::Status;
use rocket::serde::json::{json, Json, Value};
use rocket::{Route, State};

use crate::config::{environment_name, AppConfig};
use crate::models::{ModelManager, Probe};
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
    Json(json!({
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
    }))
}

/// Readiness: 200 when a mask could be served now (a model loaded, or present and
/// within the guards, or the box fallback); 503 with the reason otherwise, so that a
/// deploy whose model is missing never goes live. A chain that starts with a URL model
/// starts its download here.
#[get("/ready")]
async fn ready(models: &State<Arc<ModelManager>>, store: &State<Arc<Artefacts>>) -> (Status, Json<Value>) {
    let readiness = models.readiness(Probe::Readiness).await;
    let store_problem = store_health(store).await.store_problem;
    let ok = readiness.ready() && store_problem.is_none();
    let reason = store_problem.or_else(|| readiness.reason.clone());
    let status = if ok { Status::Ok } else { Status::ServiceUnavailable };
    (status, Json(json!({ "ready": ok, "state": readiness.state, "model": readiness.model, "reason": reason })))
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
