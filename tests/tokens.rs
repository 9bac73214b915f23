//! API tokens (`API_TOKENS`, `Authorization: Bearer <token>`): a script runs the whole
//! flow without the login form, its artefacts persist under the token's session, a bad
//! token is a 401 that never falls back to a cookie, and the tokens stay secret (not in
//! `Debug`, `/health` or the log).

mod common;

use common::*;
use rocket::http::{ContentType, Header, Status};
use rocket::local::blocking::{Client, LocalRequest, LocalResponse};

const ALPHA: &str = "script-token-alpha-0123456789";
const BRAVO: &str = "script-token-bravo-9876543210";
const TOKENS: &str = "script-token-alpha-0123456789, script-token-bravo-9876543210";
/// base64 of 32 bytes: a key Rocket takes as it is (so two apps can share it).
const KEY: &str = "dGhpcy1pcy1hLTMyLWJ5dGUta2V5LWZvci10b2tlbnM=";
/// The cup in coffee.png (600x400).
const CUP: [i64; 4] = [165, 10, 415, 300];

fn bearer(token: &str) -> Header<'static> {
    Header::new("Authorization", format!("Bearer {token}"))
}

fn coffee() -> Vec<u8> {
    read(&shared("images/coffee.png"))
}

fn upload_as<'c>(request: LocalRequest<'c>, bytes: &[u8]) -> LocalResponse<'c> {
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "coffee.png", content_type: "image/png", bytes }]);
    request.header(ct).body(body).dispatch()
}

fn mask_as(request: LocalRequest<'_>, b: [i64; 4]) -> LocalResponse<'_> {
    let body = serde_json::json!({"x_min": b[0], "y_min": b[1], "x_max": b[2], "y_max": b[3]});
    request.header(ContentType::JSON).body(body.to_string()).dispatch()
}

fn replace_as(request: LocalRequest<'_>) -> LocalResponse<'_> {
    let product = product_png();
    let (ct, body) = multipart(&[
        Part::File { name: "product_image", filename: "bottle.png", content_type: "image/png", bytes: &product },
        Part::Text("feather_amount", "8"),
    ]);
    request.header(ct).body(body).dispatch()
}

fn token_app(extra: &[(&str, &str)]) -> App {
    let mut settings = vec![("api_tokens", TOKENS)];
    settings.extend_from_slice(extra);
    app(&settings)
}

#[test]
fn a_script_runs_the_whole_flow_with_a_token_and_no_login() {
    let app = token_app(&[]);
    let client = &app.client;
    let up = upload_as(client.post("/upload_image").header(bearer(ALPHA)), &coffee());
    assert_eq!(up.status(), Status::Ok);
    assert!(up.cookies().iter().next().is_none(), "a token request gets no cookie");
    let page = client.get("/").header(bearer(ALPHA)).dispatch();
    assert_eq!(page.status(), Status::Ok);
    assert!(page.cookies().iter().next().is_none(), "the page for a token sets no (device) cookie either");
    assert_eq!(json_of(up)["width"], 600);

    let mask = mask_as(client.post("/generate_mask").header(bearer(ALPHA)), CUP);
    assert_eq!(mask.status(), Status::Ok);
    let mask = json_of(mask);
    assert_eq!(mask["kind"], "salient", "{mask}");
    assert!(mask["mask_pixels"].as_u64().unwrap() > 5000, "{mask}");

    assert_eq!(replace_as(client.post("/replace_product").header(bearer(ALPHA))).status(), Status::Ok);
    let result = client.get("/download_result").header(bearer(ALPHA)).dispatch();
    assert_eq!(result.status(), Status::Ok);
    assert_eq!(result.content_type(), Some(ContentType::PNG));
    let result = decode(&result.into_bytes().unwrap()).to_rgb8();
    let scene = decode(&coffee()).to_rgb8();
    assert_eq!(result.dimensions(), (600, 400));
    assert_ne!(result.get_pixel(290, 150), scene.get_pixel(290, 150), "the cup was replaced");
    assert_eq!(result.get_pixel(5, 395), scene.get_pixel(5, 395), "the far corner was not");

    // The other token is another session: it sees none of this.
    let other = client.get("/get_result_image").header(bearer(BRAVO)).dispatch();
    assert_eq!(other.status(), Status::NotFound);
    // Without any credentials, nothing.
    expect_error(client.get("/get_result_image").dispatch(), Status::Unauthorized);
    // A logout with the token clears its artefacts; the token itself stays valid.
    client.get("/logout").header(bearer(ALPHA)).dispatch();
    assert_eq!(client.get("/get_image").header(bearer(ALPHA)).dispatch().status(), Status::NotFound);
    assert_eq!(upload_as(client.post("/upload_image").header(bearer(ALPHA)), &coffee()).status(), Status::Ok);
}

#[test]
fn a_tokens_session_outlives_the_process_when_the_secret_is_the_same() {
    // A restart (or another replica on the same store) with the same SECRET_KEY finds the
    // artefacts a token's script left.
    let first = token_app(&[("secret_key", KEY)]);
    assert_eq!(upload_as(first.client.post("/upload_image").header(bearer(BRAVO)), &coffee()).status(), Status::Ok);
    let store = first.temp.path().join("artefacts").display().to_string();
    let again = token_app(&[("secret_key", KEY), ("artefact_dir", &store)]);
    let image = again.client.get("/get_image").header(bearer(BRAVO)).dispatch();
    assert_eq!(image.status(), Status::Ok, "same secret, same token: same session");
    assert_eq!(decode(&image.into_bytes().unwrap()).to_rgb8().dimensions(), (600, 400));
    // Another secret derives another session: nothing there.
    let other_key = "b3RoZXItMzItYnl0ZS1rZXktZm9yLXRva2VuLXRlc3Q=";
    let elsewhere = token_app(&[("secret_key", other_key), ("artefact_dir", &store)]);
    assert_eq!(elsewhere.client.get("/get_image").header(bearer(BRAVO)).dispatch().status(), Status::NotFound);
    // No secret at all (development): a random key per process, never a well-known one.
    let unkeyed = token_app(&[]);
    assert_eq!(upload_as(unkeyed.client.post("/upload_image").header(bearer(BRAVO)), &coffee()).status(), Status::Ok);
    let unkeyed_store = unkeyed.temp.path().join("artefacts").display().to_string();
    let restarted = token_app(&[("artefact_dir", &unkeyed_store)]);
    assert_eq!(restarted.client.get("/get_image").header(bearer(BRAVO)).dispatch().status(), Status::NotFound);
}

#[test]
fn a_bad_token_is_a_json_401_and_never_falls_back_to_the_cookie() {
    let app = token_app(&[]);
    let client = &app.client;
    login(client);
    assert_eq!(upload(client, "coffee.png", &coffee()).status(), Status::Ok, "the cookie works");
    let almost = &ALPHA[..ALPHA.len() - 1];
    let longer = format!("{ALPHA}0");
    for bad in ["Bearer nope", &format!("Bearer {almost}"), &format!("Bearer {longer}"), "Bearer ", "bearer  x"] {
        let response = client.get("/get_image").header(Header::new("Authorization", bad.to_string())).dispatch();
        let challenge = response.headers().get_one("WWW-Authenticate").map(str::to_string);
        assert_eq!(expect_error(response, Status::Unauthorized), "invalid API token", "{bad:?}");
        assert!(challenge.is_some_and(|c| c.contains("invalid_token")), "{bad:?}");
        // Also where the cookie would have passed a POST.
        let (ct, body) =
            multipart(&[Part::File { name: "image", filename: "c.png", content_type: "image/png", bytes: &coffee() }]);
        let post = client.post("/upload_image").header(Header::new("Authorization", bad.to_string()));
        expect_error(post.header(ct).body(body).dispatch(), Status::Unauthorized);
    }
    // The cookie still works without the header; a valid token wins over it (another session).
    assert_eq!(client.get("/get_image").dispatch().status(), Status::Ok);
    assert_eq!(client.get("/get_image").header(bearer(ALPHA)).dispatch().status(), Status::NotFound);
    // Another scheme (a proxy's Basic credentials) is not ours: the cookie decides.
    let basic = Header::new("Authorization", "Basic dXNlcjpwYXNz");
    assert_eq!(client.get("/get_image").header(basic).dispatch().status(), Status::Ok);
    // A plain 401 keeps its message and gets no bearer challenge (browsers).
    let anonymous = Client::tracked(drishya::build(test_figment(&[("api_tokens", TOKENS)]).0)).unwrap();
    let response = anonymous.get("/get_image").dispatch();
    assert!(response.headers().get_one("WWW-Authenticate").is_none());
    assert_eq!(expect_error(response, Status::Unauthorized), "login required");
}

#[test]
fn malformed_long_and_doubled_authorization_headers_are_refused_not_crashed_on() {
    let app = token_app(&[]);
    let client = &app.client;
    assert_eq!(upload_as(client.post("/upload_image").header(bearer(ALPHA)), &coffee()).status(), Status::Ok);
    let get = |values: &[&str]| {
        let mut request = client.get("/get_image");
        for value in values {
            request = request.header(Header::new("Authorization", value.to_string()));
        }
        request.dispatch()
    };
    let long = format!("Bearer {}", "A".repeat(64 * 1024));
    let inner_space = format!("Bearer {ALPHA} {BRAVO}");
    let quoted = format!("Bearer \"{ALPHA}\"");
    let unicode = format!("Bearer {ALPHA}\u{e9}");
    for bad in [long.as_str(), &inner_space, &quoted, &unicode, "Bearer \u{0}\u{1}", "BEARER ===", "Bearer"] {
        let message = expect_error(get(&[bad]), Status::Unauthorized);
        assert_eq!(message, "invalid API token", "{:?}", &bad[..bad.len().min(40)]);
    }
    // The scheme's name is case-insensitive (RFC 7235), and blanks round the token are not part of it.
    assert_eq!(get(&[&format!("bearer   {ALPHA}  ")]).status(), Status::Ok);
    // A proxy's Basic credentials beside the script's token: the token is found.
    assert_eq!(get(&["Basic dXNlcjpwYXNz", &format!("Bearer {ALPHA}")]).status(), Status::Ok);
    // Two bearer tokens are ambiguous, even two valid ones: refused, neither used.
    let two = [format!("Bearer {ALPHA}"), format!("Bearer {BRAVO}")];
    let message = expect_error(get(&[&two[0], &two[1]]), Status::Unauthorized);
    assert_eq!(message, "invalid API token");
    // Without the Bearer scheme, the header is not a token at all: no login, no challenge.
    for other in ["Token abc", &format!("Bearer{ALPHA}"), &format!("Bearer\t{ALPHA}")] {
        let response = get(&[other]);
        assert!(response.headers().get_one("WWW-Authenticate").is_none(), "{other}");
        assert_eq!(expect_error(response, Status::Unauthorized), "login required", "{other}");
    }
}

#[test]
fn without_api_tokens_every_bearer_token_is_refused() {
    let app = app(&[]);
    let response = app.client.get("/get_image").header(bearer(ALPHA)).dispatch();
    assert_eq!(expect_error(response, Status::Unauthorized), "invalid API token");
}

/// A request as a page on another site would send it.
fn forged(request: LocalRequest<'_>) -> LocalRequest<'_> {
    let request = request.header(Header::new("Origin", "https://evil.example"));
    request.header(Header::new("Host", "drishya.example")).header(Header::new("Sec-Fetch-Site", "cross-site"))
}

#[test]
fn bearer_requests_skip_the_cross_origin_check_and_cookies_keep_it() {
    let app = token_app(&[]);
    let client = &app.client;
    let up = upload_as(forged(client.post("/upload_image").header(bearer(ALPHA))), &coffee());
    assert_eq!(up.status(), Status::Ok, "no cookie, nothing to forge");
    login(client);
    let refused = upload_as(forged(client.post("/upload_image")), &coffee());
    assert_eq!(refused.status(), Status::Forbidden, "the cookie's cross-origin rule is unchanged");
}

#[test]
fn bad_api_tokens_stop_the_launch_with_one_line_naming_the_variable() {
    let refusal = |value: &str| {
        let figment = test_figment(&[("api_tokens", value)]).0;
        drishya::config::checked(&figment).err().map(|e| e.to_string()).unwrap_or_default()
    };
    for (value, why) in [
        ("too-short-token", "shorter than 16"),
        ("script-token-alpha-0123456789,", "entry 2 is empty"),
        ("script-token-alpha-0123456789,,script-token-bravo-9876543210", "entry 2 is empty"),
        ("script-token-with\"quote-0123", "may hold only"),
    ] {
        let message = refusal(value);
        assert!(message.starts_with("API_TOKENS is invalid") && message.contains(why), "{value}: {message}");
        assert!(!message.contains(value.trim_end_matches(',')), "the value is never shown: {message}");
        assert_eq!(message.lines().count(), 1);
    }
    // All digits: a number to the configuration reader (it would lose leading zeros).
    let message = refusal("0012345678901234567");
    assert!(message.contains("API_TOKENS: not a usable value"), "{message}");
    assert!(!message.contains("12345678901234567"), "{message}");
    // Base64-style tokens with '+', '/' and '=' are fine, so is no token at all.
    let figment = test_figment(&[("api_tokens", "abcDEF0123456789+/xyz==")]).0;
    assert!(drishya::config::checked(&figment).is_ok());
    assert!(drishya::config::checked(&test_figment(&[]).0).is_ok());
}

#[test]
fn tokens_are_not_in_debug_output_nor_in_health() {
    let figment = test_figment(&[("api_tokens", TOKENS)]).0;
    let cfg = drishya::config::checked(&figment).expect("valid");
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("script-token"), "{debug}");
    assert!(debug.contains("api_tokens: (2 set, not shown)"), "{debug}");
    let app = token_app(&[]);
    for health in [app.client.get("/health").dispatch(), app.client.get("/health").header(bearer(ALPHA)).dispatch()] {
        let text = health.into_string().unwrap();
        assert!(!text.contains("script-token"), "{text}");
    }
}

/// The release binary at Rocket's most verbose level: neither a valid nor a refused token
/// reaches the log, while the requests that carried them do.
#[test]
fn the_token_never_reaches_the_log() {
    use common::process::*;
    let dir = app_dir();
    let port = free_port();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let env = vec![
        ("PORT", port.to_string()),
        ("APP_PASSWORD", "the-password-of-the-token-test".to_string()),
        ("SECRET_KEY", "a key of at least thirty-two characters for the token test".to_string()),
        ("TEMP_DIR", dir.path().join("artefacts").display().to_string()),
        ("MODELS", "models/u2netp.onnx".to_string()),
        ("API_TOKENS", "logged-token-never-0123456789".to_string()),
        ("ROCKET_LOG_LEVEL", "debug".to_string()),
    ];
    let server = start_logged(dir.path(), &env, port, log.try_clone().unwrap(), log);

    let good = [("Authorization", "Bearer logged-token-never-0123456789")];
    assert_eq!(request(port, "GET", "/get_image", &good, b"").unwrap().status, 404);
    let bad = [("Authorization", "Bearer refused-token-never-987654321")];
    let refused = request(port, "GET", "/get_image", &bad, b"").unwrap();
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"], "invalid API token");
    let reply = request(port, "POST", "/upload_image", &bad, b"").unwrap();
    assert_eq!(reply.status, 401);
    let expected = ["GET /get_image 404", "GET /get_image 401", "POST /upload_image 401"];
    let text = log_holding(&log_path, &expected);
    drop(server);

    assert!(!text.contains("token-never"), "a token reached the log:\n{text}");
    assert!(text.contains("GET /get_image: API token refused (not one of API_TOKENS)"), "{text}");
    for line in expected {
        assert!(text.lines().any(|l| l.starts_with(line)), "no `{line} ...` line:\n{text}");
    }
}
