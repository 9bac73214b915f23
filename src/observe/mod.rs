//! The operator's view: Prometheus metrics at `GET /metrics` (behind `METRICS_TOKEN` when it
//! is set), a request id on every answer (`X-Request-Id`) and, with `LOG_FORMAT=json`, one
//! JSON log line per request.
//!
//! Elsewhere there are only one-line hooks: the gates count their refusals and time image
//! jobs, the store counts its cap's refusals, the model owner times inferences and counts
//! loads ([`metrics`]); `web`'s logger asks [`reqlog`] whether to write JSON.

mod metrics;
mod reqlog;

use rocket::fairing::AdHoc;

use crate::config::AppConfig;

pub use metrics::{cap_refused, gate_refused, inference_ran, model_load_settled, ImageJobTimer, GATES, UNMATCHED};
pub use reqlog::{acceptable as acceptable_request_id, json_logs, json_record, json_request_log, LogFormat, RequestId};
pub use reqlog::{use_json_lines, MAX_ID_LEN, REQUEST_TARGET};

/// Mounts `/metrics` and attaches the request fairing; switches the logger to JSON lines
/// when `LOG_FORMAT=json`.
pub fn stage() -> AdHoc {
    AdHoc::on_ignite("Metrics and request log", |rocket| async move {
        metrics::init();
        if rocket.state::<AppConfig>().is_some_and(|cfg| cfg.log_format == LogFormat::Json) {
            reqlog::use_json_lines();
        }
        rocket.attach(reqlog::RequestLog).mount("/", routes![metrics::metrics_route])
    })
}
