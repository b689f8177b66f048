//! The window stage: pulls chunks, gives each item its time, key and watermark, and lets the
//! kind's state hold it; emits what closes.
//!
//! Pulled like `batch`, not a task of its own: the stage after it polls it, and while its
//! upstream is quiet it polls its own timer in the same call, so a window still closes on
//! time (processing time), or when a quiet input has been idle long enough (event time).
//! Per chunk, not per item: one clock read, one close of the windows the watermark passed.
//!
//! Counting: an item is `passed` once every window that holds it has been emitted (its
//! pane, session or count window retired), `failed` when it went to the dead letters (late,
//! no room, a panic in a closure), and `passed` too when it went out as a late item on the
//! side output. `emitted` counts windows (and late items on the side output). Items held in
//! open windows are in flight; a cancelled run counts them `unfinished`.

use std::future::Future;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::aggregate::Aggregate;
use super::count::Counts;
use super::panes::Panes;
use super::session::Sessions;
use super::state::{Emitted, State, Why};
use super::{LateItem, MAX_TIME, OnFull, Spec, TimeOf, Windowed};
use crate::failure::{Failure, ItemError};
use crate::plan::Pipeline;
use crate::report::StageStats;
use crate::runtime::chunk::{Chunk, Outcome, Ticket};
use crate::runtime::{ChunkSource, RunCtx, Upstream};
use crate::util::time::after;

/// What the stage sends on: a closed window, or (on the side output) a late item.
pub(crate) trait Emits<K, V, T>: Send + Sized + 'static {
    fn window(w: Windowed<K, V>) -> Self;
    /// The late item as an output, or given back to go to the dead letters.
    fn late(item: T) -> Result<Self, T>;
}

impl<K: Send + 'static, V: Send + 'static, T> Emits<K, V, T> for Windowed<K, V> {
    #[inline]
    fn window(w: Windowed<K, V>) -> Self {
        w
    }
    fn late(item: T) -> Result<Self, T> {
        Err(item)
    }
}

impl<K: Send + 'static, V: Send + 'static, T: Send + 'static> Emits<K, V, T>
    for Result<Windowed<K, V>, T>
{
    #[inline]
    fn window(w: Windowed<K, V>) -> Self {
        Ok(w)
    }
    fn late(item: T) -> Result<Self, T> {
        Ok(Err(item))
    }
}

/// The stage's settings once the plan was checked.
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) spec: Spec,
    /// Event time (else processing time).
    pub(crate) event: bool,
    pub(crate) lateness: u64,
    pub(crate) idle: Option<Duration>,
    pub(crate) max_open: usize,
    pub(crate) on_full: OnFull,
}

/// Appends the window stage to `p`.
pub(crate) fn window<T, K, KF, TF, A, O>(
    p: Pipeline<T>,
    config: Config,
    key: KF,
    time: TF,
    agg: A,
) -> Pipeline<O>
where
    T: Send + 'static,
    K: std::hash::Hash + Eq + Clone + Send + 'static,
    KF: FnMut(&T) -> K + Send + 'static,
    TF: TimeOf<T>,
    A: Aggregate<T>,
    O: Emits<K, A::Output, T>,
{
    p.then(move |b, up| {
        let stats = b.stage(&config.name, "window");
        let run = b.run.clone();
        match config.spec {
            Spec::Panes { size, step } => Box::new(Engine::new(
                up,
                &config,
                key,
                time,
                agg,
                Panes::new(size, step),
                stats,
                run,
            )) as Upstream<O>,
            Spec::Session { gap } => Box::new(Engine::new(
                up,
                &config,
                key,
                time,
                agg,
                Sessions::new(gap),
                stats,
                run,
            )),
            Spec::Count { n } => Box::new(Engine::new(
                up,
                &config,
                key,
                time,
                agg,
                Counts::new(n),
                stats,
                run,
            )),
        }
    })
}

/// After this many input chunks without anything to emit, yield to the scheduler.
const CHUNKS_BEFORE_YIELD: usize = 16;

struct Engine<T, K, KF, TF, A: Aggregate<T>, S, O> {
    up: Upstream<T>,
    key: KF,
    time: TF,
    agg: A,
    state: S,
    event: bool,
    lateness: u64,
    idle: Option<Duration>,
    max_open: usize,
    on_full: OnFull,
    /// The origin of processing time (the run's start).
    epoch: Instant,
    watermark: u64,
    max_seen: u64,
    /// When the last chunk arrived, and the watermark then (idle advance counts from it).
    last_arrival: Instant,
    idle_base: u64,
    out: Emitted<K, A::Output>,
    late_out: Chunk<O>,
    /// Late items sent on as outputs since the last chunk out.
    late_passed: usize,
    timer: Option<Pin<Box<Sleep>>>,
    armed: Option<Instant>,
    ended: bool,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    _o: PhantomData<fn() -> O>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<T, K, KF, TF, A, S, O> Engine<T, K, KF, TF, A, S, O>
where
    T: Send + 'static,
    K: std::hash::Hash + Eq + Clone + Send + 'static,
    KF: FnMut(&T) -> K + Send + 'static,
    TF: TimeOf<T>,
    A: Aggregate<T>,
    S: State<K, T, A>,
    O: Emits<K, A::Output, T>,
{
    #[allow(clippy::too_many_arguments)]
    fn new(
        up: Upstream<T>,
        config: &Config,
        key: KF,
        time: TF,
        agg: A,
        state: S,
        stats: Arc<StageStats>,
        run: Arc<RunCtx>,
    ) -> Self {
        Engine {
            up,
            key,
            time,
            agg,
            state,
            event: config.event,
            lateness: config.lateness,
            idle: config.idle,
            max_open: config.max_open,
            on_full: config.on_full,
            epoch: run.epoch,
            watermark: 0,
            max_seen: 0,
            last_arrival: Instant::now(),
            idle_base: 0,
            out: Emitted::default(),
            late_out: Chunk::default(),
            late_passed: 0,
            timer: None,
            armed: None,
            ended: false,
            stats,
            run,
            _o: PhantomData,
        }
    }

    fn fail(&mut self, error: ItemError, ticket: Ticket) {
        ticket.finish(Outcome::Failed);
        StageStats::add(&self.stats.failed, 1);
        self.run
            .fail(Failure::new(self.stats.name.clone(), error, 1));
    }

    fn late(&mut self, item: T, ticket: Ticket, t: u64) {
        StageStats::add(&self.stats.late, 1);
        match O::late(item) {
            Ok(o) => {
                self.late_out.push(o, ticket);
                self.late_passed += 1;
            }
            Err(_) => {
                let error = LateItem {
                    time: Duration::from_nanos(t),
                    watermark: Duration::from_nanos(self.watermark),
                };
                self.fail(ItemError::user(error), ticket);
            }
        }
    }

    fn full(&mut self, ticket: Ticket) {
        let error = format!(
            "{} windows open (max_open): no room for a new one",
            self.max_open
        );
        self.fail(ItemError::user(error), ticket);
    }

    /// One item: its time, key and windows. `ticket` stays in place until the state takes
    /// it, so that a panic in user code leaves it for the caller to fail.
    fn one(&mut self, item: T, ticket: &mut Ticket, processing: u64) {
        let t = if self.event {
            nanos(self.time.event_time(&item))
        } else {
            processing
        };
        if t >= MAX_TIME {
            let error = format!(
                "event time {:?} is out of range (at most {:?} after the epoch)",
                Duration::from_nanos(t),
                Duration::from_nanos(MAX_TIME - 1)
            );
            self.fail(ItemError::user(error), std::mem::take(ticket));
            return;
        }
        let key = (self.key)(&item);
        let wm = self.watermark;
        let max = self.max_open;
        if let Err(r) = self.state.add(&mut self.agg, key, t, wm, item, ticket, max) {
            match r.why {
                Why::Late => self.late(r.item, std::mem::take(ticket), t),
                Why::Full => {
                    let room = self.on_full == OnFull::EmitOldest
                        && self.state.evict(&mut self.agg, &mut self.out);
                    if !room {
                        self.full(std::mem::take(ticket));
                    } else if let Err(r) =
                        self.state
                            .add(&mut self.agg, r.key, t, wm, r.item, ticket, max)
                    {
                        drop(r);
                        self.full(std::mem::take(ticket));
                    }
                }
            }
        }
        if self.event && t > self.max_seen {
            self.max_seen = t;
            self.watermark = self.watermark.max(t.saturating_sub(self.lateness));
        }
    }

    fn take(&mut self, chunk: Chunk<T>) {
        StageStats::add(&self.stats.received, chunk.len());
        let now = Instant::now();
        self.last_arrival = now;
        let processing = nanos(now.saturating_duration_since(self.epoch));
        if !self.event {
            self.watermark = self.watermark.max(processing);
            self.state
                .close(&mut self.agg, self.watermark, &mut self.out);
        }
        if !chunk.tickets.is_empty() {
            self.out.tracked = true;
        }
        let mut items = chunk.into_pairs();
        loop {
            let mut current = Ticket::none();
            // Around the loop, not each item: the happy path pays nothing for it. A panic
            // fails its own item and the loop goes on with the next.
            let result = catch_unwind(AssertUnwindSafe(|| {
                for (item, ticket) in &mut items {
                    current = ticket;
                    self.one(item, &mut current, processing);
                }
            }));
            match result {
                Ok(()) => break,
                Err(payload) => self.fail(ItemError::from_panic(&*payload), current),
            }
        }
        self.state
            .close(&mut self.agg, self.watermark, &mut self.out);
        self.idle_base = self.watermark;
    }

    /// When the next window closes by the clock, if one does.
    fn deadline(&self) -> Option<Instant> {
        let end = self.state.next_end()?;
        if !self.event {
            return Some(after(self.epoch, Duration::from_nanos(end)));
        }
        let idle = self.idle?;
        let need = Duration::from_nanos(end.saturating_sub(self.idle_base));
        Some(after(self.last_arrival, idle.max(need)))
    }

    /// Moves the watermark to what the clock says at `now`, and closes what it passed.
    fn tick(&mut self, now: Instant) {
        if !self.event {
            let t = nanos(now.saturating_duration_since(self.epoch));
            self.watermark = self.watermark.max(t);
        } else if let Some(idle) = self.idle {
            let quiet = now.saturating_duration_since(self.last_arrival);
            if quiet >= idle {
                let t = self.idle_base.saturating_add(nanos(quiet));
                self.watermark = self.watermark.max(t);
            }
        }
        self.state
            .close(&mut self.agg, self.watermark, &mut self.out);
    }

    fn has_output(&self) -> bool {
        !self.out.windows.is_empty() || !self.late_out.is_empty()
    }

    /// Polls the timer until it is pending or something closed.
    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        while let Some(due) = self.deadline() {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if self.armed != Some(due) {
                timer.as_mut().reset(due);
                self.armed = Some(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            let before = self.state.next_end();
            self.tick(Instant::now());
            if self.has_output() || self.state.next_end() == before {
                return;
            }
        }
    }

    fn output(&mut self) -> Chunk<O> {
        let mut chunk = std::mem::take(&mut self.late_out);
        let windows = std::mem::take(&mut self.out.windows);
        let tickets = std::mem::take(&mut self.out.tickets);
        let n = windows.len();
        if tickets.is_empty() {
            chunk.append(Chunk::untracked(
                windows.into_iter().map(O::window).collect(),
            ));
        } else {
            for (w, t) in windows.into_iter().zip(tickets) {
                chunk.push(O::window(w), t);
            }
        }
        let retired = std::mem::take(&mut self.out.retired);
        let late = std::mem::take(&mut self.late_passed);
        StageStats::add(&self.stats.passed, retired as usize + late);
        StageStats::add(&self.stats.emitted, n + late);
        chunk
    }
}

impl<T, K, KF, TF, A, S, O> ChunkSource<O> for Engine<T, K, KF, TF, A, S, O>
where
    T: Send + 'static,
    K: std::hash::Hash + Eq + Clone + Send + 'static,
    KF: FnMut(&T) -> K + Send + 'static,
    TF: TimeOf<T>,
    A: Aggregate<T>,
    S: State<K, T, A>,
    O: Emits<K, A::Output, T>,
{
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<O>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut yield_now = true;
        for _ in 0..CHUNKS_BEFORE_YIELD {
            // The clock first: items pulled now arrived after it.
            if let Some(due) = self.deadline() {
                let now = Instant::now();
                if due <= now {
                    self.tick(now);
                    if self.has_output() {
                        yield_now = false;
                        break;
                    }
                }
            }
            match self.up.poll_chunk(cx) {
                Poll::Ready(Some(chunk)) => {
                    self.take(chunk);
                    if self.has_output() {
                        yield_now = false;
                        break;
                    }
                }
                Poll::Ready(None) => {
                    // The end of input (also after a graceful stop): every window closes.
                    self.watermark = u64::MAX;
                    self.state.close(&mut self.agg, u64::MAX, &mut self.out);
                    self.ended = true;
                    yield_now = false;
                    break;
                }
                Poll::Pending => {
                    self.poll_timer(cx);
                    yield_now = false;
                    break;
                }
            }
        }
        // Failures are counted as they happen; so is what went out, below.
        if self.has_output() || self.out.retired > 0 {
            let chunk = self.output();
            if !chunk.is_empty() {
                return Poll::Ready(Some(chunk));
            }
        }
        if self.ended {
            return Poll::Ready(None);
        }
        if yield_now {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn discard(&mut self) -> usize {
        // A cancel does not flush: the items in open windows stay unfinished (their tickets,
        // dropped with the state, say so).
        self.stats.left(self.state.held() as usize);
        let late = std::mem::take(&mut self.late_out);
        self.stats.left(late.len());
        drop(late.into_items(Outcome::Cancelled));
        self.ended = true;
        self.stats.discarded(self.up.discard());
        0
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{Count, LateItem, Session, Sliding, Tumbling};
    use std::error::Error as _;
    use std::time::Duration;
    use tokio::time::Instant;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Items `(event seconds, arrival ms)`; the input ends at `end` ms (tokio's clock).
    fn arrivals(items: &'static [(u64, u64)], end: u64) -> Pipeline<u64> {
        let start = Instant::now();
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            if i < items.len() {
                tokio::time::sleep_until(start + Duration::from_millis(items[i].1)).await;
                Some((items[i].0, i + 1))
            } else {
                tokio::time::sleep_until(start + Duration::from_millis(end)).await;
                None
            }
        });
        Pipeline::from_stream(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_order_within_lateness_lands_and_late_ones_are_counted() {
        let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = failures.clone();
        // lateness 5 s: after 12 the watermark is 7, so 8 still lands in [0, 10); after 16
        // it is 11, [0, 10) closes, and 9 is late
        let (out, report) = Pipeline::from_iter([1u64, 12, 8, 16, 9, 14])
            .window(Tumbling::every(S(10)))
            .event_time(|s| S(*s))
            .allowed_lateness(S(5))
            .collect_items()
            .collect_with_report()
            .dead_letter(DeadLetter::callback(move |f| {
                seen.lock().unwrap().push(f.clone())
            }))
            .await
            .unwrap();
        let got: Vec<(u64, Vec<u64>)> = out
            .into_iter()
            .map(|w| (w.start.as_secs(), w.value))
            .collect();
        assert_eq!(got, vec![(0, vec![1, 8]), (10, vec![12, 16, 14])]);
        let w = report.stage("window").unwrap();
        assert_eq!(
            (w.received, w.passed, w.failed, w.late, w.emitted),
            (6, 5, 1, 1, 2)
        );
        assert!(report.is_balanced());
        let failures = failures.lock().unwrap();
        let late = failures[0]
            .error
            .source()
            .unwrap()
            .downcast_ref::<LateItem>();
        assert_eq!(
            late,
            Some(&LateItem {
                time: S(9),
                watermark: S(11)
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_input_advances_the_watermark_and_closes_windows() {
        // events at 1 s and 2 s arrive at once; then the source is quiet for an hour. The
        // watermark is 2 s; after 5 s idle it moves with the clock and reaches 10 s (the
        // end of [0, 10)) 8 s after the last arrival. An item of 5 s arriving at 20 s is late.
        static ITEMS: [(u64, u64); 3] = [(1, 0), (2, 0), (5, 20_000)];
        let start = Instant::now();
        let (out, report) = arrivals(&ITEMS, 3_600_000)
            .window(Tumbling::every(S(10)))
            .event_time(|s| S(*s))
            .idle_timeout(S(5))
            .count()
            .map(move |w| (w.start.as_secs(), w.value, start.elapsed().as_millis()))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![(0, 2, 8_000)]);
        let w = report.stage("window").unwrap();
        assert_eq!((w.late, w.failed, w.passed), (1, 1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn without_idle_advance_a_quiet_source_holds_its_window_to_the_end() {
        static ITEMS: [(u64, u64); 2] = [(1, 0), (2, 0)];
        let start = Instant::now();
        let out = arrivals(&ITEMS, 60_000)
            .window(Tumbling::every(S(10)))
            .event_time(|s| S(*s))
            .count()
            .map(move |w| (w.value, start.elapsed().as_millis()))
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![(2, 60_000)]);
    }

    /// An endless source: one item every 10 ms.
    fn ticking() -> Pipeline<u64> {
        Pipeline::from_iter(0..u64::MAX)
            .map_async("tick", |x| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                x
            })
            .into_pipeline()
    }

    #[tokio::test(start_paused = true)]
    async fn a_graceful_stop_flushes_the_open_windows() {
        let out = Collected::new();
        let handle = Graph::new()
            .collect(
                ticking().window(Tumbling::every(S(3600))).collect_items(),
                &out,
            )
            .spawn();
        tokio::time::sleep(Duration::from_millis(55)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        let windows = out.take();
        assert_eq!(windows.len(), 1);
        let w = report.stage("window").unwrap();
        assert!(w.received >= 5);
        assert_eq!((w.passed, w.emitted), (w.received, 1));
        assert_eq!(windows[0].value, (0..w.received).collect::<Vec<_>>());
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_does_not_flush_and_leaves_the_items_unfinished() {
        let handle = ticking().window(Session::gap(S(60))).count().spawn();
        tokio::time::sleep(Duration::from_millis(55)).await;
        handle.cancel();
        let err = handle.join().await.unwrap_err();
        let report = err.report().unwrap();
        let w = report.stage("window").unwrap();
        assert!(w.received >= 5);
        assert_eq!((w.passed, w.emitted), (0, 0));
        assert_eq!(w.unfinished, w.received);
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_in_a_closure_fails_only_its_item() {
        let (out, report) = Pipeline::from_iter(0..10u32)
            .window(Count::every(3))
            .key_by(|x| {
                assert!(*x != 4, "no key for four");
                x % 2
            })
            .collect_items()
            .collect_with_report()
            .await
            .unwrap();
        let got: Vec<(u32, Vec<u32>)> = out.into_iter().map(|w| (w.key, w.value)).collect();
        assert_eq!(
            got,
            vec![
                (1, vec![1, 3, 5]),
                (0, vec![0, 2, 6]),
                (1, vec![7, 9]),
                (0, vec![8])
            ]
        );
        let w = report.stage("window").unwrap();
        assert_eq!((w.received, w.passed, w.failed), (10, 9, 1));
        assert_eq!(
            report.failure_sample[0].error.to_string(),
            "panicked: no key for four"
        );
    }

    #[tokio::test]
    async fn an_event_time_out_of_range_fails_its_item() {
        let (out, report) = Pipeline::from_iter([1u64, u64::MAX])
            .window(Tumbling::every(S(1)))
            .event_time(|s| S(*s))
            .count()
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        let w = report.stage("window").unwrap();
        assert_eq!((w.passed, w.failed, w.late), (1, 1, 0));
        assert!(
            report.failure_sample[0]
                .error
                .to_string()
                .starts_with("event time 18446744073.709551615s is out of range"),
            "{}",
            report.failure_sample[0].error
        );
    }

    /// Asserts that `err` says every one of `parts`.
    fn says_all(err: &crate::Error, parts: &[&str]) {
        let text = err.to_string();
        for part in parts {
            assert!(text.contains(part), "{part} in {text}");
        }
    }

    #[tokio::test]
    async fn hostile_options_are_rejected_all_at_once() {
        let err = Pipeline::from_iter(0..3u64)
            .window(Tumbling::every(Duration::ZERO))
            .event_time(|s| S(*s))
            .idle_timeout(Duration::ZERO)
            .max_open(0)
            .count()
            .run()
            .await
            .unwrap_err();
        says_all(
            &err,
            &[
                "size = 0ns: must be more than zero",
                "idle_timeout = 0ns: must be more than zero",
                "max_open = 0: must be at least 1",
            ],
        );
        let err = Pipeline::from_iter(0..3u64)
            .window(Session::gap(Duration::MAX))
            .count()
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("gap = "), "{err}");
        assert!(
            err.to_string().contains("must be less than 146 years"),
            "{err}"
        );
        let err = Pipeline::from_iter(0..3u64)
            .window(Count::every(0))
            .count()
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `window`: count = 0: must be at least 1"
        );
    }

    #[tokio::test]
    async fn lateness_and_idle_timeout_without_event_time_are_refused_by_name() {
        let refused = Pipeline::from_iter(0..3u64)
            .window(Tumbling::every(S(1)))
            .allowed_lateness(S(5))
            .idle_timeout(Duration::from_millis(250))
            .count()
            .run()
            .await;
        says_all(
            &refused.expect_err("event-time options on processing time"),
            &[
                "allowed_lateness = 5s: event time only",
                "idle_timeout = 250ms: event time only",
            ],
        );
        // with event time (given after them, too) both are fine
        let report = Pipeline::from_iter(0..3u64)
            .window(Tumbling::every(S(1)))
            .allowed_lateness(S(5))
            .idle_timeout(Duration::from_millis(250))
            .event_time(|s| S(*s))
            .count()
            .run()
            .await
            .unwrap();
        assert_eq!(report.stage("window").unwrap().emitted, 3);
        // a zero lateness is the default: nothing to refuse
        Pipeline::from_iter(0..3u64)
            .window(Count::every(2))
            .allowed_lateness(Duration::ZERO)
            .count()
            .run()
            .await
            .unwrap();
    }

    /// Pages of 10 over ids 0..n; the cursor is the next id to read.
    fn pages(
        n: u32,
    ) -> impl FnMut(
        Option<u32>,
    )
        -> std::future::Ready<Result<crate::Page<u32, u32>, std::convert::Infallible>>
    + Clone
    + Send
    + 'static {
        move |c| {
            let from = c.unwrap_or(0);
            let to = (from + 10).min(n);
            std::future::ready(Ok(if to < n {
                crate::Page::next((from..to).collect(), to)
            } else {
                crate::Page::end_at((from..to).collect(), to)
            }))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_passes_an_item_only_once_its_windows_are_delivered() {
        let store = crate::MemoryCheckpoints::new();
        let out = Pipeline::from_cursor(store.clone(), "ids", pages(95))
            .window(Sliding::new(S(4), S(2)))
            .event_time(|id| S(u64::from(*id)))
            .count()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.iter().map(|w| w.items).max(), Some(4));
        assert_eq!(store.get("ids").as_deref(), Some("95"));
        // cancelled with windows open: the checkpoint stays before their items (the source
        // gives 50 ids, then waits forever)
        let store = crate::MemoryCheckpoints::new();
        let stuck = |c: Option<u32>| async move {
            let from = c.unwrap_or(0);
            if from >= 50 {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(crate::Page::next(
                (from..from + 10).collect(),
                from + 10,
            ))
        };
        let handle = Pipeline::from_cursor(store.clone(), "ids", stuck)
            .window(Session::gap(S(3600)))
            .event_time(|id| S(u64::from(*id)))
            .count()
            .spawn();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(handle.snapshot().stage("window").unwrap().received, 50);
        handle.cancel();
        let _ = handle.join().await;
        assert_eq!(store.get("ids"), None);
    }
}
