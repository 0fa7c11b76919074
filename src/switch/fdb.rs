//! The forwarding database of a switch: which member a (VLAN, MAC) was last seen on.
//!
//! Bounded and aging. A lookup or a refresh of a known address takes the read lock only (the
//! last-seen time is an atomic in the entry), so senders on different cores do not serialise on
//! it; the write lock is taken to learn a new address, move one to another member, or sweep
//! expired entries. When the table is full a new address is not learned (the frame is still
//! forwarded, flooded) and the refusal is counted: a guest sending from random source MACs
//! cannot grow the daemon's memory or push out the addresses others use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

/// A MAC address as six bytes.
pub type Mac = [u8; 6];

/// What [`Fdb::learn`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// The address was known on this member; its time was refreshed.
    Refreshed,
    /// A new entry.
    New,
    /// The address moved here from another member.
    Moved,
    /// The table is full: not learned.
    Full,
}

#[derive(Debug)]
struct Entry {
    member: AtomicU32,
    /// Seconds since the table's epoch.
    seen: AtomicU64,
}

/// One entry, as `ctl fdb` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FdbEntry {
    /// VLAN id (0: untagged network of access ports without a VLAN).
    pub vlan: u16,
    /// The address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Member id.
    pub member: u32,
    /// Seconds since it was last seen.
    pub age_secs: u64,
}

/// The table.
#[derive(Debug)]
pub struct Fdb {
    map: RwLock<HashMap<(u16, Mac), Entry>>,
    max: usize,
    aging: Duration,
    epoch: Instant,
    /// When (seconds since the epoch) the last sweep ran.
    swept: AtomicU64,
}

impl Fdb {
    /// A table of at most `max` entries forgetting addresses not seen for `aging`.
    pub fn new(max: usize, aging: Duration) -> Fdb {
        Fdb {
            map: RwLock::new(HashMap::new()),
            max,
            aging,
            epoch: Instant::now(),
            swept: AtomicU64::new(0),
        }
    }

    /// Seconds since the epoch.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    fn live(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.seen.load(Relaxed)) <= self.aging.as_secs()
    }

    /// The member `mac` on `vlan` was last seen on, unless it aged out.
    pub fn lookup(&self, vlan: u16, mac: &Mac, now: u64) -> Option<u32> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&(vlan, *mac))
            .filter(|e| self.live(e, now))
            .map(|e| e.member.load(Relaxed))
    }

    /// Records that `mac` on `vlan` was seen on `member`.
    pub fn learn(&self, vlan: u16, mac: &Mac, member: u32, now: u64) -> Learned {
        {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            match map.get(&(vlan, *mac)) {
                Some(e) if e.member.load(Relaxed) == member => {
                    if e.seen.load(Relaxed) != now {
                        e.seen.store(now, Relaxed);
                    }
                    return Learned::Refreshed;
                }
                // Full, and swept this second already: refused without the write lock, so a
                // guest sending from random addresses does not serialise the other senders.
                None if map.len() >= self.max && self.swept.load(Relaxed) == now => {
                    return Learned::Full;
                }
                _ => {}
            }
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get(&(vlan, *mac)) {
            let was = e.member.swap(member, Relaxed);
            e.seen.store(now, Relaxed);
            return if was == member {
                Learned::Refreshed
            } else {
                Learned::Moved
            };
        }
        if map.len() >= self.max {
            // Sweep expired entries, at most once a second, to make room.
            if self.swept.swap(now, Relaxed) != now {
                map.retain(|_, e| self.live(e, now));
            }
            if map.len() >= self.max {
                return Learned::Full;
            }
        }
        map.insert(
            (vlan, *mac),
            Entry {
                member: AtomicU32::new(member),
                seen: AtomicU64::new(now),
            },
        );
        Learned::New
    }

    /// Forgets every address learned on `member` (it left the switch).
    pub fn forget_member(&self, member: u32) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, e| e.member.load(Relaxed) != member);
    }

    /// Live entries, sorted by VLAN and MAC.
    pub fn entries(&self) -> Vec<FdbEntry> {
        let now = self.now();
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<FdbEntry> = map
            .iter()
            .filter(|(_, e)| self.live(e, now))
            .map(|((vlan, mac), e)| FdbEntry {
                vlan: *vlan,
                mac: vhost_net_backend::MacAddr(*mac).to_string(),
                member: e.member.load(Relaxed),
                age_secs: now.saturating_sub(e.seen.load(Relaxed)),
            })
            .collect();
        v.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        v
    }

    /// Entries held, live or not yet swept.
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True when the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];

    #[test]
    fn learns_refreshes_moves_and_ages() {
        let f = Fdb::new(8, Duration::from_secs(300));
        assert_eq!(f.lookup(0, &A, 0), None);
        assert_eq!(f.learn(0, &A, 1, 0), Learned::New);
        assert_eq!(f.learn(0, &A, 1, 5), Learned::Refreshed);
        assert_eq!(f.lookup(0, &A, 5), Some(1));
        // Another VLAN is another address.
        assert_eq!(f.lookup(10, &A, 5), None);
        assert_eq!(f.learn(0, &A, 2, 6), Learned::Moved);
        assert_eq!(f.lookup(0, &A, 6), Some(2));
        // Aged out 300 s after it was last seen.
        assert_eq!(f.lookup(0, &A, 306), Some(2));
        assert_eq!(f.lookup(0, &A, 307), None);
        assert!(f.entries().is_empty() || f.entries()[0].age_secs <= 300);
    }

    #[test]
    fn a_full_table_refuses_new_addresses_until_old_ones_expire() {
        let f = Fdb::new(2, Duration::from_secs(10));
        assert_eq!(f.learn(0, &A, 1, 0), Learned::New);
        assert_eq!(f.learn(0, &B, 1, 0), Learned::New);
        let c = [2, 0, 0, 0, 0, 3];
        assert_eq!(f.learn(0, &c, 1, 1), Learned::Full);
        // Refused again in the same second (the read-lock path), and still in the next.
        assert_eq!(f.learn(0, &[2, 0, 0, 0, 0, 4], 1, 1), Learned::Full);
        assert_eq!(f.learn(0, &[2, 0, 0, 0, 0, 5], 1, 2), Learned::Full);
        // Known addresses still refresh and move.
        assert_eq!(f.learn(0, &A, 2, 1), Learned::Moved);
        assert_eq!(f.len(), 2);
        // B expires (last seen at 0); A was refreshed at 1 and stays until 11.
        assert_eq!(f.learn(0, &c, 1, 11), Learned::New);
        assert_eq!(f.lookup(0, &A, 11), Some(2));
        assert_eq!(f.lookup(0, &B, 11), None);
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn forgetting_a_member_drops_its_addresses() {
        let f = Fdb::new(8, Duration::from_secs(300));
        f.learn(0, &A, 1, 0);
        f.learn(0, &B, 2, 0);
        f.forget_member(1);
        assert_eq!(f.lookup(0, &A, 0), None);
        assert_eq!(f.lookup(0, &B, 0), Some(2));
        assert_eq!(f.entries().len(), 1);
        assert_eq!(f.entries()[0].mac, "02:00:00:00:00:02");
    }
}
