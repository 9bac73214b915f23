//! Sessions through the real app: a lifetime the server checks, logout that holds against
//! a copied cookie, old cookies refused cleanly; Secure cookies and HSTS behind TLS; the
//! Content-Security-Policy and the pages that live with it; `/health` without paths for
//! anonymous callers.
//!
//! Requests carry the headers the front door would set (`X-Drishya-Peer`,
//! `X-Drishya-Proto`); cookies are handled by hand (an untracked client), as a thief
//! holding a copy of one would.

mod common;

use std::path::Path;

use common::*;
use drishya::auth::{now_ms, SessionToken, DEVICE_COOKIE, SESSION_COOKIE};
use drishya::front::PROTO_HEADER;
use drishya::storage::SessionId;
use rocket::http::{ContentType, Cookie, Header, Status};
use rocket::local::blocking::{Client, LocalResponse};

/// The real app with a client that keeps no cookies of its own.
fn untracked(settings: &[(&str, &str)]) -> (Client, tempfile::TempDir) {
    let (figment, temp) = test_figment(settings);
    (Client::untracked(drishya::build(figment)).expect("the app ignites"), temp)
}

fn password_body() -> String {
    format!("password={}", PASSWORD.replace(' ', "+"))
}

/// Logs in (with `extra` headers); returns the answer's session cookie.
fn log_in(client: &Client, extra: &[Header<'static>]) -> Cookie<'static> {
    let mut request = client.post("/login").header(ContentType::Form).body(password_body());
    for header in extra {
        request = request.header(header.clone());
    }
    let response = request.dispatch();
    assert_eq!(response.status(), Status::SeeOther, "login");
    session_cookie(&response).expect("a session cookie")
}

fn session_cookie(response: &LocalResponse<'_>) -> Option<Cookie<'static>> {
    response.cookies().get(SESSION_COOKIE).cloned()
}

fn set_cookies(response: &LocalResponse<'_>) -> Vec<String> {
    response.headers().get("Set-Cookie").map(str::to_string).collect()
}

fn is_login_page(response: LocalResponse<'_>) -> bool {
    response.into_string().unwrap_or_default().contains("name=\"password\"")
}

#[test]
fn a_copied_cookie_is_refused_after_logout() {
    let (client, _temp) = untracked(&[("models", "")]);
    let cookie = log_in(&client, &[]);
    let copy = cookie.clone();
    let bytes = png_bytes(&image::RgbImage::from_pixel(32, 24, image::Rgb([9, 9, 9])));
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "a.png", content_type: "image/png", bytes: &bytes }]);
    let up = client.post("/upload_image").header(ct).body(body).cookie(cookie.clone()).dispatch();
    assert_eq!(up.status(), Status::Ok);
    assert_eq!(client.get("/get_image").cookie(copy.clone()).dispatch().status(), Status::Ok, "the copy works");

    let out = client.get("/logout").cookie(cookie).dispatch();
    assert_eq!(out.status(), Status::SeeOther);

    // The copy, replayed after the logout: refused everywhere, never a 404 "upload again".
    let msg = expect_error(client.get("/get_image").cookie(copy.clone()).dispatch(), Status::Unauthorized);
    assert!(msg.contains("login"), "{msg}");
    let mask = client
        .post("/generate_mask")
        .header(ContentType::JSON)
        .body(r#"{"x_min":0,"y_min":0,"x_max":5,"y_max":5}"#)
        .cookie(copy.clone())
        .dispatch();
    expect_error(mask, Status::Unauthorized);
    assert!(is_login_page(client.get("/").cookie(copy).dispatch()), "`/` shows the login page");
    // Logging in again gives a new, working session.
    let again = log_in(&client, &[]);
    expect_error(client.get("/get_image").cookie(again).dispatch(), Status::NotFound);
}

/// A session cookie as the server seals it, issued `age_secs` ago.
fn sealed_session(age_secs: u64) -> Cookie<'static> {
    let token = SessionToken::new(SessionId::random(), now_ms() - age_secs * 1000);
    Cookie::new(SESSION_COOKIE, token.encode())
}

#[test]
fn an_expired_cookie_and_an_old_format_one_are_refused_cleanly() {
    let (client, _temp) = untracked(&[("models", ""), ("session_max_age", "3600")]);
    // Within SESSION_MAX_AGE: a valid session (with nothing uploaded yet).
    let fresh = client.get("/get_image").private_cookie(sealed_session(3500)).dispatch();
    expect_error(fresh, Status::NotFound);
    // Past it.
    let old = client.get("/get_image").private_cookie(sealed_session(3601)).dispatch();
    assert!(expect_error(old, Status::Unauthorized).contains("login"));
    let page = client.get("/").private_cookie(sealed_session(3601)).dispatch();
    assert_eq!(page.status(), Status::Ok);
    let removal = set_cookies(&page);
    assert!(removal.iter().any(|c| c.starts_with("drishya_session=;")), "the browser drops it: {removal:?}");
    assert!(is_login_page(page));

    // A cookie from before issue times were recorded: the session id alone, sealed with the
    // right key. Refused, not a panic and not a session.
    let legacy = || Cookie::new(SESSION_COOKIE, SessionId::random().as_str().to_string());
    expect_error(client.get("/get_image").private_cookie(legacy()).dispatch(), Status::Unauthorized);
    assert!(is_login_page(client.get("/").private_cookie(legacy()).dispatch()));
    // Garbage, and a value that is not sealed at all.
    expect_error(
        client.get("/get_image").private_cookie(Cookie::new(SESSION_COOKIE, "2.x.y")).dispatch(),
        Status::Unauthorized,
    );
    let plain = Cookie::new(SESSION_COOKIE, SessionToken::new(SessionId::random(), now_ms()).encode());
    expect_error(client.get("/get_image").cookie(plain).dispatch(), Status::Unauthorized);
}

#[test]
fn the_cookie_lives_a_working_day_by_default_and_session_max_age_is_checked() {
    assert_eq!(drishya::config::AppConfig::default().session_max_age, 28_800);
    let (client, _temp) = untracked(&[("models", "")]);
    let response = client.post("/login").header(ContentType::Form).body(password_body()).dispatch();
    let cookies = set_cookies(&response);
    assert_eq!(cookies.len(), 1, "the login answer carries the session cookie only: {cookies:?}");
    assert!(cookies[0].contains("Max-Age=28800"), "{cookies:?}");
    // A day-old cookie is refused at the default.
    expect_error(
        client.get("/get_image").private_cookie(sealed_session(8 * 3600 + 1)).dispatch(),
        Status::Unauthorized,
    );

    for bad in ["0", "59", "2592001"] {
        assert!(try_app(&[("session_max_age", bad)]).is_err(), "SESSION_MAX_AGE={bad} must stop the launch");
    }
    let message = drishya::config::checked(&test_figment(&[("session_max_age", "30")]).0).err().map(|e| e.to_string());
    assert!(message.as_deref().unwrap_or("").contains("SESSION_MAX_AGE"), "{message:?}");
    assert!(try_app(&[("session_max_age", "60")]).is_ok());
}

#[test]
fn behind_tls_cookies_are_secure_and_hsts_is_sent() {
    let (client, _temp) = untracked(&[("models", "")]);
    let https = Header::new(PROTO_HEADER, "https");
    let response =
        client.post("/login").header(ContentType::Form).header(https.clone()).body(password_body()).dispatch();
    assert_eq!(response.headers().get_one("Strict-Transport-Security"), Some("max-age=31536000"));
    let session = set_cookies(&response);
    assert!(session.iter().all(|c| c.contains("; Secure")), "{session:?}");
    let cookie = session_cookie(&response).expect("a session cookie");
    // The device cookie, given with the page the login leads to, is Secure too.
    let page = client.get("/").header(https.clone()).cookie(cookie.clone()).dispatch();
    let device = set_cookies(&page);
    assert!(device.iter().any(|c| c.starts_with(DEVICE_COOKIE) && c.contains("; Secure")), "{device:?}");
    assert!(page.headers().get_one("Strict-Transport-Security").is_some());
    assert!(client.get("/health").header(https).dispatch().headers().get_one("Strict-Transport-Security").is_some());

    // Plain http (and a client's own X-Forwarded-Proto, which only the front may judge):
    // neither Secure nor HSTS, which a browser would refuse or remember wrongly.
    let plain = client
        .post("/login")
        .header(ContentType::Form)
        .header(Header::new("X-Forwarded-Proto", "https"))
        .body(password_body())
        .dispatch();
    assert!(plain.headers().get_one("Strict-Transport-Security").is_none());
    assert!(set_cookies(&plain).iter().all(|c| !c.contains("Secure")), "{:?}", set_cookies(&plain));
}

#[test]
fn every_page_has_a_content_security_policy_the_pages_live_with() {
    let (client, _temp) = untracked(&[("models", "")]);
    let policy_of = |response: &LocalResponse<'_>| {
        response.headers().get_one("Content-Security-Policy").map(str::to_string).unwrap_or_default()
    };
    let login_page = client.get("/").dispatch();
    let policy = policy_of(&login_page);
    assert_eq!(policy, drishya::web::CONTENT_SECURITY_POLICY);
    for part in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"] {
        assert!(policy.contains(part), "{part} missing: {policy}");
    }
    assert!(!policy.contains("unsafe"), "no unsafe-inline or unsafe-eval: {policy}");
    let cookie = log_in(&client, &[]);
    let app_page = client.get("/").cookie(cookie).dispatch();
    assert!(app_page.into_string().unwrap_or_default().contains("/static/app.js"), "the app page");
    assert_eq!(policy_of(&client.get("/").dispatch()), policy);
    assert_eq!(policy_of(&client.get("/health").dispatch()), policy, "JSON answers too");

    // The pages keep to it: scripts and styles only from files, no inline handlers.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["templates", "static"] {
        for entry in std::fs::read_dir(repo.join(dir)).unwrap().flatten() {
            let path = entry.path();
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path).unwrap_or_default().to_ascii_lowercase();
            if name.ends_with(".tera") || name.ends_with(".html") {
                for script in text.split("<script").skip(1) {
                    let tag = script.split('>').next().unwrap_or("");
                    assert!(tag.contains("src="), "{name}: an inline <script>");
                }
                for banned in ["<style", " style=", "javascript:"] {
                    assert!(!text.contains(banned), "{name}: {banned}");
                }
                let handler = text.split(|c: char| c.is_whitespace()).any(|w| {
                    w.strip_prefix("on")
                        .and_then(|r| r.split_once('='))
                        .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase()))
                });
                assert!(!handler, "{name}: an inline event handler (onclick=...)");
            }
            if name.ends_with(".js") {
                for banned in [
                    "eval(",
                    "new function",
                    "innerhtml",
                    "insertadjacenthtml",
                    "document.write",
                    "setattribute('style'",
                ] {
                    assert!(!text.contains(banned), "{name}: {banned}");
                }
            }
        }
    }
}

#[test]
fn anonymous_health_and_ready_show_no_model_paths() {
    let hidden = tempfile::tempdir().unwrap();
    let missing = hidden.path().join("private-folder").join("missing.onnx");
    let u2netp = u2netp();
    let u2netp_dir = Path::new(&u2netp).parent().unwrap().display().to_string();
    let models = format!("{},{}", missing.display(), u2netp);
    let (client, _temp) = untracked(&[("models", &models)]);

    let health = client.get("/health").dispatch().into_string().unwrap();
    for path in ["private-folder", &hidden.path().display().to_string(), &u2netp_dir] {
        assert!(!health.contains(path), "/health shows {path} to anyone: {health}");
    }
    assert!(health.contains("missing.onnx") && health.contains("u2netp.onnx"), "file names stay: {health}");
    let ready = client.get("/ready").dispatch().into_string().unwrap();
    assert!(!ready.contains("private-folder") && !ready.contains(&u2netp_dir), "{ready}");

    // A logged-in user sees where the models are.
    let cookie = log_in(&client, &[]);
    let health = client.get("/health").cookie(cookie).dispatch().into_string().unwrap();
    assert!(health.contains("private-folder") && health.contains(&u2netp_dir), "{health}");
}
