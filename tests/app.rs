//! The whole product through the real Rocket app: login, upload, mask (real U²-Net-p),
//! replace, download, sessions, errors.

mod common;

use common::*;
use image::{GenericImageView, Rgb, RgbImage};
use rocket::http::{ContentType, Status};

/// The cup in coffee.png (600x400), with a little room.
const CUP: [i64; 4] = [165, 10, 415, 300];
const CUP_CENTRE: (u32, u32) = (290, 150);

fn coffee() -> Vec<u8> {
    read(&shared("images/coffee.png"))
}

fn replace<'c>(
    client: &'c rocket::local::blocking::Client,
    extra: &[Part<'_>],
) -> rocket::local::blocking::LocalResponse<'c> {
    let product = product_png();
    let mut parts =
        vec![Part::File { name: "product_image", filename: "bottle.png", content_type: "image/png", bytes: &product }];
    for p in extra {
        parts.push(match p {
            Part::Text(n, v) => Part::Text(n, v),
            Part::File { .. } => unreachable!(),
        });
    }
    let (ct, body) = multipart(&parts);
    client.post("/replace_product").header(ct).body(body).dispatch()
}

#[test]
fn whole_flow_on_coffee_with_real_u2netp() {
    let app = app(&[]);
    let client = &app.client;
    login(client);

    let up = json_of(upload(client, "coffee.png", &coffee()));
    assert_eq!(up["success"], true);
    assert_eq!((up["width"].as_u64(), up["height"].as_u64()), (Some(600), Some(400)));
    assert_eq!((up["original_width"].as_u64(), up["original_height"].as_u64()), (Some(600), Some(400)));

    let working = client.get("/get_image").dispatch();
    assert_eq!(working.content_type(), Some(ContentType::PNG));
    let working = decode(&working.into_bytes().unwrap()).to_rgb8();
    assert_eq!(working.dimensions(), (600, 400));

    let mask = generate_mask(client, CUP);
    assert_eq!(mask.status(), Status::Ok);
    let mask = json_of(mask);
    assert_eq!(mask["kind"], "salient", "{mask}");
    assert_eq!(mask["model"], "u2netp");
    let area = mask["mask_pixels"].as_u64().unwrap();
    let box_area = ((CUP[2] - CUP[0]) * (CUP[3] - CUP[1])) as u64;
    assert!(area > box_area / 5 && area < box_area, "mask covers {area} of {box_area} box pixels");
    let bbox = &mask["bbox"];
    assert!(bbox["x_min"].as_i64().unwrap() >= CUP[0] && bbox["x_max"].as_i64().unwrap() <= CUP[2], "{bbox}");
    assert!(bbox["y_min"].as_i64().unwrap() >= CUP[1] && bbox["y_max"].as_i64().unwrap() <= CUP[3], "{bbox}");

    let overlay = client.get("/get_mask_visualization").dispatch();
    assert_eq!(overlay.status(), Status::Ok);
    let overlay = decode(&overlay.into_bytes().unwrap()).to_rgb8();
    assert_ne!(
        overlay.get_pixel(CUP_CENTRE.0, CUP_CENTRE.1),
        working.get_pixel(CUP_CENTRE.0, CUP_CENTRE.1),
        "cup centre is masked"
    );
    assert_eq!(overlay.get_pixel(5, 395), working.get_pixel(5, 395), "far corner is not");

    let replaced = replace(client, &[Part::Text("scale_factor", "1.0"), Part::Text("feather_amount", "8")]);
    assert_eq!(replaced.status(), Status::Ok);
    assert_eq!(json_of(replaced)["success"], true);

    let download = client.get("/download_result").dispatch();
    assert_eq!(download.status(), Status::Ok);
    let disposition = download.headers().get_one("Content-Disposition").unwrap_or_default().to_string();
    assert!(disposition.contains("attachment") && disposition.contains("product_replaced_image.png"), "{disposition}");
    let result = decode(&download.into_bytes().unwrap()).to_rgb8();
    assert_eq!(result.dimensions(), working.dimensions());

    let bx = [
        bbox["x_min"].as_u64().unwrap() as u32,
        bbox["y_min"].as_u64().unwrap() as u32,
        bbox["x_max"].as_u64().unwrap() as u32,
        bbox["y_max"].as_u64().unwrap() as u32,
    ];
    let mut changed_inside = 0;
    for (x, y, p) in result.enumerate_pixels() {
        let inside = x >= bx[0] && x < bx[2] && y >= bx[1] && y < bx[3];
        if inside {
            changed_inside += usize::from(p != working.get_pixel(x, y));
        } else {
            assert_eq!(p, working.get_pixel(x, y), "pixel ({x},{y}) outside the mask's box changed");
        }
    }
    assert!(changed_inside > 1000, "only {changed_inside} pixels changed inside the box");
    let shown = client.get("/get_result_image").dispatch();
    assert_eq!(decode(&shown.into_bytes().unwrap()).to_rgb8(), result);
}

#[test]
fn every_route_but_login_and_health_needs_the_login() {
    let app = app(&[]);
    let client = &app.client;
    for path in ["/get_image", "/get_mask_visualization", "/get_result_image", "/download_result"] {
        let msg = expect_error(client.get(path).dispatch(), Status::Unauthorized);
        assert!(msg.contains("login"), "{path}: {msg}");
    }
    expect_error(upload(client, "coffee.png", &coffee()), Status::Unauthorized);
    expect_error(generate_mask(client, CUP), Status::Unauthorized);
    expect_error(replace(client, &[]), Status::Unauthorized);
    // `/` shows the login page, `/health` answers.
    let index = client.get("/").dispatch().into_string().unwrap();
    assert!(index.contains("password"), "login page expected");
    assert_eq!(client.get("/health").dispatch().status(), Status::Ok);
}

#[test]
fn wrong_password_is_refused_and_repeated_failures_are_throttled() {
    let app = app(&[]);
    let client = &app.client;
    let attempt = || client.post("/login").header(ContentType::Form).body("password=nope").dispatch();
    for _ in 0..5 {
        let response = attempt();
        assert_eq!(response.status(), Status::Unauthorized);
        assert!(response.into_string().unwrap().contains("Incorrect password"));
    }
    let throttled = attempt();
    assert_eq!(throttled.status(), Status::TooManyRequests);
    expect_error(client.get("/get_image").dispatch(), Status::Unauthorized);
}

#[test]
fn session_cookie_is_private_httponly_and_strict() {
    let app = app(&[]);
    let response = app
        .client
        .post("/login")
        .header(ContentType::Form)
        .body(format!("password={}", PASSWORD.replace(' ', "+")))
        .dispatch();
    let cookie = response.headers().get_one("Set-Cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains("drishya_session=") || cookie.len() > 60, "value is encrypted: {cookie}");
}

#[test]
fn sessions_cannot_see_each_other_and_logout_removes_artefacts() {
    let app = app(&[]);
    let alice = &app.client;
    // A second browser: another client of the same configuration and temp dir.
    let figment = alice.rocket().figment().clone();
    let bob = rocket::local::blocking::Client::tracked(drishya::build(figment)).unwrap();
    login(alice);
    login(&bob);
    assert_eq!(upload(alice, "coffee.png", &coffee()).status(), Status::Ok);
    expect_error(bob.get("/get_image").dispatch(), Status::NotFound);
    // Bob's own upload does not replace Alice's image.
    let small = png_bytes(&RgbImage::from_pixel(64, 48, Rgb([1, 2, 3])));
    assert_eq!(upload(&bob, "small.png", &small).status(), Status::Ok);
    let alice_img = decode(&alice.get("/get_image").dispatch().into_bytes().unwrap());
    assert_eq!(alice_img.dimensions(), (600, 400));
    let files_before = count_files(app.temp.path());
    assert!(files_before >= 2);
    alice.get("/logout").dispatch();
    expect_error(alice.get("/get_image").dispatch(), Status::Unauthorized);
    assert_eq!(count_files(app.temp.path()), files_before - 1, "alice's artefacts are gone");
    assert_eq!(bob.get("/get_image").dispatch().status(), Status::Ok);
}

fn count_files(dir: &std::path::Path) -> usize {
    walk(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "png")).count()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn large_uploads_are_downscaled_to_1280_keeping_mean_colour() {
    // A 2400x1600 photo made by upscaling coffee.png 4x (nearest), so its mean colour is coffee's.
    let coffee = decode(&coffee()).to_rgb8();
    let big = image::imageops::resize(&coffee, 2400, 1600, image::imageops::FilterType::Nearest);
    let app = app(&[]);
    login(&app.client);
    let up = json_of(upload(&app.client, "big.png", &png_bytes(&big)));
    assert_eq!((up["width"].as_u64(), up["height"].as_u64()), (Some(1280), Some(853)));
    // original_* is the size the Flask client scales its box by: the working image's.
    assert_eq!((up["original_width"].as_u64(), up["original_height"].as_u64()), (Some(1280), Some(853)));
    assert_eq!((up["source_width"].as_u64(), up["source_height"].as_u64()), (Some(2400), Some(1600)));
    let working = decode(&app.client.get("/get_image").dispatch().into_bytes().unwrap()).to_rgb8();
    let (a, b) = (mean(&big), mean(&working));
    for c in 0..3 {
        assert!((a[c] - b[c]).abs() <= a[c] * 0.01 + 0.5, "channel {c}: {} vs {}", a[c], b[c]);
    }
}

fn mean(image: &RgbImage) -> [f64; 3] {
    let mut sum = [0f64; 3];
    for p in image.pixels() {
        for c in 0..3 {
            sum[c] += f64::from(p[c]);
        }
    }
    let n = f64::from(image.width() * image.height());
    sum.map(|s| s / n)
}

#[test]
fn bad_requests_get_json_errors_that_say_what_is_wrong() {
    let app = app(&[]);
    let client = &app.client;
    login(client);
    // Before any upload.
    let msg = expect_error(generate_mask(client, CUP), Status::NotFound);
    assert!(msg.contains("upload"), "{msg}");
    let msg = expect_error(upload(client, "notes.png", b"this is not an image at all"), Status::UnsupportedMediaType);
    assert!(msg.contains("JPEG, PNG or WebP"), "{msg}");
    assert_eq!(upload(client, "coffee.png", &coffee()).status(), Status::Ok);
    let malformed = client.post("/generate_mask").header(ContentType::JSON).body("{\"x_min\": 1,").dispatch();
    assert!(expect_error(malformed, Status::BadRequest).contains("JSON"));
    let missing =
        client.post("/generate_mask").header(ContentType::JSON).body(r#"{"x_min":1,"y_min":2,"x_max":3}"#).dispatch();
    assert!(expect_error(missing, Status::BadRequest).contains("y_max"));
    assert!(expect_error(generate_mask(client, [700, 500, 900, 600]), Status::BadRequest).contains("box"));
    assert!(expect_error(generate_mask(client, [100, 100, 100, 200]), Status::BadRequest).contains("box"));
    // Replace before any mask.
    let msg = expect_error(replace(client, &[]), Status::NotFound);
    assert!(msg.contains("mask"), "{msg}");
    assert_eq!(generate_mask(client, CUP).status(), Status::Ok);
    let msg = expect_error(replace(client, &[Part::Text("scale_factor", "7")]), Status::BadRequest);
    assert!(msg.contains("scale_factor"), "{msg}");
    let msg = expect_error(replace(client, &[Part::Text("grading_method", "Sepia")]), Status::BadRequest);
    assert!(msg.contains("grading_method"), "{msg}");
    expect_error(client.get("/no/such/route").dispatch(), Status::NotFound);
}

#[test]
fn a_box_partly_outside_the_image_is_clipped() {
    let app = app(&[("models", "")]);
    login(&app.client);
    assert_eq!(upload(&app.client, "coffee.png", &coffee()).status(), Status::Ok);
    let mask = json_of(generate_mask(&app.client, [-50, -50, 100, 80]));
    assert_eq!(mask["box"], serde_json::json!({"x_min": 0, "y_min": 0, "x_max": 100, "y_max": 80}));
    assert_eq!(mask["kind"], "box");
    assert_eq!(mask["mask_pixels"], 8000);
}

#[test]
fn health_reports_memory_model_and_directories_without_login() {
    let app = app(&[]);
    let health = json_of(app.client.get("/health").dispatch());
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["service"], "drishya");
    assert_eq!(health["model_loaded"], false, "nothing is loaded at start");
    assert_eq!(health["model"]["state"], "not_loaded");
    for key in ["memory_total_gb", "memory_available_gb", "process_rss_mb", "cpu_count", "disk_usage_percent"] {
        assert!(health["system"][key].is_number(), "system.{key} missing: {health}");
    }
    assert_eq!(health["directories"]["temp_dir_exists"], true);
    assert_eq!(health["directories"]["temp_dir_writable"], true);
    assert!(health["timestamp"].is_string() && health["environment"].is_string());
}

#[test]
fn invalid_configuration_stops_the_launch() {
    assert!(try_app(&[("max_image_width", "wide")]).is_err());
    assert!(try_app(&[("max_image_width", "10")]).is_err());
    assert!(try_app(&[("inference_concurrency", "0")]).is_err());
    assert!(try_app(&[("models", "ftp://example/model.onnx")]).is_err());
}

#[test]
fn pages_link_fingerprinted_assets_that_are_cached_and_served_locally() {
    let app = app(&[]);
    let fingerprint = drishya::web::fingerprint(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/static")));
    let login_page = app.client.get("/").dispatch().into_string().unwrap();
    assert!(login_page.contains(&format!("/static/app.css?v={fingerprint}")), "login page links the fingerprint");
    assert!(!login_page.contains("http://") && !login_page.contains("https://"), "no external CDN");
    login(&app.client);
    let page = app.client.get("/").dispatch().into_string().unwrap();
    assert!(page.contains(&format!("/static/app.js?v={fingerprint}")));
    let asset = app.client.get(format!("/static/app.js?v={fingerprint}")).dispatch();
    assert_eq!(asset.status(), Status::Ok);
    assert!(asset.headers().get_one("Cache-Control").unwrap().contains("immutable"));
    let unversioned = app.client.get("/static/app.js").dispatch();
    assert_eq!(unversioned.headers().get_one("Cache-Control"), Some("no-cache"));
}
