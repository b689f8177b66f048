//! `--state FILE`: the run's idempotency store, a `flowline_sqlite::SqliteStore` keyed by
//! the input text (not its position), so that a rerun over a changed or reordered input
//! still skips exactly the inputs already done.
//!
//! flowline's `idempotent` stage does the bookkeeping: an input's key is reserved as it
//! enters, committed once it ended done (its output written, or dropped by a filter or a
//! dedup), marked failed when it failed (listed for `--retry-failed`), released when a stop
//! or a cancel left it unfinished. The stage's commit barrier gates every task: no job
//! starts while an input that ended is not committed, so after a SIGKILL at most the jobs
//! in flight run again. The holder is named, so that a rerun takes back the reservations a
//! killed run left.
//!
//! A locked file (a backup, another program) pauses the job under the run's outage policy:
//! said once on stderr, and again when progress is recorded again.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flowline::{Reservation, Store, StoreFuture};
use flowline_sqlite::SqliteStore;

/// The holder's name: a rerun (same name) takes back what a killed run held.
const HOLDER: &str = "flowline";
/// The keys' scope in the file.
const SCOPE: &str = "flowline-cli";
/// How long a call waits for another program's lock before the outage policy takes over
/// (and says so): short, so that a lock is reported instead of waited out silently.
const BUSY_WAIT: Duration = Duration::from_secs(1);
/// The start of a key that is not the input's text: the input's bytes in hex. A text input
/// starting with it is written so too, so that no two inputs share a key.
const HEX: &str = "\u{FFFD}hex:";

/// The state file, open for one run: the store, and the inputs that failed before.
pub struct State {
    pub store: StateStore,
    /// The inputs that failed and have not run since, in the order they failed.
    pub failed: Vec<Vec<u8>>,
}

impl State {
    /// Opens (or creates) the state file.
    pub fn open(path: &Path) -> Result<State, String> {
        let bad = |e: flowline::BoxError| {
            format!("--state {}: not a usable state file: {e}", path.display())
        };
        let store = SqliteStore::open(path)
            .and_then(|s| s.busy_timeout(BUSY_WAIT))
            .map_err(bad)?
            .scope(SCOPE)
            .holder(HOLDER);
        let failed = store
            .failed_keys()
            .map_err(bad)?
            .iter()
            .map(|k| input(k))
            .collect();
        Ok(State {
            store: StateStore {
                inner: store,
                what: Arc::from(format!("--state {}", path.display())),
                down: Arc::default(),
            },
            failed,
        })
    }
}

/// An input's key: its text when it is UTF-8, else its bytes in hex after a mark no text
/// key starts with.
pub fn key(input: &[u8]) -> String {
    match std::str::from_utf8(input) {
        Ok(text) if !text.starts_with(HEX) => text.to_string(),
        _ => {
            let mut k = String::with_capacity(HEX.len() + 2 * input.len());
            k.push_str(HEX);
            for b in input {
                // Two hex digits a byte, written in place (no string per byte).
                let _ = write!(k, "{b:02x}");
            }
            k
        }
    }
}

/// The key of an item standing for `inputs`: its input's key; for several (a batch), the
/// key of their text joined by newlines.
pub fn key_of(inputs: &[Vec<u8>]) -> String {
    match inputs {
        [one] => key(one),
        many => key(&many.join(&b'\n')),
    }
}

/// The input a key stands for.
pub fn input(key: &str) -> Vec<u8> {
    let hex = key.strip_prefix(HEX).filter(|h| h.len() % 2 == 0);
    let bytes = hex.and_then(|h| {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
    });
    bytes.unwrap_or_else(|| key.as_bytes().to_vec())
}

/// The SQLite store, saying on stderr when the file cannot be written (locked) and when it
/// can again: the job pauses meanwhile, under the run's outage policy.
#[derive(Clone)]
pub struct StateStore {
    inner: SqliteStore,
    what: Arc<str>,
    down: Arc<AtomicBool>,
}

impl StateStore {
    /// `--state FILE`, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    fn said<'a, T: Send + 'a>(&'a self, call: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
        Box::pin(async move {
            let r = call.await;
            match &r {
                Ok(_) if self.down.swap(false, Ordering::Relaxed) => {
                    eprintln!("flowline: {}: progress recorded again", self.what);
                }
                Err(e) if !self.down.swap(true, Ordering::Relaxed) => eprintln!(
                    "flowline: {}: cannot record progress ({e}); the jobs that ended wait and nothing new starts until it can",
                    self.what
                ),
                _ => {}
            }
            r
        })
    }
}

impl Store for StateStore {
    fn reserve<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<Reservation>> {
        self.said(self.inner.reserve(keys, ttl))
    }
    fn commit<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.said(self.inner.commit(keys))
    }
    fn release<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.said(self.inner.release(keys))
    }
    fn fail<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        self.said(self.inner.fail(keys))
    }
    fn renew<'a>(&'a self, keys: &'a [String], ttl: Duration) -> StoreFuture<'a, Vec<bool>> {
        self.said(self.inner.renew(keys, ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_text_or_the_bytes_in_hex_and_never_collide() {
        let inputs: Vec<Vec<u8>> = vec![
            b"plain".to_vec(),
            b"".to_vec(),
            "caf\u{e9} \u{2603}".as_bytes().to_vec(),
            vec![0xff, 0xfe, b'a'],
            vec![b'a', 0x80],
            // A text input that looks like a hex key, and the bytes it would stand for.
            format!("{HEX}ff").into_bytes(),
            vec![0xff],
            HEX.as_bytes().to_vec(),
            format!("{HEX}zz").into_bytes(),
        ];
        let keys: Vec<String> = inputs.iter().map(|i| key(i)).collect();
        assert_eq!(keys[0], "plain");
        assert_eq!(keys[3], format!("{HEX}fffe61"));
        for (i, k) in inputs.iter().zip(&keys) {
            assert_eq!(&input(k), i, "{k:?}");
        }
        let distinct: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_named_with_the_option() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notes.txt");
        std::fs::write(
            &path,
            "not sqlite at all, but long enough to have a header ....",
        )
        .unwrap();
        let Err(e) = State::open(&path) else {
            panic!("opened")
        };
        assert!(
            e.starts_with(&format!(
                "--state {}: not a usable state file",
                path.display()
            )),
            "{e}"
        );
    }
}
