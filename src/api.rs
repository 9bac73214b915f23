//! The Flask app's JSON routes: upload, mask, replace, and the artefact downloads.
//! Handlers only parse, call the pipeline, and map errors; heavy work runs on the
//! blocking pool.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;
use rocket::data::{Data, ToByteUnit};
use rocket::fairing::AdHoc;
use rocket::form::{Errors, Form};
use rocket::fs::TempFile;
use rocket::http::{ContentType, Header, Status};
use rocket::request::{FromRequest, Outcome};
use rocket::serde::json::{json, Json, Value};
use rocket::tokio::io::AsyncReadExt;
use rocket::tokio::task::spawn_blocking;
use rocket::{Catcher, Request, Route, State};

use crate::auth::User;
use crate::composite::{self, Settings};
use crate::config::AppConfig;
use crate::error::{ApiError, ApiResult, InputError};
use crate::gate::{Admitted, Busy, Gate, Pass};
use crate::imaging;
use crate::models::ModelManager;
use crate::params::{self, ReplaceFields};
use crate::segment::{self, BoxPrompt};
use crate::storage::{self, Artefact, Artefacts, SessionId, StorageError};

type Store = State<Arc<Artefacts>>;

/// Seconds a client is told to wait when the image queue is full.
const IMAGE_RETRY_SECS: u64 = 2;

/// The gate for heavy image work (decode, composite, PNG encode): each admitted job
/// may hold a few decoded images, so their number is what bounds memory.
pub struct ImageJobs(Gate);

impl ImageJobs {
    /// The gate itself (tests fill it to check what a full queue does).
    pub fn gate(&self) -> &Gate {
        &self.0
    }

    fn admit(&self) -> Result<Admitted, Busy> {
        self.0.admit(IMAGE_RETRY_SECS)
    }

    async fn run(admitted: Admitted) -> Result<Pass, Busy> {
        admitted.run().await.ok_or(Busy { retry_after: IMAGE_RETRY_SECS })
    }

    /// Waits for a place for a job on `upload`, then lets the next upload in. While the
    /// job waits in the queue, the upload's file is flushed and dropped from the page
    /// cache, which the container's memory cgroup counts: 64 queued 4 MB uploads were
    /// ~250 MB of it.
    async fn enter_with(&self, upload: &TempFile<'_>, slot: UploadSlot) -> Result<Pass, Busy> {
        let busy = Busy { retry_after: IMAGE_RETRY_SECS };
        match self.0.admit(IMAGE_RETRY_SECS)?.try_run() {
            Ok(pass) => Ok(pass),
            Err(queued) => {
                if let Some(path) = upload.path().map(Path::to_path_buf) {
                    // Best effort: a failure only leaves the pages cached.
                    let _ = spawn_blocking(move || storage::uncache(&path)).await;
                }
                drop(slot);
                queued.run().await.ok_or(busy)
            }
        }
    }
}

/// Uploads whose bodies are read at the same time. A request guard, so it is taken
/// before Rocket reads the body (data guards come last): the bodies of the others wait
/// in their sockets instead of the page cache.
const UPLOADS_AT_ONCE: usize = 4;

struct UploadGate(Gate);

/// A place to receive an upload's body (see `UPLOADS_AT_ONCE`).
pub struct UploadSlot(#[allow(dead_code)] Pass);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for UploadSlot {
    type Error = Busy;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Busy> {
        let Some(gate) = request.rocket().state::<UploadGate>() else {
            return Outcome::Error((Status::InternalServerError, Busy { retry_after: IMAGE_RETRY_SECS }));
        };
        match gate.0.enter(IMAGE_RETRY_SECS).await {
            Ok(pass) => Outcome::Success(UploadSlot(pass)),
            Err(busy) => {
                // For the catcher: the 503 carries Retry-After like every other "busy".
                request.local_cache(|| Some(busy));
                Outcome::Error((Status::ServiceUnavailable, busy))
            }
        }
    }
}

/// Manages the image-job gate from `IMAGE_CONCURRENCY` / `IMAGE_QUEUE`.
pub fn stage() -> AdHoc {
    AdHoc::on_ignite("Image job gate", |rocket| async move {
        let Some((running, queue)) = rocket.state::<AppConfig>().map(|c| (c.image_concurrency, c.image_queue)) else {
            return rocket;
        };
        rocket.manage(ImageJobs(Gate::new(running, queue))).manage(UploadGate(Gate::new(UPLOADS_AT_ONCE, queue)))
    })
}

/// Runs blocking work off the async workers; a panic inside becomes a 500, not a crash.
async fn blocking<T, F>(work: F) -> ApiResult<T>
where
    F: FnOnce() -> ApiResult<T> + Send + 'static,
    T: Send + 'static,
{
    spawn_blocking(work).await.map_err(|e| ApiError::Internal(format!("worker task failed: {e}")))?
}

fn form_error(errors: &Errors<'_>, cfg: &AppConfig) -> ApiError {
    if errors.status() == Status::PayloadTooLarge {
        return InputError::TooLarge { limit_mb: cfg.max_upload_mb }.into();
    }
    let first = errors.iter().next().map(|e| e.to_string()).unwrap_or_default();
    InputError::MalformedForm(first).into()
}

/// A file field: too large (413), missing (400 naming it), or the file.
fn file_field<'a, 'r>(
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
async fn read_upload(file: &TempFile<'_>) -> ApiResult<Vec<u8>> {
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
) -> ApiResult<Json<Value>> {
    let form = form.map_err(|e| form_error(&e, cfg))?;
    let file = file_field(&form.image, "image", cfg)?;
    // This session is not evicted for the byte cap while its request runs.
    let _pin = store.pin(&user.session);
    // The upload stays on disk until this job may run: only admitted jobs hold pixels.
    let _pass = jobs.enter_with(file, slot).await?;
    let bytes = read_upload(file).await?;
    let max_width = cfg.max_image_width;
    let store = store.inner().clone();
    let session = user.session;
    blocking(move || {
        let scene = imaging::decode_scene(&bytes, max_width)?;
        drop(bytes);
        let png = imaging::encode_png(&scene.image)?;
        store.remove(&session, &[Artefact::Mask, Artefact::MaskOverlay, Artefact::Result])?;
        store.write(&session, Artefact::Image, &png)?;
        let (width, height) = scene.image.dimensions();
        // `original_*` is the size the box is drawn in, as the Flask server meant it: its
        // client scales the canvas box by original_width / canvas.width. The photo's own
        // size goes under `source_*`.
        Ok(Json(json!({
            "success": true,
            "width": width,
            "height": height,
            "original_width": width,
            "original_height": height,
            "source_width": scene.original_width,
            "source_height": scene.original_height,
        })))
    })
    .await
}

/// Loads the session's working image.
fn load_scene(store: &Artefacts, session: &SessionId) -> ApiResult<RgbImage> {
    Ok(decode_scene(&store.read(session, Artefact::Image)?)?)
}

fn decode_scene(png: &[u8]) -> Result<RgbImage, imaging::ImageError> {
    Ok(imaging::decode_png(png)?.into_rgb8())
}

/// A key for the model's per-image cache (the SAM embedding): the working image's
/// content, so that the same scene read on any replica, from any store, finds it.
fn content_key(png: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(png).iter().map(|b| format!("{b:02x}")).collect()
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
    // One queue place from here to the end: a computed mask is never thrown away for
    // want of a place to encode it (the running place is given back during inference).
    let pass = ImageJobs::run(jobs.admit()?).await?;
    let (scene, key) = {
        let store = store.inner().clone();
        let session = user.session.clone();
        blocking(move || {
            let png = store.read(&session, Artefact::Image)?;
            Ok((decode_scene(&png)?, content_key(&png)))
        })
        .await?
    };
    let paused = pass.pause();
    let prompt = segment::clip_box(coords, scene.width(), scene.height())?;
    let scene = Arc::new(scene);
    let outcome = models.segment(scene.clone(), key, prompt).await?;
    let _pass = ImageJobs::run(paused).await?;
    let store = store.inner().clone();
    let session = user.session;
    let (area, bbox) = blocking(move || {
        let area = segment::mask_area(&outcome.mask);
        let bbox = composite::mask_bbox(&outcome.mask);
        store.write(&session, Artefact::Mask, &imaging::encode_png(&outcome.mask)?)?;
        let overlay = imaging::mask_overlay(&scene, &outcome.mask);
        store.write(&session, Artefact::MaskOverlay, &imaging::encode_png(&overlay)?)?;
        store.remove(&session, &[Artefact::Result])?;
        Ok((area, bbox.map(|r| (r, outcome.model))))
    })
    .await?;
    let (bbox, model) = match bbox {
        Some((r, model)) => {
            (Some(json!({"x_min": r.x, "y_min": r.y, "x_max": r.x + r.w, "y_max": r.y + r.h})), Some(model))
        }
        None => (None, None),
    };
    Ok(Json(json!({
        "success": true,
        "mask_pixels": area,
        "bbox": bbox,
        "box": prompt_json(prompt),
        "model": model.as_ref().map(|m| m.name.clone()),
        "kind": model.as_ref().map(|m| m.kind),
        "fallback": model.as_ref().map(|m| m.kind == segment::ModelKind::Box),
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
    let store = store.inner().clone();
    let session = user.session;
    let (width, height) = blocking(move || {
        let scene = load_scene(&store, &session)?;
        let mask_png = store.read(&session, Artefact::Mask)?;
        let mask = imaging::decode_png(&mask_png)?.into_luma8();
        let product = imaging::decode_product(&bytes)?;
        drop(bytes);
        let result = composite::replace_product(&scene, &mask, &product, &settings)?;
        drop((scene, mask, product));
        store.write(&session, Artefact::Result, &imaging::encode_png(&result)?)?;
        Ok(result.dimensions())
    })
    .await?;
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

async fn artefact(store: &Store, session: SessionId, which: Artefact, attachment: bool) -> ApiResult<Png> {
    let store = store.inner().clone();
    let bytes = blocking(move || Ok(store.read(&session, which)?)).await?;
    Ok(Png { bytes, attachment })
}

#[get("/get_image")]
async fn get_image(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user.session, Artefact::Image, false).await
}

#[get("/get_mask_visualization")]
async fn get_mask_visualization(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user.session, Artefact::MaskOverlay, false).await
}

#[get("/get_result_image")]
async fn get_result_image(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user.session, Artefact::Result, false).await
}

#[get("/download_result")]
async fn download_result(user: User, store: &Store) -> ApiResult<Png> {
    artefact(store, user.session, Artefact::Result, true).await
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
