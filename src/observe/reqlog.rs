//! The request id, the request counters and, with `LOG_FORMAT=json`, one JSON line per
//! request (and every other log record as a JSON line too, so a log collector parses all).
//!
//! The id is the client's or the proxy's (`X-Request-Id`, then Railway's
//! `X-Railway-Request-Id`) when it is printable ASCII of at most [`MAX_ID_LEN`] characters,
//! else one of ours; it is echoed as `X-Request-Id`, so a user's report can be matched to
//! the log. The JSON line never holds the cookie, a token, a password or a query string:
//! the session is a hash of its id, the path is cut at `?`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use rocket::fairing::{Fairing, Info, Kind};
use rocket::http::{Header, Status};
use rocket::{Data, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::auth::{SessionToken, TokenAuth, SESSION_COOKIE};
use crate::config::AppConfig;

/// `LOG_FORMAT`: `text`, the human lines (the default), or `json` (either in any case).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(serde::de::Error::custom("must be `text` or `json`")),
        }
    }
}

/// Longest request id taken from a client: a header value, not a body.
pub const MAX_ID_LEN: usize = 128;

/// The log target of the request lines (the human one of `web::headers` and the JSON one).
pub const REQUEST_TARGET: &str = "drishya::request";

/// Whether the process's logger writes JSON lines. Set once at ignite from `LOG_FORMAT`
/// (the logger is installed before the configuration is read, and is the process's).
static JSON_LINES: AtomicBool = AtomicBool::new(false);

pub fn use_json_lines() {
    JSON_LINES.store(true, Ordering::Relaxed);
}

/// Whether log records are written as JSON lines (see `web`'s logger).
pub fn json_logs() -> bool {
    JSON_LINES.load(Ordering::Relaxed)
}

/// Whether this app writes its request lines as JSON (then `web::headers` writes none).
pub fn json_request_log(request: &Request<'_>) -> bool {
    request.rocket().state::<AppConfig>().is_some_and(|cfg| cfg.log_format == LogFormat::Json)
}

/// One log record as a JSON line, for the logger in JSON mode. A request line is already a
/// JSON object and goes out as it is.
pub fn json_record(level: log::Level, target: &str, text: &str) -> String {
    if target == REQUEST_TARGET && text.starts_with('{') {
        return format!("{text}\n");
    }
    let level = level.as_str().to_ascii_lowercase();
    let line = json!({ "ts": now(), "level": level, "target": target, "msg": without_colours(text) });
    format!("{line}\n")
}

/// `text` without the terminal colour codes Rocket puts in its messages (`ESC [ ... m`).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Up to and including the sequence's final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn now() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// This request's id, as echoed in `X-Request-Id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    /// The client's id when it is acceptable, else a fresh one.
    fn of(request: &Request<'_>) -> Self {
        let given = ["X-Request-Id", "X-Railway-Request-Id"]
            .into_iter()
            .filter_map(|name| request.headers().get_one(name))
            .map(str::trim)
            .find(|id| acceptable(id));
        RequestId(given.map_or_else(generate, str::to_string))
    }

    /// The id of `request` (one is made if the fairing has not run, as in a catcher test).
    pub fn get<'r>(request: &'r Request<'_>) -> &'r str {
        &request.local_cache(|| RequestId::of(request)).0
    }
}

/// Printable ASCII (space to `~`), not empty, at most [`MAX_ID_LEN`]: nothing that could
/// split a log line, forge a header or fill the log.
pub fn acceptable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn generate() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// When the request reached this fairing, for its duration.
struct Started(Instant);

/// Request ids, the request counters and the JSON request line.
pub struct RequestLog;

#[rocket::async_trait]
impl Fairing for RequestLog {
    fn info(&self) -> Info {
        Info { name: "Request id, metrics and JSON request log", kind: Kind::Request | Kind::Response }
    }

    async fn on_request(&self, request: &mut Request<'_>, _: &mut Data<'_>) {
        request.local_cache(|| Started(Instant::now()));
        RequestId::get(request);
    }

    async fn on_response<'r>(&self, request: &'r Request<'_>, response: &mut Response<'r>) {
        let took = request.local_cache(|| Started(Instant::now())).0.elapsed();
        let id = RequestId::get(request);
        response.set_header(Header::new("X-Request-Id", id.to_string()));
        let route = route_label(request);
        let status = response.status();
        super::metrics::request_answered(&route, request.method().as_str(), status.code, took);
        if json_request_log(request) {
            log::info!(target: REQUEST_TARGET, "{}", request_line(request, id, &route, status, took));
        }
    }
}

/// The matched route's URI template (never the raw path: each path would be a series of
/// its own), or [`super::metrics::UNMATCHED`].
fn route_label(request: &Request<'_>) -> String {
    match request.route() {
        Some(route) => route.uri.path().to_string(),
        None => super::metrics::UNMATCHED.to_string(),
    }
}

fn request_line(request: &Request<'_>, id: &str, route: &str, status: Status, took: Duration) -> String {
    let line = json!({
        "ts": now(),
        "level": "info",
        "msg": "request",
        "target": REQUEST_TARGET,
        "request_id": id,
        "method": request.method().as_str(),
        "route": route,
        // The path only: a query string may carry a credential (`/login?password=...`).
        "path": request.uri().path().as_str(),
        "status": status.code,
        "duration_ms": (took.as_secs_f64() * 1e6).round() / 1e3,
        "session": session_hash(request),
    });
    line.to_string()
}

/// A short hash of the request's session, so that one user's requests can be followed in
/// the log without the log holding anything that opens the session: the session id is
/// hashed (it names the session's artefacts), the cookie and the token never appear.
/// `None` for a request without a session the server accepts the seal of.
fn session_hash(request: &Request<'_>) -> Option<String> {
    let session = match bearer_token(request) {
        Some(token) => request.rocket().state::<TokenAuth>()?.session_for(token)?,
        None => SessionToken::decode(request.cookies().get_private(SESSION_COOKIE)?.value()).ok()?.session,
    };
    let digest = Sha256::new().chain_update(b"drishya/log-session/v1\0").chain_update(session.as_str()).finalize();
    Some(hex(&digest[..8]))
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token<'r>(request: &'r Request<'_>) -> Option<&'r str> {
    let value = request.headers().get_one("Authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_printable_ascii_ids_of_at_most_128_characters_are_taken() {
        assert!(acceptable("3f2a-9c1e/req:42 A"));
        assert!(acceptable(&"x".repeat(MAX_ID_LEN)));
        assert!(!acceptable(&"x".repeat(MAX_ID_LEN + 1)));
        assert!(!acceptable(""));
        assert!(!acceptable("a\nb"));
        assert!(!acceptable("a\u{7f}"));
        assert!(!acceptable("é"));
        assert_eq!(generate().len(), 32);
        assert_ne!(generate(), generate());
    }

    #[test]
    fn log_records_become_json_lines_and_request_lines_stay_whole() {
        let line = json_record(log::Level::Warn, "drishya::models", "a \"quoted\" reason");
        let value: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(value["level"], "warn");
        assert_eq!(value["msg"], "a \"quoted\" reason");
        assert_eq!(json_record(log::Level::Info, REQUEST_TARGET, "{\"a\":1}"), "{\"a\":1}\n");
        let coloured = json_record(log::Level::Info, "rocket::launch", "\u{1b}[1;34maddress\u{1b}[0m: 127.0.0.1");
        assert!(coloured.contains("\"msg\":\"address: 127.0.0.1\""), "{coloured}");
    }
}
