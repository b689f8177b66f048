//! The feeder: runs the pipe's source into the queue's stream, then writes out what the
//! workers send back, as a local run would, and exits with a local run's exit code once
//! every input it fed has ended (a result, or a dead letter).
//!
//! **Resuming.** Inputs are added in batches by one script that also records how many
//! were fed (`meta.fed`, the last input's position): a batch is in the stream with its
//! count or not at all, and a batch tried again after a lost reply is not added twice.
//! A rerun of the feeder skips the inputs fed before (the source must give the same
//! inputs in the same order, as with `--state`) and goes on. An input is marked ended
//! (`ended`, a bitmap) only after its output or dead letter was written, in one script
//! with the removal of its result: a feeder killed between the two writes the output
//! again when rerun (at least once), and never takes an input without a result for done.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use flowline::Outage;
use flowline_redis::ReadEntry;
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::Queue;
use super::key_gate::{Input, KeyGate};
use crate::exec::{CallError, Fail, Item, Value as ItemValue};
use crate::run::{DeadFile, Emit, Outcome, Settings};
use crate::spec::Plan;

/// Inputs fed and not yet ended, at most: the feeder waits for results past it, so that an
/// endless source does not fill Redis.
pub const WINDOW: u64 = 10_000;
/// Inputs added per script call.
const FEED_BATCH: usize = 500;
/// Results read per call.
const READ_BATCH: usize = 500;

/// Adds a batch of inputs and records the last one fed, only if `fed` is still what the
/// caller saw (so a retry after a lost reply adds nothing twice). An input past `fed`
/// leaves the positions it skips `held` (inputs the feeder holds back for their key, with
/// `key(..)`); an input before it is added only if it was held, once. KEYS: jobs, meta,
/// held. ARGV: fed before, then per input: its position, its number of arguments, the
/// arguments. Returns `fed` after the call.
const FEED: &str = r"
local fed = tonumber(redis.call('HGET', KEYS[2], 'fed') or '0')
if fed ~= tonumber(ARGV[1]) then return fed end
local i = 2
while i <= #ARGV do
  local pos = tonumber(ARGV[i])
  local n = tonumber(ARGV[i + 1])
  local add = false
  if pos > fed then
    for p = fed + 1, pos - 1 do redis.call('SADD', KEYS[3], p) end
    fed = pos
    add = true
  else
    add = redis.call('SREM', KEYS[3], pos) == 1
  end
  if add then
    local e = {'seq', ARGV[i]}
    for j = 1, n do
      e[#e + 1] = 'a' .. (j - 1)
      e[#e + 1] = ARGV[i + 1 + j]
    end
    redis.call('XADD', KEYS[1], '*', unpack(e))
  end
  i = i + 2 + n
end
redis.call('HSET', KEYS[2], 'fed', fed)
return fed
";

/// Marks inputs ended and removes their results. KEYS: ended, meta, results, dead.
/// ARGV: the number of result ids, the ids, the number of dead-letter ids, the ids, then
/// per input its position and `1` if it failed. A failure is counted once, however often
/// the call is tried.
const ENDED: &str = r"
local i = 1
for k = 3, 4 do
  local n = tonumber(ARGV[i])
  if n > 0 then redis.call('XDEL', KEYS[k], unpack(ARGV, i + 1, i + n)) end
  i = i + 1 + n
end
while i <= #ARGV do
  if redis.call('SETBIT', KEYS[1], ARGV[i], 1) == 0 and ARGV[i + 1] == '1' then
    redis.call('HINCRBY', KEYS[2], 'failed', 1)
  end
  i = i + 2
end
return 1
";

/// What the feeder knows of the queue.
struct Feeder {
    queue: Queue,
    conn: ConnectionManager,
    outage: Outage,
    server: String,
    emit: Emit,
    dead: DeadFile,
    keep_order: bool,
    /// The inputs fed and not yet written out.
    open: Open,
    /// With `-k`: results that came before their turn.
    waiting: BTreeMap<u64, Read>,
    /// With `-k`: the next input to write out.
    next: u64,
    failures: u64,
    /// With `key(..)`: the keys in flight, told of each input that ends.
    gate: Option<Arc<KeyGate>>,
}

/// The inputs fed and not yet ended, and how far feeding has gone: what the feeder needs
/// to know which results are new. Only the open inputs are held (at most the window
/// and a batch), however long the run, instead of a mark per input ever fed.
#[derive(Debug, Default)]
struct Open {
    open: BTreeSet<u64>,
    /// Inputs before `last` held back for their key, not yet fed.
    held: BTreeSet<u64>,
    /// The last input fed (positions start at 1).
    last: u64,
}

impl Open {
    /// The most inputs a feeder leaves open: the window, a batch being added and a batch
    /// over it.
    const MOST: u64 = WINDOW + 2 * FEED_BATCH as u64;

    /// The inputs of a resumed run: `fed` were fed but those `held`, and `bits` (Redis's
    /// bitmap, bit `seq` set for an input ended) tells which ended. `None` when more would
    /// be open than a feeder leaves (a record that is not a feeder's).
    fn resumed(fed: u64, bits: &[u8], held: BTreeSet<u64>) -> Option<Open> {
        let bit = |seq: u64| {
            let byte = usize::try_from(seq / 8).ok().and_then(|i| bits.get(i));
            byte.is_some_and(|b| b & (0x80 >> (seq % 8)) != 0)
        };
        // Bits past what the bitmap holds are open: count before collecting.
        let in_bits = u64::try_from(bits.len())
            .unwrap_or(u64::MAX)
            .saturating_mul(8);
        if fed.saturating_sub(in_bits) > Self::MOST {
            return None;
        }
        let held: BTreeSet<u64> = held.into_iter().filter(|&s| s >= 1 && s <= fed).collect();
        let mut open = BTreeSet::new();
        for seq in 1..=fed {
            if !bit(seq) && !held.contains(&seq) {
                if (open.len() + held.len()) as u64 >= Self::MOST {
                    return None;
                }
                open.insert(seq);
            }
        }
        Some(Open {
            open,
            held,
            last: fed,
        })
    }

    /// The inputs at `positions` are fed (open until they end), in that order: one past
    /// `last` leaves the positions it skips held, one before it was held.
    fn fed(&mut self, positions: impl IntoIterator<Item = u64>) {
        for pos in positions {
            if pos > self.last {
                self.held.extend(self.last + 1..pos);
                self.last = pos;
                self.open.insert(pos);
            } else if self.held.remove(&pos) {
                self.open.insert(pos);
            }
        }
    }

    /// Whether `seq` was fed and has not ended.
    fn is_open(&self, seq: u64) -> bool {
        self.open.contains(&seq)
    }

    /// Whether `seq` was fed and has ended.
    fn is_ended(&self, seq: u64) -> bool {
        (1..=self.last).contains(&seq) && !self.is_open(seq) && !self.held.contains(&seq)
    }

    /// `seq` has ended; true the first time.
    fn end(&mut self, seq: u64) -> bool {
        self.open.remove(&seq)
    }

    /// How many inputs fed have ended.
    fn ended_count(&self) -> u64 {
        self.last - (self.open.len() + self.held.len()) as u64
    }
}

/// How an input ended, as a worker (or the stream source) reported it.
enum Ended {
    /// A job's output (`Output`) or a request's body (`One`).
    Value(Item),
    /// Dropped by a filter: done, nothing to write.
    Skipped,
    Failed(Box<Fail>),
}

/// A result read, with where it came from (to remove it once written out).
struct Read {
    seq: u64,
    /// The entry's id and whether it is in the dead-letter stream.
    id: (String, bool),
    ended: Ended,
    /// What its jobs wrote on stderr.
    stderr: Vec<u8>,
}

impl Feeder {
    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, String>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut op = op;
        flowline_redis::call(&self.outage, &self.server, || op(self.conn.clone()))
            .await
            .map_err(|e| format!("queue `{}`: {what}: {e}", self.queue.name))
    }

    fn is_ended(&self, seq: u64) -> bool {
        self.open.is_ended(seq)
    }

    /// Writes out how an input ended: its output, and its jobs' stderr as one block, as a
    /// local run does.
    fn write_out(&mut self, ended: &Ended, stderr: &[u8]) {
        if !stderr.is_empty() {
            use std::io::Write;
            let _ = std::io::stderr().lock().write_all(stderr);
        }
        match ended {
            Ended::Value(item) => self.emit.item(item),
            Ended::Skipped => {}
            Ended::Failed(fail) => {
                if self.emit.takes_bytes() {
                    self.emit.bytes(&fail.error.stdout);
                }
                self.dead.write(fail);
                self.failures += 1;
            }
        }
    }

    /// Writes out one input's result; notes it to be marked ended and its entry removed.
    fn end(&mut self, r: Read, marks: &mut Vec<(u64, bool)>, ids: &mut [Vec<String>; 2]) {
        self.write_out(&r.ended, &r.stderr);
        marks.push((r.seq, matches!(r.ended, Ended::Failed(_))));
        self.open.end(r.seq);
        ids[usize::from(r.id.1)].push(r.id.0);
    }

    /// Writes out a batch of results (in input order with `-k`) and marks the inputs ended.
    async fn take(&mut self, reads: Vec<Read>) -> Result<(), String> {
        let mut ids: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        let mut marks: Vec<(u64, bool)> = Vec::new();
        for r in reads {
            if !self.open.is_open(r.seq) || self.waiting.contains_key(&r.seq) {
                // A second result of an input (its job ran twice): only the first counts.
                // An entry of no input fed (no position, or past the last fed) is removed
                // too.
                ids[usize::from(r.id.1)].push(r.id.0);
            } else {
                // The job has ended: its key's next input may be fed, whenever this one is
                // written out.
                if let Some(g) = &self.gate {
                    g.ended(r.seq);
                }
                if self.keep_order {
                    // Removed from Redis once written out, not before.
                    self.waiting.insert(r.seq, r);
                } else {
                    self.end(r, &mut marks, &mut ids);
                }
            }
        }
        while self.is_ended(self.next) {
            self.next += 1;
        }
        while let Some(r) = self.waiting.remove(&self.next) {
            self.end(r, &mut marks, &mut ids);
            while self.is_ended(self.next) {
                self.next += 1;
            }
        }
        if marks.is_empty() && ids.iter().all(Vec::is_empty) {
            return Ok(());
        }
        let script = redis::Script::new(ENDED);
        let keys = [
            self.queue.key("ended"),
            self.queue.meta_key(),
            self.queue.key("results"),
            self.queue.key("dead"),
        ];
        self.call("marking inputs ended", |mut c| {
            let mut inv = script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for list in &ids {
                inv.arg(list.len());
                for id in list {
                    inv.arg(id);
                }
            }
            for (seq, failed) in &marks {
                inv.arg(*seq).arg(u8::from(*failed));
            }
            async move { inv.invoke_async::<Value>(&mut c).await }
        })
        .await?;
        Ok(())
    }
}

/// Runs the feeder to the end (or to a signal).
pub async fn run(plan: Plan, settings: Settings, queue: Queue) -> Result<Outcome, String> {
    let conn = super::connect(&queue.server)?;
    let server = queue.label();
    let mut f = Feeder {
        emit: Emit::open(&plan.main.sink, &settings.job_opts)?,
        dead: DeadFile::new(settings.dead_letter.clone()),
        keep_order: settings.keep_order,
        open: Open::default(),
        waiting: BTreeMap::new(),
        next: 1,
        failures: 0,
        gate: None,
        outage: Outage::default(),
        server,
        conn,
        queue,
    };
    let fed_before = start(&mut f, settings.quiet).await?;
    let gated = KeyGate::of(&plan).map(|(gate, released)| (Arc::new(gate), released));
    f.gate = gated.as_ref().map(|(g, _)| g.clone());
    if let Some(g) = &f.gate {
        g.resuming(fed_before);
    }
    // A resumed run's inputs before `fed_before`: those in flight keep their keys busy,
    // those held are fed now.
    let (open_before, held_before) = (f.open.open.clone(), f.open.held.clone());

    // The source on a task of its own, so that a slow input does not hold up the results.
    let (reader, _) = crate::input::open_source(&plan.source, false, settings.delim).await?;
    let (tx, rx) = mpsc::channel::<Input>(FEED_BATCH * 2);
    let colsep = settings.colsep.clone();
    let gate = f.gate.clone();
    let source = tokio::spawn(async move {
        let mut reader = reader;
        let mut seq = 0u64;
        loop {
            match reader.next_args(colsep.as_ref()).await {
                Ok(Some(args)) => {
                    seq += 1;
                    let input = (seq, args);
                    let fresh = seq > fed_before || held_before.contains(&seq);
                    let input = match &gate {
                        Some(g) if fresh => match g.admit(input).await {
                            Some(i) => i,
                            None => continue,
                        },
                        Some(g) => {
                            if open_before.contains(&seq) {
                                g.in_flight(&input);
                            }
                            continue;
                        }
                        None if fresh => input,
                        None => continue,
                    };
                    if tx.send(input).await.is_err() {
                        return Ok(seq);
                    }
                }
                Ok(None) => return Ok(seq),
                Err(e) => return Err(e),
            }
        }
    });

    let f = Arc::new(tokio::sync::Mutex::new(f));
    let progress = Arc::new(tokio::sync::Notify::new());
    let fed = Arc::new(std::sync::atomic::AtomicU64::new(fed_before));
    let source_done = std::sync::atomic::AtomicBool::new(false);
    let work = async {
        // Results are written out while the source runs; once it has ended, its count of
        // inputs is the total the results must reach. The total is this feeder's to know,
        // not a record in Redis: an earlier feeder's would end a rerun whose source gave
        // more inputs before it had fed them.
        let feeding = async {
            let inputs = Inputs {
                source: rx,
                gated,
                source_done: false,
            };
            let last = feed(f.clone(), inputs, fed.clone(), progress.clone()).await?;
            let total = match source.await {
                Ok(Ok(n)) => n.max(last),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(format!("the source stopped: {e}")),
            };
            fed.store(total, std::sync::atomic::Ordering::SeqCst);
            source_done.store(true, std::sync::atomic::Ordering::SeqCst);
            progress.notify_waiters();
            Ok(())
        };
        let collecting = collect(f.clone(), fed.clone(), &source_done, progress.clone());
        tokio::try_join!(feeding, collecting).map(|_| ())
    };
    let usr1 = crate::run::on_sigusr1(None, || {});
    let signals = super::stop_signals()?;
    let stopped = tokio::select! {
        r = work => {
            r?;
            false
        }
        () = signals.recv() => true,
    };
    if let Some(u) = usr1 {
        u.abort();
    }
    if stopped {
        let f = f.lock().await;
        eprintln!(
            "\nflowline: stopped; the inputs fed and not ended stay in queue `{}`: run the same command again to go on",
            f.queue.name
        );
        return Ok(Outcome {
            failures: f.failures,
            interrupted: true,
            halted_by: None,
        });
    }
    let f = f.lock().await;
    finish(&f).await?;
    if !settings.quiet {
        let mut line = format!(
            "flowline: {} inputs, {} failed (queue `{}`)",
            fed.load(std::sync::atomic::Ordering::SeqCst),
            f.failures,
            f.queue.name
        );
        if let Some(n) = f.gate.as_ref().map(|g| g.waits()).filter(|&n| n > 0) {
            line.push_str(&format!(", {n} waited for their key"));
        }
        if f.dead.written() > 0 {
            line.push_str(&format!(
                "; failures written to {}",
                settings.dead_letter.display()
            ));
        }
        eprintln!("{line}");
    }
    Ok(Outcome {
        failures: f.failures,
        interrupted: false,
        halted_by: None,
    })
}

/// Starts a new run of the queue, or resumes an unfinished one; returns how many inputs
/// were fed before.
async fn start(f: &mut Feeder, quiet: bool) -> Result<u64, String> {
    let meta_key = f.queue.meta_key();
    let meta: HashMap<String, String> = f
        .call("reading the queue", |mut c| {
            let k = meta_key.clone();
            async move { redis::cmd("HGETALL").arg(&k).query_async(&mut c).await }
        })
        .await?;
    let num = |k: &str| meta.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let run = meta.get("run").filter(|r| !r.is_empty());
    let Some(run) = run.filter(|_| !meta.contains_key("finished")) else {
        // A new run, with keys of its own: what an earlier run left expires by itself (its
        // feeder set that when it finished), and its late workers write only there.
        let run = super::new_run_id();
        f.call("starting a run", |mut c| {
            let (k, run) = (meta_key.clone(), run.clone());
            let mut p = redis::pipe();
            p.atomic().del(&k).ignore().hset(&k, "run", &run).ignore();
            async move { p.query_async::<()>(&mut c).await }
        })
        .await?;
        f.queue = f.queue.with_run(&run);
        return Ok(0);
    };
    f.queue = f.queue.with_run(run);
    let (ended_key, held_key) = (f.queue.key("ended"), f.queue.key("held"));
    let (bits, held): (Vec<u8>, Vec<String>) = f
        .call("reading the inputs ended and held", |mut c| {
            let mut p = redis::pipe();
            p.get(&ended_key).smembers(&held_key);
            async move { p.query_async(&mut c).await }
        })
        .await?;
    f.failures = num("failed");
    let fed = num("fed");
    // Outside input: what is not a position is no input held.
    let held = held.iter().filter_map(|s| s.parse().ok()).collect();
    f.open = Open::resumed(fed, &bits, held).ok_or_else(|| {
        format!(
            "queue `{}`: its record says {fed} inputs were fed, and more of them are open than a feeder leaves; clear it (DEL its keys) to start again",
            f.queue.name
        )
    })?;
    while f.is_ended(f.next) {
        f.next += 1;
    }
    if !quiet {
        eprintln!(
            "flowline: resuming queue `{}`: {fed} inputs fed before, {} of them ended",
            f.queue.name,
            f.open.ended_count()
        );
    }
    Ok(fed)
}

/// The inputs to feed: the source's, and with `key(..)` those its gate releases.
struct Inputs {
    source: mpsc::Receiver<Input>,
    gated: Option<(Arc<KeyGate>, mpsc::UnboundedReceiver<Input>)>,
    source_done: bool,
}

impl Inputs {
    /// The next input, a released one first; `None` once the source has ended and the
    /// gate holds nothing.
    async fn next(&mut self) -> Option<Input> {
        loop {
            let Some((gate, released)) = &mut self.gated else {
                return self.source.recv().await;
            };
            if self.source_done {
                // Released inputs are sent while counted held: none is missed.
                if gate.drained() {
                    return released.try_recv().ok();
                }
                return released.recv().await;
            }
            tokio::select! {
                biased;
                i = released.recv() => return i,
                i = self.source.recv() => match i {
                    Some(i) => return Some(i),
                    None => self.source_done = true,
                },
            }
        }
    }

    /// An input ready now, if any.
    fn ready(&mut self) -> Option<Input> {
        if let Some((_, released)) = &mut self.gated {
            if let Ok(i) = released.try_recv() {
                return Some(i);
            }
        }
        self.source.try_recv().ok()
    }
}

/// Adds the inputs to the stream, a batch at a time; returns the last position fed.
async fn feed(
    f: Arc<tokio::sync::Mutex<Feeder>>,
    mut inputs: Inputs,
    fed: Arc<std::sync::atomic::AtomicU64>,
    progress: Arc<tokio::sync::Notify>,
) -> Result<u64, String> {
    use std::sync::atomic::Ordering::SeqCst;
    let script = redis::Script::new(FEED);
    let (jobs, meta, held, name, conn, outage, server) = {
        let f = f.lock().await;
        (
            f.queue.key("jobs"),
            f.queue.meta_key(),
            f.queue.key("held"),
            f.queue.name.clone(),
            f.conn.clone(),
            f.outage,
            f.server.clone(),
        )
    };
    let mut batch: Vec<Input> = Vec::with_capacity(FEED_BATCH);
    loop {
        batch.clear();
        match inputs.next().await {
            Some(i) => batch.push(i),
            None => return Ok(fed.load(SeqCst)),
        }
        while batch.len() < FEED_BATCH {
            match inputs.ready() {
                Some(i) => batch.push(i),
                None => break,
            }
        }
        // Not too far ahead of the results.
        loop {
            let wait = progress.notified();
            let ended = f.lock().await.open.ended_count();
            if fed.load(SeqCst).saturating_sub(ended) < WINDOW {
                break;
            }
            wait.await;
        }
        let before = fed.load(SeqCst);
        let last = batch.iter().map(|i| i.0).fold(before, u64::max);
        // Open before the workers can see them: their results are then always this run's.
        f.lock().await.open.fed(batch.iter().map(|i| i.0));
        let now: u64 = flowline_redis::call(&outage, &server, || {
            let mut c = conn.clone();
            let mut inv = script.prepare_invoke();
            inv.key(&jobs).key(&meta).key(&held).arg(before);
            for (seq, args) in &batch {
                inv.arg(*seq).arg(args.len());
                for a in args {
                    inv.arg(a.as_slice());
                }
            }
            async move { inv.invoke_async(&mut c).await }
        })
        .await
        .map_err(|e| format!("queue `{name}`: adding inputs: {e}"))?;
        if now != last {
            return Err(format!(
                "queue `{name}`: another feeder is adding inputs to it ({now} fed, {last} expected); run one feeder per queue"
            ));
        }
        fed.store(last, SeqCst);
    }
}

/// Writes out results until every input fed has ended and the source is done (`fed`
/// holds the total then).
async fn collect(
    f: Arc<tokio::sync::Mutex<Feeder>>,
    fed: Arc<std::sync::atomic::AtomicU64>,
    source_done: &std::sync::atomic::AtomicBool,
    progress: Arc<tokio::sync::Notify>,
) -> Result<(), String> {
    let (results, dead, conn, outage, server, name) = {
        let f = f.lock().await;
        (
            f.queue.key("results"),
            f.queue.key("dead"),
            // A connection of its own: a blocking read holds its connection up, and the
            // inputs are added meanwhile.
            super::connect(&f.queue.server)?,
            f.outage,
            f.server.clone(),
            f.queue.name.clone(),
        )
    };
    let (mut after_r, mut after_d) = ("0".to_string(), "0".to_string());
    loop {
        let reply: Value = flowline_redis::call(&outage, &server, || {
            let mut c = conn.clone();
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_BATCH)
                .arg("BLOCK")
                .arg(200)
                .arg("STREAMS")
                .arg(&results)
                .arg(&dead)
                .arg(&after_r)
                .arg(&after_d);
            async move { cmd.query_async(&mut c).await }
        })
        .await
        .map_err(|e| format!("queue `{name}`: reading results: {e}"))?;
        let mut reads = Vec::new();
        let reply = entries(reply).map_err(|e| format!("queue `{name}`: reading results: {e}"))?;
        for (stream, id, fields) in reply {
            let from_dead = stream == dead;
            if from_dead {
                after_d = id.clone();
            } else {
                after_r = id.clone();
            }
            // A position past what may have been fed is no input of this run (Redis
            // content is outside input: it must not size the feeder's memory). A batch
            // being added may have results before its call returns, hence the margin.
            let most = fed.load(std::sync::atomic::Ordering::SeqCst) + FEED_BATCH as u64;
            let stderr = fields.get("errout").cloned().unwrap_or_default();
            match result_of(&fields, from_dead).filter(|(seq, _)| *seq <= most) {
                Some((seq, ended)) => reads.push(Read {
                    seq,
                    id: (id, from_dead),
                    ended,
                    stderr,
                }),
                // Not a result this feeder wrote out: removed with the next batch.
                None => reads.push(Read {
                    seq: 0,
                    id: (id, from_dead),
                    ended: Ended::Skipped,
                    stderr: Vec::new(),
                }),
            }
        }
        let mut g = f.lock().await;
        if !reads.is_empty() {
            g.take(reads).await?;
            progress.notify_waiters();
        }
        // Every input marked ended was fed: the count reaching the total is all of them.
        let done = source_done.load(std::sync::atomic::Ordering::SeqCst);
        if done && g.open.ended_count() >= fed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
    }
}

/// Marks the run finished (the workers exit) and lets its keys expire.
async fn finish(f: &Feeder) -> Result<(), String> {
    let mut keys = f.queue.keys(&["jobs", "results", "dead", "ended", "held"]);
    keys.push(f.queue.meta_key());
    let meta = f.queue.meta_key();
    f.call("marking the run finished", |mut c| {
        let mut p = redis::pipe();
        p.atomic().hset(&meta, "finished", 1).ignore();
        for k in &keys {
            // A minute for the workers to see `finished` and stop.
            p.expire(k, 60).ignore();
        }
        async move { p.query_async::<()>(&mut c).await }
    })
    .await
}

/// An entry of the results: its stream, its id and its fields.
type Entry = (String, String, HashMap<String, Vec<u8>>);

/// The entries of an `XREAD` reply: stream, id, fields. A reply is outside input: one that
/// does not parse is an error naming what was wrong; an entry whose fields cannot be read
/// has none (it is no result: it is removed with the next batch).
fn entries(reply: Value) -> Result<Vec<Entry>, flowline_redis::ReplyError> {
    let mut out = Vec::new();
    for (stream, list) in flowline_redis::parse_streams(reply)? {
        for e in list {
            out.push(match e {
                ReadEntry::Entry(e) => (
                    stream.clone(),
                    e.id().to_string(),
                    e.fields().iter().cloned().collect(),
                ),
                ReadEntry::Bad(id, _) => (stream.clone(), id, HashMap::new()),
            });
        }
    }
    Ok(out)
}

/// An input's arguments, as the fields `a0`, `a1`, ... hold them.
pub fn args_of(fields: &HashMap<String, Vec<u8>>) -> Vec<Vec<u8>> {
    (0..)
        .map_while(|i| fields.get(&format!("a{i}")).cloned())
        .collect()
}

/// The item of an input: one argument, or several.
pub fn item_of(seq: u64, mut args: Vec<Vec<u8>>) -> Item {
    if args.len() == 1 {
        Item::new(seq, args.swap_remove(0))
    } else {
        Item::with_args(seq, args)
    }
}

fn text(fields: &HashMap<String, Vec<u8>>, k: &str) -> String {
    fields
        .get(k)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn num<T: std::str::FromStr>(fields: &HashMap<String, Vec<u8>>, k: &str) -> Option<T> {
    text(fields, k).parse().ok()
}

/// How an input ended, from a result a worker wrote (or an entry the stream source moved
/// to the dead letters); `None` for an entry without a valid position.
fn result_of(fields: &HashMap<String, Vec<u8>>, from_dead: bool) -> Option<(u64, Ended)> {
    let seq: u64 = num(fields, "seq").filter(|&s| s > 0)?;
    let item = item_of(seq, args_of(fields));
    let failed = |stage: String, error: CallError, attempts: u32| {
        Ended::Failed(Box::new(Fail {
            item: item.clone(),
            step: 0,
            stage,
            error,
            attempts,
        }))
    };
    if from_dead {
        let error = CallError {
            message: format!(
                "the queue gave up on it ({}) after {} deliveries",
                text(fields, "flowline.reason"),
                text(fields, "flowline.deliveries")
            ),
            ..CallError::default()
        };
        return Some((seq, failed("queue".into(), error, 0)));
    }
    let out = fields.get("out").cloned().unwrap_or_default();
    let ended = match fields.get("k").map(Vec::as_slice) {
        Some(b"ok") => {
            let value = if fields.get("v").map(Vec::as_slice) == Some(b"one") {
                ItemValue::One(out)
            } else {
                ItemValue::Output(out)
            };
            Ended::Value(Item { value, ..item })
        }
        Some(b"skip") => Ended::Skipped,
        _ => {
            let error = CallError {
                message: text(fields, "err"),
                exit: num(fields, "exit"),
                signal: num(fields, "signal"),
                stderr: text(fields, "stderr"),
                retry_after: None,
                stdout: out,
            };
            failed(
                text(fields, "stage"),
                error,
                num(fields, "attempts").unwrap_or(1),
            )
        }
    };
    Some((seq, ended))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn fields(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    /// A long run holds only its open inputs: a million fed and ended in windows leave
    /// none held, however many there were.
    #[test]
    fn the_feeders_record_of_inputs_is_bounded_by_the_window() {
        let mut o = Open::default();
        let mut most = 0;
        for window in 0..100u64 {
            o.fed(window * 10_000 + 1..=(window + 1) * 10_000);
            most = most.max(o.open.len());
            for seq in window * 10_000 + 1..=(window + 1) * 10_000 {
                assert!(o.end(seq));
            }
        }
        assert_eq!(most, 10_000);
        assert!(o.open.is_empty());
        assert_eq!(o.ended_count(), 1_000_000);
        assert!(o.is_ended(1) && o.is_ended(1_000_000));
        // Hostile positions: never fed, never ended, never counted.
        for seq in [0, 1_000_001, u64::MAX] {
            assert!(!o.is_ended(seq) && !o.is_open(seq) && !o.end(seq));
        }
        assert!(!o.end(5), "ended twice");
        assert_eq!(o.ended_count(), 1_000_000);
    }

    /// With `key(..)` inputs are fed out of order: one skipped is held, neither open nor
    /// ended, until it is fed; fed twice, it counts once.
    #[test]
    fn inputs_held_for_their_key_are_neither_open_nor_ended() {
        let mut o = Open::default();
        o.fed([1, 4, 2]);
        assert_eq!(o.held.iter().copied().collect::<Vec<_>>(), [3]);
        assert!(o.is_open(4) && !o.is_open(3) && !o.is_ended(3));
        assert_eq!(o.ended_count(), 0);
        assert!(o.end(1) && o.end(2) && o.end(4));
        assert_eq!(o.ended_count(), 3, "3 is held, not ended");
        o.fed([3, 3, 1]);
        assert!(o.is_open(3) && !o.is_open(1) && o.held.is_empty());
        assert!(o.end(3));
        assert_eq!(o.ended_count(), 4);
        // A resumed record: held positions are not open; those past `fed` are no inputs.
        let o = Open::resumed(5, &[0b0100_0000], BTreeSet::from([3, 4, 9, 0])).unwrap();
        assert_eq!(o.open.iter().copied().collect::<Vec<_>>(), [2, 5]);
        assert_eq!(o.held.iter().copied().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(o.ended_count(), 1);
    }

    #[test]
    fn a_resumed_record_reads_the_bitmap_and_refuses_one_no_feeder_left() {
        // Inputs 1..=10 fed; 1, 2 and 9 ended (bit `seq` from the left).
        let bits = [0b0110_0000, 0b0100_0000];
        let o = Open::resumed(10, &bits, BTreeSet::new()).unwrap();
        assert_eq!(
            o.open.iter().copied().collect::<Vec<_>>(),
            [3, 4, 5, 6, 7, 8, 10]
        );
        assert_eq!(o.ended_count(), 3);
        assert!(Open::resumed(u64::MAX, &bits, BTreeSet::new()).is_none());
        assert!(Open::resumed(Open::MOST + 1, &[], BTreeSet::new()).is_none());
        assert!(Open::resumed(Open::MOST, &[], BTreeSet::new()).is_some());
        assert!(
            Open::resumed(0, &[0xff; 4], BTreeSet::new())
                .unwrap()
                .open
                .is_empty()
        );
    }

    #[test]
    fn replies_that_do_not_parse_are_errors_and_bad_entries_no_results() {
        assert!(entries(Value::Nil).unwrap().is_empty());
        let e = entries(Value::Int(3)).unwrap_err().to_string();
        assert!(e.contains("a list of streams was expected"), "{e}");
        let good = || {
            Value::Array(vec![
                Value::Array(vec![b("1-0"), Value::Array(vec![b("seq"), b("1")])]),
                Value::Array(vec![b("2-0")]),
                Value::Array(vec![b("3-0"), Value::Array(vec![b("odd")])]),
            ])
        };
        // An entry without an id, or a stream without entries, makes the reply an error.
        let mut no_id = good();
        if let Value::Array(list) = &mut no_id {
            list.push(Value::Int(7));
        }
        let e = entries(Value::Array(vec![Value::Array(vec![b("s"), no_id])]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("an entry without an id"), "{e}");
        let reply = Value::Array(vec![
            Value::Array(vec![b("s"), good()]),
            Value::Array(vec![b("only-a-name")]),
        ]);
        let e = entries(reply).unwrap_err().to_string();
        assert!(e.contains("a stream's name and entries"), "{e}");
        let got = entries(Value::Array(vec![Value::Array(vec![b("s"), good()])])).unwrap();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].2.get("seq").map(Vec::as_slice), Some(&b"1"[..]));
        // Entries whose fields cannot be read have none: no result of this run.
        assert!(got[1].2.is_empty() && got[2].2.is_empty());
        assert!(got.iter().all(|(s, ..)| s == "s"));
        assert!(result_of(&got[2].2, false).is_none());
    }

    #[test]
    fn results_without_a_valid_position_are_no_inputs() {
        for seq in [&b""[..], b"0", b"-1", b"x", b"99999999999999999999999"] {
            assert!(result_of(&fields(&[("seq", seq), ("k", b"ok")]), false).is_none());
        }
        assert!(result_of(&fields(&[("k", b"ok")]), false).is_none());
    }

    #[test]
    fn a_result_is_read_as_a_local_run_would_write_it() {
        let ok = fields(&[
            ("seq", b"4"),
            ("a0", b"x"),
            ("k", b"ok"),
            ("out", &[0xff, b'\n']),
        ]);
        let Some((4, Ended::Value(item))) = result_of(&ok, false) else {
            panic!("not a value")
        };
        assert!(matches!(&item.value, ItemValue::Output(o) if o == &[0xff, b'\n']));
        assert_eq!(item.inputs[0], b"x");
        let two = fields(&[("seq", b"5"), ("a0", b"p"), ("a1", b"q"), ("k", b"skip")]);
        assert!(matches!(result_of(&two, false), Some((5, Ended::Skipped))));
        let fail = fields(&[
            ("seq", b"6"),
            ("a0", b"y"),
            ("k", b"fail"),
            ("exit", b"3"),
            ("stderr", b"oops"),
            ("attempts", b"nonsense"),
        ]);
        let Some((6, Ended::Failed(f))) = result_of(&fail, false) else {
            panic!("not a failure")
        };
        assert_eq!(
            (f.error.exit, f.error.stderr.as_str(), f.attempts),
            (Some(3), "oops", 1)
        );
        let dead = fields(&[("seq", b"7"), ("flowline.reason", b"max_deliveries")]);
        let Some((7, Ended::Failed(f))) = result_of(&dead, true) else {
            panic!("not a failure")
        };
        assert!(
            f.error.message.contains("max_deliveries"),
            "{}",
            f.error.message
        );
    }
}
