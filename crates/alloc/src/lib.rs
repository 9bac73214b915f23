//! The process's allocator: glibc's malloc for everything under 128 KiB, and for the big
//! blocks (tract's activations, image planes) an anonymous mapping of their own; from
//! 2 MiB on aligned to 2 MiB and advised for transparent huge pages.
//!
//! Why (docs/performance.md §2): with glibc's adaptive mmap threshold, freed activations
//! stay in the heap and a 64-flow load test peaked far above what the flows need; with a
//! fixed threshold every activation came back as fresh 4 KiB pages and the SAM encoder ran
//! markedly slower (each page a fault and a zeroing). A mapping per big block keeps the
//! first property (memory goes back to the kernel on free) and huge pages remove 511 of
//! every 512 faults.
//! `HUGE_PAGES=0` keeps the separate mappings but without the advice.
//!
//! While an inference runs ([`reuse_freed_blocks`]), a freed big block is kept for the next
//! big allocation instead of being unmapped: tract frees one activation and allocates the
//! next all through a run, and a fresh mapping costs a page fault and the kernel's zeroing
//! of every page (docs/performance.md §2 item 6). The cache does not raise the resident
//! peak: a request takes the smallest kept block that fits (its surplus kept as a block of
//! its own, joined again with its neighbours when they come back); a request that none
//! fits takes the largest, moved to the head of a fresh mapping, and the other kept blocks
//! are unmapped first, so new pages are only ever faulted in with nothing else kept. The
//! cache is emptied when the last scope ends. The surplus is kept rather than unmapped
//! because the transformer MLPs' four-times-wider activations were otherwise cut down and
//! faulted in again block after block (docs/performance.md §2 item 6).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks of at least this size get their own mapping (one huge page on a 4 KiB-page kernel).
const BIG: usize = 2 << 20;
/// Blocks of at least this size get a mapping of their own, so that a reuse scope keeps
/// them too: glibc maps them itself anyway (the fixed mmap threshold set in
/// [`tune_allocator`]), and each came back as fresh pages, faulted and zeroed (the SAM
/// decoder's attention scores and token blocks, 0.1-2 MiB: 8 % of its time).
const OWN: usize = 128 << 10;
/// The largest alignment a big block is asked for (every page size is a multiple of it).
const ALIGN: usize = 4096;

static ADVISE_HUGE: AtomicBool = AtomicBool::new(true);
/// Bytes of big blocks live now (for the benchmark's live-heap figure).
static MAPPED: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently held in big blocks (their requested sizes).
pub fn mapped_bytes() -> usize {
    MAPPED.load(Ordering::Relaxed)
}

/// Turns the huge-page advice on or off for blocks mapped from now on.
pub fn set_huge_pages(on: bool) {
    ADVISE_HUGE.store(on, Ordering::Relaxed);
}

/// Open [`reuse_freed_blocks`] scopes.
static REUSE_SCOPES: AtomicUsize = AtomicUsize::new(0);

/// Keeps freed big blocks for reuse until the returned guard (and every other one) is
/// dropped; then they are unmapped. Wrap a model run in it.
pub fn reuse_freed_blocks() -> ReuseScope {
    REUSE_SCOPES.fetch_add(1, Ordering::AcqRel);
    ReuseScope(())
}

pub struct ReuseScope(());

impl Drop for ReuseScope {
    fn drop(&mut self) {
        if REUSE_SCOPES.fetch_sub(1, Ordering::AcqRel) == 1 {
            kept::release_all();
        }
    }
}

/// Freed big blocks kept for reuse: `(address, page-rounded length)`, 0 for an empty slot.
/// A request takes the smallest that fits, whatever their sizes: its surplus is kept as a
/// block of its own and joined again with its neighbour when that comes back, so cutting a
/// 256 KiB attention block from a kept activation costs the activation's next user no
/// pages. New memory is only ever faulted in with nothing kept: the resident peak is the
/// live blocks' and no more. A fixed array: the allocator cannot allocate for its own
/// bookkeeping.
mod kept {
    use super::{map, Mutex};

    const SLOTS: usize = 64;
    type Blocks = [(usize, usize); SLOTS];
    static KEPT: Mutex<Blocks> = Mutex::new([(0, 0); SLOTS]);

    fn blocks() -> std::sync::MutexGuard<'static, Blocks> {
        KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a freed block, joined with kept neighbours; false when every slot is taken
    /// (the caller unmaps it).
    pub fn keep(ptr: *mut u8, len: usize) -> bool {
        shelve(&mut blocks(), ptr as usize, len)
    }

    fn shelve(blocks: &mut Blocks, mut ptr: usize, mut len: usize) -> bool {
        // Joined with kept neighbours (a block and the surplus cut from it) so a later,
        // larger request finds them as one; until no neighbour is left.
        while let Some(slot) = blocks.iter_mut().find(|b| b.1 > 0 && (b.0 + b.1 == ptr || ptr + len == b.0)) {
            let (next, more) = std::mem::take(slot);
            ptr = ptr.min(next);
            len += more;
        }
        match blocks.iter_mut().find(|b| b.1 == 0) {
            Some(slot) => {
                *slot = (ptr, len);
                true
            }
            None => false,
        }
    }

    /// A block of `len` bytes (page-rounded) made of kept pages: the smallest kept block
    /// that fits, its surplus kept (or unmapped when no slot is free); or else the largest,
    /// moved to the start of a fresh mapping of `len` bytes, the others unmapped first (so
    /// only that fresh tail is new memory, and nothing else is kept). None when nothing is.
    pub fn take(len: usize) -> Option<*mut u8> {
        let mut blocks = blocks();
        let fitting = (0..SLOTS).filter(|&i| blocks[i].1 >= len).min_by_key(|&i| blocks[i].1);
        if let Some(i) = fitting {
            let (ptr, cap) = std::mem::take(&mut blocks[i]);
            if cap > len && !shelve(&mut blocks, ptr + len, cap - len) {
                drop(blocks);
                // SAFETY: the surplus is the tail of a mapping this module owns.
                unsafe { map::unmap((ptr + len) as *mut u8, cap - len) };
            }
            return Some(ptr as *mut u8);
        }
        let largest = (0..SLOTS).filter(|&i| blocks[i].1 > 0).max_by_key(|&i| blocks[i].1)?;
        let (ptr, cap) = std::mem::take(&mut blocks[largest]);
        let others = std::mem::replace(&mut *blocks, [(0, 0); SLOTS]);
        drop(blocks);
        unmap_all(&others);
        // SAFETY: `ptr`/`cap` is a whole kept block, no longer used by anyone.
        Some(unsafe { map::grow(ptr as *mut u8, cap, len) })
    }

    pub fn release_all() {
        let all = std::mem::replace(&mut *blocks(), [(0, 0); SLOTS]);
        unmap_all(&all);
    }

    fn unmap_all(all: &[(usize, usize)]) {
        for &(ptr, len) in all.iter().filter(|b| b.1 > 0) {
            // SAFETY: each kept block is a range of our mappings nobody uses any more.
            unsafe { map::unmap(ptr as *mut u8, len) };
        }
    }
}

/// A big block: a kept one (true: it holds old data) when a reuse scope is open and one
/// fits, else a fresh, zeroed mapping (false).
fn big_block(size: usize) -> (*mut u8, bool) {
    if REUSE_SCOPES.load(Ordering::Acquire) > 0 {
        if let Some(ptr) = kept::take(page_round(size)) {
            return (ptr, true);
        }
    }
    (map::map(size), false)
}

pub struct DrishyaAlloc;

fn is_big(size: usize, align: usize) -> bool {
    cfg!(target_os = "linux") && size >= OWN && align <= ALIGN
}

/// The kernel's page size: 4 KiB on x86-64 and most arm64 kernels, 16 or 64 KiB on some
/// arm64 ones (Asahi's; RHEL's, Oracle's and Ubuntu's 64k kernels, on Ampere servers among
/// others). Blocks are rounded to it: `munmap` refuses a range that does not start on a
/// page boundary, so a 4 KiB rounding there left every trimmed tail mapped. (A huge page is
/// then 32 or 512 MiB, so the 2 MiB alignment and the advice rarely bring one; the blocks
/// still go back to the kernel when freed.)
fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    match PAGE.load(Ordering::Relaxed) {
        0 => {
            #[cfg(unix)]
            // SAFETY: sysconf reads a value the C library holds; it neither allocates nor
            // touches memory of ours (so the allocator may call it).
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            #[cfg(not(unix))]
            let page = 4096;
            let page = usize::try_from(page).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096);
            PAGE.store(page, Ordering::Relaxed);
            page
        }
        page => page,
    }
}

fn page_round(size: usize) -> usize {
    let page = page_size();
    (size + page - 1) & !(page - 1)
}

#[cfg(target_os = "linux")]
mod map {
    use super::{page_round, Ordering, ADVISE_HUGE, BIG};

    fn advise(ptr: *mut u8, len: usize) {
        if ADVISE_HUGE.load(Ordering::Relaxed) {
            // SAFETY: the range is a mapping this module owns; advice never changes contents.
            unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
        }
    }

    /// A fresh zeroed mapping of `size` bytes, from 2 MiB on starting on a 2 MiB boundary
    /// (so the kernel can back it with huge pages), or null.
    pub fn map(size: usize) -> *mut u8 {
        let len = page_round(size);
        // Too small to hold a huge page: no alignment to make, no advice to give.
        let align = if len < BIG { 0 } else { BIG };
        let Some(reserve) = len.checked_add(align) else { return std::ptr::null_mut() };
        // SAFETY: an anonymous private mapping; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let start = raw as usize;
        if align == 0 {
            return raw.cast();
        }
        let aligned = (start + BIG - 1) & !(BIG - 1);
        let head = aligned - start;
        let tail = reserve - head - len;
        // SAFETY: both trimmed ranges lie inside the mapping made above and are unused.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let ptr = aligned as *mut u8;
        advise(ptr, len);
        ptr
    }

    /// # Safety
    /// `ptr` and `size` come from `map` (or `remap`) and the block is no longer used.
    pub unsafe fn unmap(ptr: *mut u8, size: usize) {
        // SAFETY: per the contract, the range is exactly one of our mappings.
        unsafe { libc::munmap(ptr.cast(), page_round(size)) };
    }

    /// The mapping at `ptr` moved to a fresh 2 MiB-aligned address and grown to `len` bytes:
    /// its pages are moved, not copied (no fault, no zeroing for them), the rest is new. One
    /// mapping, so it can later be `remap`ped or unmapped like any other. Null on failure,
    /// with the old mapping unmapped.
    ///
    /// # Safety
    /// `ptr` and `cap` are a whole mapping from `map` that nobody uses, `cap < len`.
    pub unsafe fn grow(ptr: *mut u8, cap: usize, len: usize) -> *mut u8 {
        // An aligned place of `len` bytes; MREMAP_FIXED replaces it (it was never touched).
        let place = map(len);
        // SAFETY: both ranges are mappings this module owns.
        unsafe {
            if place.is_null() {
                unmap(ptr, cap);
                return place;
            }
            let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            let moved = libc::mremap(ptr.cast(), cap, page_round(len), flags, place.cast::<libc::c_void>());
            if moved == libc::MAP_FAILED {
                unmap(ptr, cap); // the place stays a fresh mapping of `len` bytes
            }
        }
        place
    }

    /// Grows or shrinks a mapped block, moving it only when the kernel must.
    ///
    /// # Safety
    /// `ptr` and `old` come from `map` (or `remap`).
    pub unsafe fn remap(ptr: *mut u8, old: usize, new: usize) -> *mut u8 {
        // SAFETY: the old range is one of our mappings; MREMAP_MAYMOVE keeps the contents.
        let moved = unsafe { libc::mremap(ptr.cast(), page_round(old), page_round(new), libc::MREMAP_MAYMOVE) };
        if moved == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let moved = moved.cast::<u8>();
        advise(moved, page_round(new));
        moved
    }
}

#[cfg(not(target_os = "linux"))]
mod map {
    // `is_big` is always false off Linux, so these are never reached.
    pub fn map(_: usize) -> *mut u8 {
        std::ptr::null_mut()
    }
    pub unsafe fn unmap(_: *mut u8, _: usize) {}
    pub unsafe fn grow(_: *mut u8, _: usize, _: usize) -> *mut u8 {
        std::ptr::null_mut()
    }
    pub unsafe fn remap(_: *mut u8, _: usize, _: usize) -> *mut u8 {
        std::ptr::null_mut()
    }
}

// SAFETY: every block is returned to the allocator that produced it: the size and
// alignment in the `Layout` given back on free decide, exactly as they decided on alloc.
unsafe impl GlobalAlloc for DrishyaAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_big(layout.size(), layout.align()) {
            counted(big_block(layout.size()).0, layout.size())
        } else {
            // SAFETY: forwarded contract.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_big(layout.size(), layout.align()) {
            let (ptr, reused) = big_block(layout.size());
            if reused {
                // SAFETY: the kept block is ours and at least `size` bytes long.
                unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
            }
            counted(ptr, layout.size()) // fresh anonymous pages are zero
        } else {
            // SAFETY: forwarded contract.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_big(layout.size(), layout.align()) {
            MAPPED.fetch_sub(layout.size(), Ordering::Relaxed);
            let len = page_round(layout.size());
            if REUSE_SCOPES.load(Ordering::Acquire) == 0 || !kept::keep(ptr, len) {
                // SAFETY: a big layout was mapped by `map` (or kept and trimmed to `len`).
                unsafe { map::unmap(ptr, layout.size()) }
            } else if REUSE_SCOPES.load(Ordering::Acquire) == 0 {
                // The last scope ended while this block was being kept: release it now.
                kept::release_all();
            }
        } else {
            // SAFETY: forwarded contract.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        match (is_big(layout.size(), align), is_big(new_size, align)) {
            // SAFETY: forwarded contract.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                // SAFETY: a big layout was mapped by `map`.
                let moved = unsafe { map::remap(ptr, layout.size(), new_size) };
                if moved.is_null() {
                    // A block joined from two neighbouring mappings (see `kept`) is not
                    // one mapping for mremap: copy it instead.
                    // SAFETY: forwarded contract.
                    return unsafe { self.copy_to_new(ptr, layout, new_size) };
                }
                MAPPED.fetch_sub(layout.size(), Ordering::Relaxed);
                MAPPED.fetch_add(new_size, Ordering::Relaxed);
                moved
            }
            // SAFETY: forwarded contract.
            _ => unsafe { self.copy_to_new(ptr, layout, new_size) },
        }
    }
}

impl DrishyaAlloc {
    /// `realloc` by a new block, a copy and a free.
    ///
    /// # Safety
    /// As for `GlobalAlloc::realloc`.
    unsafe fn copy_to_new(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with this alignment is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded contract; the old block stays valid until copied.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

fn counted(ptr: *mut u8, size: usize) -> *mut u8 {
    if !ptr.is_null() {
        MAPPED.fetch_add(size, Ordering::Relaxed);
    }
    ptr
}

/// glibc gives each thread its own malloc arena; with tokio's blocking pool that
/// multiplies the peak.
/// Call once at start, before threads exist.
pub fn tune_allocator() {
    // Blocks of 128 KiB and more bypass malloc (see the top of this file); `HUGE_PAGES=0` maps them
    // without the transparent-huge-page advice.
    set_huge_pages(std::env::var("HUGE_PAGES").map_or(true, |v| v != "0"));
    // A fixed mmap threshold: glibc otherwise raises it after each large free (up to
    // 32 MB), so tract's freed activations stay in the brk heap. The fixed threshold gives
    // lower peaks for slower inference, and 64 flows in 512 MB without an OOM kill
    // (docs/performance.md §8).
    // `MALLOC_FIXED_THRESHOLD=0` keeps glibc's adaptive threshold (faster, higher peaks).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let fixed = std::env::var("MALLOC_FIXED_THRESHOLD").map_or(true, |v| v != "0");
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        if fixed {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        }
    }
}

/// Returns freed heap memory to the OS after large work (inference, compositing).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each test maps and unmaps: one at a time, so one's trimmed tail is not another's block.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn blocks_are_trimmed_and_freed_in_whole_pages_of_this_kernel() {
        let _serial = SERIAL.lock();
        let page = page_size();
        #[cfg(unix)]
        // SAFETY: sysconf only reads.
        assert_eq!(page as libc::c_long, unsafe { libc::sysconf(libc::_SC_PAGESIZE) });
        assert!(page.is_power_of_two() && page >= ALIGN, "page size {page}");
        #[cfg(target_os = "linux")]
        {
            // Not a whole number of pages: the block ends inside its last page.
            let size = (5 << 20) + 100;
            let block = map::map(size);
            assert!(!block.is_null());
            let end = block as usize + page_round(size);
            assert_eq!(end % page, 0, "the block is rounded to whole {page}-byte pages");
            // mincore fails with ENOMEM on an unmapped range: the trimmed tail is gone.
            let mut resident = [0u8; 1];
            // SAFETY: `end` is page-aligned and `resident` holds one page's entry.
            let tail = unsafe { libc::mincore(end as *mut libc::c_void, page, resident.as_mut_ptr()) };
            assert_eq!(tail, -1, "the page after the block is still mapped");
            // SAFETY: the block comes from `map` and is not used.
            unsafe { map::unmap(block, size) };
            // SAFETY: as above; the block's first page must be gone too.
            let head = unsafe { libc::mincore(block.cast(), page, resident.as_mut_ptr()) };
            assert_eq!(head, -1, "the freed block is still mapped");
        }
    }

    #[test]
    fn big_blocks_are_zeroed_aligned_and_keep_contents_through_realloc() {
        let _serial = SERIAL.lock();
        let a = DrishyaAlloc;
        let layout = Layout::from_size_align(5 << 20, 64).unwrap();
        unsafe {
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % BIG, 0, "big blocks start on a huge-page boundary");
            let s = std::slice::from_raw_parts_mut(p, layout.size());
            assert!(s.iter().all(|&b| b == 0));
            s.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
            // grow big -> big, shrink big -> small, grow small -> big: contents kept each time
            let p = a.realloc(p, layout, 9 << 20);
            let grown = Layout::from_size_align(9 << 20, 64).unwrap();
            assert!((0..layout.size()).step_by(4093).all(|i| *p.add(i) == (i % 251) as u8));
            let p = a.realloc(p, grown, 1000);
            let small = Layout::from_size_align(1000, 64).unwrap();
            assert!((0..1000).all(|i| *p.add(i) == (i % 251) as u8));
            let p = a.realloc(p, small, 3 << 20);
            assert!((0..1000).all(|i| *p.add(i) == (i % 251) as u8));
            a.dealloc(p, Layout::from_size_align(3 << 20, 64).unwrap());
        }
    }
}
