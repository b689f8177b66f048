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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flowline::Outage;
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::{Queue, bytes_of, call};
use crate::exec::{CallError, Fail, Item, Value as ItemValue};
use crate::run::{DeadFile, Emit, Outcome, Settings};
use crate::spec::Plan;

/// Inputs fed and not yet ended, at most: the feeder waits for results past it, so that an
/// endless source does not fill Redis.
const WINDOW: u64 = 10_000;
/// Inputs added per script call.
const FEED_BATCH: usize = 500;
/// Results read per call.
const READ_BATCH: usize = 500;

/// Adds a batch of inputs and records the last one fed, only if `fed` is still what the
/// caller saw (so a retry after a lost reply adds nothing twice). KEYS: jobs, meta.
/// ARGV: fed before, then per input: its position, its number of arguments, the
/// arguments. Returns `fed` after the call.
const FEED: &str = r"
local fed = tonumber(redis.call('HGET', KEYS[2], 'fed') or '0')
if fed ~= tonumber(ARGV[1]) then return fed end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local e = {'seq', ARGV[i]}
  for j = 1, n do
    e[#e + 1] = 'a' .. (j - 1)
    e[#e + 1] = ARGV[i + 1 + j]
  end
  redis.call('XADD', KEYS[1], '*', unpack(e))
  fed = tonumber(ARGV[i])
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
}

/// The inputs fed and not yet ended, and how far feeding has gone: what the feeder needs
/// to know which results are new. Only the open inputs are held (at most the window
/// and a batch), however long the run, instead of a mark per input ever fed.
#[derive(Debug, Default)]
struct Open {
    open: std::collections::BTreeSet<u64>,
    /// The last input fed (positions start at 1).
    last: u64,
}

impl Open {
    /// The most inputs a feeder leaves open: the window, a batch being added and a batch
    /// over it.
    const MOST: u64 = WINDOW + 2 * FEED_BATCH as u64;

    /// The inputs of a resumed run: `fed` were fed, and `bits` (Redis's bitmap, bit `seq`
    /// set for an input ended) tells which ended. `None` when more would be open than a
    /// feeder leaves (a record that is not a feeder's).
    fn resumed(fed: u64, bits: &[u8]) -> Option<Open> {
        let bit = |seq: u64| {
            let byte = usize::try_from(seq / 8).ok().and_then(|i| bits.get(i));
            byte.is_some_and(|b| b & (0x80 >> (seq % 8)) != 0)
        };
        // Bits past what the bitmap holds are open: count before collecting.
        let held = u64::try_from(bits.len())
            .unwrap_or(u64::MAX)
            .saturating_mul(8);
        if fed.saturating_sub(held) > Self::MOST {
            return None;
        }
        let mut open = std::collections::BTreeSet::new();
        for seq in 1..=fed {
            if !bit(seq) {
                if open.len() as u64 >= Self::MOST {
                    return None;
                }
                open.insert(seq);
            }
        }
        Some(Open { open, last: fed })
    }

    /// Inputs up to `last` are fed (open until they end).
    fn fed(&mut self, last: u64) {
        while self.last < last {
            self.last += 1;
            self.open.insert(self.last);
        }
    }

    /// Whether `seq` was fed and has not ended.
    fn is_open(&self, seq: u64) -> bool {
        self.open.contains(&seq)
    }

    /// Whether `seq` was fed and has ended.
    fn is_ended(&self, seq: u64) -> bool {
        (1..=self.last).contains(&seq) && !self.is_open(seq)
    }

    /// `seq` has ended; true the first time.
    fn end(&mut self, seq: u64) -> bool {
        self.open.remove(&seq)
    }

    /// How many inputs fed have ended.
    fn ended_count(&self) -> u64 {
        self.last - self.open.len() as u64
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
        call(&self.outage, &self.server, &self.conn, op)
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
            } else if self.keep_order {
                // Removed from Redis once written out, not before.
                self.waiting.insert(r.seq, r);
            } else {
                self.end(r, &mut marks, &mut ids);
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

/// What the source hands to the feeding loop: an input's position and arguments.
type Input = (u64, Vec<Vec<u8>>);

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
        outage: Outage::default(),
        server,
        conn,
        queue,
    };
    let fed_before = start(&mut f, settings.quiet).await?;

    // The source on a task of its own, so that a slow input does not hold up the results.
    let (reader, _) = crate::input::open_source(&plan.source, false, settings.delim).await?;
    let (tx, rx) = mpsc::channel::<Input>(FEED_BATCH * 2);
    let colsep = settings.colsep.clone();
    let source = tokio::spawn(async move {
        let mut reader = reader;
        let mut seq = 0u64;
        loop {
            match reader.next_args(colsep.as_ref()).await {
                Ok(Some(args)) => {
                    seq += 1;
                    if seq > fed_before && tx.send((seq, args)).await.is_err() {
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
            let last = feed(f.clone(), rx, fed.clone(), progress.clone()).await?;
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
    let ended_key = f.queue.key("ended");
    let bits: Vec<u8> = f
        .call("reading the inputs ended", |mut c| {
            let k = ended_key.clone();
            async move { redis::cmd("GET").arg(&k).query_async(&mut c).await }
        })
        .await?;
    f.failures = num("failed");
    let fed = num("fed");
    f.open = Open::resumed(fed, &bits).ok_or_else(|| {
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

/// Adds the source's inputs to the stream, a batch at a time; returns the last position
/// fed.
async fn feed(
    f: Arc<tokio::sync::Mutex<Feeder>>,
    mut rx: mpsc::Receiver<Input>,
    fed: Arc<std::sync::atomic::AtomicU64>,
    progress: Arc<tokio::sync::Notify>,
) -> Result<u64, String> {
    use std::sync::atomic::Ordering::SeqCst;
    let script = redis::Script::new(FEED);
    let (jobs, meta, name, conn, outage, server) = {
        let f = f.lock().await;
        (
            f.queue.key("jobs"),
            f.queue.meta_key(),
            f.queue.name.clone(),
            f.conn.clone(),
            f.outage,
            f.server.clone(),
        )
    };
    let mut batch: Vec<Input> = Vec::with_capacity(FEED_BATCH);
    loop {
        batch.clear();
        match rx.recv().await {
            Some(i) => batch.push(i),
            None => return Ok(fed.load(SeqCst)),
        }
        while batch.len() < FEED_BATCH {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
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
        let last = batch.last().map_or(before, |i| i.0);
        // Open before the workers can see them: their results are then always this run's.
        f.lock().await.open.fed(last);
        let now: u64 = call(&outage, &server, &conn, |mut c| {
            let mut inv = script.prepare_invoke();
            inv.key(&jobs).key(&meta).arg(before);
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
        let reply: Value = call(&outage, &server, &conn, |mut c| {
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
        for (stream, id, fields) in entries(reply) {
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
    let mut keys = f.queue.keys(&["jobs", "results", "dead", "ended"]);
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

/// The entries of an `XREAD` reply: stream, id, fields. A reply is outside input: what
/// does not parse is left out.
fn entries(reply: Value) -> Vec<(String, String, HashMap<String, Vec<u8>>)> {
    let mut out = Vec::new();
    let streams: Vec<(Value, Value)> = match reply {
        Value::Array(a) => a
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let list = pair.pop()?;
                    Some((pair.pop()?, list))
                }
                _ => None,
            })
            .collect(),
        Value::Map(m) => m,
        _ => return out,
    };
    for (name, list) in streams {
        let Some(name) = bytes_of(&name).map(|b| String::from_utf8_lossy(&b).into_owned()) else {
            continue;
        };
        let Value::Array(list) = list else { continue };
        for e in list {
            let Value::Array(mut pair) = e else { continue };
            if pair.len() != 2 {
                continue;
            }
            let fields = pair.pop();
            let Some(id) = pair
                .pop()
                .as_ref()
                .and_then(bytes_of)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
            else {
                continue;
            };
            let mut map = HashMap::new();
            let flat: Vec<Value> = match fields {
                Some(Value::Array(a)) => a,
                Some(Value::Map(m)) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => Vec::new(),
            };
            for kv in flat.chunks(2) {
                if let [k, v] = kv {
                    if let (Some(k), Some(v)) = (bytes_of(k), bytes_of(v)) {
                        map.insert(String::from_utf8_lossy(&k).into_owned(), v);
                    }
                }
            }
            out.push((name.clone(), id, map));
        }
    }
    out
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
            o.fed((window + 1) * 10_000);
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

    #[test]
    fn a_resumed_record_reads_the_bitmap_and_refuses_one_no_feeder_left() {
        // Inputs 1..=10 fed; 1, 2 and 9 ended (bit `seq` from the left).
        let bits = [0b0110_0000, 0b0100_0000];
        let o = Open::resumed(10, &bits).unwrap();
        assert_eq!(
            o.open.iter().copied().collect::<Vec<_>>(),
            [3, 4, 5, 6, 7, 8, 10]
        );
        assert_eq!(o.ended_count(), 3);
        assert!(Open::resumed(u64::MAX, &bits).is_none());
        assert!(Open::resumed(Open::MOST + 1, &[]).is_none());
        assert!(Open::resumed(Open::MOST, &[]).is_some());
        assert!(Open::resumed(0, &[0xff; 4]).unwrap().open.is_empty());
    }

    #[test]
    fn replies_that_do_not_parse_are_left_out_not_a_panic() {
        assert!(entries(Value::Nil).is_empty());
        assert!(entries(Value::Int(3)).is_empty());
        let reply = Value::Array(vec![
            Value::Array(vec![
                b("s"),
                Value::Array(vec![
                    Value::Array(vec![b("1-0"), Value::Array(vec![b("seq"), b("1")])]),
                    Value::Array(vec![b("2-0")]),
                    Value::Int(7),
                    Value::Array(vec![b("3-0"), Value::Array(vec![b("odd")])]),
                ]),
            ]),
            Value::Array(vec![b("only-a-name")]),
        ]);
        let got = entries(reply);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].2.get("seq").map(Vec::as_slice), Some(&b"1"[..]));
        assert!(got[1].2.is_empty());
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
