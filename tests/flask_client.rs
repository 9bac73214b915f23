//! The Flask app's own browser client against this server. Its JavaScript is not run
//! here (the browser test runs ours); what it sends is computed from our answers the way
//! it computes it: the canvas is `min(800, width)` wide, the drawn box is scaled by
//! `original_width / canvas.width` (and height alike) and rounded; the replace form
//! carries its controls' values (strength slider 0.0-1.0, checkboxes as "true"/"false").

mod common;

use common::*;
use image::RgbImage;
use rocket::http::Status;
use serde_json::{json, Value};

/// The cup in coffee.png (600x400), in that image's pixels, with a little room.
const CUP: [f64; 4] = [165.0, 10.0, 415.0, 300.0];

fn coffee() -> RgbImage {
    decode(&read(&shared("images/coffee.png"))).to_rgb8()
}

/// A phone-sized photo: coffee.png upscaled 4x to 2400x1600.
fn big_coffee() -> Vec<u8> {
    png_bytes(&image::imageops::resize(&coffee(), 2400, 1600, image::imageops::FilterType::Triangle))
}

/// The Flask client's canvas size for an upload answer.
fn flask_canvas(up: &Value) -> (f64, f64) {
    let (width, height) = (up["width"].as_f64().unwrap(), up["height"].as_f64().unwrap());
    let canvas_width = width.min(800.0);
    (canvas_width, canvas_width * height / width)
}

/// The box the Flask client sends for a rectangle drawn on its canvas (`Math.round`ed).
fn flask_box(up: &Value, drawn: [f64; 4]) -> [i64; 4] {
    let (canvas_width, canvas_height) = flask_canvas(up);
    let sx = up["original_width"].as_f64().unwrap() / canvas_width;
    let sy = up["original_height"].as_f64().unwrap() / canvas_height;
    [drawn[0] * sx, drawn[1] * sy, drawn[2] * sx, drawn[3] * sy].map(|v| v.round() as i64)
}

/// The user draws around the cup on the Flask canvas (which shows the working image).
fn draw_around_cup(up: &Value, photo_width: f64) -> [f64; 4] {
    let (canvas_width, _) = flask_canvas(up);
    CUP.map(|v| v * canvas_width / photo_width)
}

#[test]
fn the_flask_clients_box_on_a_phone_sized_photo_lands_on_the_cup() {
    let app = app(&[]);
    let client = &app.client;
    login(client);
    let up = json_of(upload(client, "phone.png", &big_coffee()));
    assert_eq!((up["width"].as_u64(), up["height"].as_u64()), (Some(1280), Some(853)), "{up}");
    assert_eq!((up["source_width"].as_u64(), up["source_height"].as_u64()), (Some(2400), Some(1600)), "{up}");

    let mask = generate_mask(client, flask_box(&up, draw_around_cup(&up, 600.0)));
    assert_eq!(mask.status(), Status::Ok);
    let mask = json_of(mask);
    // The cup in working-image pixels (coffee.png scaled by 1280/600).
    let k = 1280.0 / 600.0;
    let cup = CUP.map(|v| (v * k) as i64);
    let bbox = &mask["bbox"];
    let b = ["x_min", "y_min", "x_max", "y_max"].map(|f| bbox[f].as_i64().unwrap_or(-1));
    assert!(b[0] >= cup[0] - 2 && b[1] >= cup[1] - 2 && b[2] <= cup[2] + 2 && b[3] <= cup[3] + 2, "{bbox} vs {cup:?}");
    let area = mask["mask_pixels"].as_u64().unwrap() as f64;
    let cup_area = ((cup[2] - cup[0]) * (cup[3] - cup[1])) as f64;
    assert!(area > cup_area / 5.0, "the mask covers the cup: {area} of {cup_area}");

    // The overlay marks the cup's centre, not the far corner.
    let working = decode(&client.get("/get_image").dispatch().into_bytes().unwrap()).to_rgb8();
    let overlay = decode(&client.get("/get_mask_visualization").dispatch().into_bytes().unwrap()).to_rgb8();
    let centre = ((290.0 * k) as u32, (150.0 * k) as u32);
    assert_ne!(overlay.get_pixel(centre.0, centre.1), working.get_pixel(centre.0, centre.1));
    assert_eq!(overlay.get_pixel(10, 840), working.get_pixel(10, 840));
}

/// The replace form as the Flask client sends it (its defaults, then `grading`).
fn flask_replace<'c>(
    client: &'c rocket::local::blocking::Client,
    product: &[u8],
    grading: &str,
    strength: &str,
) -> rocket::local::blocking::LocalResponse<'c> {
    let (ct, body) = multipart(&[
        Part::File { name: "product_image", filename: "rocket.jpg", content_type: "image/jpeg", bytes: product },
        Part::Text("scale_factor", "1.0"),
        Part::Text("use_blending", "true"),
        Part::Text("feather_amount", "15"),
        Part::Text("enable_color_grading", grading),
        Part::Text("color_grade_strength", strength),
        Part::Text("grading_method", "Match Target Area"),
    ]);
    client.post("/replace_product").header(ct).body(body).dispatch()
}

fn result_for(client: &rocket::local::blocking::Client, product: &[u8], grading: &str, strength: &str) -> RgbImage {
    let answer = flask_replace(client, product, grading, strength);
    assert_eq!(answer.status(), Status::Ok, "grading {grading} at {strength}");
    decode(&client.get("/get_result_image").dispatch().into_bytes().unwrap()).to_rgb8()
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    let total: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| u64::from(x.abs_diff(*y))).sum();
    total as f64 / a.as_raw().len() as f64
}

#[test]
fn the_flask_clients_strength_fraction_grades_visibly_and_more_at_one() {
    let app = app(&[]);
    let client = &app.client;
    login(client);
    assert_eq!(upload(client, "coffee.png", &png_bytes(&coffee())).status(), Status::Ok);
    let up = json!({"width": 600, "height": 400, "original_width": 600, "original_height": 400});
    assert_eq!(generate_mask(client, flask_box(&up, draw_around_cup(&up, 600.0))).status(), Status::Ok);
    // A real photo as the product: grading needs colour variation (a flat colour has no
    // spread to match and is left alone).
    let product = read(&shared("images/rocket.jpg"));

    let plain = result_for(client, &product, "false", "0.5");
    let none = result_for(client, &product, "true", "0");
    let half = result_for(client, &product, "true", "0.5");
    let full = result_for(client, &product, "true", "1");
    assert!(mean_abs_diff(&plain, &none) < 0.05, "strength 0 leaves the product as it is");
    let (d_half, d_full) = (mean_abs_diff(&plain, &half), mean_abs_diff(&plain, &full));
    assert!(d_half > 1.0, "the default 0.5 grades visibly: mean change {d_half:.2} per channel");
    assert!(d_full > d_half * 1.3, "1.0 grades more than 0.5: {d_full:.2} vs {d_half:.2}");

    // A percentage (our page's old wire format) is refused, naming the field and range.
    let msg = expect_error(flask_replace(client, &product, "true", "50"), Status::BadRequest);
    assert!(msg.contains("color_grade_strength") && msg.contains("0 to 1"), "{msg}");
}

#[test]
fn a_mask_finished_while_the_image_queue_is_full_is_delivered() {
    // One image job at a time and two waiting: three places in all.
    let app = app(&[("image_concurrency", "1"), ("image_queue", "2")]);
    let client = &app.client;
    login(client);
    assert_eq!(upload(client, "coffee.png", &png_bytes(&coffee())).status(), Status::Ok);
    let jobs = client.rocket().state::<drishya::gate::ImageJobs>().expect("the image gate is managed");
    // Other requests hold two places; the mask request gets the last one...
    let mut held: Vec<_> = (0..2).map(|_| jobs.gate().admit(1).expect("a free place")).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let answer = std::thread::scope(|scope| {
        // ...and, once it has, any place that comes free while the model runs is taken at
        // once, as a busy server's other users would.
        let taker = scope.spawn(|| {
            while jobs.gate().free_places() > 0 && !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match jobs.gate().admit(1) {
                    Ok(place) => held.push(place),
                    Err(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
                }
            }
        });
        let up = json!({"width": 600, "height": 400, "original_width": 600, "original_height": 400});
        let response = generate_mask(client, flask_box(&up, draw_around_cup(&up, 600.0)));
        let answer = (response.status(), response.into_string().unwrap_or_default());
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        // (Once answered, the request's place is free and may be taken: not counted.)
        taker.join().unwrap();
        answer
    });
    assert_eq!(answer.0, Status::Ok, "the computed mask is delivered: {}", answer.1);
}
