//! `partition(n, key, per_lane)`: per-key order with parallelism across keys.

use std::hash::{Hash, Hasher};

use crate::error::Error;
use crate::topology::fork::split_chunk;
use crate::topology::merge::merge;
use crate::topology::split_by;
use crate::{IntoPipeline, Pipeline};

/// Routes the items of `p` to `n` lanes by the hash of `key(item)` (stage `partition`), runs
/// `per_lane` on each lane, and merges the lanes (stage `merge`). Items of one key always go
/// to the same lane, in order; each lane's stages run on their own tasks.
pub(crate) fn partition<T, K, KF, L, F>(
    mut p: Pipeline<T>,
    n: usize,
    mut key: KF,
    mut per_lane: F,
) -> Pipeline<L::Item>
where
    T: Send + 'static,
    K: Hash,
    KF: FnMut(&T) -> K + Send + 'static,
    L: IntoPipeline,
    F: FnMut(Pipeline<T>) -> L,
{
    if n == 0 {
        p.settings.errors.push(Error::config(
            "partition",
            "lanes",
            0usize,
            "must be at least 1",
        ));
        return per_lane(p).into_pipeline();
    }
    let labels = (0..n).map(|i| format!("lane {i}")).collect();
    let mut pick = move |x: &T| lane_of(&key(x), n);
    let lanes = split_by(
        p,
        "partition",
        "partition",
        labels,
        false,
        move |chunk, parts, stats, run| split_chunk(chunk, parts, &mut pick, stats, run),
    );
    merge(
        lanes
            .into_iter()
            .map(|lane| per_lane(lane).into_pipeline())
            .collect(),
    )
}

/// The lane of a key: a fast, fixed hash (the same key always lands in the same lane, in
/// every run and process), mapped onto `0..n` by multiplication so that every bit counts.
pub(crate) fn lane_of<K: Hash + ?Sized>(key: &K, n: usize) -> usize {
    let mut h = KeyHasher(0);
    key.hash(&mut h);
    ((u128::from(h.finish()) * n as u128) >> 64) as usize
}

/// FxHash's mixing step per word, finished with murmur3's `fmix64` so that keys that differ
/// only in their low bits (sequential ids) still spread over the high bits used for lanes.
struct KeyHasher(u64);

impl KeyHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        let mut k = self.0;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::lane_of;
    use crate::prelude::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn sequential_keys_spread_over_every_lane() {
        let mut counts = [0u32; 8];
        for k in 0..8_000u64 {
            counts[lane_of(&(k * 8), 8)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(lane_of("user-1", 8), lane_of(&"user-1".to_string(), 8));
    }

    #[tokio::test]
    async fn zero_lanes_is_a_config_error() {
        let err = Pipeline::from_iter(0..3u32)
            .partition(0, |x| *x, |lane| lane)
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `partition`: lanes = 0: must be at least 1"
        );
    }

    /// One test case: items (key, delay), `lanes` lanes, one worker per lane.
    fn check(items: Vec<(u8, u8)>, lanes: usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            // Which lane handled each key, and the busy time per lane.
            let lane_of_key = Arc::new(Mutex::new(HashMap::<u8, usize>::new()));
            let busy = Arc::new(Mutex::new(vec![0u64; lanes]));
            let mut next_lane = 0;
            let input: Vec<(u8, usize, u8)> = items
                .iter()
                .enumerate()
                .map(|(seq, &(k, d))| (k, seq, d))
                .collect();
            let (out, report) = Pipeline::from_iter(input.clone())
                .partition(
                    lanes,
                    |&(k, _, _)| k,
                    |lane| {
                        let me = next_lane;
                        next_lane += 1;
                        let (keys, busy) = (lane_of_key.clone(), busy.clone());
                        lane.map_async("work", move |(k, seq, d)| {
                            let prev = keys.lock().unwrap().insert(k, me);
                            assert!(prev.is_none() || prev == Some(me), "key {k} in two lanes");
                            busy.lock().unwrap()[me] += u64::from(d);
                            async move {
                                tokio::time::sleep(Duration::from_millis(u64::from(d))).await;
                                (k, seq)
                            }
                        })
                    },
                )
                .collect_with_report()
                .await
                .unwrap();
            // All arrive.
            assert_eq!(out.len(), input.len());
            // Order per key kept.
            let mut last: HashMap<u8, usize> = HashMap::new();
            for (k, seq) in &out {
                if let Some(prev) = last.insert(*k, *seq) {
                    assert!(prev < *seq, "key {k} out of order: {prev} then {seq}");
                }
            }
            // Lanes run concurrently: the run takes as long as its busiest lane, not the sum.
            let busiest = *busy.lock().unwrap().iter().max().unwrap();
            assert_eq!(report.elapsed, Duration::from_millis(busiest));
            assert!(report.is_balanced());
        })
    }

    /// 48 generated cases: up to 400 items over 16 keys with delays of 0–19 ms, in 1 to 8
    /// lanes. The generator is a fixed-seed splitmix64, so a failing case is the same on
    /// every run (its number is in the panic message).
    #[test]
    fn per_key_order_all_arrive_lanes_in_parallel() {
        let mut state = 0x5eed_u64;
        let mut next = |below: u64| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % below
        };
        for case in 0..48 {
            let len = if case == 0 { 0 } else { next(400) };
            let items: Vec<(u8, u8)> = (0..len).map(|_| (next(16) as u8, next(20) as u8)).collect();
            let lanes = 1 + next(8) as usize;
            let run = std::panic::catch_unwind(|| check(items, lanes));
            assert!(
                run.is_ok(),
                "case {case} ({len} items, {lanes} lanes) failed"
            );
        }
    }

    #[test]
    fn two_keys_in_two_lanes_take_the_time_of_one() {
        let (a, b) = (0u8..)
            .flat_map(|a| (0u8..).take(255).map(move |b| (a, b)))
            .find(|&(a, b)| lane_of(&a, 2) != lane_of(&b, 2))
            .unwrap();
        let items: Vec<(u8, u8)> = (0..50).flat_map(|_| [(a, 10), (b, 10)]).collect();
        check(items, 2);
    }
}
