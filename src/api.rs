//! The Flask app's JSON routes: upload, mask, replace, and the artefact downloads.
//! Handlers parse the request, pass the upload gate, call the step of flow.rs and answer
//! in the Flask app's JSON; errors become answers in error.rs.

use std::sync::Arc;
use std::time::Instant;

use drishya_imaging::composite::Settings;
use drishya_imaging::params::{self, ReplaceFields};
use drishya_imaging::BoxPrompt;
use drishya_segment::ModelKind;
use rocket::data::{Data, ToByteUnit};
use rocket::form::{Errors, Form};
use rocket::fs::TempFile;
use rocket::http::{ContentType, Header, Status};
use rocket::serde::json::{json, Json, Value};
use rocket::tokio::io::AsyncReadExt;
use rocket::{Catcher, Request, Route, State};

use crate::auth::User;
use crate::config::AppConfig;
use crate::error::{ApiError, ApiResult, InputError};
use crate::flow::{self, Session};
use crate::gate::{Busy, ImageJobs, UploadSlot};
use crate::models::ModelManager;
use crate::storage::{Artefact, Artefacts, StorageError};

type Store = State<Arc<Artefacts>>;

fn session<'a>(store: &'a Store, user: &'a User) -> Session<'a> {
    Session { store: store.inner(), id: &user.session }
}

/// A form that could not be read: too large (413) or malformed (400).
pub(crate) fn form_error(errors: &Errors<'_>, cfg: &AppConfig) -> ApiError {
    if errors.status() == Status::PayloadTooLarge {
        return InputError::TooLarge { limit_mb: cfg.max_upload_mb }.into();
    }
    let first = errors.iter().next().map(|e| e.to_string()).unwrap_or_default();
    InputError::MalformedForm(first).into()
}

/// A file field: too large (413), a disk that could not take it (the store's error),
/// missing (400 naming it), or the file.
pub(crate) fn file_field<'a, 'r>(
    field: &'a rocket::form::Result<'r, TempFile<'r>>,
    name: &'static str,
    cfg: &AppConfig,
) -> ApiResult<&'a TempFile<'r>> {
    let errors = match field {
        Ok(file) => return Ok(file),
        Err(errors) if errors.status() == Status::PayloadTooLarge => return Err(form_error(errors, cfg)),
        Err(errors) => errors,
    };
    // Rocket writes uploads under TEMP_DIR too: a full or read-only disk shows up here.
    for error in errors.iter() {
        if let rocket::form::error::ErrorKind::Io(io) = &error.kind {
            let io = std::io::Error::new(io.kind(), io.to_string());
            return Err(StorageError::from_write(io).into());
        }
    }
    Err(InputError::MissingField(name).into())
}

/// The whole upload, read from Rocket's temp file (already capped by the `file` limit).
pub(crate) async fn read_upload(file: &TempFile<'_>) -> ApiResult<Vec<u8>> {
    let mut bytes = Vec::with_capacity(usize::try_from(file.len()).unwrap_or(0));
    let mut reader = file.open().await.map_err(|e| ApiError::Internal(format!("reading upload: {e}")))?;
    reader.read_to_end(&mut bytes).await.map_err(|e| ApiError::Internal(format!("reading upload: {e}")))?;
    Ok(bytes)
}

#[derive(FromForm)]
struct UploadForm<'r> {
    image: rocket::form::Result<'r, TempFile<'r>>,
}

#[post("/upload_image", data = "<form>")]
async fn upload_image(
    user: User,
    slot: UploadSlot,
    form: Result<Form<UploadForm<'_>>, Errors<'_>>,
    cfg: &State<AppConfig>,
    store: &Store,
    jobs: &State<ImageJobs>,
    models: &State<Arc<ModelManager>>,
) -> ApiResult<Json<Value>> {
    let form = form.map_err(|e| form_error(&e, cfg))?;
    let file = file_field(&form.image, "image", cfg)?;
    // This session is not evicted for the byte cap while its request runs.
    let _pin = store.pin(&user.session);
    // The upload stays on disk until this job may run: only admitted jobs hold pixels.
    let _pass = jobs.enter_with(file, slot).await?;
    let bytes = read_upload(file).await?;
    let up = flow::upload(session(store, &user), models, bytes, cfg.max_image_width).await?;
    // `original_*` is the size the box is drawn in, as the Flask server meant it: its
    // client scales the canvas box by original_width / canvas.width. The photo's own
    // size goes under `source_*`.
    Ok(Json(json!({
        "success": true,
        "width": up.width,
        "height": up.height,
        "original_width": up.width,
        "original_height": up.height,
        "source_width": up.source_width,
        "source_height": up.source_height,
    })))
}

#[post("/generate_mask", data = "<body>")]
async fn generate_mask(
    user: User,
    body: Data<'_>,
    store: &Store,
    models: &State<Arc<ModelManager>>,
    jobs: &State<ImageJobs>,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let body =
        body.open(64.kibibytes()).into_bytes().await.map_err(|e| ApiError::Internal(format!("reading body: {e}")))?;
    if !body.is_complete() {
        return Err(InputError::MalformedJson("the body is larger than 64 KiB".into()).into());
    }
    let coords = params::parse_box(&body)?;
    let _pin = store.pin(&user.session);
    let masked = flow::mask(session(store, &user), jobs, models, coords).await?;
    let (bbox, model) = match masked.found {
        Some((r, model)) => {
            (Some(json!({"x_min": r.x, "y_min": r.y, "x_max": r.x + r.w, "y_max": r.y + r.h})), Some(model))
        }
        None => (None, None),
    };
    Ok(Json(json!({
        "success": true,
        "mask_pixels": masked.area,
        "bbox": bbox,
        "box": prompt_json(masked.prompt),
        "model": model.as_ref().map(|m| m.name.clone()),
        "kind": model.as_ref().map(|m| m.kind),
        "fallback": model.as_ref().map(|m| m.kind == ModelKind::Box),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })))
}

fn prompt_json(p: BoxPrompt) -> Value {
    json!({"x_min": p.x_min, "y_min": p.y_min, "x_max": p.x_max, "y_max": p.y_max})
}

#[derive(FromForm)]
struct ReplaceForm<'r> {
    product_image: rocket::form::Result<'r, TempFile<'r>>,
    scale_factor: Option<&'r str>,
    use_blending: Option<&'r str>,
    feather_amount: Option<&'r str>,
    enable_color_grading: Option<&'r str>,
    color_grade_strength: Option<&'r str>,
    grading_method: Option<&'r str>,
}

impl<'r> ReplaceForm<'r> {
    fn settings(&self) -> Result<Settings, InputError> {
        params::parse_settings(&ReplaceFields {
            scale_factor: self.scale_factor,
            use_blending: self.use_blending,
            feather_amount: self.feather_amount,
            enable_color_grading: self.enable_color_grading,
            color_grade_strength: self.color_grade_strength,
            grading_method: self.grading_method,
        })
    }
}

#[post("/replace_product", data = "<form>")]
async fn replace_product(
    user: User,
    slot: UploadSlot,
    form: Result<Form<ReplaceForm<'_>>, Errors<'_>>,
    cfg: &State<AppConfig>,
    store: &Store,
    jobs: &State<ImageJobs>,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let form = form.map_err(|e| form_error(&e, cfg))?;
    let settings = form.settings()?;
    let file = file_field(&form.product_image, "product_image", cfg)?;
    let _pin = store.pin(&user.session);
    let _pass = jobs.enter_with(file, slot).await?;
    let bytes = read_upload(file).await?;
    let (width, height) = flow::replace(session(store, &user), bytes, settings).await?;
    Ok(Json(json!({
        "success": true,
        "width": width,
        "height": height,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })))
}

/// A PNG artefact, never cached by the browser (it changes under the same URL).
struct Png {
    bytes: Vec<u8>,
    attachment: bool,
}

impl<'r> rocket::response::Responder<'r, 'static> for Png {
    fn respond_to(self, request: &'r Request<'_>) -> rocket::response::Result<'static> {
        let mut response = (ContentType::PNG, self.bytes).respond_to(request)?;
        response.set_header(Header::new("Cache-Control", "no-store"));
        if self.attachment {
            response
                .set_header(Header::new("Content-Disposition", "attachment; filename=\"product_replaced_image.png\""));
        }
        Ok(response)
    }
}

async fn artefact(store: &Store, user: User, which: Artefact, attachment: bool) -> ApiResult<Png> {
    Ok(Png { bytes: flow::artefact(session(store, &user), which).await?, attachment })
}

#[get("/get_image")]
async fn get_image(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user, Artefact::Image, false).await
}

#[get("/get_mask_visualization")]
async fn get_mask_visualization(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user, Artefact::MaskOverlay, false).await
}

#[get("/get_result_image")]
async fn get_result_image(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user, Artefact::Result, false).await
}

#[get("/download_result")]
async fn download_result(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user, Artefact::Result, true).await
}

pub fn routes() -> Vec<Route> {
    routes![
        upload_image,
        generate_mask,
        replace_product,
        get_image,
        get_mask_visualization,
        get_result_image,
        download_result
    ]
}

/// Every error Rocket produces itself (no route, no login, body too large, ...) as JSON.
#[catch(default)]
fn json_catcher(status: Status, request: &Request<'_>) -> Result<(Status, (ContentType, String)), ApiError> {
    if let Some(busy) = *request.local_cache(|| None::<Busy>) {
        return Err(ApiError::from(busy));
    }
    let message = match status.code {
        400 => "bad request: the request could not be understood",
        401 => "login required",
        403 => "forbidden",
        404 => "not found",
        413 => "upload too large",
        415 => "unsupported media type",
        422 => "the request's data could not be processed: check field names and types",
        429 => "too many requests",
        503 => "service unavailable",
        _ if status.code >= 500 => "internal error",
        _ => status.reason().unwrap_or("error"),
    };
    if status.code >= 500 {
        log::error!("{} {} -> {}", request.method(), request.uri().path(), status.code);
    }
    Ok((status, (ContentType::JSON, json!({ "error": message }).to_string())))
}

pub fn catchers() -> Vec<Catcher> {
    catchers![json_catcher]
}
