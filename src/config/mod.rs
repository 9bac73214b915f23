//! Typed configuration: `Rocket.toml` profiles, then the environment (which wins, in
//! every profile), then nothing else.
//!
//! Rocket reads `ROCKET_*` variables itself; the bare names that Railway and the old
//! Flask deployment use (`PORT`, `SECRET_KEY`, `APP_PASSWORD`, `TEMP_DIR`, ...) are merged
//! here, into figment's global profile, which outranks every `Rocket.toml` profile. A
//! Flask deployment's `.env` file is read by `main` (see [`load_env_file`]). A bad value
//! stops the launch with one line naming the variable.

mod secret;

use std::path::{Path, PathBuf};

use rocket::fairing::AdHoc;
use rocket::figment::providers::{Env, Serialized};
use rocket::figment::Figment;
use serde::{Deserialize, Serialize};

/// Password used when `APP_PASSWORD` is unset outside production. Loudly flagged.
pub const DEFAULT_PASSWORD: &str = "drishya";

pub use secret::{KeySource, MIN_CHARS as SECRET_KEY_MIN_CHARS};

/// Bare environment variables we accept, mapped to config keys (lower-cased by figment).
/// `SECRET_KEY` is not among them: it is interpreted (see `secret`) before it reaches Rocket.
const BARE_ENV: &[&str] = &[
    "PORT",
    "APP_PASSWORD",
    "PUBLIC_ORIGIN",
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
    "SPECULATIVE_EMBEDDING",
    "TEMP_TTL_SECS",
    "TEMP_MAX_MB",
    "RAYON_THREADS",
    "DOWNLOAD_TIMEOUT_SECS",
    "STORAGE_URL",
    "PROXY_IP_HEADER",
    "MAX_CONNECTIONS",
    "SESSION_MAX_AGE",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "API_TOKENS",
    "METRICS_TOKEN",
    "LOG_FORMAT",
];

/// `SESSION_MAX_AGE` bounds: a minute (shorter is a typo, not a policy) to 30 days.
pub const MIN_SESSION_MAX_AGE: u64 = 60;
pub const MAX_SESSION_MAX_AGE: u64 = 30 * 24 * 60 * 60;

/// Variables that mark a production deployment: those the hosting platforms set.
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
    /// At upload, when a Segment Anything model is loaded and an inference place is free,
    /// compute the scene's embedding in the background so the first box runs only the
    /// decoder (see `models::ModelManager::speculate`). `0`/`false` turns it off.
    #[serde(deserialize_with = "switch")]
    pub speculative_embedding: bool,
    pub temp_ttl_secs: u64,
    /// Cap on the bytes kept under the artefact dir; the least recently used sessions
    /// are evicted first (it is RAM when the dir is on /dev/shm).
    pub temp_max_mb: u64,
    /// Size of the global rayon pool (0 = one per available CPU).
    pub rayon_threads: usize,
    pub download_timeout_secs: u64,
    /// Comma-separated origins (`https://host[:port]`) a reverse proxy serves the app
    /// under, for proxies that rewrite `Host` (see `auth::is_cross_origin`).
    pub public_origin: String,
    /// The header a trusted reverse proxy puts the client's address in (`X-Real-IP`, or
    /// `X-Forwarded-For`, whose right-most entry is then used). Empty: the socket peer,
    /// and no forwarded header is believed (see `front`). Set, the proxy's
    /// `X-Forwarded-Proto` is believed too.
    pub proxy_ip_header: String,
    /// Client connections open at once (see `front`); beyond it, new ones get a 503.
    pub max_connections: usize,
    /// Seconds a login lasts: the session cookie carries its issue time and is refused
    /// after this long, whatever the browser does (see `auth`).
    pub session_max_age: u64,
    /// Where artefacts live: empty (the artefact dir), `file:///PATH`, or
    /// `s3://BUCKET[/PREFIX]` (shared by replicas; see `storage::S3Bucket`).
    pub storage_url: String,
    /// The standard AWS variables, read for an `s3://` store.
    pub aws_endpoint_url: Option<String>,
    pub aws_access_key_id: Option<String>,
    #[serde(skip_serializing)]
    pub aws_secret_access_key: Redacted,
    #[serde(skip_serializing)]
    pub aws_session_token: Redacted,
    pub aws_region: Option<String>,
    pub aws_default_region: Option<String>,
    pub aws_allow_http: bool,
    pub aws_virtual_hosted_style_request: bool,
    /// How `SECRET_KEY` became Rocket's key; `None` when it is not set. Set by [`figment`].
    pub secret_key_source: Option<KeySource>,
    /// `SECRET_KEY` is an example file's placeholder (accepted, flagged). Set by [`figment`].
    pub secret_key_placeholder: bool,
    /// Bearer tokens for scripts (`API_TOKENS`, comma-separated; see `auth::TokenAuth`).
    /// A secret: `Debug` shows only their number, never serialised.
    #[serde(skip_serializing)]
    pub api_tokens: crate::auth::ApiTokens,
    /// The bearer token `/metrics` asks for (`METRICS_TOKEN`); unset, `/metrics` is open.
    /// A secret: never printed, never serialised.
    #[serde(skip_serializing)]
    pub metrics_token: Redacted,
    /// `LOG_FORMAT`: `text` (the human lines) or `json` (one JSON object per line).
    pub log_format: crate::observe::LogFormat,
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
            speculative_embedding: true,
            temp_ttl_secs: 3600,
            temp_max_mb: 128,
            rayon_threads: 1,
            download_timeout_secs: 300,
            public_origin: String::new(),
            proxy_ip_header: String::new(),
            max_connections: 512,
            // A working day.
            session_max_age: 8 * 60 * 60,
            storage_url: String::new(),
            aws_endpoint_url: None,
            aws_access_key_id: None,
            aws_secret_access_key: Redacted::default(),
            aws_session_token: Redacted::default(),
            aws_region: None,
            aws_default_region: None,
            aws_allow_http: false,
            aws_virtual_hosted_style_request: false,
            secret_key_source: None,
            secret_key_placeholder: false,
            api_tokens: crate::auth::ApiTokens::default(),
            metrics_token: Redacted::default(),
            log_format: crate::observe::LogFormat::default(),
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
    #[error(
        "SECRET_KEY is not set and this looks like production ({marker}): sessions would not \
         survive a restart; set SECRET_KEY to any string of at least {min} characters (e.g. the \
         output of `openssl rand -base64 48`)",
        min = secret::MIN_CHARS
    )]
    SecretKeyMissing { marker: String },
    #[error(
        "SECRET_KEY is too short for production ({marker}): use at least {min} characters (e.g. \
         the output of `openssl rand -base64 48`)",
        min = secret::MIN_CHARS
    )]
    SecretKeyTooShort { marker: String },
    #[error("{file} line {line}: {why}")]
    EnvFile { file: String, line: usize, why: String },
    #[error("{file} could not be read: {why}")]
    EnvFileUnreadable { file: String, why: String },
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
        if !(16..=100_000).contains(&self.max_connections) {
            return invalid("MAX_CONNECTIONS", "must be between 16 and 100000");
        }
        let header_ok = self.proxy_ip_header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !header_ok {
            return invalid("PROXY_IP_HEADER", "must be a header name (letters, digits, '-'), e.g. X-Real-IP");
        }
        if !(MIN_SESSION_MAX_AGE..=MAX_SESSION_MAX_AGE).contains(&self.session_max_age) {
            return invalid("SESSION_MAX_AGE", "must be between 60 and 2592000 seconds (30 days)");
        }
        if self.temp_ttl_secs < 60 {
            return invalid("TEMP_TTL_SECS", "must be at least 60");
        }
        if self.temp_max_mb == 0 {
            return invalid("TEMP_MAX_MB", "must be at least 1");
        }
        match crate::storage::StorageUrl::parse(&self.storage_url) {
            Err(why) => return invalid("STORAGE_URL", &why),
            Ok(crate::storage::StorageUrl::S3 { bucket, prefix }) => {
                if let Err(e) = crate::storage::S3Bucket::new(self.s3_settings(bucket, prefix)) {
                    return Err(ConfigError::Invalid { var: e.var, why: e.why });
                }
            }
            Ok(_) => {}
        }
        if let Err(why) = self.api_tokens.check() {
            return invalid("API_TOKENS", &why);
        }
        if let Some(token) = self.metrics_token() {
            // As an API token: long enough not to be guessed over HTTP, and one header word.
            let ok = (16..=512).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return invalid("METRICS_TOKEN", "must be 16-512 printable characters without spaces");
            }
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
        for origin in self.public_origins() {
            let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.trim_start_matches("http://").trim_start_matches("https://").contains('/');
            if !ok {
                return invalid("PUBLIC_ORIGIN", "entries must look like https://host[:port] (no path)");
            }
        }
        if let Some(marker) = production {
            let marker = marker.to_string();
            if self.app_password.is_none() {
                return Err(ConfigError::DefaultPasswordInProduction { marker });
            }
            if self.secret_key_source == Some(KeySource::TooShort) {
                return Err(ConfigError::SecretKeyTooShort { marker });
            }
        }
        Ok(())
    }

    /// Origins a reverse proxy serves the app under, without a trailing slash.
    pub fn public_origins(&self) -> Vec<String> {
        split_list(&self.public_origin).into_iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect()
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

    /// The bucket settings for `STORAGE_URL=s3://BUCKET/PREFIX`, from the `AWS_*` variables.
    pub fn s3_settings(&self, bucket: String, prefix: String) -> crate::storage::S3Settings {
        let text = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        crate::storage::S3Settings {
            bucket,
            prefix,
            endpoint: text(&self.aws_endpoint_url),
            region: text(&self.aws_region)
                .or_else(|| text(&self.aws_default_region))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key_id: text(&self.aws_access_key_id).unwrap_or_default(),
            secret_access_key: self.aws_secret_access_key.0.clone().unwrap_or_default(),
            session_token: self.aws_session_token.0.clone().filter(|t| !t.is_empty()),
            allow_http: self.aws_allow_http,
            virtual_hosted: self.aws_virtual_hosted_style_request,
        }
    }

    /// How long a login lasts (`SESSION_MAX_AGE`).
    pub fn session_lifetime(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.session_max_age)
    }

    /// The token `/metrics` asks for, when one is set (empty is unset, as a blank variable).
    pub fn metrics_token(&self) -> Option<&str> {
        self.metrics_token.0.as_deref().filter(|t| !t.is_empty())
    }

    pub fn upload_limit_bytes(&self) -> u64 {
        self.max_upload_mb * 1024 * 1024
    }
}

/// A secret setting: never printed (`Debug` says so), never serialised.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Redacted(Option<String>);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "(set, not shown)" } else { "(unset)" })
    }
}

/// A switch as environments spell it: `true`/`false`, `1`/`0`, `on`/`off`, `yes`/`no`
/// (figment reads `SPECULATIVE_EMBEDDING=0` as the number 0, which a plain `bool` refuses).
fn switch<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    use serde::de::{Error, Unexpected, Visitor};

    struct Switch;

    impl Visitor<'_> for Switch {
        type Value = bool;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a switch: true/false, 1/0, on/off or yes/no")
        }

        fn visit_bool<E: Error>(self, value: bool) -> Result<bool, E> {
            Ok(value)
        }

        fn visit_u64<E: Error>(self, value: u64) -> Result<bool, E> {
            match value {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(Unexpected::Unsigned(value), &self)),
            }
        }

        fn visit_i64<E: Error>(self, value: i64) -> Result<bool, E> {
            match u64::try_from(value) {
                Ok(value) => self.visit_u64(value),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(value), &self)),
            }
        }

        fn visit_str<E: Error>(self, value: &str) -> Result<bool, E> {
            match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "on" | "yes" => Ok(true),
                "false" | "0" | "off" | "no" => Ok(false),
                _ => Err(E::invalid_value(Unexpected::Str(value), &self)),
            }
        }
    }

    deserializer.deserialize_any(Switch)
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

/// What marks this run as production: a platform variable or Rocket's
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

/// Rocket's figment (Rocket.toml + `ROCKET_*`), plus the bare variables above and the
/// key made from `SECRET_KEY`.
///
/// The bare variables go to figment's global profile: a selected profile (e.g.
/// `[release]` in Rocket.toml) outranks the default profile, the global one outranks
/// both, so the environment wins in every profile.
pub fn figment() -> Figment {
    let figment = with_secret_key(settings(), std::env::var("SECRET_KEY").ok().as_deref());
    with_upload_limits(with_address_fallback(figment))
}

/// Rocket.toml, `ROCKET_*` and the bare variables: no key derivation, no address probe.
fn settings() -> Figment {
    // TEMP_DIR is ours (artefacts), not Rocket's `temp_dir` (uploads in flight).
    // (figment hands `map` the variable's own case: compare without it.)
    let env = Env::raw()
        .only(BARE_ENV)
        .map(|key| if key.as_str().eq_ignore_ascii_case("temp_dir") { "artefact_dir".into() } else { key.into() })
        .global();
    rocket::Config::figment().merge(env)
}

/// The port the server listens on, as configured (for `drishya healthcheck`).
pub fn configured_port() -> Option<u16> {
    settings().extract_inner("port").ok()
}

/// `LOG_FORMAT` as configured, for the logger installed before the app is built (a bad
/// value is the text format here, and stops the start in [`stage`]).
pub fn configured_log_format() -> crate::observe::LogFormat {
    settings().extract_inner("log_format").unwrap_or_default()
}

/// Gives Rocket a key for `text` (see `secret`) and records how it was made.
pub fn with_secret_key(figment: Figment, text: Option<&str>) -> Figment {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return figment;
    };
    let (key, source) = secret::interpret(text);
    let figment = figment
        .merge(Serialized::global("secret_key_source", source))
        .merge(Serialized::global("secret_key_placeholder", secret::is_placeholder(text)));
    match key {
        secret::Interpreted::AsIs => figment.merge(Serialized::global("secret_key", text)),
        secret::Interpreted::Derived(bytes) => figment.merge(Serialized::global("secret_key", bytes.to_vec())),
    }
}

/// `::` (IPv6, and IPv4 too on a dual-stack kernel) where the kernel has IPv6; a kernel
/// without it cannot bind `::`, and `0.0.0.0` is the closest it can do.
fn with_address_fallback(figment: Figment) -> Figment {
    let address: Option<std::net::IpAddr> = figment.extract_inner("address").ok();
    if address != Some(std::net::Ipv6Addr::UNSPECIFIED.into()) {
        return figment;
    }
    if std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).is_ok() {
        return figment;
    }
    eprintln!("drishya: this kernel has no IPv6: listening on 0.0.0.0 instead of ::");
    figment.merge(Serialized::global("address", std::net::Ipv4Addr::UNSPECIFIED.to_string()))
}

/// Reads `KEY=value` lines from `file` into the environment, as a Flask deployment's
/// `.env` is read by python-dotenv: variables already set win; a missing file is no
/// error. Call it before any thread starts (it sets environment variables).
pub fn load_env_file(file: &Path) -> Result<usize, ConfigError> {
    let iter = match dotenvy::from_path_iter(file) {
        Ok(iter) => iter,
        Err(e) if e.not_found() => return Ok(0),
        Err(e) => return Err(ConfigError::EnvFileUnreadable { file: file.display().to_string(), why: e.to_string() }),
    };
    let mut set = 0;
    for item in iter {
        let (key, value) = item.map_err(|e| env_file_error(file, &e))?;
        if std::env::var_os(&key).is_none() {
            std::env::set_var(&key, value);
            set += 1;
        }
    }
    Ok(set)
}

/// One line naming the file, the line number and the variable, never the value (it may
/// be a secret; dotenvy's own message quotes the whole line).
fn env_file_error(file: &Path, error: &dotenvy::Error) -> ConfigError {
    let name = file.display().to_string();
    let dotenvy::Error::LineParse(bad, column) = error else {
        return ConfigError::EnvFileUnreadable { file: name, why: "not a KEY=value file".into() };
    };
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let first = bad.lines().next().unwrap_or("");
    let line = text.lines().position(|l| l == first).map_or(0, |i| i + 1);
    let var = first.trim_start_matches("export ").split('=').next().unwrap_or("").trim();
    let why = format!("{var}: cannot be parsed at column {} (check its quotes and escapes)", column + 1);
    ConfigError::EnvFile { file: name, line, why }
}

/// Sets `limits.data-form`/`limits.file` from `max_upload_mb` (plus multipart overhead).
pub fn with_upload_limits(figment: Figment) -> Figment {
    let mb: u64 = figment.extract_inner("max_upload_mb").unwrap_or(16);
    let file = mb.saturating_mul(1024 * 1024);
    let form = file.saturating_add(1024 * 1024);
    // Global: MAX_UPLOAD_MB is the one knob, whatever a Rocket.toml profile says.
    figment
        .merge(Serialized::global("limits.file", file))
        .merge(Serialized::global("limits.data-form", form))
        .merge(Serialized::global("limits.json", 64 * 1024))
}

/// Extracts and validates [`AppConfig`]; a failure aborts the launch with one line.
/// Runs before Rocket reads its own settings (fairings come first), so Rocket's own bad
/// values are named here too instead of "failed to extract configuration".
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Drishya configuration", |rocket| async move {
        match checked(rocket.figment()) {
            Ok(cfg) => {
                warn_about(&cfg);
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

/// Rocket's settings and ours from `figment`, or the first problem, naming its variable.
pub fn checked(figment: &Figment) -> Result<AppConfig, ConfigError> {
    let extract = |e: rocket::figment::Error| ConfigError::Extract(describe_figment_error(&e));
    let rocket_config = rocket::Config::try_from(figment).map_err(extract)?;
    let cfg: AppConfig = figment.extract().map_err(extract)?;
    let production = production_marker(figment.profile().as_str().as_str());
    cfg.validate(production.as_deref())?;
    let assets = crate::web::static_dir();
    if !assets.is_dir() {
        let why = format!(
            "{} is not a directory: start Drishya from the folder that holds static/ and templates/ \
             (the repository, or /app in the image), or set STATIC_DIR",
            assets.display()
        );
        return Err(ConfigError::Invalid { var: "STATIC_DIR", why });
    }
    if let Some(marker) = production {
        if !rocket_config.secret_key.is_provided() {
            return Err(ConfigError::SecretKeyMissing { marker });
        }
    }
    Ok(cfg)
}

fn warn_about(cfg: &AppConfig) {
    if cfg.uses_default_password() {
        log::warn!(
            "APP_PASSWORD is not set: the DEFAULT password '{DEFAULT_PASSWORD}' is in use. \
             Set APP_PASSWORD before exposing this server."
        );
    }
    match cfg.secret_key_source {
        Some(KeySource::Derived) => {
            log::info!("SECRET_KEY is not a base64/hex key: the cookie key was derived from it (HKDF-SHA-512)")
        }
        Some(KeySource::TooShort) => {
            log::warn!("SECRET_KEY is shorter than {} characters: accepted outside production only", secret::MIN_CHARS)
        }
        _ => {}
    }
    if cfg.secret_key_placeholder {
        log::warn!(
            "SECRET_KEY is an example file's placeholder: anyone who has read that file can forge \
             sessions. Set it to a random string (openssl rand -base64 48)."
        );
    }
}

/// The variable a config key is set by: the bare name where there is one.
fn variable_for(key: &str) -> String {
    match key {
        "artefact_dir" => "TEMP_DIR".into(),
        // SECRET_KEY itself always becomes a usable key: a bad one came from here.
        "secret_key" => "ROCKET_SECRET_KEY (or secret_key in Rocket.toml)".into(),
        _ => {
            let upper = key.to_ascii_uppercase().replace(['.', '-'], "_");
            if BARE_ENV.contains(&upper.as_str()) {
                upper
            } else {
                format!("ROCKET_{upper}")
            }
        }
    }
}

/// Turns figment's error into one line naming the variable (never a secret's value).
fn describe_figment_error(error: &rocket::figment::Error) -> String {
    let key = error.path.join(".");
    if key.is_empty() {
        return error.kind.to_string();
    }
    let var = variable_for(&key);
    // A token of digits only is read as a number and refused: never quote it.
    if key == "metrics_token" {
        return format!("{var}: not a usable value ({})", kind_without_value(&error.kind));
    }
    if key == "secret_key" || key == "app_password" || key == "api_tokens" {
        return format!("{var}: not a usable value ({})", kind_without_value(&error.kind));
    }
    format!("{var}: {}", error.kind)
}

/// What was wrong, without quoting the value (for secrets).
fn kind_without_value(kind: &rocket::figment::error::Kind) -> String {
    use rocket::figment::error::Kind;
    match kind {
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => format!("expected {expected}"),
        Kind::InvalidLength(len, expected) => format!("length {len}, expected {expected}"),
        _ => "invalid".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SPECULATIVE_EMBEDDING` as the environment gives it: a string, `0`/`false` off.
    #[test]
    fn speculative_embedding_is_on_by_default_and_0_or_false_turns_it_off() {
        assert!(AppConfig::default().speculative_embedding);
        assert_eq!(variable_for("speculative_embedding"), "SPECULATIVE_EMBEDDING");
        for (text, on) in [("0", false), ("false", false), ("off", false), ("1", true), ("TRUE", true), ("on", true)] {
            // As figment reads the variable: `0` becomes a number, `false` a boolean.
            let value: rocket::figment::value::Value = text.parse().unwrap_or_else(|e| panic!("{text}: {e:?}"));
            let figment = Figment::new().merge(Serialized::global("speculative_embedding", value));
            let cfg: AppConfig = figment.extract().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(cfg.speculative_embedding, on, "SPECULATIVE_EMBEDDING={text}");
        }
        let refused = Figment::new().merge(Serialized::global("speculative_embedding", 2)).extract::<AppConfig>();
        let why = refused.err().map(|e| describe_figment_error(&e)).unwrap_or_default();
        assert!(why.starts_with("SPECULATIVE_EMBEDDING: ") && why.contains("1/0"), "{why}");
    }
}
