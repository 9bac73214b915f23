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

pub use drishya_imaging::params::InputError;
use drishya_imaging::{BadBox, CompositeError, ImageError};
use drishya_segment::SegmentError;

use crate::gate::Busy;
use crate::models::MaskError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    BadBox(#[from] BadBox),
    #[error(transparent)]
    Mask(#[from] MaskError),
    #[error(transparent)]
    Composite(#[from] CompositeError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("the server could not finish this request")]
    Internal(String),
}

impl From<&ApiError> for Status {
    fn from(error: &ApiError) -> Status {
        match error {
            ApiError::Input(InputError::TooLarge { .. }) => Status::PayloadTooLarge,
            ApiError::Input(_) | ApiError::BadBox(_) | ApiError::Composite(_) => Status::BadRequest,
            ApiError::Image(e) => match e {
                ImageError::Unsupported => Status::UnsupportedMediaType,
                ImageError::Empty | ImageError::Corrupt { .. } => Status::BadRequest,
                ImageError::TooManyPixels { .. } => Status::PayloadTooLarge,
                ImageError::Processing(_) => Status::InternalServerError,
            },
            ApiError::Mask(MaskError::Busy { .. } | MaskError::Unavailable(_)) => Status::ServiceUnavailable,
            ApiError::Mask(MaskError::Model(e)) => match e {
                SegmentError::Unavailable(_) => Status::ServiceUnavailable,
                SegmentError::Inference(_) => Status::InternalServerError,
            },
            ApiError::Storage(e) => match e {
                StorageError::NotFound(_) => Status::NotFound,
                StorageError::Full(_) => Status::InsufficientStorage,
                StorageError::CapReached | StorageError::Unavailable(_) => Status::ServiceUnavailable,
                StorageError::ReadOnly(_)
                | StorageError::Io(_)
                | StorageError::Denied(_)
                | StorageError::Rejected(_) => Status::InternalServerError,
            },
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
            ApiError::Mask(MaskError::Busy { retry_after }) => Some(*retry_after),
            // A model that is not there now will not be there in a second or two.
            ApiError::Mask(MaskError::Unavailable(_) | MaskError::Model(SegmentError::Unavailable(_))) => Some(30),
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
