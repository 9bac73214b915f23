//! The one place where errors of every layer become HTTP answers.
//!
//! Each concern has its own error enum (image decoding, segmentation, compositing,
//! storage, request input). [`ApiError`] wraps them; `Status::from(&ApiError)` is the
//! single mapping to status codes; the responder logs the detail and sends only
//! `{"error": "<short message>"}` (internal details never reach the client).

use rocket::http::{Header, Status};
use rocket::request::Request;
use rocket::response::{self, Responder};
use rocket::serde::json::Json;
use serde_json::json;

use crate::composite::CompositeError;
use crate::imaging::ImageError;
use crate::segment::SegmentError;
use crate::storage::StorageError;

/// A request field that was missing or out of range.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("request body is not valid JSON for this route: {0}")]
    MalformedJson(String),
    #[error("'{field}' {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("'{0}' is required")]
    MissingField(&'static str),
    #[error("upload is larger than the {limit_mb} MB limit")]
    TooLarge { limit_mb: u64 },
    #[error("malformed form data: {0}")]
    MalformedForm(String),
}

impl InputError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        InputError::InvalidField { field, reason: reason.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Composite(#[from] CompositeError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Busy(#[from] crate::gate::Busy),
    #[error("the server could not finish this request")]
    Internal(String),
}

impl From<&ApiError> for Status {
    fn from(error: &ApiError) -> Status {
        match error {
            ApiError::Input(InputError::TooLarge { .. }) => Status::PayloadTooLarge,
            ApiError::Input(_) => Status::BadRequest,
            ApiError::Image(e) => e.status(),
            ApiError::Segment(e) => e.status(),
            ApiError::Composite(_) => Status::BadRequest,
            ApiError::Storage(e) => e.status(),
            ApiError::Busy(_) => Status::ServiceUnavailable,
            ApiError::Internal(_) => Status::InternalServerError,
        }
    }
}

impl ApiError {
    /// The message the client sees: the error's own text for client errors, a short
    /// generic sentence for server-side failures (the detail goes to the log).
    fn public_message(&self) -> String {
        match self {
            ApiError::Storage(e) => e.public_message().to_string(),
            ApiError::Internal(_) => "internal error: the server could not finish this request".into(),
            other => other.to_string(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Segment(e) => e.retry_after(),
            ApiError::Storage(e) => e.retry_after(),
            ApiError::Busy(busy) => Some(busy.retry_after),
            _ => None,
        }
    }
}

impl<'r> Responder<'r, 'static> for ApiError {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        let status = Status::from(&self);
        if status.code >= 500 {
            log::error!("{} {} -> {}: {:?}", request.method(), request.uri().path(), status.code, self);
        } else {
            log::info!("{} {} -> {}: {}", request.method(), request.uri().path(), status.code, self);
        }
        let mut response = Json(json!({ "error": self.public_message() })).respond_to(request)?;
        response.set_status(status);
        if let Some(seconds) = self.retry_after() {
            response.set_header(Header::new("Retry-After", seconds.to_string()));
        }
        Ok(response)
    }
}

/// Shorthand for route results.
pub type ApiResult<T> = Result<T, ApiError>;
