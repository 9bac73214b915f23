//! Artefacts do not stay in the page cache after they are written or read: page cache is
//! charged to the container's memory cgroup (docs/performance.md §4).

use drishya::storage::{Artefact, Backend, LocalDir, SessionId};
use std::path::Path;

/// Pages of `path` resident in the page cache (mincore over a read-only mapping).
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    unsafe {
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
    }
    vec.iter().filter(|&&v| v & 1 == 1).count()
}

#[test]
fn artefacts_written_and_read_leave_no_page_cache_behind() {
    // On disk (the target dir), not tmpfs, where nothing can be dropped.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bytes: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();

    // Control: a plain write stays cached on this filesystem, so the measurement can see it.
    let control = root.path().join("control.bin");
    std::fs::write(&control, &bytes).unwrap();
    let cached = resident_pages(&control);
    assert!(cached > 400, "control file: {cached} pages cached; is {:?} a disk filesystem?", root.path());
    // An upload waiting for its turn is flushed and dropped the same way.
    drishya::storage::uncache(&control).unwrap();
    assert_eq!(resident_pages(&control), 0, "after uncache");

    let store = LocalDir::new(root.path().to_path_buf());
    let session = SessionId::random();
    store.put(session.as_str(), Artefact::Result, &bytes).unwrap();
    let path = store.path(&session, Artefact::Result);
    assert_eq!(resident_pages(&path), 0, "after write");
    assert_eq!(store.get(session.as_str(), Artefact::Result).unwrap(), bytes);
    assert_eq!(resident_pages(&path), 0, "after read");
}
