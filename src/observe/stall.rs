//! `.stall_after(d, action)`: a watchdog for a pipeline that has stopped moving.
//!
//! Every `d / 4` it looks at each stage's counters (never at items, so it costs nothing per
//! item) and calls the action when:
//! - no item has completed anywhere for `d` while the source is not paused, or
//! - a stage has held items for `d` without completing any of them, or
//! - one call of an async stage has been running for `d`, even while the stage's other
//!   workers keep completing (async stages keep the start of their calls that wait, only
//!   while a watchdog is installed, so this costs nothing otherwise).
//!
//! A slow stream that still completes an item within every `d` is never a stall. After
//! firing, the watchdog re-arms: a stall that lasts another `d` fires again.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::Start;
use crate::error::Error;
use crate::util::time::interval_from_now;

/// What the stall watchdog saw.
///
/// ```
/// use flowline::{Stall, StallAction};
/// let action = StallAction::callback(|s: &Stall| eprintln!("stuck: {s}"));
/// # let _ = action;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The stage holding items that do not complete; `None` when the whole pipeline has
    /// completed nothing (e.g. a source that waits forever).
    pub stage: Option<String>,
    /// Items in that stage (or in the whole pipeline) that have not finished.
    pub in_flight: u64,
    /// How long nothing has completed there.
    pub idle: Duration,
    /// For a stall seen on one call: how long the stage's oldest call has been running.
    pub oldest_call: Option<Duration>,
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.stage {
            Some(s) => write!(f, "stage `{s}`"),
            None => write!(f, "pipeline"),
        }?;
        match self.oldest_call {
            Some(age) => write!(
                f,
                " has a call running for {age:?} ({} item(s) in flight)",
                self.in_flight
            ),
            None => write!(
                f,
                " completed nothing for {:?} with {} item(s) in flight",
                self.idle, self.in_flight
            ),
        }
    }
}

type OnStall = Box<dyn FnMut(&Stall) + Send>;

/// What the watchdog does on a stall.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::StallAction;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let err = Pipeline::from_iter(0..10u32)
///     .map_async("hang", |x| async move { std::future::pending::<()>().await; x })
///     .stall_after(Duration::from_secs(30), StallAction::Cancel)
///     .run()
///     .await
///     .unwrap_err();
/// assert!(matches!(err, Error::Cancelled { .. }));
/// # }
/// ```
#[non_exhaustive]
pub enum StallAction {
    /// Log a warning (`tracing`) naming the stage and the number of items in it.
    Log,
    /// Call a function with what was seen.
    Callback(Mutex<OnStall>),
    /// Log, then cancel the run (it returns [`Error::Cancelled`](crate::Error::Cancelled)).
    Cancel,
}

impl StallAction {
    /// A callback action.
    ///
    /// ```
    /// let a = flowline::StallAction::callback(|s| println!("{s}"));
    /// # let _ = a;
    /// ```
    pub fn callback(f: impl FnMut(&Stall) + Send + 'static) -> Self {
        StallAction::Callback(Mutex::new(Box::new(f)))
    }
}

impl fmt::Debug for StallAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StallAction::Log => "Log",
            StallAction::Callback(_) => "Callback(..)",
            StallAction::Cancel => "Cancel",
        })
    }
}

/// Per-stage memory: completions seen last time, and since when they have not moved
/// while the stage held items.
struct Watch {
    done: u64,
    since: Instant,
    /// The start of the last call reported as stuck, so one call is reported once per `d`.
    reported_call: Option<(Instant, Instant)>,
}

pub(crate) fn stall_after(d: Duration, action: StallAction) -> Result<Start, Error> {
    if d < Duration::from_millis(4) {
        return Err(Error::config(
            "stall_after",
            "after",
            d,
            "must be at least 4ms",
        ));
    }
    Ok(Box::new(move |run| {
        run.watch_calls();
        Box::pin(async move {
            let period = d / 4;
            let mut ticks = interval_from_now(period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut stages: Vec<Watch> = Vec::new();
            let mut all = Watch {
                done: 0,
                since: Instant::now(),
                reported_call: None,
            };
            loop {
                tokio::select! {
                    biased;
                    _ = run.ended().cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let now = Instant::now();
                let snap = run.snapshot_stages();
                let oldest = run.oldest_calls();
                let mut stalls = Vec::new();
                let (mut total_done, mut total_open) = (0u64, 0u64);
                for (i, s) in snap.iter().enumerate() {
                    let done = s.passed + s.dropped + s.failed;
                    total_done += done;
                    total_open += s.unfinished;
                    if i == stages.len() {
                        stages.push(Watch {
                            done,
                            since: now,
                            reported_call: None,
                        });
                    }
                    let w = &mut stages[i];
                    if done != w.done || s.unfinished == 0 {
                        w.done = done;
                        w.since = now;
                    } else if now - w.since >= d {
                        stalls.push(Stall {
                            stage: Some(s.name.clone()),
                            in_flight: s.unfinished,
                            idle: now - w.since,
                            oldest_call: None,
                        });
                        w.since = now;
                        // The stuck call, if seen, is part of this report: not reported
                        // again for another `d`.
                        w.reported_call = oldest.get(i).copied().flatten().map(|c| (c, now));
                        continue;
                    }
                    // One call stuck while the others complete: reported once per `d`.
                    if let Some(start) = oldest.get(i).copied().flatten() {
                        let fresh = match w.reported_call {
                            Some((call, at)) => call != start || now - at >= d,
                            None => true,
                        };
                        if now - start >= d && fresh {
                            stalls.push(Stall {
                                stage: Some(s.name.clone()),
                                in_flight: s.unfinished,
                                idle: now - w.since,
                                oldest_call: Some(now - start),
                            });
                            w.reported_call = Some((start, now));
                            // One report per stall: the stage's idle timer re-arms too.
                            w.since = now;
                        }
                    }
                }
                if total_done != all.done || run.is_paused() {
                    all.done = total_done;
                    all.since = now;
                } else if stalls.is_empty() && now - all.since >= d {
                    stalls.push(Stall {
                        stage: None,
                        in_flight: total_open,
                        idle: now - all.since,
                        oldest_call: None,
                    });
                    all.since = now;
                }
                for stall in &stalls {
                    match &action {
                        StallAction::Log => {
                            tracing::warn!(stage = ?stall.stage, in_flight = stall.in_flight, "stall: {stall}")
                        }
                        StallAction::Callback(f) => {
                            (f.lock().unwrap_or_else(|p| p.into_inner()))(stall)
                        }
                        StallAction::Cancel => {
                            tracing::error!(stage = ?stall.stage, in_flight = stall.in_flight, "stall, cancelling the run: {stall}");
                            run.cancel();
                        }
                    }
                }
                if !stalls.is_empty() {
                    // Someone stalled: the pipeline-wide timer restarts too, so one stall is
                    // reported once per `d`, not once per stage and once more for the whole.
                    all.since = now;
                }
            }
        })
    }))
}

#[cfg(test)]
type Seen = std::sync::Arc<Mutex<Vec<(Duration, Stall)>>>;

/// A shareable record of stalls, for tests.
#[cfg(test)]
fn recorder() -> (Seen, StallAction) {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let t0 = Instant::now();
    let action =
        StallAction::callback(move |st| s.lock().unwrap().push((t0.elapsed(), st.clone())));
    (seen, action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    #[tokio::test(start_paused = true)]
    async fn fires_on_a_stuck_item_naming_its_stage() {
        let (seen, action) = recorder();
        let h = Pipeline::from_iter(0..10u32)
            .map_async("fast", |x| async move { x })
            .map_async("stuck", |x| async move {
                if x == 3 {
                    std::future::pending::<()>().await;
                }
                x
            })
            .stall_after(Duration::from_secs(20), action)
            .spawn();
        tokio::time::sleep(Duration::from_secs(19)).await;
        assert!(seen.lock().unwrap().is_empty(), "fired before d");
        tokio::time::sleep(Duration::from_secs(7)).await;
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        let (at, stall) = &got[0];
        assert!(*at >= Duration::from_secs(20) && *at <= Duration::from_secs(26));
        assert_eq!(stall.stage.as_deref(), Some("stuck"));
        assert!(stall.in_flight >= 1);
        h.cancel();
        let _ = h.join().await;
    }

    #[tokio::test(start_paused = true)]
    async fn fires_on_one_stuck_call_while_the_other_workers_complete() {
        let (seen, action) = recorder();
        let h = Pipeline::from_iter(0..1_000u32)
            .map_async("work", |x| async move {
                if x == 5 {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                x
            })
            .workers(4)
            .unordered()
            .stall_after(Duration::from_secs(20), action)
            .spawn();
        // Items 4..8 start at 1 s; item 5 never ends. Checks run every 5 s.
        tokio::time::sleep(Duration::from_secs(24)).await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "fired before the call was 20 s old"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        let (at, stall) = &got[0];
        assert_eq!(*at, Duration::from_secs(25));
        assert_eq!(stall.stage.as_deref(), Some("work"));
        assert_eq!(stall.oldest_call, Some(Duration::from_secs(24)));
        assert!(
            stall.idle < Duration::from_secs(2),
            "the stage keeps completing"
        );
        // The same call is reported again only after another `d`.
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(seen.lock().unwrap().len(), 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(h.snapshot().delivered() > 100, "the stream kept moving");
        h.cancel();
        let _ = h.join().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_moving_stream_never_fires() {
        let (seen, action) = recorder();
        let report = Pipeline::from_iter(0..40u32)
            .map_async("slow", |x| async move {
                tokio::time::sleep(Duration::from_secs(9)).await;
                x
            })
            .stall_after(Duration::from_secs(10), action)
            .run()
            .await
            .unwrap();
        assert_eq!(report.delivered(), 40);
        assert!(report.elapsed >= Duration::from_secs(360));
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_fires_but_a_paused_one_does_not() {
        let (seen, action) = recorder();
        let (tx, rx) = tokio::sync::mpsc::channel::<u32>(4);
        let h = Pipeline::from_channel(rx)
            .stall_after(Duration::from_secs(10), action)
            .spawn();
        h.pause();
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(seen.lock().unwrap().is_empty(), "paused is not stalled");
        h.resume();
        tokio::time::sleep(Duration::from_secs(13)).await;
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1.stage, None);
        drop(tx);
        h.join().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_action_ends_a_hung_run() {
        let err = Pipeline::from_iter(0..3u32)
            .map_async("hang", |x| async move {
                std::future::pending::<()>().await;
                x
            })
            .stall_after(Duration::from_secs(5), StallAction::Cancel)
            .run()
            .await
            .unwrap_err();
        let report = err.report().unwrap();
        assert!(matches!(err, Error::Cancelled { .. }));
        assert!(report.elapsed < Duration::from_secs(7));
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn a_tiny_limit_is_a_config_error() {
        let err = Pipeline::from_iter(0..1)
            .stall_after(Duration::ZERO, StallAction::Log)
            .run()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("`stall_after`: after = 0ns"),
            "{err}"
        );
    }
}
