//! Per-session artefacts under `TEMP_DIR`: atomic writes, random names, TTL sweep.
//!
//! Layout: `<root>/sessions/<session id>/<artefact>.png`. The session id is random,
//! server-generated and carried in an encrypted cookie, so no path is ever built from
//! user input. Files are written to a random temporary name and renamed into place.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::Rng;
use rocket::fairing::AdHoc;
use rocket::http::Status;

use crate::config::AppConfig;

const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EDQUOT: i32 = 122;

/// Sessions used this recently are never evicted for the byte cap.
const ACTIVE_GRACE: Duration = Duration::from_secs(600);

/// The files a session can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artefact {
    Image,
    Mask,
    MaskOverlay,
    Result,
}

impl Artefact {
    fn file_name(self) -> &'static str {
        match self {
            Artefact::Image => "image.png",
            Artefact::Mask => "mask.png",
            Artefact::MaskOverlay => "mask_overlay.png",
            Artefact::Result => "result.png",
        }
    }

    fn missing(self) -> &'static str {
        match self {
            Artefact::Image => "no image uploaded yet: upload a scene image first",
            Artefact::Mask | Artefact::MaskOverlay => "no mask yet: generate a mask first",
            Artefact::Result => "no result yet: replace the product first",
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
    #[error("temporary storage failed: {0}")]
    Io(#[from] io::Error),
}

impl StorageError {
    pub fn status(&self) -> Status {
        match self {
            StorageError::NotFound(_) => Status::NotFound,
            StorageError::Full(_) => Status::InsufficientStorage,
            StorageError::ReadOnly(_) | StorageError::Io(_) => Status::InternalServerError,
        }
    }

    /// What the client is told (no paths, no OS detail).
    pub fn public_message(&self) -> &'static str {
        match self {
            StorageError::NotFound(artefact) => artefact.missing(),
            StorageError::Full(_) => "the server's temporary storage is full; try again later",
            StorageError::ReadOnly(_) => "the server's temporary storage is read-only; tell the operator",
            StorageError::Io(_) => "the server's temporary storage is unavailable; tell the operator",
        }
    }

    /// Classifies a failed write: full (507), read-only or other (500).
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

/// Directory state for `/health`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DirHealth {
    pub temp_dir_exists: bool,
    pub temp_dir_writable: bool,
}

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: usize,
    pub evicted: usize,
}

pub struct TempStore {
    root: PathBuf,
    ttl: Duration,
    max_bytes: u64,
}

impl TempStore {
    /// Uses `root` (created if missing). A failure here is reported, not fatal:
    /// `/health` and each request say what is wrong.
    pub fn new(root: PathBuf, ttl: Duration, max_bytes: u64) -> Self {
        let store = TempStore { root, ttl, max_bytes };
        if let Err(e) = store.ensure_root() {
            log::error!("temporary directory {} is not usable: {e}", store.root.display());
        }
        store
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sessions_dir(&self) -> PathBuf {
        self.root.join("sessions")
    }

    fn ensure_root(&self) -> io::Result<()> {
        fs::create_dir_all(self.sessions_dir())?;
        set_private(&self.root);
        Ok(())
    }

    fn session_dir(&self, session: &SessionId) -> PathBuf {
        self.sessions_dir().join(session.as_str())
    }

    /// Where an artefact lives (it may not exist).
    pub fn path(&self, session: &SessionId, artefact: Artefact) -> PathBuf {
        self.session_dir(session).join(artefact.file_name())
    }

    /// Writes atomically: random temporary name, fsync, rename.
    pub fn write(&self, session: &SessionId, artefact: Artefact, bytes: &[u8]) -> Result<(), StorageError> {
        let dir = self.session_dir(session);
        fs::create_dir_all(&dir).map_err(StorageError::from_write)?;
        let suffix: u64 = rand::rng().random();
        let tmp = dir.join(format!(".{}.{suffix:016x}.tmp", artefact.file_name()));
        let written = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, dir.join(artefact.file_name())));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StorageError::from_write(e));
        }
        touch(&dir);
        Ok(())
    }

    /// Reads an artefact whole (they are small PNGs); marks the session as in use.
    pub fn read(&self, session: &SessionId, artefact: Artefact) -> Result<Vec<u8>, StorageError> {
        let path = self.path(session, artefact);
        match read_uncached(&path) {
            Ok(bytes) => {
                touch(&self.session_dir(session));
                Ok(bytes)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound(artefact)),
            Err(e) => Err(StorageError::Io(e)),
        }
    }

    /// A key that changes whenever the artefact is rewritten (for caches).
    pub fn version_key(&self, session: &SessionId, artefact: Artefact) -> Result<String, StorageError> {
        let meta = fs::metadata(self.path(session, artefact)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound(artefact),
            _ => StorageError::Io(e),
        })?;
        let stamp =
            meta.modified().ok().and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok()).unwrap_or_default();
        Ok(format!("{}:{}:{}", session.as_str(), stamp.as_nanos(), meta.len()))
    }

    /// Removes artefacts that a newer upload makes stale.
    pub fn remove(&self, session: &SessionId, artefacts: &[Artefact]) {
        for artefact in artefacts {
            let _ = fs::remove_file(self.path(session, *artefact));
        }
    }

    /// Removes the whole session (logout).
    pub fn remove_session(&self, session: &SessionId) {
        let _ = fs::remove_dir_all(self.session_dir(session));
    }

    pub fn health(&self) -> DirHealth {
        let exists = self.root.is_dir();
        let writable = exists && {
            let probe = self.root.join(format!(".health-{}", std::process::id()));
            let ok = fs::write(&probe, b"ok").is_ok();
            let _ = fs::remove_file(&probe);
            ok
        };
        DirHealth { temp_dir_exists: exists, temp_dir_writable: writable }
    }

    /// Removes sessions idle for longer than the TTL, then the least recently used
    /// ones while the total is above the byte cap. Also recreates a missing root.
    pub fn sweep(&self) -> SweepReport {
        let _ = self.ensure_root();
        let mut sessions = self.list_sessions();
        let now = SystemTime::now();
        let mut report = SweepReport::default();
        sessions.retain(|s| {
            let idle = now.duration_since(s.last_used).unwrap_or_default();
            if idle > self.ttl {
                let _ = fs::remove_dir_all(&s.dir);
                report.expired += 1;
                return false;
            }
            true
        });
        sessions.sort_by_key(|s| s.last_used);
        let mut total: u64 = sessions.iter().map(|s| s.bytes).sum();
        for s in &sessions {
            if total <= self.max_bytes {
                break;
            }
            // A session used in the last few minutes is someone's work in progress: the
            // cap may be exceeded for a while rather than lose it.
            if now.duration_since(s.last_used).unwrap_or_default() < ACTIVE_GRACE {
                continue;
            }
            let _ = fs::remove_dir_all(&s.dir);
            total = total.saturating_sub(s.bytes);
            report.evicted += 1;
        }
        report
    }

    fn list_sessions(&self) -> Vec<SessionUsage> {
        let Ok(entries) = fs::read_dir(self.sessions_dir()) else {
            return Vec::new();
        };
        entries.flatten().filter_map(|e| session_usage(&e.path())).collect()
    }
}

struct SessionUsage {
    dir: PathBuf,
    last_used: SystemTime,
    bytes: u64,
}

fn session_usage(dir: &Path) -> Option<SessionUsage> {
    let meta = fs::metadata(dir).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let mut last_used = meta.modified().ok()?;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if let Ok(m) = entry.metadata() {
            bytes += m.len();
            if let Ok(t) = m.modified() {
                last_used = last_used.max(t);
            }
        }
    }
    Some(SessionUsage { dir: dir.to_path_buf(), last_used, bytes })
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    drop_cached_pages(&file);
    Ok(())
}

/// Flushes a file and drops it from the page cache (an upload waiting for its turn).
pub fn uncache(path: &Path) -> io::Result<()> {
    let file = fs::File::open(path)?;
    file.sync_data()?;
    drop_cached_pages(&file);
    Ok(())
}

fn read_uncached(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    drop_cached_pages(&file);
    Ok(bytes)
}

/// Asks the kernel to drop the file's (clean) pages from the page cache. The page cache
/// counts against a container's memory limit: 64 sessions' artefacts kept the 512 MB
/// cgroup's usage ~200 MB above the server's own RSS (docs/performance.md §4). Each
/// artefact is read once per request, so caching it buys little. No effect on tmpfs.
fn drop_cached_pages(file: &fs::File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: advice on an open descriptor; never changes the file's contents.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Marks a session directory as used now (the sweep looks at this time).
fn touch(dir: &Path) {
    if let Ok(file) = fs::File::open(dir) {
        let _ = file.set_modified(SystemTime::now());
    }
}

fn set_private(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
}

/// Manages the [`TempStore`] and runs the sweep every minute after liftoff.
pub fn stage() -> AdHoc {
    AdHoc::on_ignite("Temporary storage", |rocket| async move {
        let Some(cfg) = rocket.state::<AppConfig>() else {
            return rocket;
        };
        let root = cfg.resolved_temp_dir();
        let ttl = Duration::from_secs(cfg.temp_ttl_secs);
        let max_bytes = cfg.temp_max_mb * 1024 * 1024;
        log::info!("temporary files under {}", root.display());
        rocket.manage(std::sync::Arc::new(TempStore::new(root, ttl, max_bytes))).attach(AdHoc::on_liftoff(
            "Temporary file sweep",
            |rocket| {
                Box::pin(async move {
                    if let Some(store) = rocket.state::<std::sync::Arc<TempStore>>().cloned() {
                        rocket::tokio::spawn(sweep_forever(store));
                    }
                })
            },
        ))
    })
}

async fn sweep_forever(store: std::sync::Arc<TempStore>) {
    let mut tick = rocket::tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let store = store.clone();
        if let Ok(report) = rocket::tokio::task::spawn_blocking(move || store.sweep()).await {
            if report != SweepReport::default() {
                log::info!("temp sweep: {} expired, {} evicted", report.expired, report.evicted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_atomic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = TempStore::new(dir.path().to_path_buf(), Duration::from_secs(3600), 1 << 30);
        let sid = SessionId::random();
        store.write(&sid, Artefact::Image, b"abc").unwrap();
        assert_eq!(store.read(&sid, Artefact::Image).unwrap(), b"abc");
        let leftovers: Vec<_> = fs::read_dir(store.session_dir(&sid)).unwrap().flatten().collect();
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
    fn sweep_expires_idle_sessions_and_evicts_oldest_over_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = TempStore::new(dir.path().to_path_buf(), Duration::from_secs(3600), 150);
        let old = SessionId::random();
        let mid = SessionId::random();
        let new = SessionId::random();
        store.write(&old, Artefact::Image, &[0; 100]).unwrap();
        store.write(&mid, Artefact::Image, &[0; 100]).unwrap();
        store.write(&new, Artefact::Image, &[0; 100]).unwrap();
        let age = |sid: &SessionId, secs: u64| {
            let t = SystemTime::now() - Duration::from_secs(secs);
            for p in [store.path(sid, Artefact::Image), store.session_dir(sid)] {
                fs::File::open(p).unwrap().set_modified(t).unwrap();
            }
        };
        age(&old, 7200);
        age(&mid, 900);
        let report = store.sweep();
        assert_eq!(report, SweepReport { expired: 1, evicted: 1 });
        assert!(!store.session_dir(&old).exists());
        assert!(!store.session_dir(&mid).exists(), "least recently used goes first");
        assert!(store.session_dir(&new).exists());
        // Sessions in use (within the grace period) are kept even over the cap.
        let busy = SessionId::random();
        store.write(&busy, Artefact::Image, &[0; 100]).unwrap();
        assert_eq!(store.sweep(), SweepReport::default());
        assert!(store.session_dir(&busy).exists() && store.session_dir(&new).exists());
    }
}
