//! Uniform draws for jittered waits (retry backoff, outage backoff).
//!
//! Hand-written rather than taken from `rand`: a jittered wait needs a few draws a second,
//! not a cryptographic or statistically strong generator, and `rand` would add crates to
//! every user's first build. Seeded from std's randomly keyed hasher, so two processes (or
//! two stages) started at once draw different waits.

/// xorshift64*: a small generator of uniform draws in `[0, 1)`.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    /// A generator with a fresh random seed.
    pub(crate) fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        Jitter(h.finish() | 1)
    }

    /// A uniform draw in `[0, 1)`.
    pub(crate) fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_the_unit_interval_and_spread() {
        let mut j = Jitter::new();
        let draws: Vec<f64> = (0..10_000).map(|_| j.next()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let low = draws.iter().filter(|d| **d < 0.5).count();
        assert!((4_500..5_500).contains(&low), "{low} of 10000 under 0.5");
    }

    #[test]
    fn two_generators_start_apart() {
        assert_ne!(Jitter::new().next(), Jitter::new().next());
    }
}
