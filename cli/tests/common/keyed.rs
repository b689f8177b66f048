//! Keyed runs: inputs of several keys with pseudo-random job times, and what the jobs'
//! log and output say about order and overlap per key.

use std::collections::{BTreeMap, HashMap};

/// Inputs `KEY\tSEQ\tSECONDS`: `keys` keys in a pseudo-random interleaving, `per` inputs
/// each (SEQ counts per key from 1), each job sleeping a pseudo-random 0 to 19 ms.
pub fn inputs(keys: u32, per: u32, seed: u64) -> String {
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut left: Vec<u32> = vec![per; keys as usize];
    let mut out = String::new();
    while left.iter().any(|&n| n > 0) {
        let k = (next() % u64::from(keys)) as usize;
        if left[k] == 0 {
            continue;
        }
        left[k] -= 1;
        let ms = next() % 20;
        out.push_str(&format!("k{k}\t{}\t0.{ms:03}\n", per - left[k]));
    }
    out
}

/// The command of a job: notes its start and end in `log` (one append each, whole lines),
/// sleeps its time, prints `KEY SEQ`.
pub const JOB: &str = "echo start {1} {2} >> log; sleep {3}; echo end {1} {2} >> log; echo {1} {2}";

/// What the log says: per key, the most of its jobs that ran at once, and the most jobs
/// that ran at once over all keys. Asserts that each key's jobs started in input order:
/// a job notes its start once its shell runs, so of `per_key` jobs started together the
/// later may note first; when job `s` notes its start, at most `per_key - 1` of the
/// key's earlier jobs have not (they are the ones in flight beside it).
pub fn overlaps(log: &str, per_key: usize) -> (BTreeMap<String, usize>, usize) {
    let mut running: HashMap<String, usize> = HashMap::new();
    let mut started: HashMap<String, std::collections::BTreeSet<u32>> = HashMap::new();
    let mut most: BTreeMap<String, usize> = BTreeMap::new();
    let (mut total, mut most_total) = (0usize, 0usize);
    for line in log.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        let [what, key, seq] = w[..] else {
            panic!("log line {line:?}")
        };
        let seq: u32 = seq.parse().expect("seq");
        let n = running.entry(key.to_string()).or_default();
        match what {
            "start" => {
                let before = started.entry(key.to_string()).or_default();
                let not_yet = (1..seq).filter(|j| !before.contains(j)).count();
                assert!(
                    not_yet < per_key,
                    "key {key}: {seq} started before {not_yet} earlier ones"
                );
                before.insert(seq);
                *n += 1;
                total += 1;
                let m = most.entry(key.to_string()).or_default();
                *m = (*m).max(*n);
                most_total = most_total.max(total);
            }
            "end" => {
                *n -= 1;
                total -= 1;
            }
            _ => panic!("log line {line:?}"),
        }
    }
    (most, most_total)
}

/// Each key's outputs, in the order they were written; asserts all `per` came, in order.
pub fn outputs_in_key_order(out: &str, keys: u32, per: u32) {
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for line in out.lines() {
        let (k, s) = line.split_once(' ').expect("KEY SEQ");
        seen.entry(k.to_string())
            .or_default()
            .push(s.parse().expect("seq"));
    }
    assert_eq!(seen.len(), keys as usize, "{out}");
    for (k, seqs) in seen {
        assert_eq!(seqs, (1..=per).collect::<Vec<_>>(), "key {k}");
    }
}
