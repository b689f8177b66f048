//! [`StreamOptions`]: how a stream source reads, acknowledges, reclaims and keeps leases,
//! checked as a whole before anything runs.

use std::time::Duration;

use flowline::{ConfigProblem, Error, Outage};

/// Options of a [`RedisStream`](crate::RedisStream) source.
///
/// ```
/// use flowline_redis::StreamOptions;
/// use std::time::Duration;
/// let opts = StreamOptions::new()
///     .batch(200)
///     .min_idle(Duration::from_secs(30))
///     .max_deliveries(5)
///     .dead_letter_stream("jobs:dead");
/// assert!(opts.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[must_use = "options do nothing until they are given to a source"]
pub struct StreamOptions {
    pub(crate) batch: usize,
    pub(crate) block: Duration,
    pub(crate) min_idle: Duration,
    pub(crate) max_deliveries: u64,
    pub(crate) dead_letter: Option<String>,
    pub(crate) start_id: String,
    pub(crate) stop_when_drained: bool,
    pub(crate) reclaim: bool,
    pub(crate) isolate_suspects: bool,
    pub(crate) drain_timeout: Duration,
    pub(crate) outage: Outage,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            batch: 100,
            block: Duration::from_secs(1),
            min_idle: Duration::from_secs(60),
            max_deliveries: 10,
            dead_letter: None,
            start_id: "0".into(),
            stop_when_drained: false,
            reclaim: true,
            isolate_suspects: true,
            drain_timeout: Duration::from_secs(30),
            outage: Outage::default(),
        }
    }
}

/// The longest duration an option takes: Redis counts milliseconds in a signed 64-bit
/// integer, and a day is already longer than any sensible lease.
const LONGEST: Duration = Duration::from_secs(86_400 * 365);

impl StreamOptions {
    /// Batches of 100 entries, blocking reads of 1 s, `min_idle` 60 s, 10 deliveries at
    /// most, the dead letters in `<stream>:dead`, a new group starting at the stream's
    /// first entry, reclaiming on, suspects run alone, running until stopped.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new();
    /// # let _ = opts;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries per read (`COUNT` of `XREADGROUP` and `XAUTOCLAIM`), 1 to 100,000.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().batch(500);
    /// # let _ = opts;
    /// ```
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n;
        self
    }

    /// How long one read waits for new entries (`BLOCK`), 1 ms or more. A shorter block
    /// notices a stop sooner; it does not change throughput while entries are waiting.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().block(std::time::Duration::from_millis(200));
    /// # let _ = opts;
    /// ```
    pub fn block(mut self, d: Duration) -> Self {
        self.block = d;
        self
    }

    /// An entry pending this long with no sign of life from its consumer is taken over by
    /// another (`XAUTOCLAIM`). A live consumer renews its in-flight entries' leases every
    /// third of it, so only a dead (or cut-off) consumer's entries are taken. At least
    /// 30 ms. It is also the longest a dead worker's entries wait before they run again.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().min_idle(std::time::Duration::from_secs(5));
    /// # let _ = opts;
    /// ```
    pub fn min_idle(mut self, d: Duration) -> Self {
        self.min_idle = d;
        self
    }

    /// An entry delivered more than `n` times (its consumers kept dying on it: a poison
    /// message) is not run again but written to the dead-letter stream with its delivery
    /// count, and acknowledged. At least 1.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().max_deliveries(3);
    /// # let _ = opts;
    /// ```
    pub fn max_deliveries(mut self, n: u64) -> Self {
        self.max_deliveries = n;
        self
    }

    /// The stream failed and poison entries are written to (default `<stream>:dead`). In a
    /// Redis Cluster it must share the source stream's hash tag (`{jobs}` and
    /// `{jobs}:dead`): the move is one script on one node.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().dead_letter_stream("{jobs}:dead");
    /// # let _ = opts;
    /// ```
    pub fn dead_letter_stream(mut self, name: impl Into<String>) -> Self {
        self.dead_letter = Some(name.into());
        self
    }

    /// Where a group created by this source starts: `0` (default: every entry already in
    /// the stream) or `$` (only entries added from now on), or an entry id. An existing
    /// group keeps its position.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().start_id("$");
    /// # let _ = opts;
    /// ```
    pub fn start_id(mut self, id: impl Into<String>) -> Self {
        self.start_id = id.into();
        self
    }

    /// End the source once the group has nothing left: no new entry, and no entry pending
    /// for any consumer (a dead consumer's entries are reclaimed and run first). For
    /// batch jobs and tests; by default a source reads until the run is stopped.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().stop_when_drained(true);
    /// # let _ = opts;
    /// ```
    pub fn stop_when_drained(mut self, yes: bool) -> Self {
        self.stop_when_drained = yes;
        self
    }

    /// Whether this source takes over other consumers' idle entries (default on).
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().reclaim(false);
    /// # let _ = opts;
    /// ```
    pub fn reclaim(mut self, yes: bool) -> Self {
        self.reclaim = yes;
        self
    }

    /// Whether a *suspect* runs alone (default on). A suspect is an entry delivered before
    /// and never acknowledged: its consumer died or stalled with it in flight (a reclaimed
    /// entry, or one a restarted consumer re-reads). Such an entry may be the one that
    /// killed its consumer, a poison message; run beside others, each death would count a
    /// delivery for every neighbour too, and the innocent ones would reach
    /// [`max_deliveries`](Self::max_deliveries) and the dead letters with it.
    ///
    /// So a suspect is handed to the pipeline only once everything else this consumer
    /// handed out has ended, and nothing else is read or handed out until it ends;
    /// suspects are reclaimed (and a restarted consumer's own pending entries re-read) one
    /// at a time. When a suspect kills the process, only its own count rises; each innocent
    /// neighbour runs alone once, is acknowledged, and is never a suspect again.
    ///
    /// A healthy stream has no suspects (a live consumer's leases keep its entries, however
    /// slow its calls): its throughput is unchanged. After every consumer died at once
    /// (a crash of all workers, a restart without stable names) the entries they held run
    /// one at a time, each once, before new entries flow again at full width. A pipeline
    /// that holds items until more arrive, with no time limit, would hold a suspect back
    /// with them: turn this off there (a [`batch`](flowline::Flow::batch) ends its batches
    /// after `max_wait`, so it is fine).
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().isolate_suspects(false);
    /// # let _ = opts;
    /// ```
    pub fn isolate_suspects(mut self, yes: bool) -> Self {
        self.isolate_suspects = yes;
        self
    }

    /// How long, once the run has ended, the source keeps trying to acknowledge what
    /// finished while Redis is unreachable (default 30 s). What it cannot acknowledge stays
    /// pending and runs again: never lost, possibly repeated.
    ///
    /// ```
    /// let opts = flowline_redis::StreamOptions::new().drain_timeout(std::time::Duration::from_secs(5));
    /// # let _ = opts;
    /// ```
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// How long the source rides out Redis being down (default [`Outage::default`]: keep
    /// trying for 5 minutes, waits of 50 ms doubling to 1 s, jittered). Every request of
    /// the source is tried again under it: reads, acknowledgements, dead letters, lease
    /// renewals, reclaims. While Redis is down the job pauses: no entry is read, acks wait
    /// (none is dropped, none is sent for an item that did not end), and no item fails for
    /// it. Past the limit the run ends with [`Error::Outage`](flowline::Error::Outage)
    /// naming the server and its last error; the entries it held stay pending, for a rerun
    /// or another consumer. Give the run's own policy here when it has one.
    ///
    /// ```
    /// use flowline::Outage;
    /// let opts = flowline_redis::StreamOptions::new()
    ///     .outage(Outage::keep_trying_for(std::time::Duration::from_secs(60)));
    /// # let _ = opts;
    /// ```
    pub fn outage(mut self, policy: Outage) -> Self {
        self.outage = policy;
        self
    }

    /// Every option with a value it cannot take, at once, naming option and value.
    ///
    /// ```
    /// use flowline_redis::StreamOptions;
    /// let err = StreamOptions::new().batch(0).max_deliveries(0).validate().unwrap_err();
    /// let text = err.to_string();
    /// assert!(text.contains("batch") && text.contains("max_deliveries"), "{text}");
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        let mut problems = Vec::new();
        let mut bad = |option: &'static str, value: String, reason: &'static str| {
            problems.push(ConfigProblem {
                stage: "redis stream".into(),
                option,
                value,
                reason,
            })
        };
        if !(1..=100_000).contains(&self.batch) {
            bad("batch", self.batch.to_string(), "must be 1 to 100000");
        }
        if self.block < Duration::from_millis(1) || self.block > LONGEST {
            bad(
                "block",
                format!("{:?}", self.block),
                "must be 1 ms to a year",
            );
        }
        if self.min_idle < Duration::from_millis(30) || self.min_idle > LONGEST {
            bad(
                "min_idle",
                format!("{:?}", self.min_idle),
                "must be 30 ms to a year",
            );
        }
        if self.max_deliveries == 0 || self.max_deliveries > i64::MAX as u64 {
            bad(
                "max_deliveries",
                self.max_deliveries.to_string(),
                "must be at least 1",
            );
        }
        if self.dead_letter.as_deref().is_some_and(str::is_empty) {
            bad("dead_letter_stream", "\"\"".into(), "must not be empty");
        }
        if !valid_start(&self.start_id) {
            bad(
                "start_id",
                format!("{:?}", self.start_id),
                "must be 0, $ or an entry id <ms>-<seq>",
            );
        }
        if self.drain_timeout > LONGEST {
            bad(
                "drain_timeout",
                format!("{:?}", self.drain_timeout),
                "must be at most a year",
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config { problems })
        }
    }
}

fn valid_start(id: &str) -> bool {
    if id == "$" {
        return true;
    }
    let mut parts = id.splitn(2, '-');
    let ms = parts.next().unwrap_or("");
    let ok = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    ok(ms) && parts.next().is_none_or(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_are_rejected_by_name_and_value() {
        let err = StreamOptions::new()
            .batch(usize::MAX)
            .block(Duration::ZERO)
            .min_idle(Duration::MAX)
            .max_deliveries(0)
            .dead_letter_stream("")
            .start_id("yesterday")
            .drain_timeout(Duration::MAX)
            .validate()
            .unwrap_err();
        let Error::Config { problems } = err else {
            panic!("not a config error")
        };
        let names: Vec<&str> = problems.iter().map(|p| p.option).collect();
        assert_eq!(
            names,
            [
                "batch",
                "block",
                "min_idle",
                "max_deliveries",
                "dead_letter_stream",
                "start_id",
                "drain_timeout"
            ]
        );
        assert_eq!(problems[0].value, usize::MAX.to_string());
        assert!(
            StreamOptions::new()
                .min_idle(Duration::ZERO)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn start_ids_are_checked() {
        for ok in ["0", "$", "1700000000000-0", "12"] {
            assert!(valid_start(ok), "{ok}");
        }
        for bad in [
            "",
            "-",
            "1-",
            "a-1",
            "1-2-3",
            ">",
            "99999999999999999999999-0",
        ] {
            assert!(!valid_start(bad), "{bad}");
        }
        assert!(StreamOptions::new().validate().is_ok());
    }
}
