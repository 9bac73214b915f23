//! The shared artefact store against a real S3 server (s3s-fs on loopback): two app
//! instances sharing one bucket serve one flow between them, a store outage answers 503
//! with Retry-After and recovers without a restart.
//!
//! Gated: they need s3s-fs (`scripts/install-s3s-fs`); scripts/test installs it and runs
//! them with `--include-ignored`. Without it they fail, saying how to install it.

mod common;

use common::s3::S3Server;
use common::*;
use rocket::http::{ContentType, Cookie, Status};
use rocket::local::blocking::{Client, LocalRequest};

const CUP: [i64; 4] = [165, 10, 415, 300];
/// The same cookie key for every instance, as replicas share `SECRET_KEY`.
const KEY: &str = "fC6mv/qZ2I5MQMwDRrVsTcODXesMPixLAaDQF90geaeiY4X1IEBMgKpeMM+9ht6CysDsnjhT9PViRJJessIFBg==";

/// One instance of the app on the bucket, with its own temp dir (its own machine).
struct Replica {
    client: Client,
    _temp: tempfile::TempDir,
}

fn replica(s3: &S3Server, prefix: &str, extra: &[(&str, &str)]) -> Replica {
    let settings = s3.settings(prefix);
    let mut all: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.push(("secret_key", KEY));
    all.extend_from_slice(extra);
    let (figment, temp) = test_figment(&all);
    let client = Client::untracked(drishya::build(figment)).expect("the app ignites with an S3 store");
    Replica { client, _temp: temp }
}

/// A browser's session: its cookie, sent to whichever replica it talks to.
struct Browser(Cookie<'static>);

impl Browser {
    fn login(at: &Replica) -> Self {
        let response = at
            .client
            .post("/login")
            .header(ContentType::Form)
            .body(format!("password={}", PASSWORD.replace(' ', "+")))
            .dispatch();
        assert_eq!(response.status(), Status::SeeOther);
        let cookie = response.cookies().get(drishya::auth::SESSION_COOKIE).expect("a session cookie").clone();
        Browser(cookie.into_owned())
    }

    fn on<'c>(&self, request: LocalRequest<'c>) -> LocalRequest<'c> {
        request.cookie(self.0.clone())
    }
}

fn upload_body(bytes: &[u8]) -> (ContentType, Vec<u8>) {
    multipart(&[Part::File { name: "image", filename: "coffee.png", content_type: "image/png", bytes }])
}

fn replace_body(product: &[u8]) -> (ContentType, Vec<u8>) {
    multipart(&[
        Part::File { name: "product_image", filename: "product.png", content_type: "image/png", bytes: product },
        Part::Text("scale_factor", "1.0"),
    ])
}

fn product_png() -> Vec<u8> {
    png_bytes(&image::RgbImage::from_fn(120, 200, |x, y| image::Rgb([200, (x % 255) as u8, (y % 255) as u8])))
}

#[test]
#[ignore = "needs s3s-fs (scripts/install-s3s-fs); scripts/test runs it"]
fn two_replicas_sharing_a_bucket_serve_one_flow_between_them() {
    let s3 = S3Server::start();
    let (a, b) = (replica(&s3, "shared", &[]), replica(&s3, "shared", &[]));
    let coffee = read(&shared("images/coffee.png"));

    let user = Browser::login(&a);
    let (ct, body) = upload_body(&coffee);
    let uploaded = json_of(user.on(a.client.post("/upload_image")).header(ct).body(body).dispatch());
    assert_eq!(uploaded["success"], true, "{uploaded}");
    let stored = s3.objects("shared/sessions");
    assert_eq!(stored.len(), 1, "one object, the scene: {stored:?}");
    assert!(stored[0].ends_with("/image.png"), "{stored:?}");

    // The mask on the other replica: it finds the scene in the bucket.
    let body = serde_json::json!({"x_min": CUP[0], "y_min": CUP[1], "x_max": CUP[2], "y_max": CUP[3]}).to_string();
    let mask = user.on(b.client.post("/generate_mask")).header(ContentType::JSON).body(body).dispatch();
    assert_eq!(mask.status(), Status::Ok);
    let mask = json_of(mask);
    assert!(mask["mask_pixels"].as_u64().unwrap() > 1000, "{mask}");
    // The overlay it wrote is served by the first.
    let overlay = user.on(a.client.get("/get_mask_visualization")).dispatch();
    assert_eq!(overlay.status(), Status::Ok);
    let overlay = decode(&overlay.into_bytes().unwrap());

    let (ct, body) = replace_body(&product_png());
    let replaced = user.on(a.client.post("/replace_product")).header(ct).body(body).dispatch();
    assert_eq!(replaced.status(), Status::Ok, "{:?}", replaced.into_string());
    let download = user.on(b.client.get("/download_result")).dispatch();
    assert_eq!(download.status(), Status::Ok);
    let result = decode(&download.into_bytes().unwrap());
    assert_eq!((result.width(), result.height()), (overlay.width(), overlay.height()));
    let stored = s3.objects("shared/sessions");
    assert_eq!(stored.len(), 5, "scene, mask, overlay, result, the replacement it was made with: {stored:?}");
    assert!(stored.iter().any(|o| o.ends_with("/replacement.bin")), "{stored:?}");
    // The full-resolution result, from the other replica: what the first stored is enough.
    let full = user.on(b.client.get("/download_full?format=png")).dispatch();
    assert_eq!(full.status(), Status::Ok);
    let full = decode(&full.into_bytes().unwrap());
    assert_eq!((full.width(), full.height()), (result.width(), result.height()));

    // Another user's session on either replica sees none of it.
    let other = Browser::login(&b);
    let response = other.on(a.client.get("/get_result_image")).dispatch();
    assert_eq!(response.status(), Status::NotFound);

    // A new upload makes the old mask and result stale on every replica.
    let (ct, body) = upload_body(&coffee);
    assert_eq!(user.on(b.client.post("/upload_image")).header(ct).body(body).dispatch().status(), Status::Ok);
    assert_eq!(user.on(a.client.get("/get_result_image")).dispatch().status(), Status::NotFound);
    assert_eq!(s3.objects("shared/sessions").len(), 1);

    // Logout on one replica removes the session's objects from the bucket.
    assert_eq!(user.on(a.client.get("/logout")).dispatch().status(), Status::SeeOther);
    assert_eq!(s3.objects("shared/sessions"), Vec::<String>::new());

    // /health names the store.
    let health = json_of(b.client.get("/health").dispatch());
    assert_eq!(health["directories"]["store"], "s3", "{health}");
    assert_eq!(health["status"], "healthy", "{health}");
}

#[test]
#[ignore = "needs s3s-fs (scripts/install-s3s-fs); scripts/test runs it"]
fn an_unreachable_store_answers_503_with_retry_after_and_recovers_without_a_restart() {
    let mut s3 = S3Server::start();
    let app = replica(&s3, "outage", &[]);
    let user = Browser::login(&app);
    let coffee = read(&shared("images/coffee.png"));
    let upload = |user: &Browser| {
        let (ct, body) = upload_body(&coffee);
        user.on(app.client.post("/upload_image")).header(ct).body(body).dispatch()
    };
    assert_eq!(upload(&user).status(), Status::Ok);
    assert_eq!(json_of(app.client.get("/ready").dispatch())["ready"], true);

    s3.kill();
    for response in [upload(&user), user.on(app.client.get("/get_image")).dispatch()] {
        assert_eq!(response.status(), Status::ServiceUnavailable);
        let retry: Option<u64> = response.headers().get_one("Retry-After").and_then(|v| v.parse().ok());
        assert!(retry.is_some_and(|s| (1..=60).contains(&s)), "Retry-After: {retry:?}");
        let message = expect_error(response, Status::ServiceUnavailable);
        assert!(message.contains("image store") && message.contains("try again"), "{message}");
        assert!(!message.contains("127.0.0.1") && !message.contains("outage"), "no internals: {message}");
    }
    let health = app.client.get("/health").dispatch();
    assert_eq!(health.status(), Status::Ok, "liveness stays 200");
    let health = json_of(health);
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["directories"]["temp_dir_writable"], false, "{health}");
    assert!(health["reasons"].to_string().contains("image store"), "{health}");
    let ready = app.client.get("/ready").dispatch();
    assert_eq!(ready.status(), Status::ServiceUnavailable);

    // Back: the same app serves again, and what was stored before the outage is there.
    s3.restart();
    assert_eq!(user.on(app.client.get("/get_image")).dispatch().status(), Status::Ok);
    assert_eq!(upload(&user).status(), Status::Ok);
    assert_eq!(app.client.get("/ready").dispatch().status(), Status::Ok);
    assert_eq!(json_of(app.client.get("/health").dispatch())["status"], "healthy");
}

#[test]
#[ignore = "needs s3s-fs (scripts/install-s3s-fs); scripts/test runs it"]
fn wrong_credentials_are_the_operators_problem_not_a_retry() {
    let s3 = S3Server::start();
    let app = replica(&s3, "creds", &[("aws_secret_access_key", "\"not-the-secret\"")]);
    let user = Browser::login(&app);
    let (ct, body) = upload_body(&read(&shared("images/coffee.png")));
    let response = user.on(app.client.post("/upload_image")).header(ct).body(body).dispatch();
    assert!(response.headers().get_one("Retry-After").is_none());
    let message = expect_error(response, Status::InternalServerError);
    assert!(message.contains("credentials") && message.contains("operator"), "{message}");
    assert!(!message.contains("not-the-secret"));
    let ready = json_of(app.client.get("/ready").dispatch());
    assert_eq!(ready["ready"], false);
    assert!(ready["reason"].as_str().unwrap().contains("credentials"), "{ready}");
}
