//! The path of a request through Drishya, written once. A session's work is three steps,
//! each of which reads and writes the session's artefacts (storage/):
//!
//! 1. [`upload`]: the photo's bytes become the working image (`Image`); a new photo makes
//!    the old mask, overlay and result stale, so they go. With a Segment Anything model
//!    loaded, its encoder starts on the new scene in the background when an inference
//!    place is free (models.rs, `ModelManager::speculate`), so the first box usually
//!    finds the embedding ready.
//! 2. [`mask`]: the box is clipped to the working image, the model manager (models.rs)
//!    turns it into a mask, and the mask and its overlay are stored; the old result goes.
//! 3. [`replace`]: the product is composited into the masked region (crates/imaging) and
//!    the `Result` stored.
//!
//! The routes (api.rs) parse the request, pin the session (the artefact cap never evicts
//! a session in the middle of its request), pass the upload gate and answer in JSON; here
//! the pixels are decoded, made and stored, on the blocking pool, within the image-job
//! places of gate.rs.

use std::sync::Arc;

use drishya_imaging::composite::{self, Rect, Settings};
use drishya_imaging::{codec, BoxPrompt};
use drishya_segment::ModelInfo;
use image::RgbImage;
use rocket::tokio::task::spawn_blocking;

use crate::error::{ApiError, ApiResult};
use crate::gate::ImageJobs;
use crate::models::ModelManager;
use crate::storage::{Artefact, Artefacts, SessionId};

/// One session's store, for the steps below.
pub struct Session<'a> {
    pub store: &'a Arc<Artefacts>,
    pub id: &'a SessionId,
}

impl Session<'_> {
    /// Owned handles, for work moved onto the blocking pool.
    fn owned(&self) -> (Arc<Artefacts>, SessionId) {
        (self.store.clone(), self.id.clone())
    }
}

/// What an upload became.
pub struct Uploaded {
    /// The working image (at most `MAX_IMAGE_WIDTH` wide).
    pub width: u32,
    pub height: u32,
    /// The photo's own size, after its EXIF rotation.
    pub source_width: u32,
    pub source_height: u32,
}

/// Step 1: decodes the upload into the working image and stores it, then hands the scene
/// to the model manager to speculate on (it returns at once; the upload's answer never
/// waits for the encoder). The caller holds an image-job place (the bytes are decoded
/// here); the speculative run holds none.
pub async fn upload(
    session: Session<'_>,
    models: &Arc<ModelManager>,
    bytes: Vec<u8>,
    max_width: u32,
) -> ApiResult<Uploaded> {
    let (store, id) = session.owned();
    let manager = models.clone();
    let (uploaded, speculation) = blocking(move || {
        let scene = codec::decode_scene(&bytes, max_width)?;
        drop(bytes);
        let png = codec::encode_png(&scene.image)?;
        store.remove(&id, &[Artefact::Mask, Artefact::MaskOverlay, Artefact::Result])?;
        store.write(&id, Artefact::Image, &png)?;
        // From here on this is the session's scene: older ones are not speculated on.
        let ticket = manager.scene_uploaded(id.as_str());
        let (width, height) = scene.image.dimensions();
        let uploaded =
            Uploaded { width, height, source_width: scene.original_width, source_height: scene.original_height };
        // The key `mask` will compute from the stored bytes; the decoded image is what
        // `mask` decodes from them (PNG is lossless).
        let speculation = manager.speculates().then(|| (ticket, scene.image, content_key(&png)));
        Ok((uploaded, speculation))
    })
    .await?;
    if let Some((ticket, image, key)) = speculation {
        models.speculate(ticket, image, key);
    }
    Ok(uploaded)
}

/// What a mask request made.
pub struct Masked {
    /// The box as it was used: clipped to the working image.
    pub prompt: BoxPrompt,
    /// Pixels in the mask.
    pub area: u64,
    /// The mask's bounding box and the model that made it; `None` for an empty mask.
    pub found: Option<(Rect, ModelInfo)>,
}

/// Step 2: the mask of the box `coords` (working-image pixels, as the client sent them).
/// Holds one image-job queue place from start to end, so that a computed mask is never
/// thrown away for want of a place to store it; the running place is given back while
/// the model runs (the model manager has its own gate).
pub async fn mask(
    session: Session<'_>,
    jobs: &ImageJobs,
    models: &ModelManager,
    coords: [f64; 4],
) -> ApiResult<Masked> {
    let pass = ImageJobs::run(jobs.admit()?).await?;
    let (scene, key) = {
        let (store, id) = session.owned();
        blocking(move || {
            let png = store.read(&id, Artefact::Image)?;
            Ok((decode_scene(&png)?, content_key(&png)))
        })
        .await?
    };
    let paused = pass.pause();
    let prompt = drishya_imaging::clip_box(coords, scene.width(), scene.height())?;
    let scene = Arc::new(scene);
    let outcome = models.segment(scene.clone(), key, prompt).await?;
    let _pass = ImageJobs::run(paused).await?;
    let (store, id) = session.owned();
    blocking(move || {
        let area = drishya_segment::mask_area(&outcome.mask);
        let bbox = composite::mask_bbox(&outcome.mask);
        store.write(&id, Artefact::Mask, &codec::encode_png(&outcome.mask)?)?;
        let overlay = codec::mask_overlay(&scene, &outcome.mask);
        store.write(&id, Artefact::MaskOverlay, &codec::encode_png(&overlay)?)?;
        store.remove(&id, &[Artefact::Result])?;
        Ok(Masked { prompt, area, found: bbox.map(|r| (r, outcome.model)) })
    })
    .await
}

/// Step 3: composites the product (`bytes`, any supported format) into the session's
/// masked region and stores the result; returns its size. The caller holds an image-job
/// place.
pub async fn replace(session: Session<'_>, bytes: Vec<u8>, settings: Settings) -> ApiResult<(u32, u32)> {
    let (store, id) = session.owned();
    blocking(move || {
        let scene = decode_scene(&store.read(&id, Artefact::Image)?)?;
        let mask = codec::decode_png(&store.read(&id, Artefact::Mask)?)?.into_luma8();
        let product = codec::decode_product(&bytes)?;
        drop(bytes);
        let result = composite::replace_product(&scene, &mask, &product, &settings)?;
        drop((scene, mask, product));
        store.write(&id, Artefact::Result, &codec::encode_png(&result)?)?;
        Ok(result.dimensions())
    })
    .await
}

/// A stored artefact's bytes (PNG).
pub async fn artefact(session: Session<'_>, which: Artefact) -> ApiResult<Vec<u8>> {
    let (store, id) = session.owned();
    blocking(move || Ok(store.read(&id, which)?)).await
}

fn decode_scene(png: &[u8]) -> Result<RgbImage, codec::ImageError> {
    Ok(codec::decode_png(png)?.into_rgb8())
}

/// A key for the model's per-image cache (the SAM embedding): the working image's
/// content, so that the same scene read on any replica, from any store, finds it.
fn content_key(png: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(png).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs blocking work off the async workers; a panic inside becomes a 500, not a crash.
async fn blocking<T, F>(work: F) -> ApiResult<T>
where
    F: FnOnce() -> ApiResult<T> + Send + 'static,
    T: Send + 'static,
{
    spawn_blocking(work).await.map_err(|e| ApiError::Internal(format!("worker task failed: {e}")))?
}
