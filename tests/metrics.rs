//! `GET /metrics` through the real app: the Prometheus text format, counters and
//! histograms that move with real requests (a real photo, the real U²-Net-p), 503s counted
//! under the gate that refused them, the gauges, and `METRICS_TOKEN`.
//!
//! The counters are the process's, so the tests here take turns (one lock) and compare
//! scrapes before and after.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use common::*;
use rocket::http::{Header, Status};
use rocket::local::blocking::Client;

/// The cup in coffee.png (600x400), with a little room.
const CUP: [i64; 4] = [165, 10, 415, 300];

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn coffee() -> Vec<u8> {
    read(&shared("images/coffee.png"))
}

/// One scrape: every sample by `name{labels}` (labels sorted), and the families' types.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// The sample, 0 when absent (a labelled series appears at its first use).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<_> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    labels.sort();
    if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", labels.join(","))
    }
}

/// Parses the text exposition format strictly: `# HELP`/`# TYPE` comments, and samples
/// `name{label="value",...} number` whose family (the name less `_bucket`, `_sum`, `_count`
/// for histograms) has a `# TYPE`. Panics on anything else.
fn parse(text: &str) -> Scrape {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line: {line}"));
            assert!(valid_name(name), "bad metric name: {line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let labels: Vec<(String, String)> = split_labels(body)
                    .into_iter()
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                        assert!(valid_name(k), "bad label name: {line}");
                        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                        (k.to_string(), v.unwrap_or_else(|| panic!("unquoted label value: {line}")).to_string())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(valid_name(name), "bad metric name: {line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        assert!(types.contains_key(family), "a sample before its # TYPE: {line}");
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let previous = samples.insert(key(name, &labels), value);
        assert!(previous.is_none(), "a series twice: {line}");
    }
    Scrape { samples, types }
}

/// `a="x",b="y,z"` -> [`a="x"`, `b="y,z"`] (commas inside quotes stay).
fn split_labels(body: &str) -> Vec<String> {
    let (mut parts, mut current, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in body.chars() {
        match c {
            ',' if !quoted => parts.push(std::mem::take(&mut current)),
            _ => {
                if c == '"' && !escaped {
                    quoted = !quoted;
                }
                escaped = c == '\\' && !escaped;
                current.push(c);
            }
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

fn scrape(client: &Client) -> Scrape {
    let response = client.get("/metrics").dispatch();
    assert_eq!(response.status(), Status::Ok);
    let content_type = response.content_type().map(|c| c.to_string()).unwrap_or_default();
    assert!(content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"), "{content_type}");
    parse(&response.into_string().unwrap_or_default())
}

#[test]
fn an_upload_and_a_mask_move_the_counters_and_the_histograms() {
    let _turn = turn();
    let app = app(&[]);
    let client = &app.client;
    let before = scrape(client);
    login(client);
    assert_eq!(upload(client, "coffee.png", &coffee()).status(), Status::Ok);
    let mask = generate_mask(client, CUP);
    assert_eq!(mask.status(), Status::Ok, "{:?}", mask.into_string());
    assert_eq!(client.get("/no/such/page-4711?token=x").dispatch().status(), Status::NotFound);
    assert_eq!(client.get("/static/app.js").dispatch().status(), Status::Ok);
    let after = scrape(client);
    let moved = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);

    for (kind, family) in [
        ("counter", "drishya_http_requests_total"),
        ("histogram", "drishya_http_request_duration_seconds"),
        ("counter", "drishya_gate_refusals_total"),
        ("histogram", "drishya_inference_duration_seconds"),
        ("histogram", "drishya_image_job_duration_seconds"),
        ("counter", "drishya_model_loads_total"),
        ("gauge", "drishya_gate_jobs"),
        ("gauge", "drishya_artefact_bytes"),
        ("gauge", "drishya_artefact_cap_bytes"),
        ("gauge", "process_resident_memory_bytes"),
    ] {
        assert_eq!(after.types.get(family).map(String::as_str), Some(kind), "{family}");
    }

    // Requests by the route's template, method and status.
    let requests = "drishya_http_requests_total";
    assert_eq!(moved(requests, &[("route", "/login"), ("method", "POST"), ("status", "303")]), 1.0);
    assert_eq!(moved(requests, &[("route", "/upload_image"), ("method", "POST"), ("status", "200")]), 1.0);
    assert_eq!(moved(requests, &[("route", "/generate_mask"), ("method", "POST"), ("status", "200")]), 1.0);
    // A path no route has is one series, whatever the path.
    assert_eq!(moved(requests, &[("route", "unmatched"), ("method", "GET"), ("status", "404")]), 1.0);
    assert!(!after.samples.keys().any(|k| k.contains("4711")), "a raw path became a label");
    // A route with a parameter is its template, not the path asked for.
    assert_eq!(moved(requests, &[("route", "/static/<path..>"), ("method", "GET"), ("status", "200")]), 1.0);
    assert!(!after.samples.keys().any(|k| k.contains("app.js")), "a raw path became a label");
    let upload_time = "drishya_http_request_duration_seconds_count";
    assert_eq!(
        after.value(upload_time, &[("route", "/upload_image")])
            - before.value(upload_time, &[("route", "/upload_image")]),
        1.0
    );

    // One U²-Net-p inference, timed; one model load.
    let inference = [("kind", "salient")];
    assert_eq!(moved("drishya_inference_duration_seconds_count", &inference), 1.0);
    assert!(moved("drishya_inference_duration_seconds_sum", &inference) > 0.0);
    let slowest = [("kind", "salient"), ("le", "+Inf")];
    assert_eq!(moved("drishya_inference_duration_seconds_bucket", &slowest), 1.0);
    assert_eq!(moved("drishya_model_loads_total", &[("outcome", "loaded")]), 1.0);
    assert_eq!(moved("drishya_model_loads_total", &[("outcome", "failed")]), 0.0);
    // The upload's image job, and the mask's (two stretches today: reading the scene, and
    // storing the mask; at least one whatever flow.rs becomes).
    assert!(moved("drishya_image_job_duration_seconds_count", &[]) >= 2.0);
    assert!(moved("drishya_image_job_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(moved("drishya_gate_refusals_total", &[("gate", "artefact_cap")]), 0.0);
    for gate in ["upload", "image", "inference"] {
        assert_eq!(
            after.get("drishya_gate_refusals_total", &[("gate", gate)]),
            before.get("drishya_gate_refusals_total", &[("gate", gate)])
        );
        assert_eq!(after.get("drishya_gate_jobs", &[("gate", gate), ("state", "running")]), Some(0.0), "{gate}");
        assert_eq!(after.get("drishya_gate_jobs", &[("gate", gate), ("state", "queued")]), Some(0.0), "{gate}");
    }

    // The store's bytes as the store counts them (scene, mask, overlay).
    let store = client.rocket().state::<Arc<drishya::storage::Artefacts>>().expect("the store");
    assert!(store.bytes() > 0);
    assert_eq!(after.get("drishya_artefact_bytes", &[]), Some(store.bytes() as f64));
    assert_eq!(before.get("drishya_artefact_bytes", &[]), Some(0.0));
    assert_eq!(after.get("drishya_artefact_cap_bytes", &[]), Some(128.0 * 1024.0 * 1024.0));
    assert!(after.value("process_resident_memory_bytes", &[]) > 1024.0 * 1024.0);
    // The queue depths: both image places taken and one job admitted behind them.
    let jobs = client.rocket().state::<drishya::gate::ImageJobs>().expect("the image gate");
    let running = [jobs.gate().try_enter().expect("a place"), jobs.gate().try_enter().expect("a place")];
    let queued = jobs.gate().admit(1).expect("a queue place");
    let busy = scrape(client);
    assert_eq!(busy.get("drishya_gate_jobs", &[("gate", "image"), ("state", "running")]), Some(2.0));
    assert_eq!(busy.get("drishya_gate_jobs", &[("gate", "image"), ("state", "queued")]), Some(1.0));
    drop((running, queued));
    assert_eq!(after.get("drishya_model_loaded", &[]), Some(1.0));
}

#[test]
fn a_503_from_a_full_gate_counts_under_that_gate() {
    let _turn = turn();
    let app = app(&[("image_concurrency", "1"), ("image_queue", "0"), ("inference_queue", "0")]);
    let client = &app.client;
    login(client);
    let refusals = |scrape: &Scrape, gate| scrape.value("drishya_gate_refusals_total", &[("gate", gate)]);

    // The image-job gate's only place held: the upload is refused.
    let jobs = client.rocket().state::<drishya::gate::ImageJobs>().expect("the image gate");
    let held = jobs.gate().try_enter().expect("the only place");
    let before = scrape(client);
    assert_eq!(before.get("drishya_gate_jobs", &[("gate", "image"), ("state", "running")]), Some(1.0));
    expect_error(upload(client, "coffee.png", &coffee()), Status::ServiceUnavailable);
    let after = scrape(client);
    assert_eq!(refusals(&after, "image") - refusals(&before, "image"), 1.0);
    assert_eq!(refusals(&after, "inference") - refusals(&before, "inference"), 0.0);
    assert_eq!(refusals(&after, "upload") - refusals(&before, "upload"), 0.0);
    let busy = [("route", "/upload_image"), ("method", "POST"), ("status", "503")];
    assert_eq!(
        after.value("drishya_http_requests_total", &busy) - before.value("drishya_http_requests_total", &busy),
        1.0
    );
    drop(held);

    // The four upload places held (no queue): the upload is refused before its body is read.
    let uploads = drishya::gate::uploads(client.rocket()).expect("the upload gate");
    let held: Vec<_> = (0..4).map(|_| uploads.try_enter().expect("an upload place")).collect();
    assert!(uploads.try_enter().is_none(), "all four are held");
    let before = scrape(client);
    expect_error(upload(client, "coffee.png", &coffee()), Status::ServiceUnavailable);
    let after = scrape(client);
    assert_eq!(refusals(&after, "upload") - refusals(&before, "upload"), 1.0);
    assert_eq!(refusals(&after, "image") - refusals(&before, "image"), 0.0);
    assert_eq!(after.get("drishya_gate_jobs", &[("gate", "upload"), ("state", "running")]), Some(4.0));
    drop(held);

    // The inference gate's only place held (no queue): the mask is refused.
    assert_eq!(upload(client, "coffee.png", &coffee()).status(), Status::Ok);
    let models = client.rocket().state::<Arc<drishya::models::ModelManager>>().expect("the model owner");
    let held = models.gate().try_enter().expect("the only inference place");
    let before = scrape(client);
    expect_error(generate_mask(client, CUP), Status::ServiceUnavailable);
    let after = scrape(client);
    assert_eq!(refusals(&after, "inference") - refusals(&before, "inference"), 1.0);
    assert_eq!(refusals(&after, "image") - refusals(&before, "image"), 0.0);
    drop(held);
    assert_eq!(generate_mask(client, CUP).status(), Status::Ok);
}

#[test]
fn a_write_the_artefact_cap_refuses_counts_under_artefact_cap() {
    let _turn = turn();
    // A 1 MB cap, and a scene whose working image alone is larger: no idle session to evict.
    let app = app(&[("temp_max_mb", "1")]);
    let client = &app.client;
    login(client);
    let before = scrape(client);
    let photo = read(&shared("images/hubble_deep_field.jpg"));
    expect_error(upload(client, "hubble.jpg", &photo), Status::ServiceUnavailable);
    let after = scrape(client);
    let refusals = |scrape: &Scrape, gate| scrape.value("drishya_gate_refusals_total", &[("gate", gate)]);
    assert_eq!(refusals(&after, "artefact_cap") - refusals(&before, "artefact_cap"), 1.0);
    assert_eq!(refusals(&after, "image") - refusals(&before, "image"), 0.0);
    assert_eq!(after.get("drishya_artefact_cap_bytes", &[]), Some(1024.0 * 1024.0));
}

#[test]
fn metrics_token_is_required_when_set() {
    let _turn = turn();
    const TOKEN: &str = "metrics-token-for-the-test-81c2";
    let app = app(&[("metrics_token", TOKEN)]);
    let client = &app.client;

    let refused = client.get("/metrics").dispatch();
    assert_eq!(refused.headers().get_one("WWW-Authenticate"), Some("Bearer realm=\"metrics\""));
    assert!(expect_error(refused, Status::Unauthorized).contains("METRICS_TOKEN"));
    for wrong in [
        "Bearer metrics-token-for-the-test-81c",
        "Bearer metrics-token-for-the-test-81c2x",
        "Basic bWV0cmljczp4",
        TOKEN,
    ] {
        let response = client.get("/metrics").header(Header::new("Authorization", wrong)).dispatch();
        assert_eq!(response.status(), Status::Unauthorized, "{wrong}");
    }
    // A cookie login is no key to it either.
    login(client);
    assert_eq!(client.get("/metrics").dispatch().status(), Status::Unauthorized);

    let allowed = client.get("/metrics").header(Header::new("Authorization", format!("bearer {TOKEN}"))).dispatch();
    assert_eq!(allowed.status(), Status::Ok);
    let text = allowed.into_string().unwrap_or_default();
    assert!(!text.contains(TOKEN));
    let scrape = parse(&text);
    assert!(scrape.types.contains_key("drishya_http_requests_total"));
    // The refusals were counted as 401s of the route.
    let refused = [("route", "/metrics"), ("method", "GET"), ("status", "401")];
    assert!(scrape.value("drishya_http_requests_total", &refused) >= 6.0);

    // A token too short to be a secret stops the start, naming the variable, not the value.
    for bad in ["short-token", "a token with spaces in it"] {
        let (figment, _temp) = test_figment(&[("metrics_token", bad)]);
        let why = drishya::config::checked(&figment).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(why.starts_with("METRICS_TOKEN is invalid") && !why.contains(bad), "{why}");
        assert!(try_app(&[("metrics_token", bad)]).is_err(), "{bad}");
    }
    // Digits only are read as a number, and refused without being quoted.
    let (figment, _temp) = test_figment(&[("metrics_token", "12345678901234567890")]);
    let why = drishya::config::checked(&figment).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(why.contains("METRICS_TOKEN") && !why.contains("1234567890"), "{why}");
}
