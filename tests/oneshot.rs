//! `POST /api/replace`: scene + product + box in, the composite out, in one request,
//! through the real app and the real U²-Net-p; its session is its own and gone when the
//! request ends; hostile input gets the step routes' answers.

mod common;

use common::*;
use rocket::http::{ContentType, Header, Status};
use rocket::local::blocking::{Client, LocalResponse};

const TOKEN: &str = "oneshot-test-token-0123456789";
/// The cup in coffee.png (600x400), in the photo's pixels.
const CUP: [&str; 4] = ["165", "10", "415", "300"];

fn bearer() -> Header<'static> {
    Header::new("Authorization", format!("Bearer {TOKEN}"))
}

fn coffee() -> Vec<u8> {
    read(&shared("images/coffee.png"))
}

fn token_app(extra: &[(&str, &str)]) -> App {
    let mut settings = vec![("api_tokens", TOKEN)];
    settings.extend_from_slice(extra);
    app(&settings)
}

/// The form's parts: the scene, the product, the box, then `fields`; a name in `without`
/// is left out, and a field given in `fields` replaces the default one.
fn call<'c>(
    client: &'c Client,
    scene: &[u8],
    product: &[u8],
    fields: &[(&str, &str)],
    without: &[&str],
) -> LocalResponse<'c> {
    let mut parts = Vec::new();
    if !without.contains(&"image") {
        parts.push(Part::File { name: "image", filename: "scene.png", content_type: "image/png", bytes: scene });
    }
    if !without.contains(&"product_image") {
        parts.push(Part::File {
            name: "product_image",
            filename: "bottle.png",
            content_type: "image/png",
            bytes: product,
        });
    }
    for (name, value) in ["x_min", "y_min", "x_max", "y_max"].iter().zip(CUP) {
        if !without.contains(name) && !fields.iter().any(|(n, _)| n == name) {
            parts.push(Part::Text(name, value));
        }
    }
    for (name, value) in fields {
        parts.push(Part::Text(name, value));
    }
    let (ct, body) = multipart(&parts);
    client.post("/api/replace").header(bearer()).header(ct).body(body).dispatch()
}

/// The transient sessions left in the store (there should be none once a call is over).
fn sessions_left(app: &App) -> Vec<String> {
    let dir = app.temp.path().join("artefacts").join("sessions");
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// The same composite through the step routes, in the token's session (box in the
/// working image's pixels).
fn step_flow(client: &Client, scene: &[u8], working_box: [i64; 4]) -> Vec<u8> {
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "s.png", content_type: "image/png", bytes: scene }]);
    assert_eq!(client.post("/upload_image").header(bearer()).header(ct).body(body).dispatch().status(), Status::Ok);
    let b = working_box;
    let json = serde_json::json!({"x_min": b[0], "y_min": b[1], "x_max": b[2], "y_max": b[3]});
    let mask =
        client.post("/generate_mask").header(bearer()).header(ContentType::JSON).body(json.to_string()).dispatch();
    assert_eq!(mask.status(), Status::Ok);
    let product = product_png();
    let (ct, body) = multipart(&[Part::File {
        name: "product_image",
        filename: "b.png",
        content_type: "image/png",
        bytes: &product,
    }]);
    assert_eq!(client.post("/replace_product").header(bearer()).header(ct).body(body).dispatch().status(), Status::Ok);
    client.get("/download_result").header(bearer()).dispatch().into_bytes().unwrap()
}

#[test]
fn one_call_gives_the_step_flows_composite_and_leaves_no_session() {
    let app = token_app(&[]);
    let client = &app.client;
    let response = call(client, &coffee(), &product_png(), &[("feather_amount", "15")], &[]);
    assert_eq!(response.status(), Status::Ok);
    assert_eq!(response.content_type(), Some(ContentType::PNG));
    let disposition = response.headers().get_one("Content-Disposition").unwrap_or_default().to_string();
    assert!(disposition.contains("product_replaced_image.png"), "{disposition}");
    let png = response.into_bytes().unwrap();
    assert!(sessions_left(&app).is_empty(), "the transient session is removed: {:?}", sessions_left(&app));

    let result = decode(&png).to_rgb8();
    let scene = decode(&coffee()).to_rgb8();
    assert_eq!(result.dimensions(), (600, 400));
    assert_ne!(result.get_pixel(290, 150), scene.get_pixel(290, 150), "the cup was replaced");
    assert_eq!(result.get_pixel(5, 395), scene.get_pixel(5, 395), "the far corner was not");
    // The step routes with the same box make the very same picture.
    let stepped = decode(&step_flow(client, &coffee(), [165, 10, 415, 300])).to_rgb8();
    assert!(stepped == result, "one call and the step routes differ");
}

#[test]
fn the_callers_own_session_is_neither_read_nor_touched() {
    let app = token_app(&[]);
    let client = &app.client;
    let cat = read(&shared("images/chelsea.png"));
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "c.png", content_type: "image/png", bytes: &cat }]);
    assert_eq!(client.post("/upload_image").header(bearer()).header(ct).body(body).dispatch().status(), Status::Ok);
    assert_eq!(call(client, &coffee(), &product_png(), &[], &[]).status(), Status::Ok);
    let mine = client.get("/get_image").header(bearer()).dispatch();
    assert_eq!(decode(&mine.into_bytes().unwrap()).to_rgb8().dimensions(), (451, 300), "still the cat");
    assert_eq!(sessions_left(&app).len(), 1, "only the caller's own session");
}

#[test]
fn the_box_is_in_the_photos_pixels_whatever_the_working_width() {
    // coffee.png is 600 px wide; a working width of 300 halves it.
    let app = token_app(&[("max_image_width", "300")]);
    let client = &app.client;
    let response = call(client, &coffee(), &product_png(), &[], &[]);
    assert_eq!(response.status(), Status::Ok);
    let result = decode(&response.into_bytes().unwrap()).to_rgb8();
    assert_eq!(result.dimensions(), (300, 200), "the composite is the working image's size");
    // The step routes take the working image's pixels: the halved box gives the same picture.
    let stepped = decode(&step_flow(client, &coffee(), [83, 5, 208, 150])).to_rgb8();
    assert!(stepped == result, "the photo's box was not scaled to the working image");
}

#[test]
fn jpeg_and_webp_are_encoded_as_asked() {
    let app = token_app(&[]);
    let client = &app.client;
    let png = call(client, &coffee(), &product_png(), &[], &[]).into_bytes().unwrap();
    let png = decode(&png).to_rgb8();

    let webp = call(client, &coffee(), &product_png(), &[("format", "webp")], &[]);
    assert_eq!(webp.status(), Status::Ok);
    assert_eq!(webp.content_type(), Some(ContentType::WEBP));
    let disposition = webp.headers().get_one("Content-Disposition").unwrap_or_default().to_string();
    assert!(disposition.contains("product_replaced_image.webp"), "{disposition}");
    let webp = webp.into_bytes().unwrap();
    assert_eq!(image::guess_format(&webp).ok(), Some(image::ImageFormat::WebP));
    assert!(decode(&webp).to_rgb8() == png, "WebP is lossless here");

    let mut sizes = Vec::new();
    for quality in ["30", "95"] {
        let jpeg = call(client, &coffee(), &product_png(), &[("format", "JPEG"), ("quality", quality)], &[]);
        assert_eq!(jpeg.status(), Status::Ok);
        assert_eq!(jpeg.content_type(), Some(ContentType::JPEG));
        let bytes = jpeg.into_bytes().unwrap();
        assert_eq!(image::guess_format(&bytes).ok(), Some(image::ImageFormat::Jpeg));
        let decoded = decode(&bytes).to_rgb8();
        assert_eq!(decoded.dimensions(), (600, 400));
        sizes.push(bytes.len());
    }
    assert!(sizes[0] < sizes[1], "quality 30 is smaller than 95: {sizes:?}");
    assert!(sessions_left(&app).is_empty());
}

#[test]
fn hostile_input_is_refused_before_any_work_and_leaves_nothing() {
    let app = token_app(&[]);
    let client = &app.client;
    let (scene, product) = (coffee(), product_png());
    let error = |fields: &[(&str, &str)], without: &[&str], status: Status| {
        expect_error(call(client, &scene, &product, fields, without), status)
    };
    for (missing, named) in [("image", "'image'"), ("product_image", "'product_image'"), ("x_max", "'x_max'")] {
        let message = error(&[], &[missing], Status::BadRequest);
        assert!(message.contains(named) && message.contains("required"), "{missing}: {message}");
    }
    let message = error(&[("format", "gif")], &[], Status::BadRequest);
    assert!(message.contains("'format'"), "{message}");
    // Checked before the scene is even sniffed: a bad field beside a file that is no
    // image is the field's 400, not the file's 415.
    let message = expect_error(call(client, b"%PDF-1.4", &product, &[("format", "gif")], &[]), Status::BadRequest);
    assert!(message.contains("'format'"), "{message}");
    for quality in ["0", "101", "high", "-5"] {
        let message = error(&[("quality", quality)], &[], Status::BadRequest);
        assert!(message.contains("'quality'"), "{quality}: {message}");
    }
    // A box beyond any photo's bounds, or not a number.
    for (field, value) in [("x_max", "1e12"), ("y_min", "NaN"), ("x_min", "inf"), ("y_max", "ten")] {
        let message = error(&[(field, value)], &[], Status::BadRequest);
        assert!(message.contains(field) && message.contains("finite number"), "{field}={value}: {message}");
    }
    // A box wholly outside the photo, after the upload: nothing is left behind.
    let outside = [("x_min", "700"), ("x_max", "900"), ("y_min", "0"), ("y_max", "100")];
    let message = error(&outside, &[], Status::BadRequest);
    assert!(message.contains("no area"), "{message}");
    let message = error(&[("color_grade_strength", "50")], &[], Status::BadRequest);
    assert!(message.contains("color_grade_strength"), "{message}");
    // Not images: the scene (before the mask), the product (after it).
    expect_error(call(client, b"%PDF-1.4 not a photo", &product, &[], &[]), Status::UnsupportedMediaType);
    expect_error(call(client, &scene, b"GIF89a not ours", &[], &[]), Status::UnsupportedMediaType);
    assert!(sessions_left(&app).is_empty(), "errors remove the transient session: {:?}", sessions_left(&app));

    // A huge box that still holds the photo is clipped to it, as /generate_mask does.
    let huge = [("x_min", "-1000000"), ("y_min", "-1000000"), ("x_max", "1000000"), ("y_max", "1000000")];
    assert_eq!(call(client, &scene, &product, &huge, &[]).status(), Status::Ok);
}

#[test]
fn credentials_limits_and_gates_are_those_of_the_step_routes() {
    let app = token_app(&[("max_upload_mb", "1"), ("image_concurrency", "1"), ("image_queue", "0")]);
    let client = &app.client;
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "s.png", content_type: "image/png", bytes: &coffee() }]);
    expect_error(client.post("/api/replace").header(ct.clone()).body(body.clone()).dispatch(), Status::Unauthorized);
    let bad = Header::new("Authorization", "Bearer oneshot-test-token-wrong-0000");
    let refused = client.post("/api/replace").header(bad).header(ct).body(body).dispatch();
    assert_eq!(expect_error(refused, Status::Unauthorized), "invalid API token");
    // A logged-in browser may use it too (same-origin rules as every POST).
    login(client);
    let product = product_png();
    let (ct, body) = multipart(&[Part::File {
        name: "product_image",
        filename: "b.png",
        content_type: "image/png",
        bytes: &product,
    }]);
    let message = expect_error(client.post("/api/replace").header(ct).body(body).dispatch(), Status::BadRequest);
    assert!(message.contains("'image'"), "{message}");

    // Over MAX_UPLOAD_MB: 413 naming the limit.
    let big = vec![0x42u8; 1536 * 1024];
    let message = expect_error(call(client, &big, &product, &[], &[]), Status::PayloadTooLarge);
    assert!(message.contains("1 MB"), "{message}");
    // Each file within MAX_UPLOAD_MB (one alone gets as far as the sniffing), but both
    // together over the body's cap of MAX_UPLOAD_MB + 1 MB: 413 too, before any decoding.
    let near = vec![0x42u8; 1024 * 1024 - 100];
    expect_error(call(client, &near, &product, &[], &[]), Status::UnsupportedMediaType);
    let message = expect_error(call(client, &near, &near, &[], &[]), Status::PayloadTooLarge);
    assert!(message.contains("1 MB"), "{message}");

    // The image-job gate full (its one place held, no queue): 503 with Retry-After.
    let jobs = client.rocket().state::<drishya::gate::ImageJobs>().expect("the gate");
    let held = jobs.gate().try_enter().expect("the only place");
    let busy = call(client, &coffee(), &product, &[], &[]);
    assert!(busy.headers().get_one("Retry-After").is_some());
    expect_error(busy, Status::ServiceUnavailable);
    drop(held);
    assert_eq!(call(client, &coffee(), &product, &[], &[]).status(), Status::Ok);
    assert!(sessions_left(&app).is_empty());
}

/// Interleaved calls (the async client runs them at once, each in its own task's turns;
/// their pixel work runs side by side on the blocking pool) each get their own composite.
#[rocket::async_test]
async fn concurrent_calls_each_get_their_own_composite() {
    let (figment, temp) = test_figment(&[("api_tokens", TOKEN)]);
    let client = rocket::local::asynchronous::Client::tracked(drishya::build(figment)).await.expect("the app");
    let (scene, product) = (coffee(), product_png());
    // Three boxes, three different pictures.
    let boxes: [[&str; 4]; 3] = [CUP, ["20", "200", "200", "390"], ["400", "150", "590", "390"]];
    let send = |b: [&'static str; 4]| {
        let (ct, body) = multipart(&[
            Part::File { name: "image", filename: "s.png", content_type: "image/png", bytes: &scene },
            Part::File { name: "product_image", filename: "p.png", content_type: "image/png", bytes: &product },
            Part::Text("x_min", b[0]),
            Part::Text("y_min", b[1]),
            Part::Text("x_max", b[2]),
            Part::Text("y_max", b[3]),
        ]);
        let request = client.post("/api/replace").header(bearer()).header(ct).body(body);
        async move {
            let response = request.dispatch().await;
            assert_eq!(response.status(), Status::Ok);
            decode(&response.into_bytes().await.expect("a body")).to_rgb8()
        }
    };
    let mut alone = Vec::new();
    for b in boxes {
        alone.push(send(b).await);
    }
    assert!(alone[0] != alone[1] && alone[1] != alone[2], "the boxes make different pictures");
    let (a, b, c) = rocket::tokio::join!(send(boxes[0]), send(boxes[1]), send(boxes[2]));
    for (i, (alone, together)) in alone.iter().zip([a, b, c]).enumerate() {
        assert!(*alone == together, "box {i}: the concurrent call's picture differs");
    }
    let left = std::fs::read_dir(temp.path().join("artefacts").join("sessions"))
        .map(|d| d.flatten().count())
        .unwrap_or_default();
    assert_eq!(left, 0, "every transient session is removed");
}
