//! The process allocator (crates/alloc): big blocks go back to the kernel when freed, even
//! in the pattern that kept them resident under glibc's adaptive threshold, and they are
//! backed by huge pages where the kernel offers them. Its own test binary: no other test
//! allocates meanwhile.

fn status_kb(field: &str, file: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// As the app and the benchmark declare it.
#[global_allocator]
static GLOBAL: drishya_alloc::DrishyaAlloc = drishya_alloc::DrishyaAlloc;

/// The two tests measure the whole process: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rss_kb() -> u64 {
    status_kb("VmRSS:", "/proc/self/status")
}

#[test]
fn freed_activations_do_not_stay_resident() {
    let _serial = SERIAL.lock();
    let before = rss_kb();
    let mut pins = Vec::new();
    for round in 0..4u8 {
        // Two 24 MiB "activations", then a small allocation above them in the heap, then the
        // big ones freed: glibc's adaptive threshold puts rounds 2-4 in the brk heap, where the
        // small block pins them (docs/performance.md §2 item 1: the test fails with glibc's malloc).
        let a = vec![round; 24 << 20];
        let b = vec![round + 1; 24 << 20];
        pins.push(vec![round; 512]);
        assert_eq!(std::hint::black_box(&a)[1000] + std::hint::black_box(&b)[1000], 2 * round + 1);
    }
    let after = rss_kb();
    assert!(after < before + 16_000, "freed blocks still resident: {before} -> {after} kB");
    drop(pins);
}

#[test]
fn big_blocks_use_huge_pages_when_the_kernel_offers_them() {
    let _serial = SERIAL.lock();
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    // A huge page is 2 MiB with 4 KiB pages (x86-64, most arm64 kernels); with 16 or 64 KiB
    // pages (some arm64 kernels) it is 32 or 512 MiB, and the 64 MiB block below may hold none.
    let huge_kb = status_kb("", "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") / 1024;
    let offered = (thp.contains("[always]") || thp.contains("[madvise]")) && huge_kb == 2048;
    let before = status_kb("AnonHugePages:", "/proc/self/smaps_rollup");
    let block = vec![7u8; 64 << 20];
    let during = status_kb("AnonHugePages:", "/proc/self/smaps_rollup");
    assert_eq!(std::hint::black_box(&block)[5 << 20], 7);
    if offered {
        assert!(during >= before + 32_768, "THP {thp:?}: AnonHugePages {before} -> {during} kB");
    } else {
        assert!(huge_kb != 2048 || during == before, "THP {thp:?}: no huge pages expected: {before} -> {during} kB");
    }
}

/// While a model runs, a freed big block is handed to the next big allocation (no fresh
/// pages to fault and zero), its surplus kept for the request after (and joined again
/// when both come back), a bigger request keeps its pages too, and everything kept goes
/// back to the kernel when the scope ends.
#[test]
fn a_reuse_scope_hands_freed_blocks_on_and_releases_them_at_its_end() {
    use std::alloc::{GlobalAlloc, Layout};
    let _serial = SERIAL.lock();
    let a = drishya_alloc::DrishyaAlloc;
    let layout = |mb: usize| Layout::from_size_align(mb << 20, 64).unwrap();
    let before = rss_kb();
    {
        let _scope = drishya_alloc::reuse_freed_blocks();
        unsafe {
            let first = a.alloc(layout(24));
            std::ptr::write_bytes(first, 7, 24 << 20);
            a.dealloc(first, layout(24));
            let kept = rss_kb();
            assert!(kept >= before + 20_000, "the freed block is kept inside the scope: {before} -> {kept} kB");

            let smaller = a.alloc(layout(8));
            assert_eq!(smaller, first, "the kept block is reused");
            assert_eq!(*smaller.add(5 << 20), 7, "same pages, not fresh ones");
            let rest = a.alloc(layout(16));
            assert_eq!(rest, first.add(8 << 20), "its surplus is the next block");
            assert_eq!(*rest.add(15 << 20), 7, "the surplus's pages, not fresh ones");
            let both = rss_kb();
            assert!(both < before + 28_000, "no new memory for the two: {before} -> {both} kB");
            a.dealloc(rest, layout(16));
            a.dealloc(smaller, layout(8));
            let joined = a.alloc(layout(24));
            assert_eq!(joined, first, "the two pieces are one block again");
            a.dealloc(joined, layout(24));

            let bigger = a.alloc(layout(32));
            assert_eq!(bigger as usize % (2 << 20), 0, "a grown block stays huge-page aligned");
            assert_eq!(*bigger.add(5 << 20), 7, "a bigger request keeps the kept pages");
            std::ptr::write_bytes(bigger, 1, 32 << 20);
            // A grown block is one mapping: it can grow again (a Vec doubling, say).
            let bigger = a.realloc(bigger, layout(32), 40 << 20);
            assert!(!bigger.is_null(), "a grown block can be reallocated");
            assert_eq!(*bigger.add((32 << 20) - 1), 1, "realloc keeps the contents");
            std::ptr::write_bytes(bigger, 1, 40 << 20);
            let bigger = a.realloc(bigger, layout(40), 16 << 20);
            a.dealloc(bigger, layout(16));

            let zeroed = a.alloc_zeroed(layout(8));
            assert_eq!(zeroed, bigger, "reused again");
            assert!((0..8 << 20).step_by(4096).all(|i| *zeroed.add(i) == 0), "alloc_zeroed still zeroes");
            a.dealloc(zeroed, layout(8));
        }
    }
    let after = rss_kb();
    assert!(after < before + 4_000, "kept blocks are unmapped when the scope ends: {before} -> {after} kB");
}

/// Blocks from 128 KiB up (the SAM decoder's attention scores and token blocks) are kept
/// inside a scope too: the next one gets the same pages, not fresh zeroed ones.
#[test]
fn attention_sized_blocks_are_reused_inside_a_scope() {
    use std::alloc::{GlobalAlloc, Layout};
    let _serial = SERIAL.lock();
    let a = drishya_alloc::DrishyaAlloc;
    let layout = Layout::from_size_align(256 << 10, 64).unwrap();
    let _scope = drishya_alloc::reuse_freed_blocks();
    unsafe {
        let first = a.alloc(layout);
        std::ptr::write_bytes(first, 7, 256 << 10);
        a.dealloc(first, layout);
        let again = a.alloc(layout);
        assert_eq!(again, first, "the kept block is reused");
        assert_eq!(*again.add(200 << 10), 7, "same pages, not fresh ones");
        a.dealloc(again, layout);
    }
}
