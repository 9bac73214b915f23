//! Per-session artefacts under `TEMP_DIR`: atomic writes, random names, a byte cap that
//! holds (see `ledger`), TTL sweep.
//!
//! Layout: `<root>/sessions/<session id>/<artefact>.png`. The session id is random,
//! server-generated and carried in an encrypted cookie, so no path is ever built from
//! user input. Files are written to a random temporary name and renamed into place.

mod ledger;

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ledger::{footprint, Ledger, Scanned};

use rand::Rng;
use rocket::fairing::AdHoc;
use rocket::http::Status;

use crate::config::AppConfig;

const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EDQUOT: i32 = 122;

/// Seconds a client is told to wait when every session under the cap is in use.
const CAP_RETRY_SECS: u64 = 5;

/// tmpfs's `f_type` (statfs): artefacts there are RAM.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The files a session can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artefact {
    Image,
    Mask,
    MaskOverlay,
    Result,
}

impl Artefact {
    const ALL: [Artefact; ledger::FILES] = [Artefact::Image, Artefact::Mask, Artefact::MaskOverlay, Artefact::Result];

    fn index(self) -> usize {
        self as usize
    }

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
            Artefact::Image => "no scene image for this session (none uploaded yet, or it expired): upload it again",
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
    /// Every session under the byte cap is in use by a request.
    #[error("the artefact cap is reached and every session is in use")]
    CapReached,
    #[error("temporary storage failed: {0}")]
    Io(#[from] io::Error),
}

impl StorageError {
    pub fn status(&self) -> Status {
        match self {
            StorageError::NotFound(_) => Status::NotFound,
            StorageError::Full(_) => Status::InsufficientStorage,
            StorageError::CapReached => Status::ServiceUnavailable,
            StorageError::ReadOnly(_) | StorageError::Io(_) => Status::InternalServerError,
        }
    }

    /// What the client is told (no paths, no OS detail).
    pub fn public_message(&self) -> &'static str {
        match self {
            StorageError::NotFound(artefact) => artefact.missing(),
            StorageError::Full(_) => "the server's temporary storage is full; try again later",
            StorageError::CapReached => "the server is holding as many images as it may; try again in a few seconds",
            StorageError::ReadOnly(_) => "the server's temporary storage is read-only; tell the operator",
            StorageError::Io(_) => "the server's temporary storage is unavailable; tell the operator",
        }
    }

    /// Seconds to wait before trying again, where waiting helps.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, StorageError::CapReached).then_some(CAP_RETRY_SECS)
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
    /// Bytes the artefacts take, and the cap they are held under.
    pub artefact_mb: f64,
    pub artefact_cap_mb: f64,
    /// On tmpfs: the artefacts are RAM (counted in the model's memory budget).
    pub temp_dir_in_memory: bool,
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
    in_memory: bool,
    ledger: Mutex<Ledger>,
}

/// A request using a session: while it lives, the session is not evicted.
pub struct Pin {
    store: Arc<TempStore>,
    session: SessionId,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.store.ledger().unpin(self.session.as_str());
    }
}

impl TempStore {
    /// Uses `root` (created if missing). A failure here is reported, not fatal:
    /// `/health` and each request say what is wrong.
    pub fn new(root: PathBuf, ttl: Duration, max_bytes: u64) -> Self {
        let in_memory = on_tmpfs(&root);
        let store = TempStore { root, ttl, max_bytes, in_memory, ledger: Mutex::new(Ledger::default()) };
        if let Err(e) = store.ensure_root() {
            log::error!("temporary directory {} is not usable: {e}", store.root.display());
        }
        let scan = store.scan();
        store.ledger().resync(scan);
        store
    }

    /// The ledger; a panic elsewhere while it was held leaves numbers that the next
    /// sweep's scan corrects, so a poisoned lock is used as it is.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `session` from being evicted until the returned pin is dropped.
    pub fn pin(self: &Arc<Self>, session: &SessionId) -> Pin {
        self.ledger().pin(session.as_str(), SystemTime::now());
        Pin { store: self.clone(), session: session.clone() }
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

    /// Writes atomically (random temporary name, fsync, rename) within the byte cap:
    /// room is made first by evicting idle sessions, or the write is refused.
    pub fn write(&self, session: &SessionId, artefact: Artefact, bytes: &[u8]) -> Result<(), StorageError> {
        let now = SystemTime::now();
        let size = footprint(bytes.len() as u64);
        {
            let mut ledger = self.ledger();
            let evicted = ledger.reserve(session.as_str(), artefact.index(), size, self.max_bytes, now);
            let evicted = evicted.map_err(|_| StorageError::CapReached)?;
            // Deleted under the lock: a request for an evicted session that starts now
            // must not have its new files deleted by this.
            for id in &evicted {
                let _ = fs::remove_dir_all(self.sessions_dir().join(id));
            }
            if !evicted.is_empty() {
                log::info!("artefact cap: evicted {} idle session(s)", evicted.len());
            }
            self.report(&ledger);
        }
        let dir = self.session_dir(session);
        let written = fs::create_dir_all(&dir).and_then(|()| {
            let suffix: u64 = rand::rng().random();
            let tmp = dir.join(format!(".{}.{suffix:016x}.tmp", artefact.file_name()));
            let renamed = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, dir.join(artefact.file_name())));
            if renamed.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            renamed
        });
        if let Err(e) = written {
            let on_disk = fs::metadata(self.path(session, artefact)).map_or(0, |m| footprint(m.len()));
            let mut ledger = self.ledger();
            ledger.set(session.as_str(), artefact.index(), on_disk, now);
            self.report(&ledger);
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
                self.ledger().touch(session.as_str(), SystemTime::now());
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
        let mut ledger = self.ledger();
        for artefact in artefacts {
            let _ = fs::remove_file(self.path(session, *artefact));
            ledger.set(session.as_str(), artefact.index(), 0, SystemTime::now());
        }
        self.report(&ledger);
    }

    /// Removes the whole session (logout).
    pub fn remove_session(&self, session: &SessionId) {
        let mut ledger = self.ledger();
        let _ = fs::remove_dir_all(self.session_dir(session));
        ledger.forget(session.as_str());
        self.report(&ledger);
    }

    pub fn health(&self) -> DirHealth {
        let exists = self.root.is_dir();
        let writable = exists && {
            let probe = self.root.join(format!(".health-{}", std::process::id()));
            let ok = fs::write(&probe, b"ok").is_ok();
            let _ = fs::remove_file(&probe);
            ok
        };
        let mb = |bytes: u64| (bytes as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0;
        DirHealth {
            temp_dir_exists: exists,
            temp_dir_writable: writable,
            artefact_mb: mb(self.bytes()),
            artefact_cap_mb: mb(self.max_bytes),
            temp_dir_in_memory: self.in_memory,
        }
    }

    /// Re-reads the disk (it is the truth; the ledger is its summary), removes sessions
    /// idle for longer than the TTL, and evicts least recently used idle ones should the
    /// disk hold more than the cap (files left from an earlier run, a lowered cap).
    /// Sessions in use are never removed. Also recreates a missing root.
    pub fn sweep(&self) -> SweepReport {
        let _ = self.ensure_root();
        let mut ledger = self.ledger();
        ledger.resync(self.scan());
        let expired = ledger.expire(SystemTime::now(), self.ttl);
        let evicted = ledger.trim(self.max_bytes);
        for id in expired.iter().chain(&evicted) {
            let _ = fs::remove_dir_all(self.sessions_dir().join(id));
        }
        self.report(&ledger);
        SweepReport { expired: expired.len(), evicted: evicted.len() }
    }

    /// Every session on disk: its files' sizes and when it was last used.
    fn scan(&self) -> Vec<Scanned> {
        let Ok(entries) = fs::read_dir(self.sessions_dir()) else {
            return Vec::new();
        };
        entries.flatten().filter_map(|e| session_usage(&e.path())).collect()
    }
}

fn session_usage(dir: &Path) -> Option<Scanned> {
    let meta = fs::metadata(dir).ok()?;
    let id = dir.file_name()?.to_str()?;
    if !meta.is_dir() || SessionId::parse(id).is_none() {
        return None;
    }
    let mut last_used = meta.modified().ok()?;
    let mut bytes = [0; ledger::FILES];
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let Ok(m) = entry.metadata() else { continue };
        if let Ok(t) = m.modified() {
            last_used = last_used.max(t);
        }
        // A temporary file of a write in flight counts with the artefact it becomes.
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let slot = Artefact::ALL.iter().find(|a| name.trim_start_matches('.').starts_with(a.file_name()));
        if let Some(artefact) = slot {
            bytes[artefact.index()] += footprint(m.len());
        }
    }
    Some(Scanned { id: id.to_string(), bytes, last_used })
}

/// Whether `dir` is on tmpfs (its pages are RAM, charged to the container).
fn on_tmpfs(dir: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        // The nearest existing ancestor: the folder itself may not exist yet.
        let Some(existing) = dir.ancestors().find(|p| p.exists()) else { return false };
        let Ok(path) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else { return false };
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid NUL-terminated path and a zeroed out-parameter of the right type.
        if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
            return false;
        }
        #[allow(clippy::unnecessary_cast)]
        return stat.f_type as i64 == TMPFS_MAGIC;
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        false
    }
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
    fn the_cap_holds_at_every_write_evicting_idle_sessions_and_never_busy_ones() {
        const PAGE: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(TempStore::new(dir.path().to_path_buf(), Duration::from_secs(3600), 2 * PAGE));
        let [a, b, c, d] = [(); 4].map(|()| SessionId::random());
        store.write(&a, Artefact::Image, &[0; 100]).unwrap();
        store.write(&b, Artefact::Image, &[0; 100]).unwrap();
        let age = |sid: &SessionId, secs: u64| {
            let t = SystemTime::now() - Duration::from_secs(secs);
            for p in [store.path(sid, Artefact::Image), store.session_dir(sid)] {
                fs::File::open(p).unwrap().set_modified(t).unwrap();
            }
        };
        age(&a, 1200);
        age(&b, 600);
        assert_eq!(store.sweep(), SweepReport::default(), "within the TTL and the cap");
        // A third session does not fit: the least recently used goes at once, not a
        // minute later.
        store.write(&c, Artefact::Image, &[0; 100]).unwrap();
        assert!(!store.session_dir(&a).exists() && store.session_dir(&b).exists() && store.session_dir(&c).exists());
        assert_eq!(store.bytes(), 2 * PAGE);
        assert!(matches!(store.read(&a, Artefact::Image), Err(StorageError::NotFound(Artefact::Image))));
        // Both sessions in use: a fourth is refused (503, Retry-After), nothing is lost.
        let pins = (store.pin(&b), store.pin(&c));
        let refused = store.write(&d, Artefact::Image, &[0; 100]).unwrap_err();
        assert_eq!((refused.status(), refused.retry_after()), (Status::ServiceUnavailable, Some(CAP_RETRY_SECS)));
        assert!(!store.session_dir(&d).exists() && store.session_dir(&b).exists() && store.session_dir(&c).exists());
        drop(pins);
        store.write(&d, Artefact::Image, &[0; 100]).unwrap();
        assert!(!store.session_dir(&b).exists(), "b was used before c");
        // Idle past the TTL: swept.
        age(&c, 7200);
        assert_eq!(store.sweep(), SweepReport { expired: 1, evicted: 0 });
        assert_eq!(store.bytes(), PAGE);
        // Files left on disk beyond the cap (an earlier run, a lowered cap) are trimmed.
        let smaller = TempStore::new(dir.path().to_path_buf(), Duration::from_secs(3600), 1);
        assert_eq!(smaller.sweep(), SweepReport { expired: 0, evicted: 1 });
    }
}
