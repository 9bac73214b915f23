//! The path of a request through Drishya, written once. A session's work is three steps,
//! each of which reads and writes the session's artefacts (storage/):
//!
//! 1. [`upload`]: the photo's bytes become the working image (`Image`), and are kept as
//!    they came (`Original`) when the photo is larger; a new photo makes the old mask,
//!    overlay and result stale, so they go. With a Segment Anything model
//!    loaded, its encoder starts on the new scene in the background when an inference
//!    place is free (models.rs, `ModelManager::speculate`), so the first box usually
//!    finds the embedding ready.
//! 2. [`mask`]: the box is clipped to the working image, the model manager (models.rs)
//!    turns it into a mask, and the mask and its overlay are stored; the old result goes.
//! 3. [`replace`]: the product is composited into the masked region (crates/imaging) and
//!    the `Result` stored, with what it used (`Replacement`: settings and product).
//!
//! Beside the stored artefacts, two downloads are made on request (exports.rs): the
//! [`cutout`], and the [`full_result`], the composite redone at the photo's own size.
//!
//! The routes (api.rs, exports.rs) parse the request, pin the session (the artefact cap never evicts
//! a session in the middle of its request), pass the upload gate and answer in JSON; here
//! the pixels are decoded, made and stored, on the blocking pool, within the image-job
//! places of gate.rs.

use std::io::Write;
use std::sync::Arc;

use drishya_imaging::composite::{self, Rect, Settings};
use drishya_imaging::fullres::{self, Replacement};
use drishya_imaging::{codec, BoxPrompt, OutputFormat};
use drishya_segment::ModelInfo;
use image::RgbImage;
use rocket::tokio::sync::Semaphore;
use rocket::tokio::task::spawn_blocking;

use crate::error::{ApiError, ApiResult, InputError};
use crate::gate::ImageJobs;
use crate::models::ModelManager;
use crate::storage::{self, Artefact, Artefacts, SessionId, StorageError};

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
        let png = codec::encode_png(&scene.image)?;
        store.remove(&id, &STALE_AFTER_UPLOAD)?;
        // The photo as uploaded, for the full-resolution result; written before the new
        // scene so that no scene is ever stored beside another photo's original. A photo
        // no larger than the working image is the working image: nothing more to keep.
        if (scene.original_width, scene.original_height) != scene.image.dimensions() {
            store.write(&id, Artefact::Original, &bytes)?;
        }
        drop(bytes);
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
        store.remove(&id, &[Artefact::Result, Artefact::Replacement])?;
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
        let result = composite::replace_product(&scene, &mask, &product, &settings)?;
        drop((scene, mask, product));
        // What the full-resolution result repeats (the product as uploaded: usually smaller
        // than decoded), stored before the result it belongs to.
        store.write(&id, Artefact::Replacement, &Replacement::pack(&settings, &bytes))?;
        drop(bytes);
        store.write(&id, Artefact::Result, &codec::encode_png(&result)?)?;
        Ok(result.dimensions())
    })
    .await
}

/// What a new photo makes stale (the original too: a photo no larger than the working
/// image has none).
const STALE_AFTER_UPLOAD: [Artefact; 5] =
    [Artefact::Mask, Artefact::MaskOverlay, Artefact::Result, Artefact::Replacement, Artefact::Original];

/// A stored artefact's bytes (PNG).
pub async fn artefact(session: Session<'_>, which: Artefact) -> ApiResult<Vec<u8>> {
    let (store, id) = session.owned();
    blocking(move || Ok(store.read(&id, which)?)).await
}

/// The selected object as a transparent PNG: the working image with the mask as its alpha.
/// Two decodes and an encode: an image job, whose place is taken here.
pub async fn cutout(session: Session<'_>, jobs: &ImageJobs) -> ApiResult<Vec<u8>> {
    let _pass = ImageJobs::run(jobs.admit()?).await?;
    let (store, id) = session.owned();
    blocking(move || {
        // The mask first: without one, "no mask yet" is the answer that helps.
        let mask = codec::decode_png(&store.read(&id, Artefact::Mask)?)?.into_luma8();
        let scene = decode_scene(&store.read(&id, Artefact::Image)?)?;
        Ok(codec::encode_png(&codec::cutout(&scene, &mask)?)?)
    })
    .await
}

/// A download written to an unlinked file on disk: a large result's bytes are not held
/// in memory while a client reads them, nor is the image-job place.
pub struct Spooled {
    pub file: std::fs::File,
    pub len: u64,
}

/// Full-resolution results made at once: one. Each holds the whole photo decoded (a WebP
/// also its RGBA copy and encoded frame, image-webp's way), several times what any other
/// image job holds: two of them beside a model run would not fit in 512 MB.
static FULL_RESOLUTION: Semaphore = Semaphore::const_new(1);

/// The last result at the photo's own resolution, in `format`, spooled in `spool_dir`.
/// The photo is decoded once at full size and the composite redone in the mask's box
/// alone (crates/imaging fullres); a photo no larger than the working image has no
/// original stored, and its result is the stored one. An image job, whose place is taken
/// here.
pub async fn full_result(
    session: Session<'_>,
    jobs: &ImageJobs,
    format: OutputFormat,
    spool_dir: std::path::PathBuf,
) -> ApiResult<Spooled> {
    // A queue place first (bounded: 503 beyond it), then the one full-resolution turn,
    // then a running place, so a job waiting for its turn never holds a running place.
    let admitted = jobs.admit()?;
    let _turn =
        FULL_RESOLUTION.acquire().await.map_err(|e| ApiError::Internal(format!("full-resolution turn: {e}")))?;
    let _pass = ImageJobs::run(admitted).await?;
    let (store, id) = session.owned();
    blocking(move || {
        let replacement = store.read(&id, Artefact::Replacement)?;
        let full = match store.read(&id, Artefact::Original) {
            Ok(original) => {
                if format == OutputFormat::WebP {
                    let (width, height) = fullres::photo_size(&original)?;
                    if u64::from(width) * u64::from(height) > fullres::MAX_WEBP_PIXELS {
                        let mp = fullres::MAX_WEBP_PIXELS / 1_000_000;
                        let why = format!("WebP at full resolution is limited to {mp} megapixels: ask for png or jpeg");
                        return Err(InputError::invalid("format", why).into());
                    }
                }
                let mut full = fullres::decode_full(&original)?;
                drop(original);
                let working = decode_scene(&store.read(&id, Artefact::Image)?)?;
                let mask = codec::decode_png(&store.read(&id, Artefact::Mask)?)?.into_luma8();
                let replacement = Replacement::unpack(&replacement)?;
                let product = codec::decode_product(replacement.product)?;
                fullres::composite_full(&mut full, &working, &mask, &product, &replacement.settings)?;
                full
            }
            Err(StorageError::NotFound(_)) => decode_scene(&store.read(&id, Artefact::Result)?)?,
            Err(e) => return Err(e.into()),
        };
        drop(replacement);
        let mut file = storage::spool_file(&spool_dir)?;
        let mut out = std::io::BufWriter::new(&mut file);
        codec::write_as(&full, format, &mut out)?;
        drop(full);
        out.flush().map_err(StorageError::from_write)?;
        drop(out);
        let len = storage::finish_spool(&mut file)?;
        Ok(Spooled { file, len })
    })
    .await
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
