//! `GET /openapi.json` against the real app: every mounted route is documented and every
//! documented operation is mounted; what the document says of logins, query parameters
//! and JSON answers is what the routes do.

mod common;

use std::collections::BTreeSet;

use common::*;
use rocket::http::{ContentType, Header, Status};
use serde_json::Value;

const TOKEN: &str = "openapi-test-token-0123456789";

fn document() -> Value {
    serde_json::from_str(drishya::openapi::DOCUMENT).expect("openapi.json is JSON")
}

/// A route's path as OpenAPI writes it: `<name>` and `<name..>` become `{name}`.
fn openapi_path(rocket_path: &str) -> String {
    rocket_path
        .split('/')
        .map(|segment| match segment.strip_prefix('<').and_then(|s| s.strip_suffix('>')) {
            Some(name) => format!("{{{}}}", name.trim_end_matches("..")),
            None => segment.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// (method, path) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut set = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "options", "head", "patch", "trace"] {
            if item.get(method).is_some() {
                set.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    set
}

/// (method, path) of every route mounted in the real app, as OpenAPI writes it (the
/// static files under `/static` are the page's, not the API's).
fn mounted(app: &App) -> BTreeSet<(String, String)> {
    app.client
        .rocket()
        .routes()
        .filter(|route| !route.uri.path().starts_with("/static/"))
        .map(|route| (route.method.as_str().to_string(), openapi_path(route.uri.path())))
        .collect()
}

/// A route mounted by anyone, now or later, fails this until it is described.
#[test]
fn every_mounted_route_is_documented() {
    let app = app(&[]);
    let doc = document();
    let undocumented: Vec<_> = mounted(&app).difference(&documented(&doc)).cloned().collect();
    assert!(undocumented.is_empty(), "mounted but not in src/openapi.json: {undocumented:?}");
    // A route's query parameters are the documented ones. A `<name..>` takes a whole
    // form of fields the route's text does not show: then only the named ones are held.
    for route in app.client.rocket().routes() {
        let path = openapi_path(route.uri.path());
        let op = &doc["paths"][&path][route.method.as_str().to_lowercase()];
        let documented: BTreeSet<String> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect();
        let query = route.uri.query().map(|q| q.to_string()).unwrap_or_default();
        let dynamic: Vec<&str> = query.split('&').filter_map(|s| s.strip_prefix('<')?.strip_suffix('>')).collect();
        let named: BTreeSet<String> = dynamic.iter().filter(|n| !n.ends_with("..")).map(|n| n.to_string()).collect();
        let missing: Vec<_> = named.difference(&documented).collect();
        assert!(missing.is_empty(), "{path}: query {missing:?} not documented");
        if dynamic.iter().all(|n| !n.ends_with("..")) {
            let extra: Vec<_> = documented.difference(&named).collect();
            assert!(extra.is_empty(), "{path}: documented query {extra:?} is not the route's");
        }
    }
}

/// The document promises nothing the app does not serve.
#[test]
fn every_documented_route_is_mounted() {
    let app = app(&[]);
    let unmounted: Vec<_> = documented(&document()).difference(&mounted(&app)).cloned().collect();
    assert!(unmounted.is_empty(), "in src/openapi.json but not mounted: {unmounted:?}");
}

#[test]
fn the_document_is_served_without_a_login_and_hangs_together() {
    let app = app(&[]);
    let response = app.client.get("/openapi.json").dispatch();
    assert_eq!(response.status(), Status::Ok);
    assert_eq!(response.content_type(), Some(ContentType::JSON));
    let served: Value = serde_json::from_str(&response.into_string().unwrap()).unwrap();
    let doc = document();
    assert_eq!(served, doc);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);

    // Every $ref points at something there.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    out.push(target);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut targets = Vec::new();
    refs(&doc, &mut targets);
    assert!(!targets.is_empty());
    for target in targets {
        let pointer = target.strip_prefix('#').unwrap_or_else(|| panic!("not a local $ref: {target}"));
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {target}");
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path}: no responses");
            assert!(op["operationId"].is_string(), "{method} {path}: no operationId");
            let security = op["security"].as_array().unwrap_or_else(|| panic!("{method} {path}: no security"));
            for requirement in security {
                for scheme in requirement.as_object().unwrap().keys() {
                    assert!(schemes.contains_key(scheme), "{method} {path}: unknown scheme {scheme}");
                }
            }
        }
    }
}

/// Whether the document lets `method path` be called without credentials (`{}` among its
/// security requirements).
fn anonymous_allowed(doc: &Value, method: &str, path: &str) -> bool {
    let security = doc["paths"][path][method]["security"].as_array().cloned().unwrap_or_default();
    security.iter().any(|r| r.as_object().is_some_and(|o| o.is_empty()))
}

#[test]
fn what_the_document_says_of_logins_is_what_the_routes_do() {
    let app = app(&[("api_tokens", TOKEN)]);
    let client = &app.client;
    let doc = document();
    let paths = doc["paths"].as_object().unwrap();
    // Documented routes not mounted are the first test's finding, not this one's.
    let mounted: BTreeSet<(String, String)> =
        client.rocket().routes().map(|r| (r.method.as_str().to_lowercase(), openapi_path(r.uri.path()))).collect();
    for (path, item) in paths {
        if path.contains('{') {
            continue;
        }
        for method in ["get", "post"] {
            if item.get(method).is_none() || !mounted.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let request = match method {
                "get" => client.get(path.as_str()),
                _ => client.post(path.as_str()).header(ContentType::JSON).body("{}"),
            };
            let response = request.dispatch();
            let status = response.status();
            if anonymous_allowed(&doc, method, path) {
                // (The login form's own 401 is its wrong-password page, not a demand for a login.)
                let body = response.into_string().unwrap_or_default();
                let demands_login = status == Status::Unauthorized && body.contains("login required");
                assert!(!demands_login, "{method} {path} is documented as open");
            } else {
                assert_eq!(status, Status::Unauthorized, "{method} {path} is documented as needing a login");
                let documented_401 = item[method]["responses"].get("401").is_some();
                assert!(documented_401, "{method} {path}: its 401 is not documented");
                // And the API token opens it (no 401 with a valid one).
                let bearer = Header::new("Authorization", format!("Bearer {TOKEN}"));
                let request = match method {
                    "get" => client.get(path.as_str()),
                    _ => client.post(path.as_str()).header(ContentType::JSON).body("{}"),
                };
                assert_ne!(
                    request.header(bearer).dispatch().status(),
                    Status::Unauthorized,
                    "{method} {path} with a token"
                );
            }
        }
    }
}

/// The keys of the documented schema `name`.
fn schema_keys(doc: &Value, name: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][name]["properties"].as_object().unwrap().keys().cloned().collect()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap_or_else(|| panic!("not an object: {value}")).keys().cloned().collect()
}

#[test]
fn the_json_answers_have_the_documented_shapes() {
    let app = app(&[("api_tokens", TOKEN)]);
    let client = &app.client;
    let doc = document();
    let bearer = || Header::new("Authorization", format!("Bearer {TOKEN}"));
    let coffee = read(&shared("images/coffee.png"));
    let (ct, body) =
        multipart(&[Part::File { name: "image", filename: "c.png", content_type: "image/png", bytes: &coffee }]);
    let uploaded = json_of(client.post("/upload_image").header(bearer()).header(ct).body(body).dispatch());
    assert_eq!(keys(&uploaded), schema_keys(&doc, "Uploaded"));
    let mask = r#"{"x_min":165,"y_min":10,"x_max":415,"y_max":300}"#;
    let masked =
        json_of(client.post("/generate_mask").header(bearer()).header(ContentType::JSON).body(mask).dispatch());
    assert_eq!(keys(&masked), schema_keys(&doc, "Masked"));
    assert_eq!(keys(&masked["box"]), schema_keys(&doc, "IntBox"));
    let product = png_bytes(&image::RgbImage::from_pixel(40, 80, image::Rgb([20, 160, 60])));
    let (ct, body) = multipart(&[Part::File {
        name: "product_image",
        filename: "p.png",
        content_type: "image/png",
        bytes: &product,
    }]);
    let replaced = json_of(client.post("/replace_product").header(bearer()).header(ct).body(body).dispatch());
    assert_eq!(keys(&replaced), schema_keys(&doc, "Replaced"));
    assert_eq!(keys(&json_of(client.get("/health").dispatch())), schema_keys(&doc, "Health"));
    assert_eq!(keys(&json_of(client.get("/ready").dispatch())), schema_keys(&doc, "Ready"));
    let error = json_of(client.get("/get_image").dispatch());
    assert_eq!(keys(&error), schema_keys(&doc, "Error"));
}
