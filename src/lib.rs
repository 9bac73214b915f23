//! Drishya: product replacement in photos, in one small Rust binary.
//!
//! `build(figment)` assembles the whole application from a configuration so that
//! `main` and the tests run exactly the same Rocket instance.

#[macro_use]
extern crate rocket;

pub mod alloc;
pub mod api;
pub mod auth;
pub mod composite;
pub mod config;
pub mod download;
pub mod error;
pub mod front;
pub mod gate;
pub mod health;
pub mod imaging;
pub mod models;
pub mod params;
pub mod segment;
pub mod storage;
pub mod sysmem;
pub mod web;

use std::sync::Arc;

/// Big blocks in their own huge-page mappings (see `alloc`). Not under cargo-fuzz, whose
/// sanitiser must see every allocation.
#[cfg(not(fuzzing))]
#[global_allocator]
static GLOBAL: alloc::DrishyaAlloc = alloc::DrishyaAlloc;

use rocket::figment::Figment;
use rocket::{Build, Rocket};
use rocket_dyn_templates::Template;

/// The application for a given figment (tests pass their own).
pub fn build(figment: Figment) -> Rocket<Build> {
    // The client's address is what the front door says it is (see `front`).
    let figment = figment.merge(("ip_header", front::PEER_HEADER));
    rocket::custom(figment)
        .attach(config::stage())
        .attach(auth::stage())
        .attach(web::threads())
        .attach(storage::stage())
        .attach(models::stage())
        .attach(api::stage())
        .attach(Template::fairing())
        .attach(web::headers())
        .attach(web::assets())
        .manage(Arc::new(auth::Throttle::default()))
        .mount("/", auth::routes())
        .mount("/", api::routes())
        .mount("/", health::routes())
        .mount("/static", web::static_files())
        .register("/", api::catchers())
}
