//! Prometheus metrics: what happened (counters and histograms, fed by one-line hooks where
//! it happens) and how things stand (gauges, read from the app's state at each scrape).
//!
//! The counters and histograms live in one registry for the process: the hooks sit in the
//! gates and the model owner, which know nothing of Rocket, and a server is one app per
//! process. The gauges are made afresh at each scrape from the app that answers it (its
//! gates, its store, its model owner), so they are never stale and never another app's.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use rocket::http::{ContentType, Header, Status};
use rocket::request::{FromRequest, Outcome, Request};
use rocket::response::{self, Responder};
use rocket::serde::json::Json;
use rocket::{Orbit, Rocket};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AppConfig;
use crate::gate::{Gate, ImageJobs};
use crate::models::ModelManager;
use crate::storage::Artefacts;

/// The route label of a request no route matched (every 404 of a scanner is one series).
pub const UNMATCHED: &str = "unmatched";

/// The gates whose refusals (503 + Retry-After) are counted, as they are labelled: the
/// three queues, and the artefact cap when every session holding bytes is in use.
pub const GATES: [&str; 4] = ["upload", "image", "inference", "artefact_cap"];

/// The counters and histograms of the process.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    refusals: IntCounterVec,
    inference_seconds: HistogramVec,
    image_job_seconds: Histogram,
    model_loads: IntCounterVec,
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("drishya_http_requests_total", "Requests answered, by route template, method and status"),
            &["route", "method", "status"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("drishya_http_request_duration_seconds", "Time to answer a request, by route template")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["route"],
        )?;
        let refusals = IntCounterVec::new(
            Opts::new("drishya_gate_refusals_total", "Requests refused with 503 because a gate was full"),
            &["gate"],
        )?;
        let inference_seconds = HistogramVec::new(
            HistogramOpts::new("drishya_inference_duration_seconds", "Time a model took for one mask, by model kind")
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            &["kind"],
        )?;
        let image_job_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "drishya_image_job_duration_seconds",
                "Time an image job (decode, composite, encode) held a running place, per stretch",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let model_loads = IntCounterVec::new(
            Opts::new("drishya_model_loads_total", "Model loads finished, by outcome (loaded, box_fallback, failed)"),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(inference_seconds.clone()))?;
        registry.register(Box::new(image_job_seconds.clone()))?;
        registry.register(Box::new(model_loads.clone()))?;
        // Present from the start at zero, so that a rate over them never has a gap.
        for gate in GATES {
            refusals.with_label_values(&[gate]);
        }
        for outcome in ["loaded", "box_fallback", "failed"] {
            model_loads.with_label_values(&[outcome]);
        }
        Ok(Metrics { registry, requests, request_seconds, refusals, inference_seconds, image_job_seconds, model_loads })
    }
}

/// `None` only if a definition above is refused by the crate (a programming error, caught
/// by the unit test below): then nothing is counted and `/metrics` says so, but the app runs.
static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match Metrics::new() {
    Ok(metrics) => Some(metrics),
    Err(e) => {
        log::error!("the metrics could not be set up: {e}");
        None
    }
});

fn metrics() -> Option<&'static Metrics> {
    METRICS.as_ref()
}

/// Makes the registry now, at ignite, rather than in the first request that counts.
pub(crate) fn init() {
    let _ = metrics();
}

/// A request was answered.
pub(crate) fn request_answered(route: &str, method: &str, status: u16, took: Duration) {
    if let Some(m) = metrics() {
        m.requests.with_label_values(&[route, method, &status.to_string()]).inc();
        m.request_seconds.with_label_values(&[route]).observe(took.as_secs_f64());
    }
}

/// `gate` (one of [`GATES`]) refused a request: its queue was full.
pub fn gate_refused(gate: &'static str) {
    if let Some(m) = metrics() {
        m.refusals.with_label_values(&[gate]).inc();
    }
}

/// The artefact cap refused a write (no idle session left to evict): counted as the
/// `artefact_cap` gate's refusal, and the store's error for it.
pub fn cap_refused() -> crate::storage::StorageError {
    gate_refused("artefact_cap");
    crate::storage::StorageError::CapReached
}

/// A model of `kind` made a mask in `took`.
pub fn inference_ran(kind: drishya_segment::ModelKind, took: Duration) {
    let kind = match kind {
        drishya_segment::ModelKind::Sam => "sam",
        drishya_segment::ModelKind::Salient => "salient",
        drishya_segment::ModelKind::Box => "box",
    };
    if let Some(m) = metrics() {
        m.inference_seconds.with_label_values(&[kind]).observe(took.as_secs_f64());
    }
}

/// A model load finished: a model `loaded` (the box standing in when `fallback`), or not.
pub fn model_load_settled(loaded: bool, fallback: bool) {
    let outcome = match (loaded, fallback) {
        (true, false) => "loaded",
        (true, true) => "box_fallback",
        (false, _) => "failed",
    };
    if let Some(m) = metrics() {
        m.model_loads.with_label_values(&[outcome]).inc();
    }
}

/// Held by a running image job: its running time is observed when it is dropped.
pub struct ImageJobTimer(Instant);

impl ImageJobTimer {
    pub fn start() -> Self {
        ImageJobTimer(Instant::now())
    }
}

impl Drop for ImageJobTimer {
    fn drop(&mut self) {
        if let Some(m) = metrics() {
            m.image_job_seconds.observe(self.0.elapsed().as_secs_f64());
        }
    }
}

/// Why `/metrics` was not answered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics require the METRICS_TOKEN: send Authorization: Bearer <token>")]
    Unauthorized,
    #[error("the metrics could not be written")]
    Unavailable(String),
}

impl<'r> Responder<'r, 'static> for MetricsError {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        let status = match &self {
            MetricsError::Unauthorized => Status::Unauthorized,
            MetricsError::Unavailable(detail) => {
                log::error!("GET /metrics -> 500: {detail}");
                Status::InternalServerError
            }
        };
        let mut response = Json(json!({ "error": self.to_string() })).respond_to(request)?;
        response.set_status(status);
        if status == Status::Unauthorized {
            response.set_header(Header::new("WWW-Authenticate", "Bearer realm=\"metrics\""));
        }
        Ok(response)
    }
}

/// The right to read `/metrics`: anyone when `METRICS_TOKEN` is unset, else a request with
/// `Authorization: Bearer <METRICS_TOKEN>`. Never fails as a guard: the handler answers the
/// refusal itself, so that it says what is wanted (the app's 401 catcher speaks of logins).
pub struct Scraper<'r> {
    allowed: bool,
    /// The app answering, whose state the gauges read.
    rocket: &'r Rocket<Orbit>,
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Scraper<'r> {
    type Error = std::convert::Infallible;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        let expected = request.rocket().state::<AppConfig>().and_then(AppConfig::metrics_token);
        let allowed = match expected {
            None => true,
            Some(expected) => super::reqlog::bearer_token(request).is_some_and(|given| token_matches(given, expected)),
        };
        Outcome::Success(Scraper { allowed, rocket: request.rocket() })
    }
}

/// Compared as SHA-256 digests in constant time: neither the content nor the length of the
/// token shows in the time a refusal takes.
fn token_matches(given: &str, expected: &str) -> bool {
    let (given, expected) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected.as_bytes()));
    given.ct_eq(&expected).into()
}

/// `GET /metrics`: the Prometheus text format.
#[get("/metrics")]
pub fn metrics_route(scraper: Scraper<'_>) -> Result<(ContentType, String), MetricsError> {
    if !scraper.allowed {
        log::info!("GET /metrics: refused (no valid METRICS_TOKEN)");
        return Err(MetricsError::Unauthorized);
    }
    let m = metrics().ok_or_else(|| MetricsError::Unavailable("the metrics registry was not set up".into()))?;
    let state = state_registry(scraper.rocket).map_err(|e| MetricsError::Unavailable(e.to_string()))?;
    let mut families = m.registry.gather();
    families.extend(state.gather());
    let encoder = TextEncoder::new();
    let mut text = Vec::new();
    encoder.encode(&families, &mut text).map_err(|e| MetricsError::Unavailable(e.to_string()))?;
    let text = String::from_utf8(text).map_err(|e| MetricsError::Unavailable(e.to_string()))?;
    // `version=0.0.4` is the text format's content type, as Prometheus asks for it.
    let content_type = ContentType::new("text", "plain").with_params([("version", "0.0.4"), ("charset", "utf-8")]);
    Ok((content_type, text))
}

/// The gauges, as `rocket`'s state has them now.
fn state_registry(rocket: &Rocket<Orbit>) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let jobs = IntGaugeVec::new(
        Opts::new(
            "drishya_gate_jobs",
            "Jobs in each gate now: running (holding a running place) or queued (admitted, waiting)",
        ),
        &["gate", "state"],
    )?;
    let gates: [(&str, Option<&Gate>); 3] = [
        ("upload", crate::gate::uploads(rocket)),
        ("image", rocket.state::<ImageJobs>().map(ImageJobs::gate)),
        ("inference", rocket.state::<Arc<ModelManager>>().map(|m| m.gate())),
    ];
    for (name, gate) in gates {
        if let Some(gate) = gate {
            let (running, queued) = gate.occupancy();
            jobs.with_label_values(&[name, "running"]).set(gauge(running as u64));
            jobs.with_label_values(&[name, "queued"]).set(gauge(queued as u64));
        }
    }
    registry.register(Box::new(jobs))?;

    if let Some(store) = rocket.state::<Arc<Artefacts>>() {
        let bytes = IntGauge::new("drishya_artefact_bytes", "Bytes the sessions' artefacts take now")?;
        bytes.set(gauge(store.bytes()));
        registry.register(Box::new(bytes))?;
    }
    if let Some(cfg) = rocket.state::<AppConfig>() {
        let cap = IntGauge::new("drishya_artefact_cap_bytes", "The cap on the artefacts' bytes (TEMP_MAX_MB)")?;
        cap.set(gauge(cfg.temp_max_mb.saturating_mul(1024 * 1024)));
        registry.register(Box::new(cap))?;
    }
    if let Some(models) = rocket.state::<Arc<ModelManager>>() {
        let loaded = IntGauge::new("drishya_model_loaded", "1 while the model chain is loaded (`ready` in /health)")?;
        loaded.set(i64::from(models.status().state == crate::models::LoadState::Ready));
        registry.register(Box::new(loaded))?;
    }

    let (rss, peak) = crate::sysmem::process_rss();
    let resident = IntGauge::new("process_resident_memory_bytes", "Resident memory of this process")?;
    resident.set(gauge(rss));
    registry.register(Box::new(resident))?;
    let resident_peak = IntGauge::new("drishya_process_resident_memory_peak_bytes", "Peak resident memory")?;
    resident_peak.set(gauge(peak));
    registry.register(Box::new(resident_peak))?;
    // Only where the container has a memory limit: there is no cgroup figure to give otherwise.
    if let Some((limit, usage)) = crate::sysmem::cgroup_memory() {
        let used = IntGauge::new(
            "drishya_cgroup_memory_usage_bytes",
            "Memory the container's cgroup uses, less the inactive page cache the kernel reclaims first",
        )?;
        used.set(gauge(usage));
        registry.register(Box::new(used))?;
        let max = IntGauge::new("drishya_cgroup_memory_limit_bytes", "The container's memory limit")?;
        max.set(gauge(limit));
        registry.register(Box::new(max))?;
    }
    Ok(registry)
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definitions_are_accepted() {
        assert!(Metrics::new().is_ok());
    }

    #[test]
    fn tokens_match_only_exactly() {
        assert!(token_matches("a-metrics-token-0123", "a-metrics-token-0123"));
        assert!(!token_matches("a-metrics-token-012", "a-metrics-token-0123"));
        assert!(!token_matches("", "a-metrics-token-0123"));
    }
}
