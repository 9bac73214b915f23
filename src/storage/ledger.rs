//! The artefact bytes of every session, kept in memory so that the byte cap is checked
//! before a write rather than swept after it: on tmpfs (`/dev/shm`, the default) those
//! bytes are RAM charged to the container, and a cap enforced a minute late let steady
//! traffic fill a 512 MB container. Policy when a write would pass the cap: evict the
//! least recently used sessions that no request is using; if that is not enough (every
//! session busy), refuse the write (503 + Retry-After). Never grow past the cap, except
//! for the one temporary file of a write in flight.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// Artefact files per session (`Artefact::index`).
pub const FILES: usize = 6;

/// Space a file of `len` bytes takes: whole pages, as tmpfs and most filesystems allocate.
pub fn footprint(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

#[derive(Debug, Clone)]
struct Entry {
    bytes: [u64; FILES],
    last_used: SystemTime,
    /// Requests using the session now: never evicted meanwhile.
    pins: u32,
}

impl Entry {
    fn new(now: SystemTime) -> Self {
        Entry { bytes: [0; FILES], last_used: now, pins: 0 }
    }

    fn total(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

/// What the store holds for one session (from a listing), and when it was last used.
#[derive(Debug, Clone)]
pub struct SessionUsage {
    pub id: String,
    pub bytes: [u64; FILES],
    pub last_used: SystemTime,
}

#[derive(Default)]
pub struct Ledger {
    sessions: HashMap<String, Entry>,
    total: u64,
}

/// The cap cannot be met without evicting a session in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Ledger {
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Replaces what is known of the store by `listing`, keeping the pins and the later
    /// of the two last-use times. The listing may be taken before a write of a request
    /// in flight finished: a pinned session keeps the larger of its known and listed
    /// sizes per file (counting a deleted file a little longer is safe for the cap,
    /// missing a written one is not).
    pub fn resync(&mut self, listing: Vec<SessionUsage>) {
        let mut sessions: HashMap<String, Entry> =
            listing.into_iter().map(|s| (s.id, Entry { bytes: s.bytes, last_used: s.last_used, pins: 0 })).collect();
        for (id, old) in self.sessions.drain() {
            match sessions.get_mut(&id) {
                Some(entry) => {
                    entry.last_used = entry.last_used.max(old.last_used);
                    entry.pins = old.pins;
                    if old.pins > 0 {
                        for (new, old) in entry.bytes.iter_mut().zip(old.bytes) {
                            *new = (*new).max(old);
                        }
                    }
                }
                None if old.pins > 0 => {
                    sessions.insert(id, old);
                }
                None => {}
            }
        }
        self.sessions = sessions;
        self.total = self.sessions.values().map(Entry::total).sum();
    }

    /// Bytes `file` of session `id` is known to take.
    pub fn bytes_of(&self, id: &str, file: usize) -> u64 {
        self.sessions.get(id).map_or(0, |e| e.bytes[file])
    }

    pub fn pin(&mut self, id: &str, now: SystemTime) {
        let entry = self.sessions.entry(id.to_string()).or_insert_with(|| Entry::new(now));
        entry.pins += 1;
        entry.last_used = now;
    }

    pub fn unpin(&mut self, id: &str) {
        if let Some(entry) = self.sessions.get_mut(id) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    pub fn touch(&mut self, id: &str, now: SystemTime) {
        if let Some(entry) = self.sessions.get_mut(id) {
            entry.last_used = now;
        }
    }

    /// Records that `file` of session `id` now takes `bytes`.
    pub fn set(&mut self, id: &str, file: usize, bytes: u64, now: SystemTime) {
        let entry = self.sessions.entry(id.to_string()).or_insert_with(|| Entry::new(now));
        self.total = self.total - entry.bytes[file] + bytes;
        entry.bytes[file] = bytes;
        entry.last_used = now;
    }

    pub fn forget(&mut self, id: &str) {
        if let Some(entry) = self.sessions.remove(id) {
            self.total -= entry.total();
        }
    }

    /// Makes room for `file` of session `id` to take `bytes` within `cap`, and records
    /// it. Returns the sessions evicted for it (least recently used first, never a pinned
    /// one nor `id`), already forgotten: the caller deletes their files.
    pub fn reserve(
        &mut self,
        id: &str,
        file: usize,
        bytes: u64,
        cap: u64,
        now: SystemTime,
    ) -> Result<Vec<String>, Full> {
        let current = self.sessions.get(id).map_or(0, |e| e.bytes[file]);
        let needed = (self.total - current + bytes).saturating_sub(cap);
        let victims = self.least_recently_used(needed, Some(id)).ok_or(Full)?;
        for victim in &victims {
            self.forget(victim);
        }
        self.set(id, file, bytes, now);
        Ok(victims)
    }

    /// Unpinned sessions idle for longer than `ttl`, forgotten: the caller deletes them.
    pub fn expire(&mut self, now: SystemTime, ttl: Duration) -> Vec<String> {
        let idle: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, e)| e.pins == 0 && now.duration_since(e.last_used).unwrap_or_default() > ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &idle {
            self.forget(id);
        }
        idle
    }

    /// Evicts least recently used unpinned sessions until the total is within `cap` (or
    /// only pinned ones are left); returns them, forgotten.
    pub fn trim(&mut self, cap: u64) -> Vec<String> {
        let needed = self.total.saturating_sub(cap);
        let victims = self.least_recently_used(needed, None).unwrap_or_else(|| self.evictable(None));
        for victim in &victims {
            self.forget(victim);
        }
        victims
    }

    /// The fewest least recently used evictable sessions holding at least `needed` bytes.
    fn least_recently_used(&self, needed: u64, keep: Option<&str>) -> Option<Vec<String>> {
        let mut freed = 0;
        let mut victims = Vec::new();
        for id in self.evictable(keep) {
            if freed >= needed {
                break;
            }
            freed += self.sessions[&id].total();
            victims.push(id);
        }
        (freed >= needed).then_some(victims)
    }

    /// Unpinned sessions other than `keep` that hold bytes, least recently used first.
    fn evictable(&self, keep: Option<&str>) -> Vec<String> {
        let mut list: Vec<(&String, &Entry)> =
            self.sessions.iter().filter(|(id, e)| e.pins == 0 && e.total() > 0 && Some(id.as_str()) != keep).collect();
        list.sort_by_key(|(_, e)| e.last_used);
        list.into_iter().map(|(id, _)| id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn a_write_over_the_cap_evicts_the_least_recently_used_idle_sessions_first() {
        let mut ledger = Ledger::default();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            assert_eq!(ledger.reserve(id, 0, 100, 300, at(i as u64)), Ok(vec![]));
        }
        ledger.touch("a", at(10));
        // d needs 150: b (the oldest now) and c go; a, used last, stays.
        assert_eq!(ledger.reserve("d", 0, 150, 300, at(11)), Ok(vec!["b".to_string(), "c".to_string()]));
        assert_eq!(ledger.total(), 250);
        // Rewriting a file replaces its bytes rather than adding to them.
        assert_eq!(ledger.reserve("d", 0, 200, 300, at(12)), Ok(vec![]));
        assert_eq!(ledger.total(), 300);
    }

    #[test]
    fn sessions_in_use_are_never_evicted_and_a_write_that_cannot_fit_is_refused() {
        let mut ledger = Ledger::default();
        ledger.reserve("busy", 0, 200, 300, at(0)).unwrap();
        ledger.pin("busy", at(0));
        ledger.reserve("idle", 0, 100, 300, at(1)).unwrap();
        assert_eq!(ledger.reserve("new", 0, 150, 300, at(2)), Err(Full), "only 100 could be freed");
        assert_eq!(ledger.total(), 300, "a refused write changes nothing");
        assert_eq!(ledger.reserve("new", 0, 100, 300, at(3)), Ok(vec!["idle".to_string()]));
        ledger.unpin("busy");
        assert_eq!(ledger.expire(at(10_000), Duration::from_secs(3600)).len(), 2);
        assert_eq!(ledger.total(), 0);
    }

    #[test]
    fn a_resync_keeps_pins_and_trim_brings_a_grown_disk_back_under_the_cap() {
        let mut ledger = Ledger::default();
        ledger.pin("pinned", at(0));
        let scan = |id: &str, bytes: u64, t: u64| SessionUsage {
            id: id.into(),
            bytes: [bytes, 0, 0, 0, 0, 0],
            last_used: at(t),
        };
        ledger.resync(vec![scan("old", 100, 1), scan("pinned", 100, 2), scan("new", 100, 3)]);
        assert_eq!(ledger.total(), 300);
        assert_eq!(ledger.trim(150), vec!["old".to_string(), "new".to_string()], "the pinned one stays");
        assert_eq!(ledger.total(), 100);
    }

    #[test]
    fn a_listing_older_than_a_write_in_flight_never_hides_its_bytes() {
        let mut ledger = Ledger::default();
        let listed = |id: &str, bytes: u64, t: u64| SessionUsage {
            id: id.into(),
            bytes: [bytes, 0, 0, 0, 0, 0],
            last_used: at(t),
        };
        ledger.pin("busy", at(0));
        ledger.set("busy", 0, 300, at(5));
        ledger.set("busy", 1, 200, at(5));
        ledger.touch("busy", at(9));
        // Listed before the mask landed, and with the old scene's size.
        ledger.resync(vec![listed("busy", 100, 4), listed("idle", 100, 1)]);
        assert_eq!(ledger.bytes_of("busy", 0), 300);
        assert_eq!(ledger.bytes_of("busy", 1), 200);
        assert_eq!(ledger.total(), 600);
        // The later use stays the session's last use; an idle one takes the listed size.
        assert_eq!(ledger.trim(500), vec!["idle".to_string()]);
        ledger.unpin("busy");
        assert_eq!(ledger.expire(at(3608), Duration::from_secs(3600)), Vec::<String>::new(), "used at 9, not 4");
        assert_eq!(ledger.expire(at(3610), Duration::from_secs(3600)), vec!["busy".to_string()]);
    }
}
