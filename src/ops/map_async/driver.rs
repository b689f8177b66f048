//! The driver task of an async stage: a short loop over the stage's parts. Each turn it sends
//! on what is done ([`Output`]), takes the calls that finished ([`InFlight`]), lets the
//! retries whose backoff is over ([`RetryQueue`]), the items an admission held
//! ([`HeldItems`]) and a probe of a server that was down ([`Down`]) come due, and starts
//! calls while the limits allow: input from the [`Input`] buffer, leave from the
//! [`Chain`] of admissions, a place in the [`Reorder`] buffer, latency from the
//! [`LatencySampler`]. Every item is accounted for.
//!
//! The driver knows its policies only as admissions and a [`RetryPolicy`]; a stage without
//! any pays one branch per item for them, and starts its items in a tight loop
//! ([`Driver::start_plain`]) through the same launch path as the general one.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::failure::{FailedInput, Failure, ItemError};
use crate::policy::hedge::{Hedge, HedgeState};
use crate::policy::{Admission, Finished, RetryPolicy};
use crate::report::StageStats;
use crate::runtime::chunk::{CHUNK_CAP, Chunk, Outcome};
use crate::runtime::{RunCtx, Upstream};

use super::admission::{Admitted, Chain};
use super::builder::Options;
use super::call::{Completion, Meta, Polled, StageFn, make};
use super::held::HeldItems;
use super::inflight::{InFlight, Launched};
use super::input::Input;
use super::key_by;
use super::keyed::{KeyFn, Keyed};
use super::latency::LatencySampler;
use super::output::Output;
use super::reorder::{Done, Reorder};
use super::retry_queue::RetryQueue;
use super::routed::{Route, with_attempt};
use super::transient::{Down, Ridden};

mod again;
mod plain;

/// The most items a stage keeps in retry backoff before it stops taking new ones.
const MAX_PARKED: usize = 4 * CHUNK_CAP;
/// The least reorder window of an ordered stage without `ordered_window`.
const DEFAULT_WINDOW: usize = CHUNK_CAP;

#[allow(clippy::too_many_arguments)]
pub(super) async fn drive<T, U, S>(
    up: Upstream<T>,
    call: S,
    options: Options,
    keep: Option<fn(&T) -> FailedInput>,
    copy: Option<fn(&T) -> T>,
    route: Option<Route<T, U>>,
    ends: Option<fn(&U) -> bool>,
    key: Option<KeyFn<T>>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    tx: tokio::sync::mpsc::Sender<Chunk<U>>,
) where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    let admissions: Vec<Box<dyn Admission>> =
        options.policies.iter().map(|p| p.admission()).collect();
    let retry = options.retry.as_ref().map(|r| r.stage());
    let plain = admissions.is_empty()
        && retry.is_none()
        && keep.is_none()
        && copy.is_none()
        && route.is_none()
        && ends.is_none()
        && (key.is_none() || options.transient.is_none())
        && !options.trace_calls;
    let keys = key.map(|k| Keyed::new(k, key_by::limits(&options)));
    let chain = Chain::new(admissions);
    let hedge = options.hedge.as_ref().map(Hedge::stage);
    let mut driver = Driver {
        plain,
        input: Input::new(up),
        call,
        keep,
        copy,
        route,
        ends,
        trace_calls: options.trace_calls,
        inflight: InFlight::new(options.timeout),
        live: run.live.find(&stats.name).unwrap_or_else(|| {
            Arc::new(crate::runtime::live::LiveStage::new(
                stats.name.clone(),
                options.workers,
                None,
                false,
            ))
        }),
        window: options.window,
        reorder: Reorder::new(options.ordered),
        output: Output::new(tx),
        stats: stats.clone(),
        run: run.clone(),
        // A hedge's percentile needs every call's latency (a fixed delay needs none).
        latency: LatencySampler::new(
            chain.times_calls() || hedge.as_ref().is_some_and(HedgeState::needs_latency),
        ),
        hedge,
        chain,
        retry_queue: RetryQueue::new(retry.as_ref().is_some_and(|r| r.pauses_source())),
        retry,
        held: HeldItems::default(),
        dead: None,
        down: options
            .transient
            .map(|t| Down::new(t, run.outage_policy.watch(stats.name.clone()))),
        stopping: false,
        keys,
    };
    let (cancel, stopping) = (run.cancel.clone(), run.stopping.clone());
    // `stopping` fires on a stop and on a cancel: one wait for both, as cheap as the wait
    // for a cancel alone.
    let heard = tokio::select! {
        biased;
        _ = stopping.cancelled() => true,
        _ = std::future::poll_fn(|cx| driver.poll_drive(cx)) => false,
    };
    let cancelled = heard
        && (cancel.is_cancelled() || {
            // A graceful stop: nothing new starts, the calls in flight finish.
            driver.stop();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => true,
                _ = std::future::poll_fn(|cx| driver.poll_drive(cx)) => false,
            }
        });
    // Cancelled, or the next stage is gone: what the stage holds is left unfinished.
    stats.left(driver.held());
    if cancelled {
        stats.discarded(driver.input.discard());
    }
    driver.latency.merge_into(&stats);
}

struct Driver<T, U, S: StageFn<T, U>> {
    /// No policy, retry, kept input, result routing or call span: items start in
    /// [`Driver::start_plain`]'s tight loop (keyed: [`Driver::start_plain_keyed`]).
    plain: bool,
    input: Input<T>,
    call: S,
    keep: Option<fn(&T) -> FailedInput>,
    copy: Option<fn(&T) -> T>,
    /// `results`: a failed item becomes an output.
    route: Option<Route<T, U>>,
    /// `done_if`: the outputs that end here, as done.
    ends: Option<fn(&U) -> bool>,
    /// A span per call.
    trace_calls: bool,
    inflight: InFlight<S::Future, T>,
    /// `workers`, as [`Control::set_workers`](crate::Control::set_workers) leaves it: read
    /// before each call.
    live: Arc<crate::runtime::live::LiveStage>,
    /// `ordered_window`, if given.
    window: Option<usize>,
    reorder: Reorder<U>,
    output: Output<U>,
    stats: Arc<StageStats>,
    run: Arc<RunCtx>,
    latency: LatencySampler,
    /// The stage's policies, in the order given: a call starts when each has let it through.
    chain: Chain,
    retry: Option<Box<dyn RetryPolicy>>,
    retry_queue: RetryQueue<T>,
    /// Items whose failed call an admission holds to be tried again (a pausing breaker).
    held: HeldItems<T>,
    /// Why the call can never be made (its service failed in `poll_ready`): every item left
    /// fails with it, without a call.
    dead: Option<ItemError>,
    /// `transient_if`: the server's state, and the items waiting for it.
    down: Option<Down<T>>,
    /// The run is stopping: no call starts; what comes in is left unfinished.
    stopping: bool,
    /// `hedge`: the delay before a slow call gets a second one, and the budget.
    hedge: Option<HedgeState>,
    /// `key_by`: the keys out and the items waiting behind them.
    keys: Option<Keyed<T, U>>,
}

impl<T, U, S> Driver<T, U, S>
where
    T: Send + 'static,
    U: Send + 'static,
    S: StageFn<T, U>,
{
    fn limit(&self) -> usize {
        // An adaptive limit may pass the workers given on the builder; a cap set while
        // running holds it.
        let workers = self.live.workers();
        self.chain.limit(workers).min(workers)
    }

    /// Whether another call may start. Calls in flight count against the limit; an ordered
    /// stage also bounds its reorder window (items started and not yet emitted, whether in
    /// flight, finished, or waiting to be tried again). The window is its own bound, larger
    /// than the workers by default, so that one item held back (a slow call, a backoff)
    /// does not stop the others. An item to be tried again is already in the window, so
    /// only the calls in flight bound it — else a finished item waiting for it to be
    /// emitted could hold its place forever.
    fn can_start(&self) -> bool {
        let limit = self.limit();
        if self.output.is_full() || self.inflight.len() >= limit {
            return false;
        }
        // A retry due or a keyed item ready is already in the window.
        let placed = self.retry_queue.due_len() + self.keys.as_ref().map_or(0, Keyed::ready);
        if !self.reorder.is_ordered() || placed > 0 {
            return true;
        }
        // A keyed stage's window also holds the items waiting behind busy keys: without
        // room for them, a key whose items lie further on in the input than the window
        // reaches would idle while an earlier item of another key is out.
        let window = self.window.unwrap_or_else(|| {
            let waiting = self.keys.as_ref().map_or(0, Keyed::max_waiting);
            limit
                .saturating_mul(4)
                .max(DEFAULT_WINDOW)
                .saturating_add(waiting)
        });
        // A probe of the stage's server is already in the window (it was started before),
        // and the window may be full of items waiting for it.
        self.reorder.in_window() < window || self.probe_ready()
    }

    /// Whether the stage's server is down (`transient_if`): only a probe may start.
    fn server_down(&self) -> bool {
        self.down.as_ref().is_some_and(Down::is_down)
    }

    fn probe_ready(&self) -> bool {
        self.down.as_ref().is_some_and(|d| d.ready.is_some())
    }

    /// How many items could start now (pulls a chunk if none is waiting).
    fn available(&mut self, cx: &mut Context<'_>) -> usize {
        if self.stopping {
            self.input.drain(cx, &self.stats);
            return 0;
        }
        if self.server_down() {
            return usize::from(self.probe_ready());
        }
        let due = self.retry_queue.due_len();
        if self.retry_queue.job_paused() {
            return due;
        }
        let pull = due > 0 || self.retry_queue.len() < MAX_PARKED;
        if let Some(k) = self.keys.as_mut() {
            return due + k.stage(&mut self.input, &mut self.reorder, pull, cx, &self.stats);
        }
        if pull {
            self.input.fill(cx, &self.stats);
        }
        due + self.input.len()
    }

    /// The next item to start: a probe of a server that is down, a retry whose backoff is
    /// over, else a new one.
    fn pop_input(&mut self) -> Option<(T, Meta)> {
        if self.stopping {
            return None;
        }
        if let Some(d) = self.down.as_mut().filter(|d| d.is_down()) {
            return d.ready.take();
        }
        if let Some(d) = self.retry_queue.pop_due() {
            return Some(d);
        }
        if self.retry_queue.job_paused() {
            return None;
        }
        if let Some(k) = self.keys.as_mut() {
            return k.pop();
        }
        let (item, ticket) = self.input.pop()?;
        let seq = self.reorder.next();
        Some((item, Meta::new(seq, ticket)))
    }

    fn start(&mut self, item: T, mut meta: Meta, cx: &mut Context<'_>) {
        meta.attempts += 1;
        let timed = self.latency.times(meta.seq);
        if meta.attempts == 1 {
            if let Some(r) = self.retry.as_mut() {
                r.first_attempt();
                if r.needs_first_at() {
                    meta.set_first_at(Instant::now());
                }
            }
        }
        if let Some(keep) = self.keep {
            if !meta.has_input() {
                meta.set_input(keep(&item));
            }
        }
        let again = self.copy.map(|c| c(&item));
        // In the call's span (`trace_calls`): making the future, its first poll here, and
        // every later poll (`Call::poll`).
        let _in_span = if self.trace_calls {
            let span = tracing::info_span!(
                target: "flowline",
                "call",
                seq = meta.seq,
                attempt = meta.attempts,
                outcome = tracing::field::Empty,
            );
            meta.set_span(span.clone());
            Some(span.entered())
        } else {
            None
        };
        let call = &mut self.call;
        // A stage that can try an item again tells the call which attempt it makes.
        let made = if again.is_some() {
            with_attempt(meta.attempts, || make(|| call.call(item)))
        } else {
            make(|| call.call(item))
        };
        let fut = match made {
            Ok(fut) => fut,
            Err(e) => return self.complete(meta, Err(e), None, again, true),
        };
        if let Some(h) = self.hedge.as_mut() {
            self.inflight.hedge_after(h.launched());
        }
        if let Launched::Ready(result, latency, (meta, again)) =
            self.inflight.launch(fut, timed, (meta, again), cx)
        {
            self.complete(meta, result, latency, again, true);
        }
    }

    /// Whether the next call may start: the call's own readiness (a tower service's
    /// `poll_ready`), a panic there counted as its error.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ItemError>> {
        let call = &mut self.call;
        match catch_unwind(AssertUnwindSafe(|| call.poll_ready(cx))) {
            Ok(Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(ItemError::User(Arc::from(e)))),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(ItemError::from_panic(&*panic))),
        }
    }

    /// The service said it cannot take calls any more: the stage reports it, and every item
    /// left fails with the same error.
    fn service_failed(&mut self, error: ItemError) {
        self.run.stage_failed(&self.stats.name, error.clone());
        self.dead = Some(error);
    }

    /// Fails the next item without a call, keeping its input as a call would have.
    fn fail_next(&mut self, error: ItemError) {
        if let Some((item, mut meta)) = self.pop_input() {
            if let Some(keep) = self.keep {
                if !meta.has_input() {
                    meta.set_input(keep(&item));
                }
            }
            self.complete(meta, Err(error), None, Some(item), false);
        }
    }

    /// Accounts for a finished call (or an item refused without one: `called` false), and
    /// emits its result, fails it, or parks it for another attempt.
    fn complete(
        &mut self,
        meta: Meta,
        result: Result<U, ItemError>,
        latency: Option<Duration>,
        again: Option<T>,
        called: bool,
    ) {
        let mut meta = meta;
        if self.trace_calls {
            meta.end_span(match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            });
        }
        if let Some(l) = latency {
            self.latency.record(meta.seq, l, &self.stats);
            if let (Some(h), true) = (self.hedge.as_mut(), called) {
                h.observe(l);
            }
        }
        if !self.chain.is_empty() && called {
            self.chain.finished(&Finished {
                call: meta.call,
                error: result.as_ref().err(),
                latency,
                in_flight: self.inflight.len() + 1,
                attempts: meta.attempts,
            });
        }
        let (mut meta, mut again, mut result) = (meta, again, result);
        if let Some(d) = self.down.as_mut() {
            let (queue, stats, run) = (&mut self.retry_queue, &self.stats, &self.run);
            match d.ride_out(
                meta,
                result,
                again,
                called,
                self.stopping,
                queue,
                stats,
                run,
            ) {
                Ridden::Taken => return,
                Ridden::Left(meta) => {
                    self.leave(meta);
                    self.stats.left(1);
                    return;
                }
                Ridden::Back(m, r, a) => (meta, result, again) = (m, r, a),
            }
        }
        if let (true, true, Err(e)) = (self.retry.is_some(), called, &result) {
            match self.park(meta, e, again) {
                Some((m, a, instead)) => {
                    (meta, again) = (m, a);
                    if let Some(error) = instead {
                        result = Err(error);
                    }
                }
                None => return,
            }
        }
        let (result, again) = match (called, again, result) {
            (true, Some(item), Err(error)) if self.holds(&meta, &error, latency) => {
                if self.stopping {
                    self.leave(meta);
                    self.stats.left(1);
                } else {
                    self.held.push(item, meta, error);
                }
                return;
            }
            (_, again, result) => (result, again),
        };
        let (seq, key) = (meta.seq, meta.key);
        let done = match (result, self.route, again) {
            // Ends here: its ticket finishes now, before another call can start.
            (Ok(u), _, _) if self.ends.is_some_and(|ends| ends(&u)) => {
                StageStats::add(&self.stats.dropped, 1);
                meta.ticket.finish(Outcome::Done);
                Done::Failed
            }
            (Ok(u), _, _) => Done::Ok(u, meta.ticket),
            (Err(error), Some(route), Some(input)) => {
                let out = route(input, error, meta.attempts, &self.stats.name);
                Done::Ok(out, meta.ticket)
            }
            (Err(error), _, _) => {
                StageStats::add(&self.stats.failed, 1);
                let input = meta.take_input();
                meta.ticket.finish(Outcome::Failed);
                self.run.fail(Failure {
                    stage: self.stats.name.clone(),
                    error,
                    attempts: meta.attempts,
                    input,
                });
                Done::Failed
            }
        };
        match self.keys.as_mut() {
            Some(k) => k.end(key, seq, done, &mut self.reorder, &mut self.output),
            None => self.reorder.fill(seq, done, &mut self.output),
        }
    }

    fn completed(&mut self, c: Completion<T, U>) {
        let Completion {
            meta,
            result,
            latency,
            again,
            called,
        } = c;
        self.complete(meta, result, latency, again, called);
    }

    /// A graceful stop: the items not started (received and not begun, waiting for a retry,
    /// for a breaker or for the server) end unfinished here; the calls in flight finish.
    fn stop(&mut self) {
        self.stopping = true;
        let mut left = self.input.clear();
        let mut metas = self.retry_queue.take_all();
        metas.extend(self.held.take_all().map(|(_, m, _)| m));
        if let Some(d) = self.down.as_mut() {
            metas.extend(d.take_all());
        }
        left += metas.len();
        for meta in metas {
            self.leave(meta);
        }
        if let Some(k) = self.keys.as_mut() {
            left += k.stop(&mut self.reorder, &mut self.output);
        }
        self.stats.left(left);
        self.reorder.emit(&mut self.output);
    }

    /// An item started before is left unfinished (its ticket goes with it, unfinished): its
    /// place in the output order is passed over, and the results behind it that are done go
    /// out now. Counted by the caller.
    fn leave(&mut self, meta: Meta) {
        match self.keys.as_mut() {
            Some(k) => k.end(
                meta.key,
                meta.seq,
                Done::Left,
                &mut self.reorder,
                &mut self.output,
            ),
            None => self.reorder.leave(meta.seq, &mut self.output),
        }
    }

    /// The items the stage holds: received and not yet passed on, dropped or failed.
    fn held(&self) -> usize {
        self.input.len()
            + self.inflight.len()
            + self.retry_queue.len()
            + self.held.len()
            + self.down.as_ref().map_or(0, Down::len)
            + self.reorder.held()
            + self.output.len()
            + self.keys.as_ref().map_or(0, Keyed::len)
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.inflight.ages().is_watched() && self.run.watch_calls.load(Ordering::Relaxed) {
            self.inflight.ages().watch();
        }
        self.live.register(cx.waker());
        let r = self.poll_drive_inner(cx);
        if let Some(oldest) = self.inflight.ages().oldest() {
            self.stats.set_oldest_call(oldest, self.run.epoch);
        }
        r
    }

    /// One turn of the loop: send, take finished calls, let waiting items come due, start
    /// calls; until nothing moves (`Pending`) or everything is done (`Ready`).
    fn poll_drive_inner(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            match self.output.poll_flush(cx, &self.stats) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(sent)) => progress |= sent,
                Poll::Pending => {}
            }
            while let Poll::Ready(Some(polled)) = self.inflight.poll_next(cx) {
                match polled {
                    Polled::Done(c) => self.completed(c),
                    Polled::HedgeDue(call) => self.hedge(call, cx),
                }
                progress = true;
            }
            if !self.chain.is_empty() {
                progress |= self.poll_pause(cx);
            }
            if self.retry_queue.in_backoff() {
                progress |= self.retry_queue.poll(cx);
            }
            if !self.held.is_empty() {
                progress |= self.poll_held(cx, false);
            }
            if self.server_down() {
                progress |= self.down.as_mut().is_some_and(|d| d.poll_probe(cx));
            }
            // A stage whose service failed leaves the plain loop: its items fail below; so
            // does a stopping one: it starts nothing.
            let plain = self.plain && self.dead.is_none() && !self.stopping;
            if plain {
                progress |= if self.keys.is_some() {
                    self.start_plain_keyed(cx)
                } else {
                    self.start_plain(cx)
                };
            }
            // The admission the next call waits for, if any.
            let mut waits_on = None;
            while !plain && self.can_start() {
                let available = self.available(cx);
                if available == 0 {
                    break;
                }
                // The call itself must be ready before the gates let it through, so that a
                // permit is taken right when the call can start.
                if self.dead.is_none() {
                    match self.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => self.service_failed(error),
                        Poll::Pending => break,
                    }
                }
                if let Some(error) = &self.dead {
                    self.fail_next(error.clone());
                } else if self.chain.is_empty() {
                    if let Some((item, meta)) = self.pop_input() {
                        self.start(item, meta, cx);
                    }
                } else {
                    let room = self.limit().saturating_sub(self.inflight.len()).max(1);
                    match self.chain.admit(cx, available.min(room)) {
                        Admitted::Go(call) => {
                            if let Some((item, mut meta)) = self.pop_input() {
                                meta.call = call;
                                self.start(item, meta, cx);
                            }
                        }
                        Admitted::Refuse(error) => self.fail_next(error),
                        Admitted::Wait(at) => {
                            waits_on = Some(at);
                            break;
                        }
                    }
                }
                progress = true;
            }
            if !self.chain.is_empty() {
                self.chain.idle_but(waits_on);
                if waits_on.is_some() {
                    // A gate that just closed (a breaker that opened) pauses the source now.
                    progress |= self.poll_pause(cx);
                }
            }
            if !progress && !self.held.is_empty() && self.inflight.is_empty() {
                progress |= self.poll_held(cx, true);
            }
            if self.stopping && !self.input.is_done() {
                self.input.drain(cx, &self.stats);
            }
            if self.input.is_done()
                && self.input.is_empty()
                && self.inflight.is_empty()
                && self.held.is_empty()
                && self.retry_queue.len() == 0
                && self.down.as_ref().is_none_or(|d| d.len() == 0)
                && self.reorder.is_empty()
                && self.output.is_empty()
                && self.keys.as_ref().is_none_or(Keyed::is_empty)
            {
                self.poll_pause(cx);
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests;
