//! Per-session artefacts (scene, mask, overlay, result PNGs; the photo as uploaded and the
//! last replacement's product and settings, for the full-resolution result) behind one small trait,
//! [`Backend`] (put, get, delete, list by session with last-use times), with a byte cap
//! that holds at every write (see `ledger`) and a TTL sweep, both written once here for
//! every backend.
//!
//! Backends: [`LocalDir`] (a directory on this machine, the default: nothing else to run)
//! and [`S3Bucket`] (an S3-compatible bucket that several replicas share; any replica can
//! then serve any request of a flow). Keys are `sessions/<session id>/<artefact file name>`: the
//! session id is random, server-generated and carried in an encrypted cookie, so no key
//! is ever built from user input.

mod ledger;
mod local;
mod s3;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

pub use ledger::SessionUsage;
use ledger::{footprint, Ledger};
pub use local::{finish_spool, spool_file, uncache, LocalDir};
pub use s3::{S3Bucket, S3Settings, S3SettingsError};

use rand::Rng;
use rocket::fairing::AdHoc;

use crate::config::AppConfig;

const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EDQUOT: i32 = 122;

/// Seconds a client is told to wait when every session under the cap is in use, or the
/// shared store is unreachable.
const RETRY_SECS: u64 = 5;

/// The files a session can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artefact {
    Image,
    Mask,
    MaskOverlay,
    Result,
    /// The uploaded photo's own bytes, for the full-resolution result (kept only when the
    /// working image is smaller than the photo).
    Original,
    /// What the last `/replace_product` used: its settings and the product's bytes
    /// (drishya_imaging::fullres::Replacement), so the full-resolution result repeats it.
    Replacement,
}

impl Artefact {
    const ALL: [Artefact; ledger::FILES] = [
        Artefact::Image,
        Artefact::Mask,
        Artefact::MaskOverlay,
        Artefact::Result,
        Artefact::Original,
        Artefact::Replacement,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn file_name(self) -> &'static str {
        match self {
            Artefact::Image => "image.png",
            Artefact::Mask => "mask.png",
            Artefact::MaskOverlay => "mask_overlay.png",
            Artefact::Result => "result.png",
            // No name may start with another (the local listing matches by prefix).
            Artefact::Original => "original.img",
            Artefact::Replacement => "replacement.bin",
        }
    }

    fn missing(self) -> &'static str {
        match self {
            Artefact::Image => "no scene image for this session (none uploaded yet, or it expired): upload it again",
            Artefact::Mask | Artefact::MaskOverlay => "no mask yet: generate a mask first",
            Artefact::Result | Artefact::Replacement => "no result yet: replace the product first",
            Artefact::Original => "the full-resolution photo is not kept for this session: upload it again",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{}", .0.missing())]
    NotFound(Artefact),
    #[error("temporary storage is full: {0}")]
    Full(io::Error),
    #[error("temporary storage is read-only: {0}")]
    ReadOnly(io::Error),
    /// Every session under the byte cap is in use by a request.
    #[error("the artefact cap is reached and every session is in use")]
    CapReached,
    #[error("temporary storage failed: {0}")]
    Io(#[from] io::Error),
    /// The shared store cannot be reached, or is overloaded (waiting helps).
    #[error("the artefact store is unreachable: {0}")]
    Unavailable(String),
    /// The shared store refused our credentials.
    #[error("the artefact store refused access: {0}")]
    Denied(String),
    /// The shared store refused a request otherwise (no such bucket, ...).
    #[error("the artefact store refused a request: {0}")]
    Rejected(String),
}

impl StorageError {
    /// What the client is told (no paths, no keys, no OS detail).
    pub fn public_message(&self) -> &'static str {
        match self {
            StorageError::NotFound(artefact) => artefact.missing(),
            StorageError::Full(_) => "the server's temporary storage is full; try again later",
            StorageError::CapReached => "the server is holding as many images as it may; try again in a few seconds",
            StorageError::ReadOnly(_) => "the server's temporary storage is read-only; tell the operator",
            StorageError::Io(_) => "the server's temporary storage is unavailable; tell the operator",
            StorageError::Unavailable(_) => "the image store cannot be reached just now; try again in a few seconds",
            StorageError::Denied(_) => "the image store refused the server's credentials; tell the operator",
            StorageError::Rejected(_) => "the image store refused a request; tell the operator",
        }
    }

    /// Seconds to wait before trying again, where waiting helps.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, StorageError::CapReached | StorageError::Unavailable(_)).then_some(RETRY_SECS)
    }

    /// Classifies a failed local write: full (507), read-only or other (500).
    pub fn from_write(error: io::Error) -> Self {
        use io::ErrorKind::{QuotaExceeded, ReadOnlyFilesystem, StorageFull};
        match (error.raw_os_error(), error.kind()) {
            (Some(ENOSPC | EDQUOT), _) | (_, StorageFull | QuotaExceeded) => StorageError::Full(error),
            (Some(EROFS), _) | (_, ReadOnlyFilesystem) => StorageError::ReadOnly(error),
            _ => StorageError::Io(error),
        }
    }
}

/// A random, server-generated session id (32 lowercase hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    pub fn random() -> Self {
        let bytes: [u8; 16] = rand::rng().random();
        SessionId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Accepts only the exact shape we generate.
    pub fn parse(value: &str) -> Option<Self> {
        let ok = value.len() == 32 && value.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| SessionId(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The artefact-store abstraction: what a place that keeps sessions' artefacts must do.
/// Calls block (they run on the blocking pool); each object is small and whole.
pub trait Backend: Send + Sync {
    /// "local" or "s3", for `/health` and the logs.
    fn kind(&self) -> &'static str;
    /// Whether the bytes are RAM (a tmpfs): then they count in the memory budget.
    fn in_memory(&self) -> bool {
        false
    }
    /// Stores an artefact atomically: a reader sees the old bytes or the new, never a part.
    fn put(&self, session: &str, artefact: Artefact, bytes: &[u8]) -> Result<(), StorageError>;
    fn get(&self, session: &str, artefact: Artefact) -> Result<Vec<u8>, StorageError>;
    /// Deleting what is not there succeeds.
    fn delete(&self, session: &str, artefact: Artefact) -> Result<(), StorageError>;
    fn delete_session(&self, session: &str) -> Result<(), StorageError>;
    /// Every session held, with its artefacts' sizes and its last use.
    fn list(&self) -> Result<Vec<SessionUsage>, StorageError>;
    fn health(&self) -> BackendHealth;
    /// The directory, for a store on this machine's disk.
    fn root(&self) -> Option<&Path> {
        None
    }
}

/// A backend's state for `/health` and `/ready`.
#[derive(Debug, Clone)]
pub struct BackendHealth {
    pub kind: &'static str,
    pub reachable: bool,
    pub writable: bool,
    /// What is wrong, in words fit for an operator (no paths or keys).
    pub problem: Option<String>,
}

/// Artefact state for `/health` (`directories`). The Flask app's `temp_dir_*` keys say
/// whether the store (local directory or bucket) can be reached and written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirHealth {
    pub temp_dir_exists: bool,
    pub temp_dir_writable: bool,
    /// "local" or "s3".
    pub store: &'static str,
    pub store_problem: Option<String>,
    /// Bytes the artefacts take (as this replica knows them), and the cap they are held under.
    pub artefact_mb: f64,
    pub artefact_cap_mb: f64,
    /// On tmpfs: the artefacts are RAM (counted in the model's memory budget).
    pub temp_dir_in_memory: bool,
}

impl DirHealth {
    /// When the store could not even be asked.
    pub fn unknown() -> Self {
        DirHealth {
            temp_dir_exists: false,
            temp_dir_writable: false,
            store: "unknown",
            store_problem: Some("the artefact store's state could not be read".into()),
            artefact_mb: 0.0,
            artefact_cap_mb: 0.0,
            temp_dir_in_memory: false,
        }
    }
}

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: usize,
    pub evicted: usize,
}

/// The artefacts of every session: a backend, and the cap, expiry and pins that hold for
/// any backend.
pub struct Artefacts {
    backend: Box<dyn Backend>,
    ttl: Duration,
    max_bytes: u64,
    in_memory: bool,
    ledger: Mutex<Ledger>,
}

/// A request using a session: while it lives, the session is not evicted.
pub struct Pin {
    store: Arc<Artefacts>,
    session: SessionId,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.store.ledger().unpin(self.session.as_str());
    }
}

impl Artefacts {
    /// Takes stock of what `backend` holds already (an unreachable store is reported by
    /// `/health`; the first sweep that reaches it takes stock).
    pub fn new(backend: Box<dyn Backend>, ttl: Duration, max_bytes: u64) -> Self {
        let in_memory = backend.in_memory();
        let store = Artefacts { backend, ttl, max_bytes, in_memory, ledger: Mutex::new(Ledger::default()) };
        match store.backend.list() {
            Ok(listing) => store.ledger().resync(listing),
            Err(e) => log::warn!("artefact store ({}): cannot list it yet: {e}", store.backend.kind()),
        }
        store
    }

    /// A local directory store (the default).
    pub fn local(root: PathBuf, ttl: Duration, max_bytes: u64) -> Self {
        Artefacts::new(Box::new(LocalDir::new(root)), ttl, max_bytes)
    }

    /// The ledger; a panic elsewhere while it was held leaves numbers that the next
    /// sweep's listing corrects, so a poisoned lock is used as it is.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `session` from being evicted until the returned pin is dropped.
    pub fn pin(self: &Arc<Self>, session: &SessionId) -> Pin {
        self.ledger().pin(session.as_str(), SystemTime::now());
        Pin { store: self.clone(), session: session.clone() }
    }

    /// The directory of a store on this machine's disk.
    pub fn root(&self) -> Option<&Path> {
        self.backend.root()
    }

    /// Bytes the artefacts take now.
    pub fn bytes(&self) -> u64 {
        self.ledger().total()
    }

    /// Tells the memory guard what the artefacts take when they are RAM.
    fn report(&self, ledger: &Ledger) {
        if self.in_memory {
            crate::sysmem::set_artefact_ram(ledger.total());
        }
    }

    /// Deletes evicted or expired sessions. Called with the ledger held: a request for
    /// one of them that starts now must not have its new artefacts deleted by this. A
    /// failure leaves objects the ledger no longer counts; the next listing finds them.
    fn discard(&self, sessions: &[String], why: &str) {
        for id in sessions {
            if let Err(e) = self.backend.delete_session(id) {
                log::warn!("artefact store: could not delete a session ({why}): {e}");
            }
        }
    }

    /// Stores an artefact within the byte cap: room is made first by evicting idle
    /// sessions, or the write is refused.
    pub fn write(&self, session: &SessionId, artefact: Artefact, bytes: &[u8]) -> Result<(), StorageError> {
        let now = SystemTime::now();
        let (id, file) = (session.as_str(), artefact.index());
        let before = {
            let mut ledger = self.ledger();
            let before = ledger.bytes_of(id, file);
            let evicted = ledger.reserve(id, file, footprint(bytes.len() as u64), self.max_bytes, now);
            let evicted = evicted.map_err(|_| crate::observe::cap_refused())?;
            if !evicted.is_empty() {
                self.discard(&evicted, "cap");
                log::info!("artefact cap: evicted {} idle session(s)", evicted.len());
            }
            self.report(&ledger);
            before
        };
        if let Err(e) = self.backend.put(id, artefact, bytes) {
            // A failed put leaves the previous object (puts are atomic).
            let mut ledger = self.ledger();
            ledger.set(id, file, before, now);
            self.report(&ledger);
            return Err(e);
        }
        Ok(())
    }

    /// Reads an artefact whole (they are small PNGs); marks the session as in use.
    pub fn read(&self, session: &SessionId, artefact: Artefact) -> Result<Vec<u8>, StorageError> {
        let bytes = self.backend.get(session.as_str(), artefact)?;
        self.ledger().touch(session.as_str(), SystemTime::now());
        Ok(bytes)
    }

    /// Removes artefacts that a newer upload or mask makes stale. Fails if they may
    /// still be there: a stale mask must never meet a new scene.
    pub fn remove(&self, session: &SessionId, artefacts: &[Artefact]) -> Result<(), StorageError> {
        for artefact in artefacts {
            self.backend.delete(session.as_str(), *artefact)?;
            let mut ledger = self.ledger();
            ledger.set(session.as_str(), artefact.index(), 0, SystemTime::now());
            self.report(&ledger);
        }
        Ok(())
    }

    /// Removes the whole session (logout). Best effort: what is left expires.
    pub fn remove_session(&self, session: &SessionId) {
        let mut ledger = self.ledger();
        self.discard(&[session.as_str().to_string()], "logout");
        ledger.forget(session.as_str());
        self.report(&ledger);
    }

    /// The store's state; may ask a remote store (call it off the async workers).
    pub fn health(&self) -> DirHealth {
        let backend = self.backend.health();
        let mb = |bytes: u64| (bytes as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0;
        DirHealth {
            temp_dir_exists: backend.reachable,
            temp_dir_writable: backend.writable,
            store: backend.kind,
            store_problem: backend.problem,
            artefact_mb: mb(self.bytes()),
            artefact_cap_mb: mb(self.max_bytes),
            temp_dir_in_memory: self.in_memory,
        }
    }

    /// Lists the store (it is the truth; the ledger is its summary), removes sessions
    /// idle for longer than the TTL, and evicts least recently used idle ones should the
    /// store hold more than the cap (files left from an earlier run, a lowered cap, other
    /// replicas' sessions). Sessions in use here are never removed. Safe to run on every
    /// replica at once: deleting what another replica deleted first succeeds.
    pub fn sweep(&self) -> SweepReport {
        let listing = match self.backend.list() {
            Ok(listing) => listing,
            Err(e) => {
                log::warn!("artefact sweep skipped: {e}");
                return SweepReport::default();
            }
        };
        let mut ledger = self.ledger();
        ledger.resync(listing);
        let expired = ledger.expire(SystemTime::now(), self.ttl);
        let evicted = ledger.trim(self.max_bytes);
        self.discard(&expired, "expired");
        self.discard(&evicted, "cap");
        self.report(&ledger);
        SweepReport { expired: expired.len(), evicted: evicted.len() }
    }
}

/// Where artefacts live, from `STORAGE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// Unset: `TEMP_DIR` (or its default); `file://PATH`: that directory.
    Local(Option<PathBuf>),
    /// `s3://BUCKET[/PREFIX]`.
    S3 { bucket: String, prefix: String },
}

impl StorageUrl {
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(StorageUrl::Local(None));
        }
        if let Some(path) = value.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err("file:// needs an absolute path (file:///var/drishya)".into());
            }
            return Ok(StorageUrl::Local(Some(PathBuf::from(path))));
        }
        if let Some(rest) = value.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !valid {
                return Err("the bucket name must be 3-63 lowercase letters, digits, '-' or '.'".into());
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
                return Err("the prefix must not contain '.', '..' or empty parts".into());
            }
            return Ok(StorageUrl::S3 { bucket: bucket.to_string(), prefix: prefix.to_string() });
        }
        Err("must be empty, file:///PATH or s3://BUCKET[/PREFIX]".into())
    }
}

/// The backend the configuration names (a bad one stops the launch).
fn backend(cfg: &AppConfig) -> Result<Box<dyn Backend>, String> {
    let url = StorageUrl::parse(&cfg.storage_url).map_err(|why| format!("STORAGE_URL {why}"))?;
    Ok(match url {
        StorageUrl::Local(path) => {
            let root = path.unwrap_or_else(|| cfg.resolved_temp_dir());
            log::info!("artefacts under {}", root.display());
            Box::new(LocalDir::new(root))
        }
        StorageUrl::S3 { bucket, prefix } => {
            let settings = cfg.s3_settings(bucket, prefix);
            log::info!(
                "artefacts in the bucket {} (prefix {:?}) at {}",
                settings.bucket,
                settings.prefix,
                settings.endpoint.as_deref().unwrap_or("AWS")
            );
            Box::new(S3Bucket::new(settings).map_err(|e| e.to_string())?)
        }
    })
}

/// Manages the [`Artefacts`] store and runs the sweep every minute after liftoff.
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Artefact storage", |rocket| async move {
        let Some(cfg) = rocket.state::<AppConfig>().cloned() else {
            return Ok(rocket);
        };
        let backend = match backend(&cfg) {
            Ok(backend) => backend,
            Err(e) => {
                log::error!("{e}");
                return Err(rocket);
            }
        };
        let ttl = Duration::from_secs(cfg.temp_ttl_secs);
        let max_bytes = cfg.temp_max_mb * 1024 * 1024;
        let store =
            rocket::tokio::task::spawn_blocking(move || Arc::new(Artefacts::new(backend, ttl, max_bytes))).await;
        let Ok(store) = store else {
            log::error!("the artefact store could not be set up");
            return Err(rocket);
        };
        Ok(rocket.manage(store).attach(AdHoc::on_liftoff("Artefact sweep", |rocket| {
            Box::pin(async move {
                if let Some(store) = rocket.state::<Arc<Artefacts>>().cloned() {
                    rocket::tokio::spawn(sweep_forever(store));
                }
            })
        })))
    })
}

async fn sweep_forever(store: Arc<Artefacts>) {
    let mut tick = rocket::tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let store = store.clone();
        if let Ok(report) = rocket::tokio::task::spawn_blocking(move || store.sweep()).await {
            if report != SweepReport::default() {
                log::info!("artefact sweep: {} expired, {} evicted", report.expired, report.evicted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn session_dir(root: &Path, sid: &SessionId) -> PathBuf {
        root.join("sessions").join(sid.as_str())
    }

    #[test]
    fn writes_are_atomic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artefacts::local(dir.path().to_path_buf(), Duration::from_secs(3600), 1 << 30);
        let sid = SessionId::random();
        store.write(&sid, Artefact::Image, b"abc").unwrap();
        assert_eq!(store.read(&sid, Artefact::Image).unwrap(), b"abc");
        let leftovers: Vec<_> = fs::read_dir(session_dir(dir.path(), &sid)).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files remain");
        assert!(matches!(store.read(&sid, Artefact::Mask), Err(StorageError::NotFound(Artefact::Mask))));
    }

    #[test]
    fn session_ids_are_strict() {
        assert!(SessionId::parse(SessionId::random().as_str()).is_some());
        assert!(SessionId::parse("../../etc/passwd").is_none());
        assert!(SessionId::parse("ABCDEF0123456789ABCDEF0123456789").is_none());
    }

    #[test]
    fn storage_urls_name_a_directory_or_a_bucket_and_nothing_else() {
        assert_eq!(StorageUrl::parse(""), Ok(StorageUrl::Local(None)));
        assert_eq!(StorageUrl::parse("file:///var/drishya"), Ok(StorageUrl::Local(Some("/var/drishya".into()))));
        assert_eq!(
            StorageUrl::parse("s3://my-bucket/drishya/prod/"),
            Ok(StorageUrl::S3 { bucket: "my-bucket".into(), prefix: "drishya/prod".into() })
        );
        assert_eq!(
            StorageUrl::parse("s3://my-bucket"),
            Ok(StorageUrl::S3 { bucket: "my-bucket".into(), prefix: "".into() })
        );
        for bad in ["file://relative", "s3://", "s3://Bad_Bucket", "s3://bucket/../x", "gs://bucket", "/tmp/x"] {
            assert!(StorageUrl::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn the_cap_holds_at_every_write_evicting_idle_sessions_and_never_busy_ones() {
        const PAGE: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let store = Arc::new(Artefacts::local(root.to_path_buf(), Duration::from_secs(3600), 2 * PAGE));
        let [a, b, c, d] = [(); 4].map(|()| SessionId::random());
        store.write(&a, Artefact::Image, &[0; 100]).unwrap();
        store.write(&b, Artefact::Image, &[0; 100]).unwrap();
        let age = |sid: &SessionId, secs: u64| {
            let t = SystemTime::now() - Duration::from_secs(secs);
            for p in [session_dir(root, sid).join("image.png"), session_dir(root, sid)] {
                fs::File::open(p).unwrap().set_modified(t).unwrap();
            }
        };
        age(&a, 1200);
        age(&b, 600);
        // (A fresh store takes its times from the disk.)
        let store = Arc::new(Artefacts::local(root.to_path_buf(), Duration::from_secs(3600), 2 * PAGE));
        assert_eq!(store.sweep(), SweepReport::default(), "within the TTL and the cap");
        // A third session does not fit: the least recently used goes at once, not a
        // minute later.
        store.write(&c, Artefact::Image, &[0; 100]).unwrap();
        let exists = |sid: &SessionId| session_dir(root, sid).exists();
        assert!(!exists(&a) && exists(&b) && exists(&c));
        assert_eq!(store.bytes(), 2 * PAGE);
        assert!(matches!(store.read(&a, Artefact::Image), Err(StorageError::NotFound(Artefact::Image))));
        // Both sessions in use: a fourth is refused (503, Retry-After), nothing is lost.
        let pins = (store.pin(&b), store.pin(&c));
        let refused = store.write(&d, Artefact::Image, &[0; 100]).unwrap_err();
        assert!(matches!(refused, StorageError::CapReached), "{refused}");
        assert_eq!(refused.retry_after(), Some(RETRY_SECS));
        assert!(!exists(&d) && exists(&b) && exists(&c));
        drop(pins);
        store.write(&d, Artefact::Image, &[0; 100]).unwrap();
        assert!(!exists(&b), "b was used before c");
        // Idle past the TTL: swept.
        age(&c, 7200);
        let store = Artefacts::local(root.to_path_buf(), Duration::from_secs(3600), 2 * PAGE);
        assert_eq!(store.sweep(), SweepReport { expired: 1, evicted: 0 });
        assert_eq!(store.bytes(), PAGE);
        // Files left on disk beyond the cap (an earlier run, a lowered cap) are trimmed.
        let smaller = Artefacts::local(root.to_path_buf(), Duration::from_secs(3600), 1);
        assert_eq!(smaller.sweep(), SweepReport { expired: 0, evicted: 1 });
    }
}
