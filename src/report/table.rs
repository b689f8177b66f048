//! The printed report: a table of the stages fitted to a width, and the number formats it
//! shares with the progress lines.

use std::fmt;
use std::time::Duration;

use super::{Report, StageReport};

/// Shorter than [`fmt_duration`] for small values: call latencies.
fn fmt_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1e6 {
        format!("{}ms", sig3(us / 1e3))
    } else {
        fmt_duration(d)
    }
}

/// A duration in at most seven characters: `12.3ms`, `4.56s`, `12.3m`, `4.56h`, `1.23kh`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", sig3(s * 1e3))
    } else if s < 999.5 {
        format!("{}s", sig3(s))
    } else if s < 999.5 * 60.0 {
        format!("{}m", sig3(s / 60.0))
    } else {
        format!("{}h", si(s / 3600.0))
    }
}

/// `v` (below 999.5) with three significant digits: `7.42`, `74.2`, `742`.
fn sig3(v: f64) -> String {
    if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A rate or other measure with three significant digits and a k/M/G/T/P/E suffix:
/// `0.50`, `7.42`, `742`, `7.42k`, `12.0M`. Not a number (or below zero) is `0`.
pub(crate) fn si(v: f64) -> String {
    if v.is_nan() || v <= 0.0 {
        return "0".into();
    }
    let mut v = v;
    for suffix in ["", "k", "M", "G", "T", "P", "E"] {
        if v < 999.5 {
            return format!("{}{suffix}", sig3(v));
        }
        v /= 1000.0;
    }
    format!("{:.0}E", v * 1000.0)
}

/// A count, exact below 1000 and with three significant digits above: `999`, `1.23k`.
pub(crate) fn si_count(n: u64) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        si(n as f64)
    }
}

/// `s` cut to `width` characters with `…` in the middle (the end often tells stages
/// apart: `fetch#2`).
pub(crate) fn elide(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let tail = (width - 1) / 2;
    let head = width - 1 - tail;
    let mut out: String = s.chars().take(head).collect();
    out.push('…');
    out.extend(s.chars().skip(n - tail));
    out
}

/// The table's columns after the stage's name: header, right-aligned.
const COLUMNS: [(&str, bool); 9] = [
    ("kind", false),
    ("in", true),
    ("out", true),
    ("dropped", true),
    ("failed", true),
    ("retried", true),
    ("unfin.", true),
    ("p50", true),
    ("p99", true),
];

/// The narrowest a printed report gets, whatever width it is given.
const MIN_WIDTH: usize = 60;

impl Report {
    /// The table's cells, header first; counts exact or (`short`) with three digits.
    fn cells(&self, short: bool) -> Vec<(String, [String; 9])> {
        let count = |n: u64| if short { si_count(n) } else { n.to_string() };
        let mut rows = vec![("stage".to_string(), COLUMNS.map(|(h, _)| h.to_string()))];
        for s in &self.stages {
            let (p50, p99) = match s.latency {
                Some(l) if l.samples > 0 => (fmt_latency(l.p50), fmt_latency(l.p99)),
                _ => ("-".into(), "-".into()),
            };
            rows.push((
                s.name.clone(),
                [
                    elide(s.kind, 10),
                    count(s.received),
                    count(s.emitted),
                    count(s.dropped),
                    count(s.failed),
                    count(s.retried),
                    count(s.unfinished),
                    p50,
                    p99,
                ],
            ));
        }
        rows
    }

    /// The header line, shortened (counts to three digits) when longer than `max`.
    fn headline(&self, max: usize) -> String {
        let line = |count: &dyn Fn(u64) -> String| {
            let mut l = format!(
                "run {} in {}: {} delivered ({}/s), {} failed",
                self.outcome,
                if self.elapsed.as_secs_f64() < 999.5 {
                    format!("{:.3}s", self.elapsed.as_secs_f64())
                } else {
                    fmt_duration(self.elapsed)
                },
                count(self.delivered()),
                si(self.items_per_second()),
                count(self.failures),
            );
            let retries = self.retries();
            if retries > 0 {
                l.push_str(&format!(", {} retries", count(retries)));
            }
            l
        };
        let exact = line(&|n: u64| n.to_string());
        if exact.chars().count() <= max {
            return exact;
        }
        let short = line(&si_count);
        if short.chars().count() <= max {
            return short;
        }
        // Only hostile values get here (a run of petahours): the counts on a line of their own.
        short.replacen(": ", ":\n", 1)
    }

    /// `failed at STAGE: error 3, timeout 1`, within `max` columns.
    fn reasons_line(s: &StageReport, max: usize) -> String {
        let list = |count: &dyn Fn(u64) -> String| {
            let mut parts: Vec<String> = s
                .failed_by
                .iter()
                .map(|(name, n)| format!("{name} {}", count(n)))
                .collect();
            // Failures a stage counted without a reason (none today) still add up.
            let other = s.failed.saturating_sub(s.failed_by.total());
            if other > 0 {
                parts.push(format!("other {}", count(other)));
            }
            parts.join(", ")
        };
        let mut reasons = list(&|n: u64| n.to_string());
        let fixed = "failed at : ".len();
        if fixed + 3 + reasons.chars().count() > max {
            reasons = list(&si_count);
        }
        let room = max.saturating_sub(fixed + reasons.chars().count()).max(3);
        format!("failed at {}: {reasons}", elide(&s.name, room))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = f.width().unwrap_or(Report::WIDTH).max(MIN_WIDTH);
        writeln!(f, "{}", self.headline(max))?;
        // Exact counts with two spaces between columns if the names get 8 columns (or all
        // they need); else one space; else counts shortened to three digits.
        let name_len = |rows: &[(String, [String; 9])]| {
            rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0)
        };
        let mut layout = None;
        for (short, gap) in [(false, 2), (false, 1), (true, 1)] {
            let rows = self.cells(short);
            let widths: [usize; 9] = std::array::from_fn(|c| {
                rows.iter()
                    .map(|r| r.1[c].chars().count())
                    .max()
                    .unwrap_or(0)
            });
            let rest: usize = widths.iter().map(|w| w + gap).sum();
            let room = max.saturating_sub(rest);
            let names = name_len(&rows);
            if room >= names.min(8) || short {
                layout = Some((rows, widths, gap, names.min(room).max(3)));
                break;
            }
        }
        let Some((rows, widths, gap, name_w)) = layout else {
            return Ok(());
        };
        for (name, cells) in &rows {
            let mut line = format!("{:<name_w$}", elide(name, name_w));
            for (c, cell) in cells.iter().enumerate() {
                let w = widths[c];
                line.push_str(&" ".repeat(gap));
                if COLUMNS[c].1 {
                    line.push_str(&format!("{cell:>w$}"));
                } else {
                    line.push_str(&format!("{cell:<w$}"));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        for s in self.stages.iter().filter(|s| s.failed > 0) {
            writeln!(f, "{}", Self::reasons_line(s, max))?;
        }
        // Limits only where they were changed while running: a run without changes reads
        // as before.
        for (s, l) in self
            .stages
            .iter()
            .filter_map(|s| Some((s, s.limits.as_ref()?)))
        {
            if l.worker_changes + l.rate_changes > 0 {
                writeln!(f, "limits of {}: {l}", elide(&s.name, max / 2))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{report, stage};

    fn widest(text: &str) -> usize {
        text.lines().map(|l| l.chars().count()).max().unwrap()
    }

    #[test]
    fn the_table_fits_100_columns_with_long_names_elided() {
        let long = "enrich-with-the-customer-service-of-the-eu-region-v2";
        let r = report(vec![
            stage("source", "source", 20_000),
            stage(long, "async", 20_000),
            stage(&format!("{long}#2"), "a-user-operator-name", 1),
            stage("sink", "sink", 20_000),
        ]);
        let text = r.to_string();
        assert!(widest(&text) <= 100, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        // The two long names stay apart: elided in the middle, their ends kept.
        let first = lines[3].split_whitespace().next().unwrap();
        assert!(
            first.starts_with("enrich-with-the…") && first.ends_with("region-v2"),
            "{text}"
        );
        assert!(
            lines[4]
                .split_whitespace()
                .next()
                .unwrap()
                .ends_with("-v2#2")
        );
        assert!(lines[4].contains(" a-use…name "), "{}", lines[4]);
        // Counts stay exact while they fit.
        assert_eq!(lines[3].split_whitespace().nth(2), Some("20000"));
        // A narrower width is kept too.
        let narrow = format!("{r:80}");
        assert!(widest(&narrow) <= 80, "{narrow}");
        assert!(narrow.contains(" 20000 "), "{narrow}");
    }

    #[test]
    fn counts_at_u64_max_still_fit() {
        let r = Report {
            failures: u64::MAX,
            elapsed: Duration::MAX,
            ..report(vec![
                stage("source", "source", u64::MAX),
                stage("sink", "sink", u64::MAX),
            ])
        };
        let text = r.to_string();
        assert!(widest(&text) <= 100, "{text}");
        assert!(text.contains("18.4E"), "{text}");
        assert!(!r.is_balanced());
        let narrow = format!("{r:60}");
        assert!(widest(&narrow) <= 60, "{narrow}");
    }

    #[test]
    fn numbers_keep_three_significant_digits() {
        let got: Vec<String> = [
            0.0,
            0.5,
            7.421,
            74.21,
            742.1,
            999.4,
            999.6,
            7421.0,
            12e6,
            f64::NAN,
        ]
        .iter()
        .map(|&v| si(v))
        .collect();
        assert_eq!(
            got,
            [
                "0", "0.50", "7.42", "74.2", "742", "999", "1.00k", "7.42k", "12.0M", "0"
            ]
        );
        assert_eq!(si_count(999), "999");
        assert_eq!(si_count(1_234), "1.23k");
        assert_eq!(si_count(u64::MAX), "18.4E");
        assert_eq!(fmt_duration(Duration::from_millis(1_500)), "1.50s");
        assert_eq!(fmt_duration(Duration::from_secs(3_000)), "50.0m");
        assert_eq!(fmt_duration(Duration::MAX), "5.12Ph");
        assert_eq!(elide("customer-tier#2", 9), "cust…er#2");
        assert_eq!(elide("short", 9), "short");
        assert_eq!(elide("abc", 0), "");
    }
}
