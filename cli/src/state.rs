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

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
}

fn open(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path)
        .map_err(|e| format!("--state {}: cannot open: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))
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
        let conn = open(path)?;
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
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("flowline-state".into())
            .spawn(move || write_loop(conn, rx))
            .map_err(|e| format!("cannot start the state writer: {e}"))?;
        Ok((
            State {
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
            },
            done,
            failed,
        ))
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

    /// Marks inputs done; the future ends when they are committed (at once when the state
    /// cannot be written any more: the run goes on, it was told why).
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

fn write_loop(mut conn: Connection, rx: mpsc::Receiver<Msg>) {
    let mut pending: Vec<(Vec<u8>, i64, String)> = Vec::new();
    let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
    let mut acks: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut last = Instant::now();
    loop {
        let mut msg = rx.recv_timeout(Duration::from_millis(100));
        let mut closed = false;
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
            if closed || pending.len() >= 4096 {
                break;
            }
            msg = match rx.try_recv() {
                Ok(m) => Ok(m),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => Err(mpsc::RecvTimeoutError::Disconnected),
            };
        }
        let due = last.elapsed() >= Duration::from_millis(100) || pending.len() >= 4096;
        if (due || closed || !waiting.is_empty() || !acks.is_empty()) && !pending.is_empty() {
            if let Err(e) = commit(&mut conn, &pending) {
                eprintln!("flowline: --state: cannot record progress: {e}");
            }
            pending.clear();
            last = Instant::now();
        }
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
        for a in acks.drain(..) {
            let _ = a.send(());
        }
        if closed {
            return;
        }
    }
}

fn commit(conn: &mut Connection, rows: &[(Vec<u8>, i64, String)]) -> rusqlite::Result<()> {
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
