//! What every stage reads about its own process: time since start, RSS and its
//! high-water mark from `/proc/self/status`, and the rounding the report uses.

use std::sync::OnceLock;
use std::time::Instant;

const MIB: f64 = 1024.0 * 1024.0;

/// The moment `main` started: the cold-start figure counts from here.
pub fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// A `kB` field of `/proc/self/status` (`VmRSS:`, `VmHWM:`), in bytes; 0 when absent.
pub fn vm_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux >= 4.0). False when not permitted.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes as MiB with one decimal.
pub fn mb(bytes: u64) -> f64 {
    (bytes as f64 / MIB * 10.0).round() / 10.0
}

/// Seconds as milliseconds with two decimals.
pub fn round_ms(seconds: f64) -> f64 {
    (seconds * 1e5).round() / 100.0
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
