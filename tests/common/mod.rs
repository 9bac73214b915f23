//! Helpers shared by the integration tests: the real app on a real config, logins,
//! multipart bodies, the shared photos and models.
#![allow(dead_code)]

pub mod fixtures;
pub mod process;
pub mod s3;

pub use fixtures::*;

use image::RgbImage;
use rocket::figment::Figment;
use rocket::http::{ContentType, Status};
use rocket::local::blocking::{Client, LocalResponse};

pub const PASSWORD: &str = "correct horse battery staple";

/// A running app: its client and the temp dir it owns.
pub struct App {
    pub client: Client,
    pub temp: tempfile::TempDir,
}

/// The real app with `settings` (config keys, lower case) on top of test defaults.
pub fn app(settings: &[(&str, &str)]) -> App {
    try_app(settings).unwrap_or_else(|e| panic!("the app should ignite: {e}"))
}

/// The test configuration: the real defaults, a temp dir, U²-Net-p, then `settings`
/// (config keys in lower case, values parsed like environment variables).
pub fn test_figment(settings: &[(&str, &str)]) -> (Figment, tempfile::TempDir) {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut figment = Figment::from(rocket::Config::debug_default())
        .merge(("log_level", "critical"))
        .merge(("app_password", PASSWORD))
        .merge(("artefact_dir", temp.path().join("artefacts")))
        .merge(("model_cache_dir", temp.path().join("cache")))
        .merge(("models", u2netp()))
        .merge(("template_dir", concat!(env!("CARGO_MANIFEST_DIR"), "/templates")));
    for (key, value) in settings {
        let value: rocket::figment::value::Value = value.parse().expect("figment values always parse");
        figment = figment.merge((*key, value));
    }
    (drishya::config::with_upload_limits(figment), temp)
}

/// The app, or why it refused to ignite.
pub fn try_app(settings: &[(&str, &str)]) -> Result<App, String> {
    let (figment, temp) = test_figment(settings);
    // `kind()` marks Rocket's error as handled (an unhandled one panics on drop).
    let client = Client::tracked(drishya::build(figment)).map_err(|e| e.kind().to_string())?;
    Ok(App { client, temp })
}

/// Logs in; panics if the login is refused.
pub fn login(client: &Client) {
    let response =
        client.post("/login").header(ContentType::Form).body(format!("password={}", urlencode(PASSWORD))).dispatch();
    assert_eq!(response.status(), Status::SeeOther, "login should redirect");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One multipart part: a text field or a file.
pub enum Part<'a> {
    Text(&'a str, &'a str),
    File { name: &'a str, filename: &'a str, content_type: &'a str, bytes: &'a [u8] },
}

pub fn multipart(parts: &[Part<'_>]) -> (ContentType, Vec<u8>) {
    const BOUNDARY: &str = "drishya-test-boundary-7d91";
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
                );
            }
            Part::File { name, filename, content_type, bytes } => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n")
                        .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    let ct = ContentType::new("multipart", "form-data").with_params(("boundary", BOUNDARY));
    (ct, body)
}

pub fn upload<'c>(client: &'c Client, filename: &str, bytes: &[u8]) -> LocalResponse<'c> {
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename, content_type: "application/octet-stream", bytes }]);
    client.post("/upload_image").header(ct).body(body).dispatch()
}

pub fn json_of(response: LocalResponse<'_>) -> serde_json::Value {
    let text = response.into_string().unwrap_or_default();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts `{"error": "..."}` with the status, returns the message.
pub fn expect_error(response: LocalResponse<'_>, status: Status) -> String {
    let got = response.status();
    let json = json_of(response);
    assert_eq!(got, status, "body: {json}");
    json["error"].as_str().unwrap_or_else(|| panic!("no error field: {json}")).to_string()
}

pub fn generate_mask<'c>(client: &'c Client, b: [i64; 4]) -> LocalResponse<'c> {
    let body = serde_json::json!({"x_min": b[0], "y_min": b[1], "x_max": b[2], "y_max": b[3]});
    client.post("/generate_mask").header(ContentType::JSON).body(body.to_string()).dispatch()
}

/// A product to paste: a green bottle (body and neck) on transparency, 120x240, as PNG.
pub fn product_png() -> Vec<u8> {
    let mut product = image::RgbaImage::new(120, 240);
    for (x, y, p) in product.enumerate_pixels_mut() {
        let inside = (x as i32 - 60).abs() < 40 || (y < 60 && (x as i32 - 60).abs() < 15);
        *p = if inside { image::Rgba([20, 160, 60, 255]) } else { image::Rgba([0, 0, 0, 0]) };
    }
    drishya_imaging::encode_png(&product).expect("png")
}

pub fn png_bytes(image: &RgbImage) -> Vec<u8> {
    drishya_imaging::encode_png(image).expect("png")
}

pub fn decode(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory(bytes).expect("an image")
}

/// A tiny valid ONNX graph of neither family: `y = relu(x)`, x: float[1, 4].
pub fn relu_onnx() -> Vec<u8> {
    use prost::Message;
    use tract_onnx::pb::{
        tensor_shape_proto::{dimension, Dimension},
        type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
    };
    let value_info = |name: &str| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: [1, 4]
                        .iter()
                        .map(|&d| Dimension { value: Some(dimension::Value::DimValue(d)), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(GraphProto {
            name: "relu".into(),
            node: vec![NodeProto {
                name: "relu".into(),
                op_type: "Relu".into(),
                input: vec!["x".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            input: vec![value_info("x")],
            output: vec![value_info("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

/// Serves `body` over HTTP/1.1 on 127.0.0.1 for any number of requests; returns the URL base.
pub fn serve_bytes(body: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://127.0.0.1:{port}")
}
