//! `Serialize` for the report, written out rather than derived: the derive macro would add
//! `serde` and `serde_derive` (and a second `syn`) to every build with the feature, for a few
//! small structs whose JSON names differ from their fields anyway ("in", "ok", "out").

use serde_core::ser::{Serialize, SerializeMap, SerializeSeq, SerializeStruct, Serializer};

use super::{FailureReasons, LatencySummary, LiveLimits, Report, RunOutcome, StageReport};
use crate::failure::Failure;

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for RunOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str().replace(' ', "_"))
    }
}

/// Only the reasons that failed an item: `{"error": 3, "timeout": 1}`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for FailureReasons {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (name, n) in self.iter() {
            m.serialize_entry(name, &n)?;
        }
        m.end()
    }
}

/// Durations in seconds: `{"samples": 100, "p50_seconds": 0.004, ...}`.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for LatencySummary {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("LatencySummary", 5)?;
        m.serialize_field("samples", &self.samples)?;
        m.serialize_field("p50_seconds", &self.p50.as_secs_f64())?;
        m.serialize_field("p90_seconds", &self.p90.as_secs_f64())?;
        m.serialize_field("p99_seconds", &self.p99.as_secs_f64())?;
        m.serialize_field("max_seconds", &self.max.as_secs_f64())?;
        m.end()
    }
}

/// The table's names: `in`, `ok` (`passed`), `out` (`emitted`), ...
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for StageReport {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("StageReport", 15)?;
        m.serialize_field("name", &self.name)?;
        m.serialize_field("kind", self.kind)?;
        m.serialize_field("in", &self.received)?;
        m.serialize_field("ok", &self.passed)?;
        m.serialize_field("out", &self.emitted)?;
        m.serialize_field("dropped", &self.dropped)?;
        m.serialize_field("failed", &self.failed)?;
        m.serialize_field("failed_by", &self.failed_by)?;
        m.serialize_field("retried", &self.retried)?;
        m.serialize_field("late", &self.late)?;
        m.serialize_field("transient_retries", &self.transient_retries)?;
        m.serialize_field("key_waits", &self.key_waits)?;
        m.serialize_field("unfinished", &self.unfinished)?;
        m.serialize_field("latency", &self.latency)?;
        match &self.limits {
            Some(l) => m.serialize_field("limits", &Limits(l))?,
            None => m.skip_field("limits")?,
        }
        m.end()
    }
}

/// `{"workers": 8, "adaptive": false, "worker_changes": 2, "rate_per_second": 50.0,
/// "rate_changes": 1}`.
struct Limits<'a>(&'a LiveLimits);

impl Serialize for Limits<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let l = self.0;
        let mut m = s.serialize_struct("LiveLimits", 5)?;
        m.serialize_field("workers", &l.workers)?;
        m.serialize_field("adaptive", &l.adaptive)?;
        m.serialize_field("worker_changes", &l.worker_changes)?;
        let rate = l.rate.map(|(c, p)| c as f64 / p.as_secs_f64());
        m.serialize_field("rate_per_second", &rate)?;
        m.serialize_field("rate_changes", &l.rate_changes)?;
        m.end()
    }
}

/// One sampled failure: where, why, after how many attempts, and the input's text.
struct Sampled<'a>(&'a Failure);

impl Serialize for Sampled<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let f = self.0;
        let mut m = s.serialize_struct("Failure", 5)?;
        m.serialize_field("stage", &*f.stage)?;
        m.serialize_field("reason", f.error.kind())?;
        m.serialize_field("error", &f.error.to_string())?;
        m.serialize_field("attempts", &f.attempts)?;
        m.serialize_field("input", &f.input.as_ref().map(|i| i.debug()))?;
        m.end()
    }
}

struct Samples<'a>(&'a [Failure]);

impl Serialize for Samples<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for f in self.0 {
            seq.serialize_element(&Sampled(f))?;
        }
        seq.end()
    }
}

/// See [`Report::to_json`] for the shape.
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Report {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("Report", 9)?;
        m.serialize_field("outcome", &self.outcome)?;
        m.serialize_field("elapsed_seconds", &self.elapsed.as_secs_f64())?;
        m.serialize_field("delivered", &self.delivered())?;
        m.serialize_field("failed", &self.failures)?;
        m.serialize_field("retried", &self.retries())?;
        m.serialize_field("items_per_second", &self.items_per_second())?;
        m.serialize_field("balanced", &self.is_balanced())?;
        m.serialize_field("stages", &self.stages)?;
        m.serialize_field("failure_sample", &Samples(&self.failure_sample))?;
        m.end()
    }
}

#[cfg(all(test, feature = "jsonl"))]
mod tests {
    use std::time::Duration;

    use crate::failure::{Failure, ItemError};
    use crate::report::tests::{report, stage};
    use crate::report::{LatencySummary, LiveLimits};

    #[test]
    fn json_has_the_tables_names_and_the_reasons() {
        let mut r = report(vec![
            stage("source", "source", 3),
            stage("fetch", "async", 3),
        ]);
        r.stages[1].latency = Some(LatencySummary {
            samples: 3,
            p50: Duration::from_millis(4),
            p90: Duration::from_millis(5),
            p99: Duration::from_millis(6),
            max: Duration::from_millis(7),
        });
        r.failure_sample = vec![Failure {
            input: Some(crate::FailedInput::new(7u64)),
            ..Failure::new("fetch", ItemError::Timeout(Duration::from_secs(2)), 3)
        }];
        r.stages[1].limits = Some(LiveLimits {
            workers: Some(8),
            adaptive: false,
            worker_changes: 2,
            rate: Some((50, Duration::from_millis(500))),
            rate_changes: 1,
        });
        r.stages[1].key_waits = 4;
        assert_eq!(
            r.to_json(),
            concat!(
                r#"{"outcome":"completed","elapsed_seconds":2.5,"delivered":0,"failed":3,"#,
                r#""retried":6,"items_per_second":0.0,"balanced":false,"stages":["#,
                r#"{"name":"source","kind":"source","in":3,"ok":3,"out":3,"dropped":3,"#,
                r#""failed":3,"failed_by":{"error":3},"retried":3,"late":0,"transient_retries":3,"key_waits":0,"unfinished":3,"latency":null},"#,
                r#"{"name":"fetch","kind":"async","in":3,"ok":3,"out":3,"dropped":3,"#,
                r#""failed":3,"failed_by":{"error":3},"retried":3,"late":0,"transient_retries":3,"key_waits":4,"unfinished":3,"#,
                r#""latency":{"samples":3,"p50_seconds":0.004,"p90_seconds":0.005,"#,
                r#""p99_seconds":0.006,"max_seconds":0.007},"#,
                r#""limits":{"workers":8,"adaptive":false,"worker_changes":2,"#,
                r#""rate_per_second":100.0,"rate_changes":1}}],"#,
                r#""failure_sample":[{"stage":"fetch","reason":"timeout","#,
                r#""error":"timed out after 2s","attempts":3,"input":"7"}]}"#
            )
        );
    }
}
