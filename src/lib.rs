//! Drishya: product replacement in photos, in one small Rust binary.
//!
//! `build(figment)` assembles the whole application from a configuration so that
//! `main` and the tests run exactly the same Rocket instance.

#[macro_use]
extern crate rocket;

pub mod api;
pub mod auth;
pub mod config;
pub mod download;
pub mod error;
pub mod exports;
pub mod flow;
pub mod front;
pub mod gate;
pub mod health;
pub mod models;
pub mod observe;
pub mod oneshot;
pub mod openapi;
pub mod storage;
pub mod sysmem;
pub mod web;

use std::sync::Arc;

/// Big blocks in their own huge-page mappings (crates/alloc). Here rather than in main.rs
/// so that the tests run on the allocator the server runs on.
#[global_allocator]
static GLOBAL: drishya_alloc::DrishyaAlloc = drishya_alloc::DrishyaAlloc;

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
        .attach(gate::stage())
        .attach(Template::fairing())
        .attach(web::headers())
        .attach(observe::stage())
        .attach(web::assets())
        .manage(Arc::new(auth::Throttle::default()))
        .mount("/", auth::routes())
        .mount("/", api::routes())
        .mount("/", exports::routes())
        .mount("/", health::routes())
        .mount("/", [oneshot::routes(), openapi::routes()].concat())
        .mount("/static", web::static_files())
        .register("/", api::catchers())
        .register("/", auth::catchers())
}
