//! Keyed concurrency (`key_by`): at most `per_key` calls in flight per key, each key's items
//! started in arrival order, and the items of a busy key waiting aside while the stage goes
//! on with other keys.
//!
//! The part is a map from key to [`Slot`] (the calls the key has out, and its items
//! waiting); a key with nothing out and nothing waiting has no entry. The driver stages new
//! items here ([`Keyed::stage`]): an item whose key may start goes to the ready queue, the
//! others wait in their key's queue, at most `max_waiting` in all (then the stage pulls no
//! more input). When an item ends (done, failed, left) its key's next waiting item becomes
//! ready. An item that waits for a retry, a breaker or the server keeps its key busy, so
//! the key's later items stay behind it.
//!
//! The key is hashed once, when the item arrives; the item carries its key's slot number in
//! its `Meta`, so ending it needs no hashing. The map is keyed by the hash (slots with the
//! same hash are chained), so the key itself is stored once and needs no `Clone`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::task::Context;

use crate::report::StageStats;

use super::call::Meta;
use super::input::Input;
use super::output::Output;
use super::reorder::{Done, Reorder};

/// No slot (the end of a chain of slots with one hash).
const NONE: u32 = u32::MAX;

/// Makes the stage's key map once the stage is built (`key_by` erases the key's type here).
pub(super) type KeyFn<T> = Box<dyn FnOnce(KeyLimits) -> Box<dyn Keys<T>> + Send>;

/// The bounds of a keyed stage.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeyLimits {
    /// Calls in flight per key (`per_key`).
    pub(super) per_key: usize,
    /// Items waiting behind a busy key, over all keys (`max_waiting`).
    pub(super) max_waiting: usize,
    /// Track each key's results so they leave in arrival order (an unordered stage with
    /// more than one call per key; else the stage's own order, or one call at a time,
    /// already keeps it).
    pub(super) track_order: bool,
}

/// The key map, its key type erased (see [`KeyMap`]).
pub(super) trait Keys<T>: Send {
    /// A new item: ready at once if its key may start, else waiting. False if it waits.
    fn arrive(&mut self, item: T, meta: Meta) -> bool;
    /// The next ready item (its key's place already taken).
    fn pop_ready(&mut self) -> Option<(T, Meta)>;
    fn ready(&self) -> usize;
    fn waiting(&self) -> usize;
    /// The item `seq` of key slot `key` ended: pushes onto `released` the items of the key
    /// whose results may now go on, in arrival order (`seq` alone, unless tracking order),
    /// and makes the key's next waiting item ready.
    fn end(&mut self, key: u32, seq: u64, released: &mut Vec<u64>);
    /// A stop: takes every waiting item (never started) and every ready one.
    fn take_all(&mut self) -> (Vec<Meta>, Vec<Meta>);
    /// Keys with an entry in the map (something out or waiting).
    fn keys(&self) -> usize;
    /// A new item `seq` of a plain stage, its key hashed once: where it goes (see
    /// [`Probe`]). `Free` keeps the key aside for [`occupy`](Keys::occupy); a `Wait` item
    /// is given to [`wait`](Keys::wait).
    fn probe(&mut self, item: &T, seq: u64) -> Probe;
    /// The key kept aside by the last `Free` probe gets its slot (at the index the probe
    /// gave, returned), with the item `seq` out: its call did not end at once.
    fn occupy(&mut self, seq: u64) -> u32;
    /// An item of a busy key (a `Wait` probe) waits in its key's queue.
    fn wait(&mut self, item: T, meta: Meta);
}

/// Where a new item of a plain stage goes ([`Keys::probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    /// Its key has no slot (nothing out, nothing waiting): it may start, and its key gets a
    /// slot, at this index, only if its call does not end at once.
    Free(u32),
    /// Its key has a slot with room and nothing waiting: it took a place and may start.
    Start(u32),
    /// Its key is busy: it waits.
    Wait(u32),
}

/// One key's state.
struct Slot<T, K> {
    /// `None`: the slot is free.
    key: Option<K>,
    hash: u64,
    /// The next slot with the same hash.
    next: u32,
    /// Items started (or ready to) and not ended: in flight, in backoff, held.
    busy: usize,
    waiting: VecDeque<(T, Meta)>,
    /// Tracking order: the items out, in arrival order, and whether each has ended.
    out: VecDeque<(u64, bool)>,
}

/// The per-key state of a keyed stage.
pub(super) struct KeyMap<T, K, F> {
    key_of: F,
    limits: KeyLimits,
    hasher: RandomState,
    /// Hash → the first slot of that hash.
    index: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    slots: Vec<Slot<T, K>>,
    free: Vec<u32>,
    ready: VecDeque<(T, Meta)>,
    waiting: usize,
    /// The key of the last `Free` probe and its hash, until it gets a slot or the next
    /// probe replaces it.
    aside: Option<(K, u64)>,
}

impl<T, K, F> KeyMap<T, K, F>
where
    K: Hash + Eq,
    F: Fn(&T) -> K,
{
    pub(super) fn new(key_of: F, limits: KeyLimits) -> Self {
        KeyMap {
            key_of,
            limits,
            hasher: RandomState::new(),
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
            waiting: 0,
            aside: None,
        }
    }

    /// The slot of `key` (hashed `hash`), if it has one.
    fn find(&self, key: &K, hash: u64) -> Option<u32> {
        let mut at = self.index.get(&hash).copied().unwrap_or(NONE);
        while at != NONE {
            let s = &self.slots[at as usize];
            if s.key.as_ref() == Some(key) {
                return Some(at);
            }
            at = s.next;
        }
        None
    }

    /// The index the next new slot takes.
    fn next_slot(&self) -> u32 {
        self.free.last().copied().unwrap_or(self.slots.len() as u32)
    }

    /// The slot of `key`, made if the key has none.
    fn slot_of(&mut self, key: K) -> u32 {
        let hash = self.hasher.hash_one(&key);
        match self.find(&key, hash) {
            Some(at) => at,
            None => self.make_slot(key, hash),
        }
    }

    /// A new slot for `key` (which has none), at [`next_slot`](Self::next_slot).
    fn make_slot(&mut self, key: K, hash: u64) -> u32 {
        let head = self.index.get(&hash).copied().unwrap_or(NONE);
        let slot = Slot {
            key: Some(key),
            hash,
            next: head,
            busy: 0,
            waiting: VecDeque::new(),
            out: VecDeque::new(),
        };
        let at = match self.free.pop() {
            Some(at) => {
                // A free slot's queues are empty; keep their buffers.
                let old = &mut self.slots[at as usize];
                let (waiting, out) = (
                    std::mem::take(&mut old.waiting),
                    std::mem::take(&mut old.out),
                );
                *old = Slot {
                    waiting,
                    out,
                    ..slot
                };
                at
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(hash, at);
        at
    }

    /// Removes the entry of a key with nothing out and nothing waiting.
    fn release(&mut self, at: u32) {
        let (hash, next) = {
            let s = &mut self.slots[at as usize];
            s.key = None;
            (s.hash, s.next)
        };
        let head = self.index[&hash];
        if head == at {
            if next == NONE {
                self.index.remove(&hash);
            } else {
                self.index.insert(hash, next);
            }
        } else {
            let mut prev = head;
            while self.slots[prev as usize].next != at {
                prev = self.slots[prev as usize].next;
            }
            self.slots[prev as usize].next = next;
        }
        self.free.push(at);
    }

    /// Item `(item, meta)` takes one of its key's places and is ready to start.
    fn make_ready(&mut self, item: T, meta: Meta) {
        let s = &mut self.slots[meta.key as usize];
        s.busy += 1;
        if self.limits.track_order {
            s.out.push_back((meta.seq, false));
        }
        self.ready.push_back((item, meta));
    }
}

impl<T, K, F> Keys<T> for KeyMap<T, K, F>
where
    T: Send,
    K: Hash + Eq + Send,
    F: Fn(&T) -> K + Send,
{
    fn arrive(&mut self, item: T, mut meta: Meta) -> bool {
        let at = self.slot_of((self.key_of)(&item));
        meta.key = at;
        let s = &mut self.slots[at as usize];
        if s.busy < self.limits.per_key && s.waiting.is_empty() {
            self.make_ready(item, meta);
            true
        } else {
            s.waiting.push_back((item, meta));
            self.waiting += 1;
            false
        }
    }

    fn pop_ready(&mut self) -> Option<(T, Meta)> {
        self.ready.pop_front()
    }

    fn ready(&self) -> usize {
        self.ready.len()
    }

    fn waiting(&self) -> usize {
        self.waiting
    }

    fn end(&mut self, key: u32, seq: u64, released: &mut Vec<u64>) {
        let s = &mut self.slots[key as usize];
        s.busy -= 1;
        if self.limits.track_order {
            if let Some(e) = s.out.iter_mut().find(|e| e.0 == seq) {
                e.1 = true;
            }
            while let Some(&(front, true)) = s.out.front() {
                released.push(front);
                s.out.pop_front();
            }
        } else {
            released.push(seq);
        }
        if let Some((item, meta)) = s.waiting.pop_front() {
            self.waiting -= 1;
            self.make_ready(item, meta);
        } else if s.busy == 0 {
            self.release(key);
        }
    }

    fn take_all(&mut self) -> (Vec<Meta>, Vec<Meta>) {
        let mut waiting = Vec::with_capacity(self.waiting);
        for s in &mut self.slots {
            waiting.extend(s.waiting.drain(..).map(|(_, m)| m));
        }
        self.waiting = 0;
        let ready = self.ready.drain(..).map(|(_, m)| m).collect();
        (waiting, ready)
    }

    fn keys(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn probe(&mut self, item: &T, seq: u64) -> Probe {
        let key = (self.key_of)(item);
        let hash = self.hasher.hash_one(&key);
        let Some(at) = self.find(&key, hash) else {
            self.aside = Some((key, hash));
            return Probe::Free(self.next_slot());
        };
        let s = &mut self.slots[at as usize];
        if s.busy < self.limits.per_key && s.waiting.is_empty() {
            // `make_ready`'s work without the ready queue: the caller starts it now.
            s.busy += 1;
            if self.limits.track_order {
                s.out.push_back((seq, false));
            }
            Probe::Start(at)
        } else {
            Probe::Wait(at)
        }
    }

    fn occupy(&mut self, seq: u64) -> u32 {
        let Some((key, hash)) = self.aside.take() else {
            return NONE;
        };
        let at = self.make_slot(key, hash);
        let s = &mut self.slots[at as usize];
        s.busy = 1;
        if self.limits.track_order {
            s.out.push_back((seq, false));
        }
        at
    }

    fn wait(&mut self, item: T, meta: Meta) {
        self.slots[meta.key as usize]
            .waiting
            .push_back((item, meta));
        self.waiting += 1;
    }
}

/// The hasher of the index, whose keys are already hashes.
#[derive(Default)]
pub(super) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The key map as the driver uses it: stages new items, and puts the results of a key's
/// items in the output order.
pub(super) struct Keyed<T, U> {
    keys: Box<dyn Keys<T>>,
    max_waiting: usize,
    /// Tracking order: results waiting for an earlier item of their key.
    parked: HashMap<u64, Done<U>>,
    released: Vec<u64>,
}

impl<T, U> Keyed<T, U> {
    pub(super) fn new(make: KeyFn<T>, limits: KeyLimits) -> Self {
        Keyed {
            keys: make(limits),
            max_waiting: limits.max_waiting,
            parked: HashMap::new(),
            released: Vec::new(),
        }
    }

    /// Moves new items from the input into the map until one is ready or the waiting
    /// items are at their bound (`pull`: may pull a chunk from upstream). Returns how many
    /// are ready.
    pub(super) fn stage(
        &mut self,
        input: &mut Input<T>,
        reorder: &mut Reorder<U>,
        pull: bool,
        cx: &mut Context<'_>,
        stats: &StageStats,
    ) -> usize {
        let mut waited = 0;
        while self.keys.ready() == 0 && self.keys.waiting() < self.max_waiting {
            if input.is_empty() && pull {
                input.fill(cx, stats);
            }
            let Some((item, ticket)) = input.pop() else {
                break;
            };
            let meta = Meta::new(reorder.next(), ticket);
            waited += usize::from(!self.keys.arrive(item, meta));
        }
        if waited > 0 {
            StageStats::add(&stats.key_waits, waited);
        }
        self.keys.ready()
    }

    pub(super) fn pop(&mut self) -> Option<(T, Meta)> {
        self.keys.pop_ready()
    }

    /// The most items waiting behind busy keys (`max_waiting`).
    pub(super) fn max_waiting(&self) -> usize {
        self.max_waiting
    }

    /// Whether the items waiting behind busy keys are at their bound (no input is taken).
    pub(super) fn full(&self) -> bool {
        self.keys.waiting() >= self.max_waiting
    }

    /// See [`Keys::probe`].
    #[inline]
    pub(super) fn probe(&mut self, item: &T, seq: u64) -> Probe {
        self.keys.probe(item, seq)
    }

    /// See [`Keys::occupy`].
    pub(super) fn occupy(&mut self, seq: u64) -> u32 {
        self.keys.occupy(seq)
    }

    /// See [`Keys::wait`]; counted in the stage's `key_waits`.
    pub(super) fn wait(&mut self, item: T, meta: Meta, stats: &StageStats) {
        self.keys.wait(item, meta);
        StageStats::add(&stats.key_waits, 1);
    }

    pub(super) fn ready(&self) -> usize {
        self.keys.ready()
    }

    /// An item ended with `done` (`Done::Left`: left unfinished): its result goes on in its
    /// turn, and its key's next item becomes ready.
    pub(super) fn end(
        &mut self,
        key: u32,
        seq: u64,
        done: Done<U>,
        reorder: &mut Reorder<U>,
        out: &mut Output<U>,
    ) {
        self.released.clear();
        self.keys.end(key, seq, &mut self.released);
        if self.released.as_slice() == [seq] {
            return put(seq, done, reorder, out);
        }
        self.parked.insert(seq, done);
        for &s in &self.released {
            if let Some(d) = self.parked.remove(&s) {
                put(s, d, reorder, out);
            }
        }
    }

    /// A graceful stop: the items waiting and ready end unfinished. Returns how many.
    pub(super) fn stop(&mut self, reorder: &mut Reorder<U>, out: &mut Output<U>) -> usize {
        let (waiting, ready) = self.keys.take_all();
        for meta in &waiting {
            reorder.leave(meta.seq, out);
        }
        for meta in &ready {
            self.end(meta.key, meta.seq, Done::Left, reorder, out);
        }
        waiting.len() + ready.len()
    }

    /// Items held here: waiting, ready, and finished results waiting for their turn.
    pub(super) fn len(&self) -> usize {
        let done = self.parked.values();
        self.keys.waiting() + self.keys.ready() + done.filter(|d| matches!(d, Done::Ok(..))).count()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.waiting() == 0 && self.keys.ready() == 0 && self.parked.is_empty()
    }
}

fn put<U>(seq: u64, done: Done<U>, reorder: &mut Reorder<U>, out: &mut Output<U>) {
    match done {
        Done::Left => reorder.leave(seq, out),
        done => reorder.fill(seq, done, out),
    }
}

impl<T, U> fmt::Debug for Keyed<T, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyed")
            .field("keys", &self.keys.keys())
            .field("waiting", &self.keys.waiting())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::chunk::Ticket;

    fn map<K: Hash + Eq + Send>(
        per_key: usize,
        track_order: bool,
        key: fn(&u32) -> K,
    ) -> KeyMap<u32, K, fn(&u32) -> K> {
        let limits = KeyLimits {
            per_key,
            max_waiting: usize::MAX,
            track_order,
        };
        KeyMap::new(key, limits)
    }

    fn arrive<K: Hash + Eq + Send>(m: &mut KeyMap<u32, K, fn(&u32) -> K>, seq: u32) -> bool {
        m.arrive(seq, Meta::new(u64::from(seq), Ticket::none()))
    }

    fn ready<K: Hash + Eq + Send>(m: &mut KeyMap<u32, K, fn(&u32) -> K>) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| m.pop_ready())
            .map(|(item, meta)| (item, meta.key))
            .collect()
    }

    #[test]
    fn a_busy_key_keeps_its_items_waiting_in_arrival_order_and_others_go_on() {
        let mut m = map(1, false, |x| x % 2);
        // Items 0..6: key 0 gets 0, 2, 4; key 1 gets 1, 3, 5.
        let started: Vec<bool> = (0..6).map(|i| arrive(&mut m, i)).collect();
        assert_eq!(started, [true, true, false, false, false, false]);
        assert_eq!((m.waiting(), m.keys()), (4, 2));
        let first = ready(&mut m);
        assert_eq!(first.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1]);
        let mut released = Vec::new();
        m.end(first[1].1, 1, &mut released);
        assert_eq!(released, [1]);
        assert_eq!(ready(&mut m).iter().map(|r| r.0).collect::<Vec<_>>(), [3]);
        m.end(first[0].1, 0, &mut released);
        assert_eq!(ready(&mut m).iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
        assert_eq!(m.waiting(), 2);
    }

    #[test]
    fn per_key_two_releases_results_in_arrival_order_when_tracking() {
        let mut m = map(2, true, |_| ());
        for i in 0..4 {
            assert_eq!(arrive(&mut m, i), i < 2);
        }
        let out = ready(&mut m);
        let key = out[0].1;
        let mut released = Vec::new();
        // Item 1 ends first: held until item 0 ends; item 2 becomes ready at once.
        m.end(key, 1, &mut released);
        assert!(released.is_empty());
        assert_eq!(ready(&mut m).iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
        m.end(key, 0, &mut released);
        assert_eq!(released, [0, 1]);
        assert_eq!(ready(&mut m).iter().map(|r| r.0).collect::<Vec<_>>(), [3]);
        released.clear();
        m.end(key, 2, &mut released);
        m.end(key, 3, &mut released);
        assert_eq!(released, [2, 3]);
        assert_eq!(m.keys(), 0, "a key with nothing out has no entry");
    }

    /// A key whose every value hashes alike: the slots of one hash are chained.
    #[derive(PartialEq, Eq)]
    struct Collides(u32);
    impl Hash for Collides {
        fn hash<H: Hasher>(&self, state: &mut H) {
            state.write_u64(7);
        }
    }

    #[test]
    fn keys_with_one_hash_stay_apart_and_leave_in_any_order() {
        let mut m = map(1, false, |x| Collides(x % 3));
        for i in 0..6 {
            assert_eq!(arrive(&mut m, i), i < 3);
        }
        assert_eq!((m.keys(), m.index.len()), (3, 1));
        let out = ready(&mut m);
        let mut released = Vec::new();
        // Ending the middle, then the head, then the tail of the chain.
        for &(item, key) in [&out[1], &out[0], &out[2]] {
            m.end(key, u64::from(item), &mut released);
        }
        let next = ready(&mut m);
        assert_eq!(next.iter().map(|r| r.0).collect::<Vec<_>>(), [4, 3, 5]);
        for (item, key) in next {
            m.end(key, u64::from(item), &mut released);
        }
        assert_eq!((m.keys(), m.index.len(), m.waiting()), (0, 0, 0));
        // Their slots are reused, and the key is found again by its value.
        assert!(arrive(&mut m, 1));
        assert!(!arrive(&mut m, 4));
        assert_eq!(m.slots.len(), 3);
    }

    #[test]
    fn a_million_distinct_keys_cost_only_the_keys_out() {
        let mut m = map(1, false, |x| *x);
        let mut out = VecDeque::new();
        let mut released = Vec::new();
        let mut most = 0;
        for i in 0..1_000_000u32 {
            assert!(arrive(&mut m, i));
            out.extend(ready(&mut m));
            most = most.max(m.keys());
            if out.len() == 16 {
                let (item, key) = out.pop_front().unwrap();
                m.end(key, u64::from(item), &mut released);
            }
        }
        assert_eq!(most, 16);
        assert!(
            m.slots.len() <= 16 && m.index.len() <= 16,
            "{}",
            m.slots.len()
        );
        assert!(m.index.capacity() < 64, "{}", m.index.capacity());
        while let Some((item, key)) = out.pop_front() {
            m.end(key, u64::from(item), &mut released);
        }
        assert_eq!((m.keys(), m.index.len()), (0, 0));
        assert_eq!(released.len(), 1_000_000);
    }

    #[test]
    fn a_stop_takes_the_waiting_and_the_ready_items() {
        let mut m = map(1, false, |x| x % 2);
        for i in 0..5 {
            arrive(&mut m, i);
        }
        let (waiting, ready) = m.take_all();
        let seqs = |v: &[Meta]| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!((seqs(&waiting), seqs(&ready)), (vec![2, 4, 3], vec![0, 1]));
        assert_eq!((m.waiting(), m.ready()), (0, 0));
    }
}
