//! Downloads beside the composite (`/download_result`, api.rs): the selected object as a
//! transparent PNG, the mask itself, and the result at the photo's own resolution in PNG,
//! JPEG or WebP. Session-bound like every artefact; the pixels are made in flow.rs.

use std::sync::Arc;

use drishya_imaging::OutputFormat;
use rocket::http::{ContentType, Header};
use rocket::response::{self, Responder, Response};
use rocket::{Request, Route, State};

use crate::auth::User;
use crate::error::ApiResult;
use crate::flow::{self, Session};
use crate::gate::ImageJobs;
use crate::storage::{Artefact, Artefacts};

type Store = State<Arc<Artefacts>>;

fn session<'a>(store: &'a Store, user: &'a User) -> Session<'a> {
    Session { store: store.inner(), id: &user.session }
}

/// An attachment, never cached (it changes under the same URL): bytes in memory, or a
/// spooled file streamed from disk.
struct Download {
    body: Body,
    content_type: ContentType,
    filename: String,
}

enum Body {
    Bytes(Vec<u8>),
    Spooled(flow::Spooled),
}

impl<'r> Responder<'r, 'static> for Download {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        let mut response = match self.body {
            Body::Bytes(bytes) => (self.content_type, bytes).respond_to(request)?,
            Body::Spooled(spooled) => {
                let file = rocket::tokio::fs::File::from_std(spooled.file);
                Response::build()
                    .header(self.content_type)
                    .sized_body(usize::try_from(spooled.len).ok(), file)
                    .finalize()
            }
        };
        response.set_header(Header::new("Cache-Control", "no-store"));
        let disposition = format!("attachment; filename=\"{}\"", self.filename);
        response.set_header(Header::new("Content-Disposition", disposition));
        Ok(response)
    }
}

fn png(bytes: Vec<u8>, filename: &str) -> Download {
    Download { body: Body::Bytes(bytes), content_type: ContentType::PNG, filename: filename.into() }
}

/// The selected object over transparency (the mask as the working image's alpha).
#[get("/download_cutout")]
async fn download_cutout(user: User, store: &Store, jobs: &State<ImageJobs>) -> ApiResult<Download> {
    let _pin = store.pin(&user.session);
    Ok(png(flow::cutout(session(store, &user), jobs).await?, "product_cutout.png"))
}

/// The mask as stored: white (255) on black (0), the working image's size.
#[get("/download_mask")]
async fn download_mask(user: User, store: &Store) -> ApiResult<Download> {
    Ok(png(flow::artefact(session(store, &user), Artefact::Mask).await?, "product_mask.png"))
}

/// The result at the uploaded photo's own resolution. `format`: png (default), jpeg or
/// webp (lossless); `quality`: 1-100, for JPEG (default 90).
#[get("/download_full?<format>&<quality>")]
async fn download_full(
    user: User,
    format: Option<&str>,
    quality: Option<&str>,
    store: &Store,
    jobs: &State<ImageJobs>,
    config: &rocket::Config,
) -> ApiResult<Download> {
    let format = OutputFormat::parse(format, quality)?;
    let _pin = store.pin(&user.session);
    // Spooled where Rocket keeps uploads in flight: on disk, not in the artefact store's RAM.
    let spool_dir = config.temp_dir.relative();
    let spooled = flow::full_result(session(store, &user), jobs, format, spool_dir).await?;
    let content_type = ContentType::parse_flexible(format.content_type()).unwrap_or(ContentType::Binary);
    let filename = format!("product_replaced_full.{}", format.extension());
    Ok(Download { body: Body::Spooled(spooled), content_type, filename })
}

pub fn routes() -> Vec<Route> {
    routes![download_cutout, download_mask, download_full]
}
