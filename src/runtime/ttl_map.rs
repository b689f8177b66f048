//! A bounded map whose entries expire after a fixed TTL, on tokio's clock.
//!
//! Written by hand rather than with moka because moka reads its own clock: under tokio's
//! paused clock its expiry would not follow `tokio::time::advance`, and the time-based tests
//! of `dedup_by` and the `Loader` cache must be exact. With one TTL for every entry, the
//! insertion order is the expiry order, so a queue gives O(1) expiry and oldest-first
//! eviction when the capacity is reached.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use crate::util::time::after;

pub(crate) struct TtlMap<K, V> {
    map: HashMap<K, (V, Instant, u64)>,
    /// Keys in insertion order, with the stamp of the insertion (a re-inserted key leaves a
    /// stale entry behind, skipped when reached).
    order: VecDeque<(K, u64)>,
    ttl: Option<Duration>,
    capacity: usize,
    stamp: u64,
}

impl<K: Hash + Eq + Clone, V> TtlMap<K, V> {
    /// Entries live `ttl` (forever if `None`); at most `capacity` are kept, oldest evicted.
    pub(crate) fn new(ttl: Option<Duration>, capacity: usize) -> Self {
        TtlMap {
            map: HashMap::new(),
            order: VecDeque::new(),
            ttl,
            capacity: capacity.max(1),
            stamp: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The live value of `key` at `now`.
    pub(crate) fn get(&self, key: &K, now: Instant) -> Option<&V> {
        match self.map.get(key) {
            Some((v, expires, _)) if self.ttl.is_none() || *expires > now => Some(v),
            _ => None,
        }
    }

    pub(crate) fn insert(&mut self, key: K, value: V, now: Instant) {
        self.stamp += 1;
        let expires = match self.ttl {
            Some(ttl) => after(now, ttl),
            None => now,
        };
        self.map.insert(key.clone(), (value, expires, self.stamp));
        self.order.push_back((key, self.stamp));
        self.evict(now);
        if self.order.len() > self.capacity.saturating_mul(2).saturating_add(64) {
            // Many re-inserts left stale entries: rebuild the queue from the live ones.
            let mut live: Vec<(K, u64)> = self
                .map
                .iter()
                .map(|(k, (_, _, s))| (k.clone(), *s))
                .collect();
            live.sort_by_key(|(_, s)| *s);
            self.order = live.into();
        }
    }

    /// Removes expired entries, then the oldest ones beyond the capacity.
    pub(crate) fn evict(&mut self, now: Instant) {
        while let Some((key, stamp)) = self.order.front() {
            let remove = match self.map.get(key) {
                Some((_, expires, s)) if s == stamp => {
                    self.map.len() > self.capacity || (self.ttl.is_some() && *expires <= now)
                }
                // stale: the key was re-inserted or removed since
                _ => {
                    self.order.pop_front();
                    continue;
                }
            };
            if !remove {
                break;
            }
            let (key, _) = self.order.pop_front().expect("front exists");
            self.map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl_and_holds_its_capacity() {
        let t0 = Instant::now();
        let mut m = TtlMap::new(Some(Duration::from_secs(10)), 3);
        m.insert(1, 'a', t0);
        assert_eq!(m.get(&1, t0 + Duration::from_millis(9_999)), Some(&'a'));
        assert_eq!(m.get(&1, t0 + Duration::from_secs(10)), None);
        for k in 2..10 {
            m.insert(k, 'b', t0);
        }
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(&9, t0), Some(&'b'));
        assert_eq!(m.get(&6, t0), None);
        for k in 0..1000 {
            m.insert(k % 2, 'c', t0);
        }
        assert!(m.order.len() <= 2 * 3 + 64);
    }
}
