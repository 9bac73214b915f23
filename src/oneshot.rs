//! `POST /api/replace`: the whole flow in one request, for scripts. A multipart body with
//! the scene, the product, the box and the `/replace_product` settings comes in; the
//! composite goes out as PNG, JPEG or WebP.
//!
//! It is the step routes' flow (flow.rs: upload, mask, replace) run in a session of its
//! own, made for this request and removed when it ends, whatever the outcome: the caller's
//! session (cookie or token) is neither read nor touched, so a script may run several of
//! these at once. The same gates hold: the upload slot while the body is read, an
//! image-job place for each decode, composite and encode, the model's inference gate for
//! the mask; and the same limits (the body as a whole is held to the data-form limit,
//! `MAX_UPLOAD_MB` plus 1 MB, since both files come in one body).
//!
//! The box is in the photo's own pixels (after its EXIF rotation, as any viewer shows it),
//! not the working image's as in `/generate_mask`: a script has the photo, and the working
//! image's size (which depends on `MAX_IMAGE_WIDTH`) is known only once the upload is done.

use std::sync::Arc;

use drishya_imaging::codec::{self, OutputFormat};
use drishya_imaging::params::{self, ReplaceFields};
use rocket::form::{Errors, Form};
use rocket::fs::TempFile;
use rocket::http::{ContentType, Header};
use rocket::tokio::task::spawn_blocking;
use rocket::{Request, Route, State};

use crate::api::{file_field, form_error, read_upload};
use crate::auth::User;
use crate::config::AppConfig;
use crate::error::{ApiError, ApiResult, InputError};
use crate::flow::{self, Session};
use crate::gate::{ImageJobs, UploadSlot};
use crate::models::ModelManager;
use crate::storage::{Artefact, Artefacts, SessionId};

#[derive(FromForm)]
struct OneShotForm<'r> {
    image: rocket::form::Result<'r, TempFile<'r>>,
    product_image: rocket::form::Result<'r, TempFile<'r>>,
    x_min: Option<&'r str>,
    y_min: Option<&'r str>,
    x_max: Option<&'r str>,
    y_max: Option<&'r str>,
    scale_factor: Option<&'r str>,
    use_blending: Option<&'r str>,
    feather_amount: Option<&'r str>,
    enable_color_grading: Option<&'r str>,
    color_grade_strength: Option<&'r str>,
    grading_method: Option<&'r str>,
    format: Option<&'r str>,
    quality: Option<&'r str>,
}

impl OneShotForm<'_> {
    /// The box as sent, in the photo's pixels; each corner a finite number within the
    /// same bounds `/generate_mask` holds a box to.
    fn coords(&self) -> Result<[f64; 4], InputError> {
        let field = |name: &'static str, value: Option<&str>| -> Result<f64, InputError> {
            let value = value.ok_or(InputError::MissingField(name))?;
            match value.trim().parse::<f64>() {
                Ok(n) if n.is_finite() && n.abs() <= 1e9 => Ok(n),
                _ => Err(InputError::invalid(name, "must be a finite number (pixels of the photo)")),
            }
        };
        Ok([
            field("x_min", self.x_min)?,
            field("y_min", self.y_min)?,
            field("x_max", self.x_max)?,
            field("y_max", self.y_max)?,
        ])
    }

    fn settings(&self) -> Result<drishya_imaging::composite::Settings, InputError> {
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

/// This request's own session: removed by [`Transient::finish`] when the work is done, or
/// on drop should the request be abandoned half-way (the client went away).
struct Transient {
    store: Arc<Artefacts>,
    id: Option<SessionId>,
}

impl Transient {
    fn new(store: &Arc<Artefacts>) -> Self {
        Transient { store: store.clone(), id: Some(SessionId::random()) }
    }

    fn session(&self) -> Option<Session<'_>> {
        self.id.as_ref().map(|id| Session { store: &self.store, id })
    }

    /// Removes the session and waits until it is gone (a shared store is a network call:
    /// off the async workers).
    async fn finish(mut self) {
        if let Some(id) = self.id.take() {
            let store = self.store.clone();
            let _ = spawn_blocking(move || store.remove_session(&id)).await;
        }
    }
}

impl Drop for Transient {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let store = self.store.clone();
            match rocket::tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || store.remove_session(&id))),
                Err(_) => store.remove_session(&id),
            }
        }
    }
}

/// The composite in the format asked for, offered as a download.
struct Composite {
    bytes: Vec<u8>,
    format: OutputFormat,
}

impl<'r> rocket::response::Responder<'r, 'static> for Composite {
    fn respond_to(self, request: &'r Request<'_>) -> rocket::response::Result<'static> {
        let content_type = ContentType::parse_flexible(self.format.content_type()).unwrap_or(ContentType::Binary);
        let mut response = (content_type, self.bytes).respond_to(request)?;
        response.set_header(Header::new("Cache-Control", "no-store"));
        let disposition = format!("attachment; filename=\"product_replaced_image.{}\"", self.format.extension());
        response.set_header(Header::new("Content-Disposition", disposition));
        Ok(response)
    }
}

#[post("/api/replace", data = "<form>")]
#[allow(clippy::too_many_arguments)]
async fn replace(
    _user: User,
    slot: UploadSlot,
    form: Result<Form<OneShotForm<'_>>, Errors<'_>>,
    cfg: &State<AppConfig>,
    store: &State<Arc<Artefacts>>,
    jobs: &State<ImageJobs>,
    models: &State<Arc<ModelManager>>,
) -> ApiResult<Composite> {
    let form = form.map_err(|e| form_error(&e, cfg))?;
    // Everything that can be refused without pixels is refused before any work.
    let scene = file_field(&form.image, "image", cfg)?;
    let product = file_field(&form.product_image, "product_image", cfg)?;
    let coords = form.coords()?;
    let settings = form.settings()?;
    let format = OutputFormat::parse(form.format, form.quality)?;

    let call = Call { scene, product, coords, settings, format };
    let transient = Transient::new(store.inner());
    let result = run(&transient, slot, call, Services { cfg, jobs, models }).await;
    transient.finish().await;
    result.map(|bytes| Composite { bytes, format })
}

/// What one call asks for, checked: the two files, the box in the photo's pixels, the
/// replacement's settings and the answer's format.
struct Call<'a, 'r> {
    scene: &'a TempFile<'r>,
    product: &'a TempFile<'r>,
    coords: [f64; 4],
    settings: drishya_imaging::composite::Settings,
    format: OutputFormat,
}

/// What a call runs through: the app's settings, its gates and its model owner.
struct Services<'a> {
    cfg: &'a AppConfig,
    jobs: &'a ImageJobs,
    models: &'a Arc<ModelManager>,
}

/// The three steps of flow.rs in `transient`'s session, then the encoding.
async fn run(transient: &Transient, slot: UploadSlot, call: Call<'_, '_>, with: Services<'_>) -> ApiResult<Vec<u8>> {
    let Call { scene, product, coords, settings, format } = call;
    let Services { cfg, jobs, models } = with;
    let session = || transient.session().ok_or_else(|| ApiError::Internal("the transient session is gone".into()));
    let store = &transient.store;
    let id = transient.id.clone().ok_or_else(|| ApiError::Internal("the transient session is gone".into()))?;
    let _pin = store.pin(&id);

    let uploaded = {
        let _pass = jobs.enter_with(scene, slot).await?;
        let bytes = read_upload(scene).await?;
        flow::upload(session()?, models, bytes, cfg.max_image_width).await?
    };
    // The photo's pixels to the working image's (the same scale on both axes but for
    // rounding; each axis is scaled on its own so the box's far edge stays on the edge).
    let sx = f64::from(uploaded.width) / f64::from(uploaded.source_width.max(1));
    let sy = f64::from(uploaded.height) / f64::from(uploaded.source_height.max(1));
    let [x0, y0, x1, y1] = coords;
    flow::mask(session()?, jobs, models, [x0 * sx, y0 * sy, x1 * sx, y1 * sy]).await?;

    let _pass = ImageJobs::run(jobs.admit()?).await?;
    let bytes = read_upload(product).await?;
    flow::replace(session()?, bytes, settings).await?;
    let png = flow::artefact(session()?, Artefact::Result).await?;
    if format == OutputFormat::Png {
        return Ok(png);
    }
    spawn_blocking(move || -> ApiResult<Vec<u8>> {
        let image = codec::decode_png(&png)?.into_rgb8();
        drop(png);
        Ok(codec::encode_as(&image, format)?)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("worker task failed: {e}")))?
}

pub fn routes() -> Vec<Route> {
    routes![replace]
}
