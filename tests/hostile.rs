//! Hostile and unusual input through the real app: every answer is a JSON error with a
//! fitting status, never a crash, and odd-but-legal images work. The inputs are made here.

mod common;

use common::*;
use image::{ImageEncoder, Rgb, RgbImage};
use rocket::http::{ContentType, Header, Status};
use rocket::local::blocking::Client;

fn logged_in() -> App {
    let app = app(&[("models", "")]);
    login(&app.client);
    app
}

fn jpeg(image: &RgbImage, exif: Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    if let Some(exif) = exif {
        encoder.set_exif_metadata(exif).unwrap();
    }
    encoder.write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8).unwrap();
    out
}

/// A big-endian TIFF/EXIF block with only the Orientation tag.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut t = b"MM\0\x2a\0\0\0\x08".to_vec();
    t.extend_from_slice(&1u16.to_be_bytes()); // one entry
    t.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    t.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    t.extend_from_slice(&1u32.to_be_bytes()); // count
    t.extend_from_slice(&value.to_be_bytes());
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    t
}

/// Three flat blocks: red top-left, green top-right, blue bottom half.
fn quadrants(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| match (x < width / 2, y < height / 2) {
        (true, true) => Rgb([220, 30, 30]),
        (false, true) => Rgb([30, 200, 30]),
        _ => Rgb([30, 30, 220]),
    })
}

fn dominant(p: &Rgb<u8>) -> char {
    let [r, g, b] = p.0;
    if r > g && r > b {
        'R'
    } else if g > b {
        'G'
    } else {
        'B'
    }
}

/// Colour letters at the four corners (inset) of the working image.
fn corners(client: &Client) -> (u32, u32, String) {
    let img = decode(&client.get("/get_image").dispatch().into_bytes().unwrap()).to_rgb8();
    let (w, h) = img.dimensions();
    let at = |x: u32, y: u32| dominant(img.get_pixel(x, y));
    let s = [at(w / 8, h / 8), at(w - w / 8, h / 8), at(w / 8, h - h / 8), at(w - w / 8, h - h / 8)].iter().collect();
    (w, h, s)
}

#[test]
fn exif_orientations_1_to_8_are_applied() {
    // Original (64x32): corners TL=R, TR=G, BL=B, BR=B. Expected displayed corners per EXIF value.
    let expected = [
        (1, (64, 32), "RGBB"),
        (2, (64, 32), "GRBB"),
        (3, (64, 32), "BBGR"),
        (4, (64, 32), "BBRG"),
        (5, (32, 64), "RBGB"),
        (6, (32, 64), "BRBG"),
        (7, (32, 64), "BGBR"),
        (8, (32, 64), "GBRB"),
    ];
    let app = logged_in();
    for (value, size, corner_colours) in expected {
        let bytes = jpeg(&quadrants(64, 32), Some(exif_orientation(value)));
        let up = json_of(upload(&app.client, "o.jpg", &bytes));
        assert_eq!(
            (up["width"].as_u64().unwrap() as u32, up["height"].as_u64().unwrap() as u32),
            size,
            "orientation {value}"
        );
        let (_, _, seen) = corners(&app.client);
        assert_eq!(seen, corner_colours, "orientation {value}");
    }
}

#[test]
fn a_huge_jpeg_is_decoded_at_reduced_scale_and_oriented() {
    // 6000x4000 (24 MP) with EXIF orientation 6: displayed 4000x6000, decoded at 1/2 (2000 wide >= 1280).
    let bytes = jpeg(&quadrants(6000, 4000), Some(exif_orientation(6)));
    let scene = drishya_imaging::decode_scene(&bytes, 1280).unwrap();
    assert_eq!((scene.original_width, scene.original_height), (4000, 6000));
    assert_eq!(scene.image.width(), 1280);
    assert!(scene.decode_divisor >= 2, "decoded at 1/{}", scene.decode_divisor);
    let app = logged_in();
    let up = json_of(upload(&app.client, "big.jpg", &bytes));
    assert_eq!((up["width"].as_u64(), up["height"].as_u64()), (Some(1280), Some(1920)));
    assert_eq!(corners(&app.client).2, "BRBG");
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    out.extend_from_slice(&crc_input);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A valid-looking PNG header claiming 100000 x 100000 RGB pixels (30 GB), a few bytes long.
fn bomb_png() -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn a_decompression_bomb_is_refused_before_allocation() {
    let app = logged_in();
    let bomb = bomb_png();
    assert!(bomb.len() < 100);
    let before = drishya::sysmem::process_rss().1;
    let msg = expect_error(upload(&app.client, "bomb.png", &bomb), Status::PayloadTooLarge);
    assert!(msg.contains("too large"), "{msg}");
    let after = drishya::sysmem::process_rss().1;
    assert!(after - before < 200 * 1024 * 1024, "peak RSS grew by {} MB", (after - before) >> 20);
}

#[test]
fn an_upload_over_the_limit_is_413() {
    let app = app(&[("models", ""), ("max_upload_mb", "1")]);
    login(&app.client);
    let big = vec![0u8; 1024 * 1024 + 10];
    let msg = expect_error(upload(&app.client, "big.png", &big), Status::PayloadTooLarge);
    assert!(msg.contains("1 MB"), "{msg}");
}

#[test]
fn truncated_and_corrupt_images_are_400() {
    let app = logged_in();
    let photo = decode(&read(&shared("images/coffee.png"))).to_rgb8();
    let png = png_bytes(&photo);
    let jpg = jpeg(&photo, None);
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .write_image(photo.as_raw(), photo.width(), photo.height(), image::ExtendedColorType::Rgb8)
        .unwrap();
    for (name, bytes) in [("png", &png), ("jpg", &jpg), ("webp", &webp)] {
        let cut = &bytes[..bytes.len() / 3];
        let response = upload(&app.client, name, cut);
        assert_eq!(response.status(), Status::BadRequest, "truncated {name}");
        let msg = json_of(response)["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains("truncated or corrupt"), "{name}: {msg}");
        let mut garbled = bytes.clone();
        let mid = garbled.len() / 2;
        garbled.truncate(mid + 64);
        garbled.extend(std::iter::repeat_n(0xff, 4096));
        let response = upload(&app.client, name, &garbled);
        assert!(
            response.status() == Status::BadRequest || response.status() == Status::Ok,
            "{name} garbled: {}",
            response.status()
        );
        assert_eq!(upload(&app.client, name, bytes).status(), Status::Ok, "{name} whole");
    }
}

#[test]
fn unusual_but_legal_pngs_and_other_formats() {
    let app = logged_in();
    // 16-bit RGB.
    let deep = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(40, 30, image::Rgb([65535, 0, 32768]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb16(deep)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    assert_eq!(upload(&app.client, "deep.png", &bytes).status(), Status::Ok);
    assert_eq!(corners_pixel(&app.client), Rgb([255, 0, 128]));
    // Grayscale.
    let grey = image::GrayImage::from_pixel(40, 30, image::Luma([77]));
    let bytes = drishya_imaging::encode_png(&grey).unwrap();
    assert_eq!(upload(&app.client, "grey.png", &bytes).status(), Status::Ok);
    assert_eq!(corners_pixel(&app.client), Rgb([77, 77, 77]));
    // Palette, with a transparent entry (over white).
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 4, 2);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_palette(vec![10, 20, 30, 200, 100, 0]);
        encoder.set_trns(vec![0, 255]);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0, 1, 0, 1, 0, 1, 0, 1]).unwrap();
    }
    assert_eq!(upload(&app.client, "palette.png", &bytes).status(), Status::Ok);
    let img = decode(&app.client.get("/get_image").dispatch().into_bytes().unwrap()).to_rgb8();
    assert_eq!(img.get_pixel(0, 0), &Rgb([255, 255, 255]), "transparent palette entry over white");
    assert_eq!(img.get_pixel(1, 0), &Rgb([200, 100, 0]));
    // GIF and BMP are not among the accepted formats, whatever the name says.
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    expect_error(upload(&app.client, "photo.jpg", &gif), Status::UnsupportedMediaType);
    expect_error(upload(&app.client, "photo.png", b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0"), Status::UnsupportedMediaType);
    // A real PNG named .jpg with a wrong Content-Type is still a PNG.
    let (ct, body) = multipart(&[Part::File {
        name: "image",
        filename: "x.jpg",
        content_type: "text/plain",
        bytes: &png_bytes(&quadrants(8, 8)),
    }]);
    assert_eq!(app.client.post("/upload_image").header(ct).body(body).dispatch().status(), Status::Ok);
}

fn corners_pixel(client: &Client) -> Rgb<u8> {
    *decode(&client.get("/get_image").dispatch().into_bytes().unwrap()).to_rgb8().get_pixel(0, 0)
}

#[test]
fn malformed_requests_name_the_field() {
    let app = logged_in();
    assert_eq!(upload(&app.client, "c.png", &png_bytes(&quadrants(100, 80))).status(), Status::Ok);
    let post = |body: &str| app.client.post("/generate_mask").header(ContentType::JSON).body(body).dispatch();
    for (body, needle) in [
        (r#"{"x_min":"NaN","y_min":0,"x_max":10,"y_max":10}"#, "x_min"),
        (r#"{"x_min":0,"y_min":-1e400,"x_max":10,"y_max":10}"#, "JSON"),
        (r#"{"x_min":0,"y_min":0,"x_max":null,"y_max":10}"#, "x_max"),
        (r#"{"x_min":0,"y_min":0,"x_max":10}"#, "y_max"),
        ("[]", "JSON"),
        ("", "JSON"),
    ] {
        let msg = expect_error(post(body), Status::BadRequest);
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let huge = format!(r#"{{"x_min":0,"y_min":0,"x_max":10,"y_max":10,"pad":"{}"}}"#, "x".repeat(100_000));
    expect_error(post(&huge), Status::BadRequest);
    // Form without the file.
    let (ct, body) = multipart(&[Part::Text("other", "1")]);
    let msg = expect_error(app.client.post("/upload_image").header(ct).body(body).dispatch(), Status::BadRequest);
    assert!(msg.contains("image"), "{msg}");
}

#[rocket::get("/boom")]
fn boom() -> &'static str {
    panic!("a bug in a handler")
}

#[test]
fn a_panicking_handler_answers_500_json_and_the_server_lives_on() {
    let (figment, _temp) = test_figment(&[]);
    let client = Client::tracked(drishya::build(figment).mount("/test", rocket::routes![boom])).unwrap();
    let msg = expect_error(client.get("/test/boom").dispatch(), Status::InternalServerError);
    assert!(!msg.contains("a bug"), "internal detail leaked: {msg}");
    assert_eq!(client.get("/health").dispatch().status(), Status::Ok);
}

#[test]
fn cross_site_posts_are_refused() {
    let app = logged_in();
    let forged = app
        .client
        .post("/upload_image")
        .header(Header::new("Origin", "https://evil.example"))
        .header(Header::new("Host", "drishya.example"))
        .header(ContentType::JSON)
        .body("{}")
        .dispatch();
    expect_error(forged, Status::Forbidden);
    let forged_login = app
        .client
        .post("/login")
        .header(Header::new("Sec-Fetch-Site", "cross-site"))
        .header(ContentType::Form)
        .body("password=x")
        .dispatch();
    assert_eq!(forged_login.status(), Status::Forbidden);
    let same = app
        .client
        .post("/generate_mask")
        .header(Header::new("Origin", "http://drishya.example"))
        .header(Header::new("Host", "drishya.example"))
        .header(ContentType::JSON)
        .body(r#"{"x_min":0,"y_min":0,"x_max":1,"y_max":1}"#)
        .dispatch();
    assert_ne!(same.status(), Status::Forbidden);
}

/// A POST from the page as a browser sends it through a reverse proxy that rewrote
/// `Host` to the upstream's (nginx's default `proxy_pass`).
fn proxied_post(client: &rocket::local::blocking::Client, origin: &str, extra: Option<Header<'static>>) -> Status {
    let mut request = client
        .post("/generate_mask")
        .header(Header::new("Origin", origin.to_string()))
        .header(Header::new("Host", "127.0.0.1:8000"))
        .header(Header::new("Sec-Fetch-Site", "same-origin"))
        .header(ContentType::JSON)
        .body(r#"{"x_min":0,"y_min":0,"x_max":1,"y_max":1}"#);
    if let Some(header) = extra {
        request = request.header(header);
    }
    request.dispatch().status()
}

#[test]
fn behind_a_host_rewriting_proxy_posts_work_when_configured_and_cross_site_ones_still_fail() {
    let public = "https://drishya.example.com";
    let plain = logged_in();
    assert_eq!(proxied_post(&plain.client, public, None), Status::Forbidden, "unconfigured: Host differs from Origin");
    // The proxy passes the public host on (proxy_set_header X-Forwarded-Host $host).
    let forwarded = Some(Header::new("X-Forwarded-Host", "drishya.example.com"));
    assert_ne!(proxied_post(&plain.client, public, forwarded), Status::Forbidden);
    // Or the public origin is configured.
    let app = app(&[("public_origin", "https://drishya.example.com/, https://other.example.org")]);
    login(&app.client);
    assert_ne!(proxied_post(&app.client, public, None), Status::Forbidden);
    assert_ne!(proxied_post(&app.client, "https://other.example.org", None), Status::Forbidden);
    assert_eq!(proxied_post(&app.client, "https://evil.example", None), Status::Forbidden, "other sites still refused");
    assert_eq!(proxied_post(&app.client, "http://drishya.example.com", None), Status::Forbidden, "scheme counts");
    let bad = try_app(&[("public_origin", "drishya.example.com/app")]).err().unwrap_or_default();
    assert!(!bad.is_empty(), "a malformed PUBLIC_ORIGIN stops the launch");
}

/// A flat CMYK JPEG (Adobe marker) of `width` x `height`.
fn cmyk_jpeg(width: u16, height: u16, cmyk: [u8; 4]) -> Vec<u8> {
    let data: Vec<u8> = std::iter::repeat_n(cmyk, usize::from(width) * usize::from(height)).flatten().collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90).encode(&data, width, height, jpeg_encoder::ColorType::Cmyk).unwrap();
    out
}

#[test]
fn cmyk_jpegs_are_converted_the_same_way_at_full_and_reduced_scale() {
    let app = logged_in();
    let cmyk = [20, 200, 220, 10];
    assert_eq!(upload(&app.client, "small-cmyk.jpg", &cmyk_jpeg(64, 48, cmyk)).status(), Status::Ok);
    let small = corners_pixel(&app.client);
    // 3000 px wide: decoded at reduced scale by the DCT path, with our own CMYK conversion.
    let scene = drishya_imaging::decode_scene(&cmyk_jpeg(3000, 200, cmyk), 1280).unwrap();
    assert!(scene.decode_divisor >= 2);
    let big = scene.image.get_pixel(600, 40);
    for c in 0..3 {
        assert!(small[c].abs_diff(big[c]) <= 6, "full-scale {small:?} vs reduced {big:?}");
    }
    let [r, g, b] = small.0;
    assert!(r != g || g != b, "a colour, not grey: {small:?}");
}

#[test]
fn an_animated_png_uses_its_first_frame() {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 8, 8);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_animated(2, 0).unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[200, 10, 10].repeat(64)).unwrap();
        writer.write_image_data(&[10, 10, 200].repeat(64)).unwrap();
    }
    let app = logged_in();
    assert_eq!(upload(&app.client, "anim.png", &bytes).status(), Status::Ok);
    assert_eq!(corners_pixel(&app.client), Rgb([200, 10, 10]));
}

/// `POST /login` as the front door forwards it from `peer`, with `extra` headers.
fn login_from<'c>(
    client: &'c Client,
    peer: &str,
    password: &str,
    extra: &[Header<'static>],
) -> rocket::local::blocking::LocalResponse<'c> {
    login_with_cookies(client, peer, password, extra, &[])
}

fn login_with_cookies<'c>(
    client: &'c Client,
    peer: &str,
    password: &str,
    extra: &[Header<'static>],
    cookies: &[rocket::http::Cookie<'static>],
) -> rocket::local::blocking::LocalResponse<'c> {
    let mut request = client
        .post("/login")
        .header(ContentType::Form)
        .header(Header::new(drishya::front::PEER_HEADER, peer.to_string()))
        .body(format!("password={}", password.replace(' ', "+")));
    for header in extra {
        request = request.header(header.clone());
    }
    for cookie in cookies {
        request = request.cookie(cookie.clone());
    }
    request.dispatch()
}

#[test]
fn a_spoofed_forwarding_header_does_not_escape_the_login_throttle() {
    let app = app(&[("models", "")]);
    let peer = "198.51.100.7";
    // Each attempt claims another address in the headers a proxy would set: the throttle
    // counts the peer the front door saw.
    let spoofed = |i: usize| {
        vec![Header::new("X-Real-IP", format!("10.0.0.{i}")), Header::new("X-Forwarded-For", format!("10.1.0.{i}"))]
    };
    for i in 0..5 {
        assert_eq!(login_from(&app.client, peer, "wrong", &spoofed(i)).status(), Status::Unauthorized, "attempt {i}");
    }
    let throttled = login_from(&app.client, peer, "wrong", &spoofed(5));
    assert_eq!(throttled.status(), Status::TooManyRequests);
    assert!(throttled.headers().get_one("Retry-After").is_some());
    assert!(throttled.into_string().unwrap_or_default().contains("try again in"));
    // Locked out even with the right password and yet another claimed address...
    assert_eq!(login_from(&app.client, peer, PASSWORD, &spoofed(6)).status(), Status::TooManyRequests);
    // ...while another peer logs in.
    assert_eq!(login_from(&app.client, "198.51.100.8", PASSWORD, &[]).status(), Status::SeeOther);
}

#[test]
fn a_lockout_on_a_shared_address_does_not_lock_out_browsers_that_logged_in_before() {
    use drishya::auth::{DEVICE_COOKIE, SESSION_COOKIE};
    let (figment, _temp) = test_figment(&[("models", "")]);
    let client = Client::untracked(drishya::build(figment)).unwrap();
    // Everyone behind one address (an office NAT, or a proxy not configured as trusted).
    let shared = "203.0.113.9";
    // Alice logs in and opens the app: her browser gets a device cookie.
    let login = login_from(&client, shared, PASSWORD, &[]);
    assert_eq!(login.status(), Status::SeeOther);
    let session = login.cookies().get(SESSION_COOKIE).cloned().expect("a session cookie");
    let page = client.get("/").cookie(session).dispatch();
    let device = page.cookies().get(DEVICE_COOKIE).cloned().expect("a device cookie with the app page");
    let device_header = page.headers().get("Set-Cookie").find(|c| c.starts_with(DEVICE_COOKIE)).unwrap_or_default();
    assert!(device_header.contains("HttpOnly") && device_header.contains("SameSite=Strict"), "{device_header}");
    let with_device = [device];
    let login_as_alice = |password: &str| login_with_cookies(&client, shared, password, &[], &with_device);

    // An attacker on the same address hammers the login.
    for _ in 0..5 {
        assert_eq!(login_from(&client, shared, "guess", &[]).status(), Status::Unauthorized);
    }
    assert_eq!(login_from(&client, shared, "guess", &[]).status(), Status::TooManyRequests);
    // A browser that never logged in waits out the back-off (the documented limit)...
    assert_eq!(login_from(&client, shared, PASSWORD, &[]).status(), Status::TooManyRequests);
    // ...Alice's does not.
    assert_eq!(login_as_alice(PASSWORD).status(), Status::SeeOther);
    // A device cookie not sealed by the server vouches for nothing.
    let forged = [rocket::http::Cookie::new(DEVICE_COOKIE, format!("d1.{:032x}.1.0", 7))];
    assert_eq!(login_with_cookies(&client, shared, PASSWORD, &[], &forged).status(), Status::TooManyRequests);

    // Her browser has a count of its own: guessing with it backs off too, and that does not
    // touch the other address's count.
    for _ in 0..5 {
        assert_eq!(login_as_alice("typo").status(), Status::Unauthorized);
    }
    assert_eq!(login_as_alice(PASSWORD).status(), Status::TooManyRequests);
    assert_eq!(login_from(&client, "203.0.113.10", PASSWORD, &[]).status(), Status::SeeOther);
}

#[test]
fn the_login_throttle_stays_bounded_and_fast_under_100000_addresses() {
    use drishya::auth::{ClientKey, Throttle};
    use std::time::{Duration, Instant};
    let app = app(&[("models", "")]);
    let throttle = app.client.rocket().state::<std::sync::Arc<Throttle>>().expect("the throttle is managed").clone();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut most = 0;
    for i in 0..100_000u32 {
        let address = std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let t = Instant::now();
        throttle.record_failure(ClientKey::Peer(address));
        slowest = slowest.max(t.elapsed());
        most = most.max(throttle.tracked());
        assert!(most <= 20_000, "{most} clients tracked after {i} failures");
    }
    let total = started.elapsed();
    assert!(total < Duration::from_secs(5), "100000 failures took {total:?}");
    assert!(slowest < Duration::from_millis(100), "the slowest failure took {slowest:?}");
    // The real login path, right after: quick, and the throttle still works.
    let t = Instant::now();
    assert_eq!(login_from(&app.client, "192.0.2.1", "wrong", &[]).status(), Status::Unauthorized);
    assert_eq!(login_from(&app.client, "192.0.2.2", PASSWORD, &[]).status(), Status::SeeOther);
    assert!(t.elapsed() < Duration::from_secs(1), "two logins took {:?}", t.elapsed());
}

#[test]
fn the_lockout_message_rounds_the_wait_up() {
    use drishya::auth::{ClientKey, Throttle};
    let app = app(&[("models", "")]);
    let throttle = app.client.rocket().state::<std::sync::Arc<Throttle>>().expect("the throttle is managed").clone();
    let peer = "192.0.2.50";
    // Six failures: a 2 s back-off, of which a few microseconds have passed.
    for _ in 0..6 {
        throttle.record_failure(ClientKey::Peer(peer.parse().unwrap()));
    }
    let response = login_from(&app.client, peer, "wrong", &[]);
    assert_eq!(response.status(), Status::TooManyRequests);
    assert_eq!(response.headers().get_one("Retry-After"), Some("2"));
    let page = response.into_string().unwrap_or_default();
    assert!(page.contains("try again in 2 s"), "not rounded down to 1 s: {page}");
}
