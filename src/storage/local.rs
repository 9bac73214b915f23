//! The local artefact store: a directory on this machine (the default; nothing else to
//! run). Layout `<root>/sessions/<session id>/<artefact>.png`; each file is written to a
//! random temporary name, synced and renamed into place, and kept out of the page cache.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rand::Rng;

use super::ledger::{footprint, SessionUsage, FILES};
use super::{Artefact, Backend, BackendHealth, SessionId, StorageError};

/// tmpfs's `f_type` (statfs): artefacts there are RAM.
const TMPFS_MAGIC: i64 = 0x0102_1994;

pub struct LocalDir {
    root: PathBuf,
    in_memory: bool,
}

impl LocalDir {
    /// Uses `root` (created if missing). A failure here is reported, not fatal:
    /// `/health` and each request say what is wrong.
    pub fn new(root: PathBuf) -> Self {
        let in_memory = on_tmpfs(&root);
        let dir = LocalDir { root, in_memory };
        if let Err(e) = dir.ensure_root() {
            log::error!("temporary directory {} is not usable: {e}", dir.root.display());
        }
        dir
    }

    fn sessions_dir(&self) -> PathBuf {
        self.root.join("sessions")
    }

    fn ensure_root(&self) -> io::Result<()> {
        fs::create_dir_all(self.sessions_dir())?;
        set_private(&self.root);
        Ok(())
    }

    fn session_dir(&self, session: &str) -> PathBuf {
        self.sessions_dir().join(session)
    }

    /// Where an artefact lives (it may not exist).
    pub fn path(&self, session: &SessionId, artefact: Artefact) -> PathBuf {
        self.session_dir(session.as_str()).join(artefact.file_name())
    }
}

impl Backend for LocalDir {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn in_memory(&self) -> bool {
        self.in_memory
    }

    fn put(&self, session: &str, artefact: Artefact, bytes: &[u8]) -> Result<(), StorageError> {
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
        written.map_err(StorageError::from_write)?;
        touch(&dir);
        Ok(())
    }

    fn get(&self, session: &str, artefact: Artefact) -> Result<Vec<u8>, StorageError> {
        let dir = self.session_dir(session);
        match read_uncached(&dir.join(artefact.file_name())) {
            Ok(bytes) => {
                touch(&dir);
                Ok(bytes)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound(artefact)),
            Err(e) => Err(StorageError::Io(e)),
        }
    }

    fn delete(&self, session: &str, artefact: Artefact) -> Result<(), StorageError> {
        match fs::remove_file(self.session_dir(session).join(artefact.file_name())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StorageError::Io(e)),
            _ => Ok(()),
        }
    }

    fn delete_session(&self, session: &str) -> Result<(), StorageError> {
        match fs::remove_dir_all(self.session_dir(session)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StorageError::Io(e)),
            _ => Ok(()),
        }
    }

    /// Every session directory: its files' sizes and when it was last used. Also
    /// recreates a missing root.
    fn list(&self) -> Result<Vec<SessionUsage>, StorageError> {
        let _ = self.ensure_root();
        let entries = fs::read_dir(self.sessions_dir())?;
        Ok(entries.flatten().filter_map(|e| session_usage(&e.path())).collect())
    }

    fn root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn health(&self) -> BackendHealth {
        let exists = self.root.is_dir();
        let writable = exists && {
            let probe = self.root.join(format!(".health-{}", std::process::id()));
            let ok = fs::write(&probe, b"ok").is_ok();
            let _ = fs::remove_file(&probe);
            ok
        };
        let problem = match (exists, writable) {
            (false, _) => Some("the temp dir does not exist".to_string()),
            (true, false) => Some("the temp dir is not writable".to_string()),
            _ => None,
        };
        BackendHealth { kind: self.kind(), reachable: exists, writable, problem }
    }
}

fn session_usage(dir: &Path) -> Option<SessionUsage> {
    let meta = fs::metadata(dir).ok()?;
    let id = dir.file_name()?.to_str()?;
    if !meta.is_dir() || SessionId::parse(id).is_none() {
        return None;
    }
    let mut last_used = meta.modified().ok()?;
    let mut bytes = [0; FILES];
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
    Some(SessionUsage { id: id.to_string(), bytes, last_used })
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

/// A file for a download too large to hold in memory while a client reads it: made in
/// `dir` (on disk, where uploads in flight wait) and unlinked at once, so it goes when its
/// last handle closes, whatever happens to the request.
pub fn spool_file(dir: &Path) -> Result<fs::File, StorageError> {
    fs::create_dir_all(dir).map_err(StorageError::from_write)?;
    let suffix: u64 = rand::rng().random();
    let path = dir.join(format!(".drishya-download.{suffix:016x}.tmp"));
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&path).map_err(StorageError::from_write)?;
    fs::remove_file(&path).map_err(StorageError::from_write)?;
    Ok(file)
}

/// A written spool file flushed to disk, out of the page cache (the container's memory
/// limit counts it) and rewound for reading; returns its length.
pub fn finish_spool(file: &mut fs::File) -> Result<u64, StorageError> {
    use std::io::Seek;
    file.sync_data().map_err(StorageError::from_write)?;
    drop_cached_pages(file);
    let len = file.seek(io::SeekFrom::End(0))?;
    file.rewind()?;
    Ok(len)
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
/// cgroup's usage far above the server's own RSS (docs/performance.md §4). Each
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

/// Marks a session directory as used now (a listing reads this time).
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
