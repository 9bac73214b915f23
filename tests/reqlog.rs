//! The request id and the JSON request log (`LOG_FORMAT=json`).
//!
//! The log as tests/logs.rs reads it: the release binary on a real socket (behind its
//! front door, as deployed), its standard output captured to a file. The request id also
//! through the in-process app, where every kind of answer (route, catcher, static file)
//! can be asked for cheaply.

mod common;

use common::process::*;
use common::*;
use rocket::http::{Header, Status};
use serde_json::Value;

const PASSWORD: &str = "the-password-of-the-reqlog-test";
const TOKEN: &str = "reqlog-api-token-0f3b9a7c";

/// The `X-Request-Id` header of a raw answer's head.
fn request_id(reply: &Reply) -> Option<String> {
    reply
        .head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("x-request-id"))
        .map(|(_, value)| value.trim().to_string())
}

fn generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn with_log_format_json_each_request_is_one_json_line_without_secrets() {
    let dir = app_dir();
    let port = free_port();
    let log_path = dir.path().join("server.log");
    let err_path = dir.path().join("server.err");
    let env = vec![
        ("PORT", port.to_string()),
        ("APP_PASSWORD", PASSWORD.to_string()),
        ("SECRET_KEY", "a key of at least thirty-two characters for the reqlog test".to_string()),
        ("TEMP_DIR", dir.path().join("artefacts").display().to_string()),
        ("MODELS", "models/u2netp.onnx".to_string()),
        ("API_TOKENS", TOKEN.to_string()),
        ("LOG_FORMAT", "json".to_string()),
    ];
    let (stdout, stderr) = (std::fs::File::create(&log_path).unwrap(), std::fs::File::create(&err_path).unwrap());
    let server = start_logged(dir.path(), &env, port, stdout, stderr);

    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let wrong = request(port, "POST", "/login?password=query-secret-one", &form, b"password=wrong-guess-9").unwrap();
    assert_eq!(wrong.status, 401);
    let cookie = login_at(port, PASSWORD);
    let cookie_value = cookie.split_once('=').map(|(_, v)| v.to_string()).unwrap();
    let traced = request(port, "GET", "/health", &[("X-Request-Id", "trace-4711/a")], b"").unwrap();
    assert_eq!(request_id(&traced).as_deref(), Some("trace-4711/a"));
    assert_eq!(upload_coffee(port, &cookie).status, 200);
    let page = get(port, "/", Some(&cookie)).unwrap();
    assert_eq!(page.status, 200);
    let bearer = format!("Bearer {TOKEN}");
    let scripted = request(port, "GET", "/get_image", &[("Authorization", &bearer)], b"").unwrap();
    assert_eq!(scripted.status, 404, "the token's session has no image: {}", scripted.text());
    let scripted_again = request(port, "GET", "/get_image", &[("Authorization", &bearer)], b"").unwrap();
    let missing = get(port, "/no/such/page?token=query-secret-two", None).unwrap();
    assert_eq!(missing.status, 404);
    let replies = [&wrong, &traced, &page, &scripted, &scripted_again, &missing];
    // The last request's line, before the server stops.
    let text = log_holding(&log_path, &["\"/no/such/page\""]);
    drop(server);

    for secret in [PASSWORD, "wrong-guess-9", TOKEN, "query-secret", &cookie_value] {
        assert!(!text.contains(secret), "`{secret}` reached the log:\n{text}");
    }
    // Every line is a JSON object (startup, warnings and all), so a collector parses each;
    // all but the front door's announcement, which it prints itself, not through the log.
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.starts_with("Drishya is listening on "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{text}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["msg"].is_string() && l["ts"].is_string()));
    let requests: Vec<&Value> = lines.iter().filter(|l| l["msg"] == "request").collect();
    let find = |method: &str, path: &str, status: u16| {
        let found: Vec<&&Value> =
            requests.iter().filter(|l| l["method"] == method && l["path"] == path && l["status"] == status).collect();
        assert!(!found.is_empty(), "no request line for {method} {path} {status}:\n{text}");
        *found[0]
    };
    for line in &requests {
        for field in ["ts", "request_id", "method", "route", "path"] {
            assert!(line[field].is_string(), "{field} in {line}");
        }
        assert!(line["status"].is_u64() && line["duration_ms"].is_number(), "{line}");
        assert!(line["session"].is_null() || line["session"].as_str().is_some_and(|s| s.len() == 16), "{line}");
    }
    // One line per request, whose id is the one the answer carried.
    for reply in replies {
        let id = request_id(reply).expect("every answer has an X-Request-Id");
        let with_id = requests.iter().filter(|l| l["request_id"] == id.as_str()).count();
        assert_eq!(with_id, 1, "{id}:\n{text}");
    }
    let failed_login = find("POST", "/login", 401);
    assert_eq!(failed_login["route"], "/login");
    assert!(failed_login["session"].is_null());
    assert_eq!(find("GET", "/health", 200)["session"], Value::Null);
    assert_eq!(requests.iter().filter(|l| l["request_id"] == "trace-4711/a").count(), 1);
    // The cookie's requests share one session hash; the token's another; neither is the
    // cookie or the token.
    let upload = find("POST", "/upload_image", 200);
    assert_eq!(upload["route"], "/upload_image");
    let session = upload["session"].as_str().expect("the upload's session");
    assert_eq!(find("GET", "/", 200)["session"], session);
    let script = find("GET", "/get_image", 404);
    let script_session = script["session"].as_str().expect("the token's session");
    assert_ne!(script_session, session);
    assert_eq!(requests.iter().filter(|l| l["session"] == script_session).count(), 2);
    let unmatched = find("GET", "/no/such/page", 404);
    assert_eq!(unmatched["route"], "unmatched");
}

#[test]
fn request_ids_are_echoed_taken_from_railway_or_made_and_hostile_ones_replaced() {
    let app = app(&[]);
    let client = &app.client;
    let id_of = |headers: Vec<Header<'static>>, path: &str| {
        let mut request = client.get(path.to_string());
        for header in headers {
            request = request.header(header);
        }
        let response = request.dispatch();
        let status = response.status();
        (status, response.headers().get_one("X-Request-Id").map(str::to_string))
    };
    let given = |value: &str| vec![Header::new("X-Request-Id", value.to_string())];

    // Echoed as given: routes, catchers (404, 401) and static files alike.
    for path in ["/health", "/no/such/page", "/get_image", "/static/app.js"] {
        let (status, id) = id_of(given("client-id-1 (retry 2)"), path);
        assert_eq!(id.as_deref(), Some("client-id-1 (retry 2)"), "{path} ({status})");
    }
    let longest = "r".repeat(128);
    assert_eq!(id_of(given(&longest), "/health").1, Some(longest));
    // Railway's own id when the client sent none (or an unusable one).
    let railway = vec![Header::new("X-Railway-Request-Id", "rw-9f8e7d")];
    assert_eq!(id_of(railway, "/health").1.as_deref(), Some("rw-9f8e7d"));
    let both = vec![Header::new("X-Request-Id", "\u{7f}bad"), Header::new("X-Railway-Request-Id", "rw-1")];
    assert_eq!(id_of(both, "/health").1.as_deref(), Some("rw-1"));

    // Absent or hostile: a fresh one, different each time.
    let (status, first) = id_of(Vec::new(), "/health");
    assert_eq!(status, Status::Ok);
    let first = first.expect("an id");
    let second = id_of(Vec::new(), "/health").1.expect("an id");
    assert!(generated(&first) && generated(&second) && first != second, "{first} {second}");
    for hostile in ["r".repeat(129), "tab\there".into(), "caf\u{e9}".into(), "a\u{1b}[31mred".into(), " ".into()] {
        let id = id_of(given(&hostile), "/health").1.expect("an id");
        assert!(generated(&id), "{hostile:?} -> {id:?}");
    }
}

#[test]
fn log_format_takes_text_or_json_and_refuses_anything_else() {
    for good in ["text", "json", "JSON"] {
        let (figment, _temp) = test_figment(&[("log_format", good)]);
        assert!(drishya::config::checked(&figment).is_ok(), "{good}");
    }
    let (figment, _temp) = test_figment(&[("log_format", "xml")]);
    let why = drishya::config::checked(&figment).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(why.ends_with("LOG_FORMAT: must be `text` or `json`"), "{why}");
}
