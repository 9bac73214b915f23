//! `GET /openapi.json`: the HTTP API described for programs (OpenAPI 3.1). Written by
//! hand in `openapi.json` beside this file, and held to the routes by `tests/openapi.rs`
//! (every mounted route is described, every described path is mounted). No login: it
//! says what the routes are, nothing of this deployment.

use rocket::http::{ContentType, Header};
use rocket::{Request, Route};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

struct Document;

impl<'r> rocket::response::Responder<'r, 'static> for Document {
    fn respond_to(self, request: &'r Request<'_>) -> rocket::response::Result<'static> {
        let mut response = (ContentType::JSON, DOCUMENT).respond_to(request)?;
        // It changes only with the binary.
        response.set_header(Header::new("Cache-Control", "no-cache"));
        Ok(response)
    }
}

#[get("/openapi.json")]
fn document() -> Document {
    Document
}

pub fn routes() -> Vec<Route> {
    routes![document]
}
