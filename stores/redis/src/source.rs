//! [`RedisStream`]: a pipeline source reading a Redis stream through a consumer group.
//!
//! Four loops run beside the pipeline, sharing one [`Shared`] state:
//! - the reader (this file) first re-reads this consumer's own pending entries (a
//!   restarted consumer resumes), then blocks for new ones on a connection of its own;
//! - the reclaimer (`reclaim.rs`) takes other consumers' entries idle past `min_idle`;
//! - the lease keeper (`lease.rs`) renews the entries this consumer holds;
//! - the acknowledger (`ack.rs`) acknowledges entries whose items finished, and moves
//!   failed and poison entries to the dead-letter stream.
//!
//! An entry's end is learned from flowline's item completion ([`Completion`]): the same
//! ticket the cursor source's checkpoint watermark uses.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use flowline::{BoxError, Completion, ConfigProblem, Error, ItemEnd, Pipeline};
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc};

use crate::conn;
use crate::entry::{self, ReadEntry, StreamEntry};
use crate::names;
use crate::options::StreamOptions;

type Feed = mpsc::Sender<Result<(StreamEntry, Completion), BoxError>>;

/// A Redis stream read through a consumer group, as the source of a pipeline.
///
/// Every entry is acknowledged (`XACK`, in batches) only once its item has finished:
/// delivered, dropped by an operator, or failed *and* written to the dead-letter stream.
/// An item cancelled with its run is not acknowledged: it stays pending, and this consumer
/// re-reads it when it starts again under the same name, or another consumer takes it over
/// after `min_idle`. So an entry is never lost; it may run twice only when a consumer dies
/// (or is cut off past `min_idle`) with it in flight. Such an entry runs alone when it runs
/// again ([`StreamOptions::isolate_suspects`]): if it is the one that killed its consumer,
/// the next death counts a delivery for it only.
///
/// With [`key_by`](flowline::AsyncStage::key_by) on a stage after it, a key's entries run
/// one at a time in stream order within this consumer (a re-read after a connection reset
/// does not run a finished entry again). Across consumers the group hands a key's entries
/// to whichever consumer reads next, so two consumers may run entries of one key at once,
/// and an entry taken over from a dead consumer runs after later entries of its key; give
/// each key its own stream where its order must hold across machines.
///
/// ```no_run
/// use flowline::prelude::*;
/// use flowline_redis::{RedisStream, StreamOptions};
/// # #[tokio::main] async fn main() -> Result<(), flowline::Error> {
/// let source = RedisStream::new("redis://127.0.0.1/", "jobs", "workers", "worker-1",
///                               StreamOptions::new())?;
/// let report = source
///     .pipeline()
///     .map_async("work", |entry| async move { entry.get_str("url").map(str::len) })
///     .workers(16)
///     .run()
///     .await?;
/// println!("{report}");
/// # Ok(()) }
/// ```
pub struct RedisStream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStream")
            .field("stream", &self.shared.stream)
            .field("group", &self.shared.group)
            .field("consumer", &self.shared.consumer)
            .finish_non_exhaustive()
    }
}

fn problem(option: &'static str, value: &str, reason: &'static str) -> ConfigProblem {
    ConfigProblem {
        stage: "redis stream".into(),
        option,
        value: format!("{value:?}"),
        reason,
    }
}

impl RedisStream {
    /// A source on `stream` at the server `url`, reading as `consumer` of `group` (the group
    /// is created, with the stream, if missing). Consumers sharing a job share the group;
    /// each needs a name of its own that stays the same across its restarts. Names and
    /// options are checked here, every problem at once, each naming the option and the
    /// value; nothing connects until the run. A stream is 1 to 1024 bytes, a group or a
    /// consumer 1 to 256, none with spaces or control characters; a `{` in a stream opens
    /// a hash tag that must close and not be empty, and a dead-letter stream given with
    /// [`StreamOptions::dead_letter_stream`] must share the stream's hash tag.
    ///
    /// ```
    /// use flowline_redis::{RedisStream, StreamOptions};
    /// let err = RedisStream::new("redis://127.0.0.1/", "", "g", "c", StreamOptions::new())
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("stream"), "{err}");
    /// let opts = StreamOptions::new().dead_letter_stream("dead");
    /// let err = RedisStream::new("redis://127.0.0.1/", "{jobs}", "g", "worker 1\n", opts)
    ///     .unwrap_err()
    ///     .to_string();
    /// assert!(err.contains("consumer") && err.contains("dead_letter_stream"), "{err}");
    /// ```
    pub fn new(
        url: &str,
        stream: &str,
        group: &str,
        consumer: &str,
        options: StreamOptions,
    ) -> Result<RedisStream, Error> {
        let mut problems = match options.validate() {
            Ok(()) => Vec::new(),
            Err(Error::Config { problems }) => problems,
            Err(other) => return Err(other),
        };
        let client = redis::Client::open(url);
        if client.is_err() {
            problems.push(problem("url", url, "must be a redis:// URL"));
        }
        if let Some(why) = names::bad_key(stream) {
            problems.push(problem("stream", stream, why));
        }
        for (option, value) in [("group", group), ("consumer", consumer)] {
            if let Some(why) = names::bad_name(value) {
                problems.push(problem(option, value, why));
            }
        }
        let dead = options
            .dead_letter
            .clone()
            .unwrap_or_else(|| format!("{stream}:dead"));
        // An empty one is reported by the options; the default is good when the stream is.
        if options
            .dead_letter
            .as_deref()
            .is_some_and(|d| !d.is_empty())
        {
            if let Some(why) = names::bad_key(&dead) {
                problems.push(problem("dead_letter_stream", &dead, why));
            } else if dead == stream {
                problems.push(problem(
                    "dead_letter_stream",
                    &dead,
                    "must differ from the stream read",
                ));
            } else if names::hash_tag(stream).is_some()
                && names::hash_tag(stream) != names::hash_tag(&dead)
            {
                problems.push(problem(
                    "dead_letter_stream",
                    &dead,
                    "must have the stream's hash tag: the move to the dead letters is one script, on one Cluster slot",
                ));
            }
        }
        match client {
            Ok(client) if problems.is_empty() => Ok(RedisStream {
                shared: Arc::new(Shared {
                    server: Arc::from(format!("{} (stream `{stream}`)", conn::server(&client))),
                    client,
                    stream: stream.into(),
                    group: group.into(),
                    consumer: consumer.into(),
                    dead,
                    opts: options,
                    state: Mutex::new(State::default()),
                    ack_wake: Notify::new(),
                    lease_wake: Notify::new(),
                    gate: Notify::new(),
                    stop_feeding: Notify::new(),
                    feeding_done: AtomicBool::new(false),
                    reread: AtomicBool::new(false),
                    lease_gap: Mutex::new(Duration::ZERO),
                }),
            }),
            _ => Err(Error::Config { problems }),
        }
    }

    /// The pipeline reading this source. Build it once per run.
    ///
    /// ```no_run
    /// use flowline::prelude::*;
    /// # async fn f(source: flowline_redis::RedisStream) {
    /// let report = source.pipeline().run().await.unwrap();
    /// # }
    /// ```
    pub fn pipeline(self) -> Pipeline<StreamEntry> {
        let (tx, mut rx) = mpsc::channel(self.shared.opts.batch);
        let stream = futures_util::stream::poll_fn(move |cx: &mut Context<'_>| -> Poll<_> {
            rx.poll_recv(cx)
        });
        Pipeline::from_tracked(stream, run(self.shared, tx))
    }
}

/// The loops, until the source is gone and every entry handed out has ended.
async fn run(sh: Arc<Shared>, tx: Feed) {
    let feeders = {
        let sh = sh.clone();
        async move {
            let reclaim = crate::reclaim::run(sh.clone(), tx.clone());
            tokio::join!(read(sh.clone(), tx), reclaim);
            sh.feeding_done.store(true, Ordering::Release);
            sh.ack_wake.notify_one();
            sh.lease_wake.notify_one();
        }
    };
    tokio::join!(
        feeders,
        crate::lease::run(sh.clone()),
        crate::ack::run(sh.clone())
    );
    let gap = *sh.lease_gap.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!(stream = %sh.stream, consumer = %sh.consumer, longest_renewal_gap = ?gap,
        min_idle = ?sh.opts.min_idle, "lease margin: min_idle minus the longest renewal gap");
}

/// See [`Shared::pending_read`].
pub(crate) struct PendingRead<'a>(&'a Shared);

impl Drop for PendingRead<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.pending_reads -= 1;
        if st.pending_reads == 0 {
            st.acked_meanwhile.clear();
        }
    }
}

#[derive(Default)]
pub(crate) struct State {
    /// The entries handed out and not yet ended, with their delivery counts.
    pub(crate) held: HashMap<String, u64>,
    /// Ended and to be acknowledged.
    pub(crate) to_ack: Vec<String>,
    /// To be written to the dead-letter stream and acknowledged: id, deliveries, reason.
    pub(crate) to_dead: Vec<(String, u64, &'static str)>,
    /// Ended and not yet acknowledged (or moved): still pending in Redis, so a re-read of
    /// this consumer's pending entries must not hand them out again.
    pub(crate) acking: HashSet<String>,
    /// Reads out whose reply may list this consumer's own pending entries (a re-read, a
    /// reclaim), from before the call until their entries are held.
    pub(crate) pending_reads: usize,
    /// Acknowledged (or moved) while such a read was out: its reply, made before the
    /// acknowledgement took effect, may still list them as pending. Cleared when no such
    /// read is out.
    pub(crate) acked_meanwhile: HashSet<String>,
    /// Entries handed to the pipeline (or being handed) and not ended: the ones of `held`
    /// that are past the source's gate.
    pub(crate) running: usize,
    /// The suspect that runs alone (or waits for the others to end before it does): while
    /// it is set, nothing else is handed out or read.
    pub(crate) suspect: Option<String>,
    /// An item was cancelled: the run is ending, nothing new is read or claimed (a claim
    /// would count a delivery of an entry that will not run).
    pub(crate) closing: bool,
}

impl State {
    /// `id` is acknowledged (or moved to the dead letters): no longer pending in Redis.
    pub(crate) fn acked(&mut self, id: String) {
        self.acking.remove(&id);
        if self.pending_reads > 0 {
            self.acked_meanwhile.insert(id);
        }
    }
}

/// What the loops of one source share.
pub(crate) struct Shared {
    /// The server and stream, as outage errors name them.
    pub(crate) server: Arc<str>,
    pub(crate) client: redis::Client,
    pub(crate) stream: String,
    pub(crate) group: String,
    pub(crate) consumer: String,
    pub(crate) dead: String,
    pub(crate) opts: StreamOptions,
    pub(crate) state: Mutex<State>,
    pub(crate) ack_wake: Notify,
    pub(crate) lease_wake: Notify,
    /// `running` reached zero or `suspect` was cleared: waiters at the gate look again.
    pub(crate) gate: Notify,
    /// The reader has ended: the reclaimer ends too.
    pub(crate) stop_feeding: Notify,
    pub(crate) feeding_done: AtomicBool,
    /// A read or reclaim failed after it may have reached the server: entries it delivered
    /// to this consumer are pending here unseen, so the reader reads this consumer's pending
    /// entries again before new ones.
    pub(crate) reread: AtomicBool,
    /// The longest time between two renewals of the leases held (the lease margin is
    /// `min_idle` minus it).
    pub(crate) lease_gap: Mutex<Duration>,
}

impl Shared {
    /// `XREADGROUP` of this consumer for `count` entries after `after` (`0`: its own
    /// pending entries; `>`: new ones), blocking `block` ms when given.
    fn read_group(&self, count: usize, block: Option<&str>, after: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(ms) = block {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(after);
        cmd
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read whose reply may list entries of this consumer's own that end and are
    /// acknowledged while the reply is on its way: until the guard drops (after the reply's
    /// entries were handed out), the acknowledger remembers what it acknowledged, so that a
    /// finished entry is not run again.
    pub(crate) fn pending_read(&self) -> PendingRead<'_> {
        self.lock().pending_reads += 1;
        PendingRead(self)
    }

    /// Nothing will be handed out any more and everything handed out has ended.
    pub(crate) fn all_ended(&self) -> bool {
        self.feeding_done.load(Ordering::Acquire) && self.lock().held.is_empty()
    }

    fn ended(&self, id: String, end: ItemEnd) {
        let mut st = self.lock();
        let deliveries = st.held.remove(&id).unwrap_or(1);
        st.running = st.running.saturating_sub(1);
        // A cancelled suspect keeps the gate shut: its run is ending.
        let alone_ended = end != ItemEnd::Cancelled && st.suspect.as_deref() == Some(id.as_str());
        if alone_ended {
            st.suspect = None;
        }
        st.closing |= end == ItemEnd::Cancelled;
        if alone_ended || st.running == 0 {
            self.gate.notify_waiters();
        }
        match end {
            ItemEnd::Done => {
                st.acking.insert(id.clone());
                st.to_ack.push(id);
            }
            ItemEnd::Failed => {
                st.acking.insert(id.clone());
                st.to_dead.push((id, deliveries, "failed"));
            }
            // Stays pending: this consumer re-reads it on restart, another takes it over.
            ItemEnd::Cancelled => {}
        }
        let empty = st.held.is_empty();
        drop(st);
        if end != ItemEnd::Cancelled {
            self.ack_wake.notify_one();
        }
        if empty {
            self.held_emptied();
        }
    }

    /// An entry held but never handed to the pipeline (it is gone): it stays pending.
    fn not_handed(&self, id: &str) {
        let mut st = self.lock();
        st.held.remove(id);
        let empty = st.held.is_empty();
        drop(st);
        if empty {
            self.held_emptied();
        }
    }

    fn held_emptied(&self) {
        self.ack_wake.notify_one();
        self.lease_wake.notify_one();
    }

    /// Waits until `pass` (called under the lock, so it may take what it found) returns
    /// true; `false` if the pipeline went away first.
    async fn gate_until(&self, tx: &Feed, mut pass: impl FnMut(&mut State) -> bool) -> bool {
        // The common case (no suspect about) without registering as a waiter.
        if pass(&mut self.lock()) {
            return true;
        }
        loop {
            let opened = self.gate.notified();
            tokio::pin!(opened);
            // Registered before the look, so a change between the two is not missed.
            opened.as_mut().enable();
            if pass(&mut self.lock()) {
                return true;
            }
            tokio::select! {
                _ = opened => {}
                _ = tx.closed() => return false,
            }
        }
    }

    /// Waits until new entries may be read or claimed: no suspect runs or waits to run
    /// (when suspects are isolated), and the run is not ending. `false` if the pipeline
    /// went away first.
    pub(crate) async fn until_open(&self, tx: &Feed) -> bool {
        let isolate = self.opts.isolate_suspects;
        self.gate_until(tx, |st| !st.closing && (!isolate || st.suspect.is_none()))
            .await
    }

    /// Lets entry `id` through the gate, to be handed to the pipeline: a fresh one once no
    /// suspect runs or waits; a suspect (`suspect`) once no other suspect does and every
    /// entry handed out before it has ended, and it keeps the gate shut until it ends.
    /// `false` if the pipeline went away first.
    async fn admit(&self, id: &str, suspect: bool, tx: &Feed) -> bool {
        if !self.opts.isolate_suspects {
            self.lock().running += 1;
            return true;
        }
        if !suspect {
            return self
                .gate_until(tx, |st| {
                    let pass = st.suspect.is_none();
                    st.running += usize::from(pass);
                    pass
                })
                .await;
        }
        let reserved = self
            .gate_until(tx, |st| {
                let pass = st.suspect.is_none();
                if pass {
                    st.suspect = Some(id.to_string());
                }
                pass
            })
            .await;
        if !reserved {
            return false;
        }
        let alone = self
            .gate_until(tx, |st| {
                let pass = st.running == 0;
                st.running += usize::from(pass);
                pass
            })
            .await;
        if !alone {
            self.lock().suspect = None;
            self.gate.notify_waiters();
        }
        alone
    }

    /// Hands entries to the pipeline (`counts`: their delivery counts, when known). Poison
    /// entries and unreadable ones go to the dead letters instead; an entry already held
    /// (read again by the reclaimer) is skipped. A suspect (delivered before) waits at the
    /// gate to run alone ([`StreamOptions::isolate_suspects`]). `Err` when the pipeline is
    /// gone.
    ///
    /// The whole batch is held (its leases renewed) before the first entry is handed out:
    /// a busy pipeline may take longer than `min_idle` to take a batch, and an entry read
    /// but still waiting here must not be taken over by another consumer.
    pub(crate) async fn hand_out(
        self: &Arc<Self>,
        reads: Vec<ReadEntry>,
        counts: &HashMap<String, u64>,
        tx: &Feed,
    ) -> Result<(), ()> {
        let mut batch = Vec::with_capacity(reads.len());
        let mut dead = false;
        {
            let mut st = self.lock();
            for read in reads {
                let n = counts.get(read.id()).copied().unwrap_or(1);
                let mut e = match read {
                    ReadEntry::Bad(id, why) => {
                        if st.held.contains_key(&id)
                            || st.acked_meanwhile.contains(&id)
                            || !st.acking.insert(id.clone())
                        {
                            continue;
                        }
                        st.to_dead.push((id, n, why));
                        dead = true;
                        continue;
                    }
                    ReadEntry::Entry(e) => e,
                };
                // Held (in flight here), ended and waiting for its acknowledgement, or
                // acknowledged since the read was sent: a re-read or a reclaim found it
                // pending, it is not to run again.
                if st.held.contains_key(e.id())
                    || st.acking.contains(e.id())
                    || st.acked_meanwhile.contains(e.id())
                {
                    continue;
                }
                if n > self.opts.max_deliveries {
                    st.acking.insert(e.id().to_string());
                    st.to_dead.push((e.id().to_string(), n, "max_deliveries"));
                    dead = true;
                    continue;
                }
                st.held.insert(e.id().to_string(), n);
                e.set_deliveries(n);
                batch.push(e);
            }
        }
        if dead {
            self.ack_wake.notify_one();
        }
        let mut batch = batch.into_iter();
        while let Some(e) = batch.next() {
            let id = e.id().to_string();
            if !self.admit(&id, e.deliveries() > 1, tx).await {
                self.not_handed(&id);
                for e in batch {
                    self.not_handed(e.id());
                }
                return Err(());
            }
            let sh = self.clone();
            let c = Completion::new(move |end| sh.ended(id, end));
            // A closed channel hands the pair back, dropped here: the completion reports
            // cancelled and the entry stays pending; so do the entries not handed out.
            if tx.send(Ok((e, c))).await.is_err() {
                for e in batch {
                    self.not_handed(e.id());
                }
                return Err(());
            }
        }
        Ok(())
    }

    /// Runs `f` until it succeeds, retrying what may succeed later under the source's
    /// outage policy (the connection reconnects by itself) while `go_on` holds. A missing
    /// group is created again (the server came back without it). Every failure sets
    /// [`reread`](Shared::reread): the call may have been applied with its reply lost.
    /// `Err` with the error not worth a retry, the last one when `go_on` stopped holding,
    /// or an [`OutageError`](flowline::OutageError) once the outage outlasted the policy.
    pub(crate) async fn retry<T, F, Fut>(
        &self,
        conn: &ConnectionManager,
        what: &'static str,
        go_on: impl Fn() -> bool,
        mut f: F,
    ) -> Result<T, BoxError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        let mut watch = self.opts.outage.watch(self.server.clone());
        loop {
            let e = match f(conn.clone()).await {
                Ok(v) => {
                    watch.succeeded();
                    return Ok(v);
                }
                Err(e) => e,
            };
            self.reread.store(true, Ordering::Release);
            if conn::is_nogroup(&e) {
                tracing::warn!(stream = %self.stream, group = %self.group, "group missing: creating it again");
                if let Err(e2) = self.ensure_group(conn.clone()).await {
                    if !conn::is_transient(&e2) || !go_on() {
                        return Err(fail(e2, self));
                    }
                }
            } else if !conn::is_transient(&e) || !go_on() {
                return Err(fail(e, self));
            }
            tracing::debug!(stream = %self.stream, error = %e, "redis {what} failed; retrying");
            // A missing group is recreated above: worth another try whatever its kind.
            let marked = if conn::is_nogroup(&e) {
                Box::new(flowline::Transient::new(e))
            } else {
                conn::mark(e)
            };
            match watch.failed(marked) {
                Ok(wait) => tokio::time::sleep(wait).await,
                Err(outage) => return Err(Box::new(outage)),
            }
        }
    }

    /// A connection of its own for one loop (`timeout`: the longest a reply may take),
    /// tried under the outage policy while `go_on` holds.
    pub(crate) async fn connect(
        &self,
        timeout: Duration,
        go_on: impl Fn() -> bool,
    ) -> Result<ConnectionManager, BoxError> {
        let mut watch = self.opts.outage.watch(self.server.clone());
        loop {
            match conn::connect(&self.client, timeout).await {
                Ok(c) => {
                    watch.succeeded();
                    return Ok(c);
                }
                Err(e) if conn::is_transient(&e) && go_on() => match watch.failed(conn::mark(e)) {
                    Ok(wait) => tokio::time::sleep(wait).await,
                    Err(outage) => return Err(Box::new(outage)),
                },
                Err(e) => return Err(fail(e, self)),
            }
        }
    }

    /// Creates the group (and the stream) unless it exists.
    pub(crate) async fn ensure_group(
        &self,
        mut conn: ConnectionManager,
    ) -> Result<(), redis::RedisError> {
        let r: Result<Value, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.opts.start_id)
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Delivery counts of this consumer's pending entries from `first` to `last`.
    pub(crate) async fn counts(
        &self,
        conn: &ConnectionManager,
        first: &str,
        last: &str,
        n: usize,
        go_on: impl Fn() -> bool,
    ) -> Result<HashMap<String, u64>, BoxError> {
        let v: Value = self
            .retry(conn, "XPENDING", go_on, |mut c| async move {
                redis::cmd("XPENDING")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(first)
                    .arg(last)
                    .arg(n)
                    .arg(&self.consumer)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut out = HashMap::with_capacity(n);
        for row in entry::items(v).unwrap_or_default() {
            let row = entry::items(row).unwrap_or_default();
            if let (Some(id), Some(count)) = (
                row.first().and_then(entry::text),
                row.get(3).and_then(entry::int),
            ) {
                out.insert(id, u64::try_from(count).unwrap_or(1));
            }
        }
        Ok(out)
    }

    /// How many entries are pending in the whole group.
    async fn group_pending(
        &self,
        conn: &ConnectionManager,
        go_on: impl Fn() -> bool,
    ) -> Result<i64, BoxError> {
        let v: Value = self
            .retry(conn, "XPENDING", go_on, |mut c| async move {
                redis::cmd("XPENDING")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(entry::items(v)
            .and_then(|a| a.first().and_then(entry::int))
            .unwrap_or(0))
    }
}

fn fail(e: impl std::fmt::Display, sh: &Shared) -> BoxError {
    format!(
        "redis stream `{}` (group `{}`, consumer `{}`): {e}",
        sh.stream, sh.group, sh.consumer
    )
    .into()
}

/// The reader: this consumer's own pending entries first, then new ones.
async fn read(sh: Arc<Shared>, tx: Feed) {
    let result = read_inner(&sh, &tx).await;
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
    sh.stop_feeding.notify_one();
}

async fn read_inner(sh: &Arc<Shared>, tx: &Feed) -> Result<(), BoxError> {
    let go_on = || !tx.is_closed();
    // Blocking reads hold their connection: this one is the reader's alone, and a call may
    // take the block time and then some.
    let conn = sh
        .connect(sh.opts.block + Duration::from_secs(5), go_on)
        .await?;
    sh.retry(&conn, "XGROUP CREATE", go_on, |c| sh.ensure_group(c))
        .await?;
    // A dead-letter key of another type would hold failed entries pending for ever: say so
    // before the first entry runs.
    let kind: String = sh
        .retry(&conn, "TYPE", go_on, |mut c| async move {
            redis::cmd("TYPE").arg(&sh.dead).query_async(&mut c).await
        })
        .await?;
    if kind != "stream" && kind != "none" {
        return Err(fail(
            format!(
                "the dead-letter stream `{}` holds a {kind}, not a stream (WRONGTYPE)",
                sh.dead
            ),
            sh,
        ));
    }
    let block_ms = sh.opts.block.as_millis().to_string();
    let none = HashMap::new();
    let mut first_pass = true;
    loop {
        // This consumer's own pending entries, oldest first: what an earlier life left, or
        // what a read whose reply was lost delivered here. Those in flight are skipped.
        // Re-read, each is a suspect. An earlier life's entries, when suspects run alone,
        // are read one at a time, each once no other suspect runs, so that a death counts
        // a delivery for one of them only. A later pass (after a lost reply) finds mostly
        // entries in flight here: it reads by batches.
        sh.reread.store(false, Ordering::Release);
        let mut after = "0".to_string();
        let count = if sh.opts.isolate_suspects && first_pass {
            1
        } else {
            sh.opts.batch
        };
        first_pass = false;
        loop {
            if !sh.until_open(tx).await {
                return Ok(());
            }
            let _read = sh.pending_read();
            let v: Value = sh
                .retry(&conn, "XREADGROUP", go_on, |mut c| {
                    let after = after.clone();
                    async move { sh.read_group(count, None, &after).query_async(&mut c).await }
                })
                .await?;
            let reads = entry::read_reply(v).map_err(|e| fail(e, sh))?;
            let (Some(first), Some(last)) = (reads.first(), reads.last()) else {
                break;
            };
            let (first, last) = (first.id().to_string(), last.id().to_string());
            let counts = sh.counts(&conn, &first, &last, reads.len(), go_on).await?;
            after = last;
            if sh.hand_out(reads, &counts, tx).await.is_err() {
                return Ok(());
            }
        }

        while !sh.reread.load(Ordering::Acquire) {
            // Nothing new is read while a suspect runs alone: entries read now would wait
            // for it, and die with it if it is a poison one.
            if !sh.until_open(tx).await {
                return Ok(());
            }
            let call = sh.retry(&conn, "XREADGROUP", go_on, |mut c| {
                let block_ms = block_ms.clone();
                async move {
                    sh.read_group(sh.opts.batch, Some(&block_ms), ">")
                        .query_async::<Value>(&mut c)
                        .await
                }
            });
            // The pipeline went away: stop now, not after the block time. Entries the read
            // may still bring stay pending for this consumer's next life or a reclaim.
            let v = tokio::select! {
                v = call => v?,
                _ = tx.closed() => return Ok(()),
            };
            let reads = entry::read_reply(v).map_err(|e| fail(e, sh))?;
            if reads.is_empty() {
                if sh.opts.stop_when_drained
                    && sh.lock().held.is_empty()
                    && sh.group_pending(&conn, go_on).await? == 0
                {
                    return Ok(());
                }
                if !go_on() {
                    return Ok(());
                }
                continue;
            }
            if sh.hand_out(reads, &none, tx).await.is_err() {
                return Ok(());
            }
        }
    }
}
