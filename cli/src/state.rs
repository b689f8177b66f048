//! `--state FILE`: which inputs are done and which failed, in SQLite, keyed by the input
//! text (not its position), so that a rerun over a changed or reordered input still skips
//! exactly the inputs already done.
//!
//! An input is written `done` only after its output was written (the sinks write
//! unbuffered). One thread commits, in group commits: a job that ends the chain waits,
//! holding its worker slot, until its input is committed ([`State::done_durably`]), so
//! that no new job starts in that slot before it; after a SIGKILL at most the jobs in
//! flight run again. Other marks (inputs a filter dropped, failures, outputs that went
//! through more steps) are committed within 100 ms. The file is in WAL mode with
//! `synchronous = NORMAL`: a commit survives a crash of `flowline`, not a power loss.
//!
//! A commit that fails because the file is locked (by a backup, another program) is kept and tried again after a growing wait, under flowline's default
//! [`Outage`] policy: the jobs that ended meanwhile wait in their slots,
//! so nothing new starts and nothing is answered done before it is written. A lock is what
//! passes (`flowline_sqlite::classify`); when the file stays locked past the policy's limit,
//! or the error cannot pass (not a database, read-only, a full disk), the writer gives up: [`State::failure`] says why and the run stops.

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flowline::Outage;
use rusqlite::{Connection, params};

const DONE: i64 = 1;
const FAILED: i64 = 2;

enum Msg {
    Mark(Vec<Vec<u8>>, i64, String),
    /// Marks done and says so once committed.
    MarkNow(Vec<Vec<u8>>, tokio::sync::oneshot::Sender<()>),
    Flush(mpsc::Sender<()>),
}

/// An opened state file, the inputs done so far, and those failed (in the order they
/// first failed).
pub type Opened = (State, HashSet<Vec<u8>>, Vec<Vec<u8>>);

/// The state file, open for one run.
pub struct State {
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    failure: Arc<Mutex<Option<String>>>,
}

fn open(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path)
        .map_err(|e| format!("--state {}: cannot open: {e}", path.display()))?;
    // A lock held longer than this fails the commit, which is then tried again under the
    // outage policy (and said on stderr), instead of blocking silently.
    conn.busy_timeout(Duration::from_secs(1))
        .and_then(|_| {
            conn.execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 CREATE TABLE IF NOT EXISTS flowline_cli_jobs (
                     input      TEXT    NOT NULL PRIMARY KEY,
                     status     INTEGER NOT NULL,   -- 1 done, 2 failed
                     error      TEXT    NOT NULL,
                     updated_ms INTEGER NOT NULL
                 );",
            )
        })
        .map_err(|e| format!("--state {}: not a usable state file: {e}", path.display()))?;
    Ok(conn)
}

impl State {
    /// Opens (or creates) the state file; returns it with the inputs done and the inputs
    /// failed so far (the failed ones in the order they were first recorded).
    pub fn open(path: &Path) -> Result<Opened, String> {
        let mut conn = open(path)?;
        let read = |status: i64| -> Result<Vec<Vec<u8>>, String> {
            let mut st = conn
                .prepare("SELECT input FROM flowline_cli_jobs WHERE status = ?1 ORDER BY rowid")
                .map_err(|e| e.to_string())?;
            let rows = st
                .query_map([status], |r| {
                    r.get::<_, rusqlite::types::Value>(0).map(key_bytes)
                })
                .map_err(|e| e.to_string())?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--state {}: {e}", path.display()))
        };
        let done: HashSet<Vec<u8>> = read(DONE)?.into_iter().collect();
        let failed = read(FAILED)?;
        let what = format!("--state {}", path.display());
        let state = State::start(Outage::default(), what, move |rows| commit(&mut conn, rows))?;
        Ok((state, done, failed))
    }

    /// Starts the writer thread over `commit`, which writes one group of marks in one
    /// transaction; failures are tried again under `outage`.
    fn start(
        outage: Outage,
        what: String,
        commit: impl FnMut(&[Row]) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<State, String> {
        let (tx, rx) = mpsc::channel();
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let writer = {
            let failure = failure.clone();
            std::thread::Builder::new()
                .name("flowline-state".into())
                .spawn(move || write_loop(commit, rx, outage, &what, &failure))
                .map_err(|e| format!("cannot start the state writer: {e}"))?
        };
        Ok(State {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            failure,
        })
    }

    /// Why the state file could not be written, once the writer gave up: the run must stop
    /// (what ended after this is not recorded).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|g| g.clone())
    }

    fn send(&self, m: Msg) {
        if let Ok(g) = self.tx.lock() {
            if let Some(tx) = g.as_ref() {
                let _ = tx.send(m);
            }
        }
    }

    /// Marks inputs done.
    pub fn done(&self, inputs: &[Vec<u8>]) {
        self.send(Msg::Mark(inputs.to_vec(), DONE, String::new()));
    }

    /// Marks inputs done; the future ends when they are committed, or when the writer gave
    /// up ([`failure`](State::failure) then says why).
    pub fn done_durably(&self, inputs: &[Vec<u8>]) -> impl std::future::Future<Output = ()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Msg::MarkNow(inputs.to_vec(), tx));
        async move {
            let _ = rx.await;
        }
    }

    /// Marks inputs failed, with why.
    pub fn failed(&self, inputs: &[Vec<u8>], error: &str) {
        self.send(Msg::Mark(inputs.to_vec(), FAILED, error.to_string()));
    }

    /// Waits until everything sent so far is committed.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Flush(tx));
        let _ = rx.recv_timeout(Duration::from_secs(30));
    }

    /// Commits what is left and closes the file.
    pub fn close(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One mark: the input, its status, why it failed.
type Row = (Vec<u8>, i64, String);

fn write_loop(
    mut commit: impl FnMut(&[Row]) -> rusqlite::Result<()>,
    rx: mpsc::Receiver<Msg>,
    outage: Outage,
    what: &str,
    failure: &Mutex<Option<String>>,
) {
    let mut pending: Vec<Row> = Vec::new();
    let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
    let mut acks: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut last = Instant::now();
    let mut watch = outage.watch(what.to_string());
    // After a failed commit: when to try again.
    let mut retry_at: Option<Instant> = None;
    let mut gave_up = false;
    let mut closed = false;
    loop {
        let wait = retry_at.map_or(Duration::from_millis(100), |at| {
            at.saturating_duration_since(Instant::now())
        });
        let mut msg = if closed {
            // Only the retry of what is left: nothing more can come.
            std::thread::sleep(wait);
            Err(mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(wait)
        };
        // Everything already queued joins this commit: one transaction for every job that
        // ended meanwhile.
        loop {
            match msg {
                Ok(Msg::Mark(inputs, status, error)) => {
                    pending.extend(inputs.into_iter().map(|i| (i, status, error.clone())));
                }
                Ok(Msg::MarkNow(inputs, ack)) => {
                    pending.extend(inputs.into_iter().map(|i| (i, DONE, String::new())));
                    acks.push(ack);
                }
                Ok(Msg::Flush(tx)) => waiting.push(tx),
                Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if closed || (pending.len() >= 4096 && retry_at.is_none()) {
                break;
            }
            msg = match rx.try_recv() {
                Ok(m) => Ok(m),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => Err(mpsc::RecvTimeoutError::Disconnected),
            };
        }
        if gave_up {
            // Nothing is written any more; whoever waits is let go (the run is stopping).
            pending.clear();
        }
        let due = match retry_at {
            Some(at) => Instant::now() >= at,
            None => {
                last.elapsed() >= Duration::from_millis(100)
                    || pending.len() >= 4096
                    || closed
                    || !waiting.is_empty()
                    || !acks.is_empty()
            }
        };
        if due && !pending.is_empty() {
            match commit(&pending) {
                Ok(()) => {
                    if watch.succeeded().is_some() {
                        eprintln!("flowline: {what}: progress recorded again");
                    }
                    pending.clear();
                    retry_at = None;
                    last = Instant::now();
                }
                Err(e) => {
                    let first = !watch.is_down();
                    let text = e.to_string();
                    match watch.failed(flowline_sqlite::classify(e)) {
                        Ok(wait) => {
                            if first {
                                eprintln!(
                                    "flowline: {what}: cannot record progress ({text}); the jobs that ended wait and nothing new starts until it can"
                                );
                            }
                            retry_at = Some(Instant::now() + wait);
                        }
                        Err(fatal) => {
                            let why = format!("{what}: cannot record progress: {fatal}");
                            eprintln!("flowline: {why}; stopping");
                            if let Ok(mut g) = failure.lock() {
                                *g = Some(why);
                            }
                            gave_up = true;
                            pending.clear();
                            retry_at = None;
                        }
                    }
                }
            }
        }
        if pending.is_empty() {
            for w in waiting.drain(..) {
                let _ = w.send(());
            }
            for a in acks.drain(..) {
                let _ = a.send(());
            }
        }
        if closed && (pending.is_empty() || gave_up) {
            return;
        }
    }
}

fn commit(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        // A done input stays done: a later failure of the same text (a duplicate input)
        // does not undo it.
        let mut st = tx.prepare_cached(
            "INSERT INTO flowline_cli_jobs (input, status, error, updated_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(input) DO UPDATE SET status = excluded.status, error = excluded.error, updated_ms = excluded.updated_ms
             WHERE flowline_cli_jobs.status != 1 OR excluded.status = 1",
        )?;
        let now = now_ms();
        for (input, status, error) in rows {
            st.execute(params![key_value(input), status, error, now])?;
        }
    }
    tx.commit()
}

/// An input as its key: text when it is UTF-8 (readable with `sqlite3`), else a blob.
fn key_value(input: &[u8]) -> rusqlite::types::Value {
    match std::str::from_utf8(input) {
        Ok(t) => rusqlite::types::Value::Text(t.to_string()),
        Err(_) => rusqlite::types::Value::Blob(input.to_vec()),
    }
}

fn key_bytes(v: rusqlite::types::Value) -> Vec<u8> {
    use rusqlite::types::Value as V;
    match v {
        V::Text(t) => t.into_bytes(),
        V::Blob(b) => b,
        V::Integer(i) => i.to_string().into_bytes(),
        V::Real(r) => r.to_string().into_bytes(),
        V::Null => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn busy() -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        )
    }

    fn quick() -> Outage {
        Outage::default().backoff(Duration::from_millis(1), Duration::from_millis(5))
    }

    /// A writer over a commit that fails `fails` times, then records what it was given.
    fn writer(outage: Outage, fails: usize) -> (State, Arc<AtomicUsize>, Arc<Mutex<Vec<Row>>>) {
        let tries = Arc::new(AtomicUsize::new(0));
        let written: Arc<Mutex<Vec<Row>>> = Arc::default();
        let (t, w) = (tries.clone(), written.clone());
        let state = State::start(outage, "--state test.db".into(), move |rows| {
            if t.fetch_add(1, Ordering::SeqCst) < fails {
                return Err(busy());
            }
            w.lock().unwrap().extend_from_slice(rows);
            Ok(())
        })
        .unwrap();
        (state, tries, written)
    }

    #[test]
    fn a_done_mark_is_answered_only_after_a_commit_that_succeeded() {
        let (state, tries, written) = writer(quick(), 3);
        block_on(state.done_durably(&[b"a".to_vec()]));
        // Answered: so the commit that wrote it had succeeded, after the three failures.
        assert_eq!(tries.load(Ordering::SeqCst), 4);
        assert_eq!(written.lock().unwrap().len(), 1);
        assert_eq!(written.lock().unwrap()[0].0, b"a");
        assert_eq!(state.failure(), None);
        state.close();
    }

    #[test]
    fn marks_made_while_the_file_is_locked_are_all_written_once_it_is_free() {
        let (state, _, written) = writer(quick(), 5);
        state.failed(&[b"x".to_vec()], "exit 1");
        state.done(&[b"y".to_vec(), b"z".to_vec()]);
        state.close();
        let mut got: Vec<Vec<u8>> = written
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect();
        got.sort();
        assert_eq!(got, [b"x".to_vec(), b"y".to_vec(), b"z".to_vec()]);
        assert_eq!(state.failure(), None);
    }

    #[test]
    fn a_file_locked_past_the_limit_stops_the_run_with_its_name() {
        let outage = Outage::keep_trying_for(Duration::from_millis(50))
            .backoff(Duration::from_millis(1), Duration::from_millis(5));
        let (state, tries, written) = writer(outage, usize::MAX);
        let t = Instant::now();
        block_on(state.done_durably(&[b"a".to_vec()]));
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
        assert!(tries.load(Ordering::SeqCst) > 1);
        assert!(written.lock().unwrap().is_empty());
        let why = state.failure().expect("the writer gave up");
        assert!(
            why.contains("--state test.db") && why.contains("locked"),
            "{why}"
        );
        // Later marks are not waited for: the run is stopping.
        block_on(state.done_durably(&[b"b".to_vec()]));
        state.close();
    }

    #[test]
    fn a_file_that_is_not_a_database_gives_up_at_once() {
        let tries = Arc::new(AtomicUsize::new(0));
        let t = tries.clone();
        let state = State::start(quick(), "--state x".into(), move |_| {
            t.fetch_add(1, Ordering::SeqCst);
            Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
                None,
            ))
        })
        .unwrap();
        block_on(state.done_durably(&[b"a".to_vec()]));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        assert!(state.failure().is_some());
        state.close();
    }
}
