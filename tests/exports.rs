//! The downloads beside the composite, through the real Rocket app with real photos and
//! real U²-Net-p masks: the cut-out (the mask as the working image's alpha), the mask
//! (white on black), and the result at the photo's own resolution in PNG, JPEG and WebP.

mod common;

use common::*;
use image::{GenericImageView, GrayImage, RgbImage};
use rocket::http::{ContentType, Status};
use rocket::local::blocking::Client;

/// The cup in coffee.png (600x400), with a little room.
const CUP: [f64; 4] = [165.0, 10.0, 415.0, 300.0];

fn coffee() -> RgbImage {
    decode(&read(&shared("images/coffee.png"))).to_rgb8()
}

/// coffee.png upscaled to `width` x `height` (bilinear), as a JPEG: a large camera photo
/// (none of the shared photos is larger than 1280 px).
fn big_coffee_jpeg(width: u32, height: u32) -> Vec<u8> {
    let big = image::imageops::resize(&coffee(), width, height, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&big).expect("jpeg");
    jpeg
}

fn replace(client: &Client) {
    let product = product_png();
    let (ct, body) = multipart(&[
        Part::File { name: "product_image", filename: "bottle.png", content_type: "image/png", bytes: &product },
        Part::Text("scale_factor", "1.0"),
        Part::Text("feather_amount", "8"),
        Part::Text("enable_color_grading", "true"),
        Part::Text("color_grade_strength", "0.5"),
    ]);
    let response = client.post("/replace_product").header(ct).body(body).dispatch();
    assert_eq!(response.status(), Status::Ok, "{}", response.into_string().unwrap_or_default());
}

/// Uploads `bytes`, masks the cup (scaled to the working image); returns the mask's JSON.
fn upload_and_mask(client: &Client, name: &str, bytes: &[u8]) -> serde_json::Value {
    let up = json_of(upload(client, name, bytes));
    assert_eq!(up["success"], true, "{up}");
    let (w, h) = (up["width"].as_f64().unwrap(), up["height"].as_f64().unwrap());
    let (sx, sy) = (w / 600.0, h / 400.0);
    let b = [CUP[0] * sx, CUP[1] * sy, CUP[2] * sx, CUP[3] * sy].map(|v| v.round() as i64);
    let mask = generate_mask(client, b);
    assert_eq!(mask.status(), Status::Ok);
    let mask = json_of(mask);
    assert_eq!(mask["kind"], "salient", "a real model's mask: {mask}");
    mask
}

/// A GET's body, after checking its status, type and attachment name.
fn download(client: &Client, uri: &str, content_type: &str, filename: &str) -> Vec<u8> {
    let response = client.get(uri.to_string()).dispatch();
    assert_eq!(response.status(), Status::Ok, "{uri}");
    assert_eq!(response.content_type().map(|c| c.to_string()).as_deref(), Some(content_type), "{uri}");
    let disposition = response.headers().get_one("Content-Disposition").unwrap_or_default().to_string();
    assert_eq!(disposition, format!("attachment; filename=\"{filename}\""), "{uri}");
    assert_eq!(response.headers().get_one("Cache-Control"), Some("no-store"), "{uri}");
    response.into_bytes().expect("a body")
}

fn bbox_of(mask: &serde_json::Value) -> [u32; 4] {
    let b = &mask["bbox"];
    ["x_min", "y_min", "x_max", "y_max"].map(|k| b[k].as_u64().unwrap_or_else(|| panic!("no bbox: {mask}")) as u32)
}

#[test]
fn the_cutout_is_the_working_image_with_the_mask_as_alpha_and_the_mask_is_white_on_black() {
    let app = app(&[]);
    let client = &app.client;
    for uri in ["/download_cutout", "/download_mask", "/download_full"] {
        assert_eq!(client.get(uri).dispatch().status(), Status::Unauthorized, "{uri} needs the login");
    }
    login(client);
    for uri in ["/download_cutout", "/download_mask"] {
        let message = expect_error(client.get(uri).dispatch(), Status::NotFound);
        assert!(message.contains("no mask yet"), "{uri}: {message}");
    }
    let photo = coffee();
    let mask_json = upload_and_mask(client, "coffee.png", &png_bytes(&photo));
    let working = decode(&client.get("/get_image").dispatch().into_bytes().unwrap()).to_rgb8();

    let mask = decode(&download(client, "/download_mask", "image/png", "product_mask.png"));
    assert!(matches!(mask, image::DynamicImage::ImageLuma8(_)), "a one-channel PNG: {:?}", mask.color());
    let mask: GrayImage = mask.into_luma8();
    assert_eq!(mask.dimensions(), working.dimensions());
    assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255), "white on black, nothing between");
    let white = mask.pixels().filter(|p| p[0] == 255).count() as u64;
    assert_eq!(Some(white), mask_json["mask_pixels"].as_u64(), "the mask the model made");
    assert_eq!(mask.get_pixel(290, 150)[0], 255, "the cup's centre is in");
    assert_eq!(mask.get_pixel(5, 395)[0], 0, "the far corner is out");

    let cutout = decode(&download(client, "/download_cutout", "image/png", "product_cutout.png"));
    assert!(matches!(cutout, image::DynamicImage::ImageRgba8(_)), "an RGBA PNG: {:?}", cutout.color());
    let cutout = cutout.into_rgba8();
    assert_eq!(cutout.dimensions(), working.dimensions());
    for ((p, m), w) in cutout.pixels().zip(mask.pixels()).zip(working.pixels()) {
        assert_eq!(p[3], m[0], "the alpha is the mask");
        assert_eq!(&p.0[..3], &w.0[..], "the colours are the working image's");
    }

    // A photo no larger than the working image: its full-resolution result is the result.
    let message = expect_error(client.get("/download_full").dispatch(), Status::NotFound);
    assert!(message.contains("no result yet"), "{message}");
    replace(client);
    let result = decode(&download(client, "/download_result", "image/png", "product_replaced_image.png")).to_rgb8();
    let full = decode(&download(client, "/download_full", "image/png", "product_replaced_full.png")).to_rgb8();
    assert_eq!(full, result);
}

/// The pixels of `full` outside `region` (x0, y0, x1, y1) that differ from `original`, and
/// those inside that do.
fn changed(full: &RgbImage, original: &RgbImage, region: [u32; 4]) -> (usize, usize) {
    let (mut outside, mut inside) = (0, 0);
    for (x, y, p) in full.enumerate_pixels() {
        if p != original.get_pixel(x, y) {
            let within = x >= region[0] && x < region[2] && y >= region[1] && y < region[3];
            *(if within { &mut inside } else { &mut outside }) += 1;
        }
    }
    (outside, inside)
}

#[test]
fn the_full_resolution_result_of_a_24_mp_photo_has_its_size_and_its_pixels_outside_the_box() {
    // 6000x4000: a 24 MP camera photo, coffee.png upscaled.
    let (width, height) = (6000, 4000);
    let jpeg = big_coffee_jpeg(width, height);
    let app = app(&[]);
    let client = &app.client;
    login(client);
    let mask = upload_and_mask(client, "big.jpg", &jpeg);
    let message = expect_error(client.get("/download_full").dispatch(), Status::NotFound);
    assert!(message.contains("no result yet"), "{message}");
    replace(client);

    let bytes = download(client, "/download_full?format=png", "image/png", "product_replaced_full.png");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    let full = decode(&bytes).to_rgb8();
    drop(bytes);
    assert_eq!(full.dimensions(), (width, height), "the photo's own size");

    // The mask's box in working pixels, scaled to the photo: every photo pixel whose
    // centre falls in it.
    let working = decode(&client.get("/get_image").dispatch().into_bytes().unwrap()).to_rgb8();
    let (sx, sy) = (f64::from(width) / f64::from(working.width()), f64::from(height) / f64::from(working.height()));
    let b = bbox_of(&mask);
    let region = [
        (f64::from(b[0]) * sx).floor() as u32,
        (f64::from(b[1]) * sy).floor() as u32,
        (f64::from(b[2]) * sx).ceil() as u32,
        (f64::from(b[3]) * sy).ceil() as u32,
    ];
    let original = decode(&jpeg).to_rgb8();
    let (outside, inside) = changed(&full, &original, region);
    assert_eq!(outside, 0, "pixels outside the scaled box are the decoded photo's");
    let area = (region[2] - region[0]) as usize * (region[3] - region[1]) as usize;
    assert!(inside > area / 10, "only {inside} of the box's {area} pixels changed");

    // It is the preview's composite, at full size: downscaled to the working size, it
    // matches the working result inside the box (the edges differ by resampling only).
    let result = decode(&client.get("/download_result").dispatch().into_bytes().unwrap()).to_rgb8();
    let small =
        image::imageops::resize(&full, working.width(), working.height(), image::imageops::FilterType::Triangle);
    drop(full);
    let (mut diff, mut n) = (0u64, 0u64);
    for y in b[1]..b[3] {
        for x in b[0]..b[2] {
            let (p, q) = (small.get_pixel(x, y), result.get_pixel(x, y));
            diff += (0..3).map(|c| u64::from(p[c].abs_diff(q[c]))).sum::<u64>();
            n += 3;
        }
    }
    let mean = diff as f64 / n as f64;
    assert!(mean < 4.0, "mean difference {mean:.2} from the working result in the box");

    // A new mask makes the result stale, at every resolution.
    let b = bbox_of(&mask).map(i64::from);
    assert_eq!(generate_mask(client, b).status(), Status::Ok);
    let message = expect_error(client.get("/download_full").dispatch(), Status::NotFound);
    assert!(message.contains("no result yet"), "{message}");
}

#[test]
fn full_resolution_jpeg_and_lossless_webp_and_bad_formats_or_qualities_are_400() {
    let (width, height) = (2400, 1600);
    let jpeg = big_coffee_jpeg(width, height);
    // Rocket's own temp dir, where downloads are spooled: this test's alone.
    let spool = tempfile::tempdir().unwrap();
    let app = app(&[("temp_dir", spool.path().to_str().unwrap())]);
    let client = &app.client;
    login(client);
    upload_and_mask(client, "big.jpg", &jpeg);
    replace(client);

    let png = decode(&download(client, "/download_full", "image/png", "product_replaced_full.png")).to_rgb8();
    assert_eq!(png.dimensions(), (width, height));

    let webp = download(client, "/download_full?format=webp", "image/webp", "product_replaced_full.webp");
    assert!(webp.starts_with(b"RIFF") && &webp[8..12] == b"WEBP", "WebP magic");
    assert_eq!(decode(&webp).to_rgb8(), png, "WebP is lossless");

    let fine = download(client, "/download_full?format=jpeg&quality=95", "image/jpeg", "product_replaced_full.jpg");
    let coarse = download(client, "/download_full?format=JPG&quality=10", "image/jpeg", "product_replaced_full.jpg");
    for bytes in [&fine, &coarse] {
        assert!(bytes.starts_with(&[0xFF, 0xD8, 0xFF]), "JPEG magic");
        assert_eq!(decode(bytes).dimensions(), (width, height));
    }
    assert!(coarse.len() * 3 < fine.len(), "quality is honoured: {} vs {} bytes", coarse.len(), fine.len());
    let error = |img: &RgbImage| {
        let (a, b) = (img.as_raw(), png.as_raw());
        a.iter().zip(b).map(|(x, y)| u64::from(x.abs_diff(*y))).sum::<u64>() as f64 / a.len() as f64
    };
    let (fine_error, coarse_error) = (error(&decode(&fine).to_rgb8()), error(&decode(&coarse).to_rgb8()));
    assert!(fine_error < 2.0 && fine_error < coarse_error, "JPEG errors {fine_error:.2} (95), {coarse_error:.2} (10)");

    let left: Vec<_> = std::fs::read_dir(spool.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "spooled downloads leave nothing behind: {left:?}");

    for (query, field) in [
        ("format=gif", "format"),
        ("format=", "format"),
        ("format=png%00", "format"),
        ("format=jpeg&quality=0", "quality"),
        ("format=jpeg&quality=101", "quality"),
        ("format=jpeg&quality=abc", "quality"),
        ("format=jpeg&quality=-5", "quality"),
        ("format=jpeg&quality=9.5", "quality"),
        ("quality=", "quality"),
    ] {
        let response = client.get(format!("/download_full?{query}")).dispatch();
        assert_eq!(response.content_type(), Some(ContentType::JSON), "{query}");
        let message = expect_error(response, Status::BadRequest);
        assert!(message.contains(field), "{query}: {message}");
    }
}

#[test]
fn a_webp_of_a_photo_over_25_mp_is_refused_while_jpeg_is_served_at_its_size() {
    // 6300x4200 (26.5 MP): over the WebP limit, within the upload limits.
    let (width, height) = (6300, 4200);
    let jpeg = big_coffee_jpeg(width, height);
    let app = app(&[]);
    let client = &app.client;
    login(client);
    upload_and_mask(client, "bigger.jpg", &jpeg);
    replace(client);
    let message = expect_error(client.get("/download_full?format=webp").dispatch(), Status::BadRequest);
    assert!(message.contains("25 megapixels") && message.contains("png or jpeg"), "{message}");
    let bytes = download(client, "/download_full?format=jpeg", "image/jpeg", "product_replaced_full.jpg");
    assert_eq!(decode(&bytes).dimensions(), (width, height));
}
