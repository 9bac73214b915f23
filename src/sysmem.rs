//! Memory figures as the process and its container see them (Linux).
//!
//! The cgroup limit is read for the process's own cgroup (v2 `memory.max`, v1
//! `memory.limit_in_bytes`), so a limit set on a sub-cgroup is seen too.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

const MIB: u64 = 1024 * 1024;
/// v1 reports "no limit" as a huge number (page-aligned i64::MAX).
const UNLIMITED_THRESHOLD: u64 = 1 << 60;

/// Drops the binary's code pages from memory once start-up is over. Start-up (figment,
/// templates, config checks, Rocket's ignition) touches code no request runs again, and
/// the kernel's fault-around maps each touched page's cached neighbours too: the
/// resident code after start was well above what serving `/health` and the page need
/// (docs/performance.md §6d). Pages a request needs fault back in from the page cache, or
/// from the file. A kernel without `MADV_PAGEOUT` (before 5.4) just refuses; nothing else
/// changes.
pub fn drop_startup_code() {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else { return };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
        for line in maps.lines() {
            let mut fields = line.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
            let path = fields.nth(3);
            if !perms.contains('x') || path != exe.to_str() {
                continue;
            }
            let Some((start, end)) = range.split_once('-') else { continue };
            let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
                continue;
            };
            // SAFETY: advice on our own read-only, file-backed code mapping; its contents
            // never change, only whether they are resident.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        }
    }
}

/// Resident and peak resident memory of this process, in bytes (from /proc/self/status).
pub fn process_rss() -> (u64, u64) {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The memory cgroup of this process: (limit, usage) in bytes, when a limit is set.
pub fn cgroup_memory() -> Option<(u64, u64)> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            let dir = PathBuf::from("/sys/fs/cgroup").join(rel);
            if let Some(found) = read_pair(&dir, "memory.max", "memory.current") {
                return Some(found);
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = PathBuf::from("/sys/fs/cgroup/memory").join(rel);
            if let Some(found) = read_pair(&dir, "memory.limit_in_bytes", "memory.usage_in_bytes") {
                return Some(found);
            }
        }
    }
    None
}

/// (limit, usage) where usage leaves out inactive page cache, which the kernel
/// reclaims before it OOM-kills anything.
fn read_pair(dir: &std::path::Path, limit: &str, usage: &str) -> Option<(u64, u64)> {
    let limit: u64 = fs::read_to_string(dir.join(limit)).ok()?.trim().parse().ok()?;
    if limit >= UNLIMITED_THRESHOLD {
        return None;
    }
    let usage: u64 = fs::read_to_string(dir.join(usage)).ok()?.trim().parse().unwrap_or(0);
    let stat = fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let inactive_file = stat
        .lines()
        .find_map(|l| l.strip_prefix("total_inactive_file ").or_else(|| l.strip_prefix("inactive_file ")))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some((limit, usage.saturating_sub(inactive_file)))
}

/// Host memory (total, available) in bytes.
pub fn host_memory() -> (u64, u64) {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    (sys.total_memory(), sys.available_memory())
}

/// Total and available memory as the container sees it: the cgroup limit when one is
/// set, the host's figures otherwise.
pub fn container_memory() -> (u64, u64) {
    match cgroup_memory() {
        Some((limit, usage)) => (limit, limit.saturating_sub(usage)),
        None => host_memory(),
    }
}

/// Where a memory budget came from (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    MemoryBudgetMb,
    CgroupLimit,
    HostAvailable,
}

impl std::fmt::Display for BudgetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BudgetSource::MemoryBudgetMb => "MEMORY_BUDGET_MB",
            BudgetSource::CgroupLimit => "the container's memory limit",
            BudgetSource::HostAvailable => "the host's available memory",
        })
    }
}

/// MiB the process may still add, and why: budget minus current RSS.
/// Bytes of artefacts held in RAM (TEMP_DIR on tmpfs), kept current by the store.
static ARTEFACT_RAM: AtomicU64 = AtomicU64::new(0);

pub fn set_artefact_ram(bytes: u64) {
    ARTEFACT_RAM.store(bytes, Ordering::Relaxed);
}

pub fn headroom_mb(budget_mb: Option<u64>) -> (u64, BudgetSource) {
    let (rss, _) = process_rss();
    if let Some(budget) = budget_mb {
        // Artefacts on tmpfs are RAM too, outside the RSS (a cgroup's usage has them).
        let used = rss.saturating_add(ARTEFACT_RAM.load(Ordering::Relaxed));
        return (budget_room_mb(budget, used), BudgetSource::MemoryBudgetMb);
    }
    if let Some((limit, usage)) = cgroup_memory() {
        return (limit.saturating_sub(usage) / MIB, BudgetSource::CgroupLimit);
    }
    (host_memory().1 / MIB, BudgetSource::HostAvailable)
}

/// Whole MiB left of `budget_mb` once `used` bytes are taken.
fn budget_room_mb(budget_mb: u64, used: u64) -> u64 {
    (budget_mb * MIB).saturating_sub(used) / MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_reported() {
        let (rss, peak) = process_rss();
        assert!(rss > 0 && peak >= rss);
    }

    #[test]
    fn budget_headroom_subtracts_rss() {
        // Other tests run beside this one, so the RSS moves between two reads:
        // the exact arithmetic is checked on fixed numbers, the live figure by range.
        assert_eq!(budget_room_mb(100, 30 * MIB + 1), 69);
        assert_eq!(budget_room_mb(1, 2 * MIB), 0, "a budget below the RSS leaves nothing");
        let (room, source) = headroom_mb(Some(10_000));
        assert_eq!(source, BudgetSource::MemoryBudgetMb);
        assert!(room < 10_000, "the process's own RSS is taken off: {room}");
        assert!(room > 9_000, "a test process holds well under 1 GiB: {room}");
        assert_eq!(headroom_mb(Some(1)).0, 0, "a budget below the RSS leaves nothing");
    }
}
