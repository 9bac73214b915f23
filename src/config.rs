//! Typed configuration: `Rocket.toml` profiles, then the environment (which wins).
//!
//! Rocket reads `ROCKET_*` variables itself; the bare names that Railway and the old
//! Flask deployment use (`PORT`, `SECRET_KEY`, `APP_PASSWORD`, `TEMP_DIR`, ...) are merged
//! here. A bad value stops the launch with one line naming the variable.

use std::path::{Path, PathBuf};

use rocket::fairing::AdHoc;
use rocket::figment::providers::{Env, Format, Serialized, Toml};
use rocket::figment::Figment;
use serde::{Deserialize, Serialize};

/// Password used when `APP_PASSWORD` is unset outside production. Loudly flagged.
pub const DEFAULT_PASSWORD: &str = "drishya";

/// Bare environment variables we accept, mapped to config keys (lower-cased by figment).
const BARE_ENV: &[&str] = &[
    "PORT",
    "SECRET_KEY",
    "APP_PASSWORD",
    "TEMP_DIR",
    "MAX_IMAGE_WIDTH",
    "MAX_UPLOAD_MB",
    "MODELS",
    "MODEL_CACHE_DIR",
    "MODEL_SHA256",
    "MAX_MODEL_MB",
    "MEMORY_BUDGET_MB",
    "INFERENCE_CONCURRENCY",
    "INFERENCE_QUEUE",
    "IMAGE_CONCURRENCY",
    "IMAGE_QUEUE",
    "MODEL_IDLE_UNLOAD_SECS",
    "MODEL_RETRY_SECS",
    "BOX_FALLBACK",
    "TEMP_TTL_SECS",
    "TEMP_MAX_MB",
    "RAYON_THREADS",
    "DOWNLOAD_TIMEOUT_SECS",
];

/// Variables that mark a production deployment (seed 002).
const PRODUCTION_MARKERS: &[&str] = &["RAILWAY_ENVIRONMENT", "HEROKU_APP_NAME", "RENDER", "FLY_APP_NAME", "PRODUCTION"];

/// Everything Drishya reads from the figment (besides Rocket's own keys).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AppConfig {
    /// Login password; `None` means "default password" (refused in production).
    pub app_password: Option<String>,
    /// Where artefacts live (env `TEMP_DIR`); `None`: /dev/shm/drishya when writable,
    /// else /tmp/drishya. Uploads in flight stay in Rocket's `temp_dir` (the OS temp
    /// dir, on disk): on a 512 MB host, 64 uploads in /dev/shm would be 256 MB of RAM.
    pub artefact_dir: Option<PathBuf>,
    pub max_image_width: u32,
    pub max_upload_mb: u64,
    /// Ordered, comma-separated model locations (file, SAM folder or http(s) URL).
    pub models: String,
    /// Where downloaded models are cached.
    pub model_cache_dir: PathBuf,
    /// Optional comma-separated SHA-256 list, aligned with `models` (empty = unchecked).
    pub model_sha256: String,
    pub max_model_mb: u64,
    pub memory_budget_mb: Option<u64>,
    pub inference_concurrency: usize,
    pub inference_queue: usize,
    /// Image jobs (decode, composite, encode) at once; each holds decoded images.
    pub image_concurrency: usize,
    /// Image jobs waiting; beyond that, 503 + Retry-After.
    pub image_queue: usize,
    /// 0 = never unload.
    pub model_idle_unload_secs: u64,
    /// After a failed load, the next attempt waits at least this long.
    pub model_retry_secs: u64,
    /// When every configured model fails, answer with the box itself instead of 503.
    pub box_fallback: bool,
    pub temp_ttl_secs: u64,
    /// Cap on the bytes kept under the artefact dir; the least recently used sessions
    /// are evicted first (it is RAM when the dir is on /dev/shm).
    pub temp_max_mb: u64,
    /// Size of the global rayon pool (0 = one per available CPU).
    pub rayon_threads: usize,
    pub download_timeout_secs: u64,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            app_password: None,
            artefact_dir: None,
            max_image_width: 1280,
            max_upload_mb: 16,
            models: String::new(),
            model_cache_dir: PathBuf::from(".cache/models"),
            model_sha256: String::new(),
            max_model_mb: 350,
            memory_budget_mb: None,
            inference_concurrency: 1,
            inference_queue: 8,
            image_concurrency: 2,
            image_queue: 64,
            model_idle_unload_secs: 0,
            model_retry_secs: 30,
            box_fallback: false,
            temp_ttl_secs: 3600,
            temp_max_mb: 128,
            rayon_threads: 1,
            download_timeout_secs: 300,
        }
    }
}

/// Why the configuration was refused. Each message names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Extract(String),
    #[error("{var} is invalid: {why}")]
    Invalid { var: &'static str, why: String },
    #[error(
        "APP_PASSWORD is not set and this looks like production ({marker}): refusing to start \
         with the default password; set APP_PASSWORD"
    )]
    DefaultPasswordInProduction { marker: String },
}

impl AppConfig {
    /// Checks ranges and relations; the first problem found is returned. `production`
    /// names what marks this run as production, if anything.
    pub fn validate(&self, production: Option<&str>) -> Result<(), ConfigError> {
        let invalid = |var, why: &str| Err(ConfigError::Invalid { var, why: why.to_string() });
        if !(64..=8192).contains(&self.max_image_width) {
            return invalid("MAX_IMAGE_WIDTH", "must be between 64 and 8192");
        }
        if !(1..=512).contains(&self.max_upload_mb) {
            return invalid("MAX_UPLOAD_MB", "must be between 1 and 512");
        }
        if !(1..=64).contains(&self.inference_concurrency) {
            return invalid("INFERENCE_CONCURRENCY", "must be between 1 and 64");
        }
        if self.inference_queue > 10_000 {
            return invalid("INFERENCE_QUEUE", "must be at most 10000");
        }
        if !(1..=64).contains(&self.image_concurrency) {
            return invalid("IMAGE_CONCURRENCY", "must be between 1 and 64");
        }
        if self.image_queue > 10_000 {
            return invalid("IMAGE_QUEUE", "must be at most 10000");
        }
        if self.max_model_mb == 0 {
            return invalid("MAX_MODEL_MB", "must be at least 1");
        }
        if matches!(self.memory_budget_mb, Some(0)) {
            return invalid("MEMORY_BUDGET_MB", "must be at least 1 when set");
        }
        if self.temp_ttl_secs < 60 {
            return invalid("TEMP_TTL_SECS", "must be at least 60");
        }
        if self.temp_max_mb == 0 {
            return invalid("TEMP_MAX_MB", "must be at least 1");
        }
        if matches!(&self.app_password, Some(p) if p.is_empty()) {
            return invalid("APP_PASSWORD", "must not be empty when set");
        }
        for location in self.model_locations() {
            if location.contains("://") && !location.starts_with("http://") && !location.starts_with("https://") {
                return invalid("MODELS", "only local paths and http(s) URLs are supported");
            }
        }
        let sums = self.model_checksums();
        if sums.len() > self.model_locations().len() {
            return invalid("MODEL_SHA256", "has more entries than MODELS");
        }
        if sums.iter().flatten().any(|s| s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit())) {
            return invalid("MODEL_SHA256", "entries must be 64 hex digits (or empty)");
        }
        if let Some(marker) = production {
            if self.app_password.is_none() {
                return Err(ConfigError::DefaultPasswordInProduction { marker: marker.to_string() });
            }
        }
        Ok(())
    }

    /// The model locations in the order they are tried.
    pub fn model_locations(&self) -> Vec<String> {
        split_list(&self.models)
    }

    /// SHA-256 per model location (same order), `None` where not given.
    pub fn model_checksums(&self) -> Vec<Option<String>> {
        if self.model_sha256.trim().is_empty() {
            return Vec::new();
        }
        self.model_sha256
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .map(|s| (!s.is_empty()).then_some(s))
            .collect()
    }

    /// The password users must type.
    pub fn password(&self) -> &str {
        self.app_password.as_deref().unwrap_or(DEFAULT_PASSWORD)
    }

    pub fn uses_default_password(&self) -> bool {
        self.app_password.is_none()
    }

    /// The directory for artefacts, with the /dev/shm-then-/tmp default.
    pub fn resolved_temp_dir(&self) -> PathBuf {
        match &self.artefact_dir {
            Some(dir) => dir.clone(),
            None if is_writable_dir(Path::new("/dev/shm")) => PathBuf::from("/dev/shm/drishya"),
            None => std::env::temp_dir().join("drishya"),
        }
    }

    pub fn upload_limit_bytes(&self) -> u64 {
        self.max_upload_mb * 1024 * 1024
    }
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

fn is_writable_dir(dir: &Path) -> bool {
    let probe = dir.join(format!(".drishya-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// What marks this run as production: a platform variable (seed 002) or Rocket's
/// release profile. `None` in development.
pub fn production_marker(profile: &str) -> Option<String> {
    PRODUCTION_MARKERS
        .iter()
        .find(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
        .map(|var| var.to_string())
        .or_else(|| (profile == "release").then(|| "the release profile".to_string()))
}

/// A name for `/health`'s `environment`.
pub fn environment_name(profile: &str) -> String {
    for var in ["RAILWAY_ENVIRONMENT", "ENVIRONMENT", "NODE_ENV", "FLASK_ENV"] {
        if let Ok(value) = std::env::var(var) {
            if !value.is_empty() {
                return value;
            }
        }
    }
    match profile {
        "release" => "production".to_string(),
        other => other.to_string(),
    }
}

/// Rocket's figment (Rocket.toml + `ROCKET_*`), plus the bare variables above.
///
/// The upload size limit is applied to Rocket's `data-form` and `file` limits so that
/// a 16 MB upload is not cut at Rocket's 2 MiB / 1 MiB defaults.
pub fn figment() -> Figment {
    let base = rocket::Config::figment().merge(Toml::file(Env::var_or("ROCKET_CONFIG", "Rocket.toml")).nested());
    // TEMP_DIR is ours (artefacts), not Rocket's `temp_dir` (uploads in flight).
    // (figment hands `map` the variable's own case: compare without it.)
    let env = Env::raw().only(BARE_ENV).map(|key| {
        if key.as_str().eq_ignore_ascii_case("temp_dir") {
            "artefact_dir".into()
        } else {
            key.into()
        }
    });
    with_upload_limits(base.merge(env))
}

/// Sets `limits.data-form`/`limits.file` from `max_upload_mb` (plus multipart overhead).
pub fn with_upload_limits(figment: Figment) -> Figment {
    let mb: u64 = figment.extract_inner("max_upload_mb").unwrap_or(16);
    let file = mb.saturating_mul(1024 * 1024);
    let form = file.saturating_add(1024 * 1024);
    figment
        .merge(Serialized::default("limits.file", file))
        .merge(Serialized::default("limits.data-form", form))
        .merge(Serialized::default("limits.json", 64 * 1024))
}

/// Extracts and validates [`AppConfig`]; a failure aborts the launch with one line.
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Drishya configuration", |rocket| async move {
        let extracted =
            rocket.figment().extract::<AppConfig>().map_err(|e| ConfigError::Extract(describe_figment_error(&e)));
        let production = production_marker(rocket.figment().profile().as_str().as_str());
        match extracted.and_then(|cfg| cfg.validate(production.as_deref()).map(|()| cfg)) {
            Ok(cfg) => {
                if cfg.uses_default_password() {
                    log::warn!(
                        "APP_PASSWORD is not set: the DEFAULT password '{}' is in use. \
                         Set APP_PASSWORD before exposing this server.",
                        DEFAULT_PASSWORD
                    );
                }
                Ok(rocket.manage(cfg))
            }
            Err(e) => {
                log::error!("{e}");
                eprintln!("drishya: {e}");
                Err(rocket)
            }
        }
    })
}

/// Turns figment's error into one line naming the variable.
fn describe_figment_error(error: &rocket::figment::Error) -> String {
    let key = error.path.join(".");
    let var = key.to_ascii_uppercase().replace('.', "_");
    if key.is_empty() {
        error.kind.to_string()
    } else {
        format!("{var}: {}", error.kind)
    }
}
