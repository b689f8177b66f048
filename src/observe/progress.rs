//! `.progress()`: live per-stage counts, rate, failures and retries, and ETA when the total
//! is known.
//!
//! On a terminal (stderr, with the `progress` feature) it draws one line that fits the
//! terminal's width: a bar with ETA when the total is known, a spinner without one when it is
//! not, then the stages, elided (`…`) rather than wrapped when they do not all fit:
//!
//! ```text
//! 00:00:02 [######--------------] 7.23k/20.0k 3.61k/s eta 4s · 41 failed · 230 retries | source 40 › customer-tier 7.23k (41 failed) › … › sink 7.18k
//! ⠙ 00:00:02 7.23k done 3.61k/s · 41 failed · 230 retries | source 15 › customer-tier 7.23k (41 failed) › … › sink 7.18k
//! ```
//!
//! Anywhere else it writes one plain line per interval, made to be parsed:
//!
//! ```text
//! progress elapsed_ms=2000 done=512 total=1000 rate=256.0 eta_ms=1906 | source in=768 ok=768 dropped=0 failed=0 retried=0 | work in=768 ok=512 dropped=0 failed=0 retried=9 | sink in=512 ok=512 dropped=0 failed=0 retried=0
//! ```
//!
//! `done` counts finished items (delivered at the sink, or dropped or failed at any stage),
//! which is the number of source items finished for a pipeline that maps 1:1; `rate` is per
//! second over the run so far. A last line, `progress final ...`, is written when the run
//! ends, with the same counts as the report. Lines go out whole, one `write` each, so they
//! never interleave with other lines mid-way. Bars are drawn on stderr; log through
//! [`StderrAboveProgress`] so that log lines print above the bars instead of through them.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::Start;
use crate::error::Error;
use crate::report::{StageReport, elide, fmt_duration, si, si_count};
use crate::util::time::interval_from_now;

type Out = Arc<Mutex<Box<dyn Write + Send>>>;

/// Options of [`Flow::progress_with`](crate::Flow::progress_with).
///
/// ```
/// use flowline::ProgressOptions;
/// use std::time::Duration;
/// let opts = ProgressOptions::new().every(Duration::from_secs(5)).total(1_000_000).plain();
/// # let _ = opts;
/// ```
#[derive(Clone)]
#[must_use = "an option set does nothing until it is passed to a stage or source"]
pub struct ProgressOptions {
    every: Duration,
    total: Option<u64>,
    plain: bool,
    out: Option<Out>,
}

impl std::fmt::Debug for ProgressOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressOptions")
            .field("every", &self.every)
            .field("total", &self.total)
            .field("plain", &self.plain)
            .finish_non_exhaustive()
    }
}

impl Default for ProgressOptions {
    fn default() -> Self {
        ProgressOptions {
            every: Duration::from_secs(1),
            total: None,
            plain: false,
            out: None,
        }
    }
}

impl ProgressOptions {
    /// Defaults: every second, total from the source if it knows it, a bar on a terminal.
    ///
    /// ```
    /// let opts = flowline::ProgressOptions::new();
    /// # let _ = opts;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// How often to update (default 1 s). Must be more than zero.
    ///
    /// ```
    /// let o = flowline::ProgressOptions::new().every(std::time::Duration::from_millis(250));
    /// # let _ = o;
    /// ```
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// The number of items the run will finish, for ETA (overrides the source's own).
    ///
    /// ```
    /// let o = flowline::ProgressOptions::new().total(10_000);
    /// # let _ = o;
    /// ```
    pub fn total(mut self, total: u64) -> Self {
        self.total = Some(total);
        self
    }

    /// Plain lines even on a terminal.
    ///
    /// ```
    /// let o = flowline::ProgressOptions::new().plain();
    /// # let _ = o;
    /// ```
    pub fn plain(mut self) -> Self {
        self.plain = true;
        self
    }

    /// Plain lines written to `out` instead of stderr.
    ///
    /// ```
    /// let o = flowline::ProgressOptions::new().to_writer(std::io::stdout());
    /// # let _ = o;
    /// ```
    pub fn to_writer(mut self, out: impl Write + Send + 'static) -> Self {
        self.out = Some(Arc::new(Mutex::new(Box::new(out))));
        self.plain = true;
        self
    }
}

/// One plain progress line for the stages' counters.
fn line(tag: &str, elapsed: Duration, total: Option<u64>, stages: &[StageReport]) -> String {
    use std::fmt::Write as _;
    let done = finished(stages);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let mut s = format!("{tag} elapsed_ms={} done={done}", elapsed.as_millis());
    if let Some(t) = total {
        let _ = write!(s, " total={t}");
    }
    let _ = write!(s, " rate={rate:.1}");
    if let Some(t) = total {
        if rate > 0.0 {
            let eta = t.saturating_sub(done) as f64 / rate;
            let _ = write!(s, " eta_ms={}", (eta * 1000.0) as u64);
        }
    }
    for st in stages {
        let _ = write!(
            s,
            " | {} in={} ok={} dropped={} failed={} retried={}",
            st.name.replace(char::is_whitespace, "_"),
            st.received,
            st.passed,
            st.dropped,
            st.failed,
            st.retried
        );
    }
    s.push('\n');
    s
}

/// Finished items: delivered at the last stage (the sink), or dropped or failed anywhere.
fn finished(stages: &[StageReport]) -> u64 {
    let ended = stages.iter().fold(0u64, |a, s| {
        a.saturating_add(s.dropped).saturating_add(s.failed)
    });
    ended.saturating_add(stages.last().map_or(0, |s| s.passed))
}

/// The bar's text after its fixed part (elapsed time, and the bar itself or a spinner), in
/// at most `width` characters: the totals first, then as many stages as fit. Stages with
/// failures, async stages (where the time goes) and the sink are kept before the others;
/// a gap where stages were left out shows as `…`.
#[cfg_attr(not(feature = "progress"), allow(dead_code))]
fn bar_text(width: usize, elapsed: Duration, total: Option<u64>, stages: &[StageReport]) -> String {
    let done = finished(stages);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let mut head = match total {
        Some(t) => {
            let mut h = format!("{}/{} {}/s", si_count(done.min(t)), si_count(t), si(rate));
            if rate > 0.0 && done < t {
                let eta = Duration::try_from_secs_f64((t - done) as f64 / rate);
                h.push_str(&format!(" eta {}", eta.map_or("-".into(), fmt_duration)));
            }
            h
        }
        None => format!("{} done {}/s", si_count(done), si(rate)),
    };
    let failed = stages.iter().fold(0u64, |a, s| a.saturating_add(s.failed));
    if failed > 0 {
        head.push_str(&format!(" · {} failed", si_count(failed)));
    }
    let retries = stages.iter().fold(0u64, |a, s| a.saturating_add(s.retried));
    if retries > 0 {
        head.push_str(&format!(" · {} retries", si_count(retries)));
    }
    let entries: Vec<String> = stages
        .iter()
        .map(|s| {
            let mut e = format!("{} {}", elide(&s.name, 18), si_count(s.emitted));
            if s.failed > 0 {
                e.push_str(&format!(" ({} failed)", si_count(s.failed)));
            }
            e
        })
        .collect();
    let render = |keep: &[bool]| {
        let mut out = String::new();
        let mut gap = false;
        for (e, &k) in entries.iter().zip(keep) {
            if !k {
                gap = true;
                continue;
            }
            if gap {
                out.push_str(if out.is_empty() {
                    "… › "
                } else {
                    " › … › "
                });
            } else if !out.is_empty() {
                out.push_str(" › ");
            }
            gap = false;
            out.push_str(e);
        }
        if gap && !out.is_empty() {
            out.push_str(" › …");
        }
        out
    };
    let mut order: Vec<usize> = (0..stages.len()).collect();
    let last = stages.len().saturating_sub(1);
    order.sort_by_key(|&i| {
        let s = &stages[i];
        (s.failed == 0, s.kind != "async", i != last, i)
    });
    let room = width.saturating_sub(head.chars().count() + " | ".len());
    let mut keep = vec![false; stages.len()];
    for i in order {
        keep[i] = true;
        if render(&keep).chars().count() > room {
            keep[i] = false;
        }
    }
    let tail = render(&keep);
    if !tail.is_empty() {
        format!("{head} | {tail}")
    } else if !stages.is_empty() && room >= 1 {
        format!("{head} | …")
    } else {
        elide(&head, width)
    }
}

/// Every bar of the process, so log lines can be written above all of them at once.
#[cfg(feature = "progress")]
fn bars() -> &'static indicatif::MultiProgress {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(|| {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
    })
}

/// Stderr that keeps progress bars intact: each write hides the bars, writes, and draws them
/// again below, so log output and bars never garble each other. Give it to your logger,
/// e.g. `tracing_subscriber::fmt().with_writer(|| StderrAboveProgress)`. Without the
/// `progress` feature (or without a bar on screen) it is plain stderr.
///
/// ```
/// use std::io::Write;
/// writeln!(flowline::StderrAboveProgress, "a log line").unwrap();
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrAboveProgress;

impl Write for StderrAboveProgress {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        #[cfg(feature = "progress")]
        {
            bars().suspend(|| std::io::stderr().write_all(buf))?;
            Ok(buf.len())
        }
        #[cfg(not(feature = "progress"))]
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

enum Draw {
    Lines(Out),
    /// The bar, and how many columns its fixed part takes (all but the message).
    #[cfg(feature = "progress")]
    Bar(indicatif::ProgressBar, usize),
}

/// The columns of `{elapsed_precise} ` before a bar's message.
#[cfg(feature = "progress")]
const BAR_FIXED: usize = 9;

/// The terminal's width in columns (80 when it cannot be told).
#[cfg(feature = "progress")]
fn term_width() -> usize {
    console::Term::stderr()
        .size_checked()
        .map_or(80, |(_, cols)| usize::from(cols))
}

impl Draw {
    fn open(opts: &ProgressOptions, total: Option<u64>) -> Draw {
        if let Some(out) = &opts.out {
            return Draw::Lines(out.clone());
        }
        #[cfg(feature = "progress")]
        if !opts.plain && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            // The counts, rate and ETA are in the message, written here (indicatif's own
            // `{per_sec}` and `{eta}` print many decimals, and its `{pos}/{len}` an empty
            // "n/n" bar when the total is unknown). `wide_msg` cuts what is still too long.
            // A short bar on a narrow terminal leaves the counts their room.
            let bar_len = (term_width() / 8).clamp(10, 30);
            let (bar, template, fixed) = match total {
                Some(t) => (
                    indicatif::ProgressBar::new(t),
                    format!("{{elapsed_precise}} [{{bar:{bar_len}}}] {{wide_msg}}"),
                    BAR_FIXED + bar_len + 3,
                ),
                None => (
                    indicatif::ProgressBar::new_spinner(),
                    "{spinner} {elapsed_precise} {wide_msg}".to_string(),
                    BAR_FIXED + 2,
                ),
            };
            let style = indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("#>-");
            bar.set_style(style);
            let bar = bars().add(bar);
            if total.is_none() {
                bar.enable_steady_tick(Duration::from_millis(120));
            }
            return Draw::Bar(bar, fixed);
        }
        let _ = total;
        Draw::Lines(Arc::new(Mutex::new(Box::new(std::io::stderr()))))
    }

    fn show(&self, fin: bool, elapsed: Duration, total: Option<u64>, stages: &[StageReport]) {
        match self {
            Draw::Lines(out) => {
                let tag = if fin { "progress final" } else { "progress" };
                let text = line(tag, elapsed, total, stages);
                let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = w.write_all(text.as_bytes());
                let _ = w.flush();
            }
            #[cfg(feature = "progress")]
            Draw::Bar(bar, fixed) => {
                let done = finished(stages);
                bar.set_position(total.map_or(done, |t| done.min(t)));
                // One column spare: a line as wide as the terminal makes some terminals
                // wrap, and the bar would then redraw below a stale copy of itself.
                let width = term_width().saturating_sub(fixed + 1);
                bar.set_message(bar_text(width, elapsed, total, stages));
                if fin {
                    bar.finish();
                }
            }
        }
    }
}

/// The progress observer; `total`: what the plan knows of its size, unless the options say.
pub(crate) fn progress(opts: ProgressOptions, total: Option<u64>) -> Result<Start, Error> {
    super::require_positive("progress", opts.every)?;
    let total = opts.total.or(total);
    Ok(Box::new(move |run| {
        let started = Instant::now();
        Box::pin(async move {
            let draw = Draw::open(&opts, total);
            let mut ticks = interval_from_now(opts.every);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                let fin = tokio::select! {
                    biased;
                    _ = run.ended().cancelled() => true,
                    _ = ticks.tick() => false,
                };
                draw.show(fin, started.elapsed(), total, &run.snapshot_stages());
                if fin {
                    return;
                }
            }
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    type Fields = Vec<(String, String)>;
    type StageFields = Vec<(String, Vec<(String, u64)>)>;

    /// Parses a line into its head fields and per-stage fields.
    fn parse(l: &str) -> (Fields, StageFields) {
        let mut parts = l.split(" | ");
        let head = parts
            .next()
            .unwrap()
            .split(' ')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let stages = parts
            .map(|p| {
                let mut it = p.split(' ');
                let name = it.next().unwrap().to_string();
                let kv = it
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_string(), v.parse().unwrap())
                    })
                    .collect();
                (name, kv)
            })
            .collect();
        (head, stages)
    }

    #[tokio::test(start_paused = true)]
    async fn plain_lines_parse_and_the_final_line_agrees_with_the_report() {
        let buf = Buf::default();
        let report = Pipeline::from_iter(0..100u32)
            .filter(|x| x % 10 != 0)
            .map_async("work", |x| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                x
            })
            .progress_with(ProgressOptions::new().to_writer(buf.clone()))
            .run()
            .await
            .unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // 90 items at 100 ms each: about 9 s, one line a second, then the final one.
        assert!(lines.len() >= 9, "{text}");
        let mut last_done = 0;
        for l in &lines[..lines.len() - 1] {
            assert!(l.starts_with("progress elapsed_ms="), "{l}");
            let (head, _) = parse(l);
            let get = |k: &str| head.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
            let done: u64 = get("done").unwrap().parse().unwrap();
            assert!(done >= last_done);
            last_done = done;
            assert_eq!(get("total").as_deref(), Some("100"));
            assert!(get("eta_ms").is_some() || done == 0);
        }
        let fin = lines.last().unwrap();
        assert!(fin.starts_with("progress final "), "{fin}");
        let (head, stages) = parse(fin);
        assert!(head.contains(&("done".into(), "100".into())), "{fin}");
        assert_eq!(stages.len(), report.stages.len());
        for ((name, kv), st) in stages.iter().zip(&report.stages) {
            assert_eq!(name, &st.name);
            let v = |k: &str| kv.iter().find(|(n, _)| n == k).unwrap().1;
            assert_eq!(
                (v("in"), v("ok"), v("dropped"), v("failed")),
                (st.received, st.passed, st.dropped, st.failed)
            );
        }
    }

    fn stage(name: &str, kind: &'static str, emitted: u64, failed: u64) -> StageReport {
        StageReport {
            name: name.into(),
            kind,
            received: emitted + failed,
            passed: emitted,
            emitted,
            dropped: 0,
            failed,
            failed_by: crate::FailureReasons::default(),
            retried: failed * 2,
            late: 0,
            transient_retries: 0,
            key_waits: 0,
            unfinished: 0,
            latency: None,
            limits: None,
        }
    }

    fn stages() -> Vec<StageReport> {
        vec![
            stage("source", "source", 2_000, 0),
            stage("look-up-the-customer-in-the-eu-region", "async", 2_000, 0),
            stage("charge-the-card", "async", 1_960, 40),
            stage("filter", "filter", 1_307, 0),
            stage("sink", "sink", 1_000, 0),
        ]
    }

    #[test]
    fn the_bar_says_done_rate_eta_failures_and_retries() {
        let secs = Duration::from_secs(2);
        let known = bar_text(200, secs, Some(2_000), &stages());
        assert_eq!(
            known,
            "1.04k/2.00k 520/s eta 1.85s · 40 failed · 80 retries | source 2.00k › \
             look-up-t…u-region 2.00k › charge-the-card 1.96k (40 failed) › filter 1.31k › \
             sink 1.00k"
        );
        let unknown = bar_text(200, secs, None, &stages());
        assert!(
            unknown.starts_with("1.04k done 520/s · 40 failed"),
            "{unknown}"
        );
        assert!(!unknown.contains("eta"), "{unknown}");
        // Done: no ETA left to show.
        let fin = bar_text(200, secs, Some(1_040), &stages());
        assert!(fin.starts_with("1.04k/1.04k 520/s · 40"), "{fin}");
        // Nothing done yet, no time gone: no rate to divide by.
        let idle = bar_text(
            200,
            Duration::ZERO,
            Some(10),
            &[stage("source", "source", 0, 0)],
        );
        assert_eq!(idle, "0/10 0/s | source 0");
    }

    #[test]
    fn stages_that_do_not_fit_are_elided_failures_and_async_first() {
        let all = stages();
        for width in [0, 10, 40, 60, 80, 120] {
            let text = bar_text(width, Duration::from_secs(2), None, &all);
            assert!(text.chars().count() <= width, "{width}: {text}");
        }
        let text = bar_text(80, Duration::from_secs(2), None, &all);
        // The stage that failed items does not fit: the async one does.
        assert_eq!(
            text,
            "1.04k done 520/s · 40 failed · 80 retries | … › look-up-t…u-region 2.00k › …"
        );
        let text = bar_text(100, Duration::from_secs(2), None, &all);
        assert_eq!(
            text,
            "1.04k done 520/s · 40 failed · 80 retries | … › charge-the-card 1.96k (40 failed) › … › sink 1.00k"
        );
    }

    #[tokio::test]
    async fn zero_interval_is_a_config_error() {
        let err = Pipeline::from_iter(0..1)
            .progress_with(ProgressOptions::new().every(Duration::ZERO))
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("`progress`: every = 0ns"), "{err}");
    }
}
