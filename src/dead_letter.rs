//! Dead letters: where failed items go. They are never dropped.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::error::Error;
use crate::failure::Failure;
use crate::report::Report;

type Callback = Arc<dyn Fn(&Failure) + Send + Sync>;

/// Extra fields of a JSON-lines dead letter, computed from the failure.
#[cfg(feature = "jsonl")]
type Fields = Arc<dyn Fn(&Failure) -> serde_json::Map<String, serde_json::Value> + Send + Sync>;

#[derive(Clone)]
enum Target {
    Report,
    Callback(Callback),
    Channel(mpsc::Sender<Failure>),
    #[cfg(feature = "jsonl")]
    Jsonl(std::path::PathBuf, Option<Fields>),
}

/// Where a run sends its failed items. Whatever the target, every failure is also counted in
/// the [`Report`] (with a sample of the first ones) and logged with `tracing` at `warn`, summed
/// per stage: one line per stage every 5 s at most, with the count by reason and a sample.
///
/// ```
/// use flowline::prelude::*;
/// use std::sync::{Arc, Mutex};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let failed = Arc::new(Mutex::new(Vec::new()));
/// let seen = failed.clone();
/// let report = Pipeline::from_iter(1..=5u32)
///     .try_map_async("check", |x| async move {
///         if x == 3 { Err(format!("{x} is unlucky")) } else { Ok(x) }
///     })
///     .keep_input()
///     .run()
///     .dead_letter(DeadLetter::callback(move |f| seen.lock().unwrap().push(f.to_string())))
///     .await
///     .unwrap();
/// assert_eq!(report.failures, 1);
/// assert_eq!(
///     failed.lock().unwrap()[0],
///     "stage `check` failed after 1 attempt(s): 3 is unlucky (input: 3)"
/// );
/// # }
/// ```
#[derive(Clone)]
pub struct DeadLetter {
    target: Target,
}

impl Default for DeadLetter {
    fn default() -> Self {
        DeadLetter::report()
    }
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.target {
            Target::Report => "report",
            Target::Callback(_) => "callback",
            Target::Channel(_) => "channel",
            #[cfg(feature = "jsonl")]
            Target::Jsonl(..) => "jsonl",
        };
        write!(f, "DeadLetter({name})")
    }
}

impl DeadLetter {
    /// The default: failures are counted in the report, a sample is kept there, and each is
    /// logged.
    pub fn report() -> Self {
        DeadLetter {
            target: Target::Report,
        }
    }

    /// Calls `f` with every failure, synchronously, on the task where the item failed.
    pub fn callback(f: impl Fn(&Failure) + Send + Sync + 'static) -> Self {
        DeadLetter {
            target: Target::Callback(Arc::new(f)),
        }
    }

    /// Sends every failure into a channel. Failures are queued in front of the channel
    /// (so a slow reader costs memory, not throughput); the run returns only after every
    /// failure was sent, or the receiver was dropped.
    pub fn channel(tx: mpsc::Sender<Failure>) -> Self {
        DeadLetter {
            target: Target::Channel(tx),
        }
    }

    /// Appends every failure to a JSON-lines file (created if missing): one object per line
    /// with `stage`, `error`, `kind` (why it failed: the word of
    /// [`ItemError::kind`](crate::ItemError::kind), which the report counts by in
    /// `failed_by` and its JSON calls `reason`), `attempts`, `input`, `input_format` and
    /// `at_ms` (Unix time). Writes are buffered and flushed when the run ends.
    ///
    /// `input` is what the stage kept of the item: with
    /// [`keep_input_json`](crate::AsyncStage::keep_input_json) the item itself as JSON
    /// (`"input_format": "json"`), which [`Pipeline::from_dead_letters`](crate::Pipeline::from_dead_letters)
    /// reads back to run the failures again; with [`keep_input`](crate::AsyncStage::keep_input)
    /// its `Debug` text, for a person to read (`"input_format": "debug"`); else `null`.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let path = std::env::temp_dir().join(format!("flowline-doc-{}.jsonl", std::process::id()));
    /// # let _ = std::fs::remove_file(&path);
    /// Pipeline::from_iter([1u32, 2, 3])
    ///     .try_map_async("odd", |x| async move { if x % 2 == 1 { Ok(x) } else { Err("even") } })
    ///     .keep_input_json()
    ///     .run()
    ///     .dead_letter(DeadLetter::jsonl(&path))
    ///     .await.unwrap();
    /// let line = std::fs::read_to_string(&path).unwrap();
    /// assert!(line.contains(r#""input":2,"input_format":"json""#), "{line}");
    /// # std::fs::remove_file(&path).unwrap();
    /// # }
    /// ```
    #[cfg(feature = "jsonl")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
    pub fn jsonl(path: impl Into<std::path::PathBuf>) -> Self {
        DeadLetter {
            target: Target::Jsonl(path.into(), None),
        }
    }

    /// With [`jsonl`](Self::jsonl): fields `f` computes from each failure are added to its
    /// line (what the error type knows beyond its message, say: an exit code, a status, the
    /// input as the user reads it). A field named like one of the standard ones replaces it.
    /// Other targets have no lines, and ignore it.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let path = std::env::temp_dir().join(format!("flowline-doc-f-{}.jsonl", std::process::id()));
    /// # let _ = std::fs::remove_file(&path);
    /// Pipeline::from_iter([1u32, 2])
    ///     .try_map_async("odd", |x| async move { if x % 2 == 1 { Ok(x) } else { Err("even") } })
    ///     .run()
    ///     .dead_letter(DeadLetter::jsonl(&path).with_fields(|f| {
    ///         let mut m = serde_json::Map::new();
    ///         m.insert("code".into(), 42.into());
    ///         m.insert("error".into(), format!("{}!", f.error).into());
    ///         m
    ///     }))
    ///     .await.unwrap();
    /// let line = std::fs::read_to_string(&path).unwrap();
    /// assert!(line.contains(r#""code":42"#) && line.contains(r#""error":"even!""#), "{line}");
    /// # std::fs::remove_file(&path).unwrap();
    /// # }
    /// ```
    #[cfg(feature = "jsonl")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
    pub fn with_fields(
        mut self,
        f: impl Fn(&Failure) -> serde_json::Map<String, serde_json::Value> + Send + Sync + 'static,
    ) -> Self {
        if let Target::Jsonl(_, fields) = &mut self.target {
            *fields = Some(Arc::new(f));
        }
        self
    }
}

/// The line of a failure in a JSON-lines dead-letter file: `stage`, `error`, `kind`,
/// `attempts`, `input`, `input_format`, `at_ms`, then `extra` (which replaces a standard
/// field of the same name).
#[cfg(feature = "jsonl")]
fn jsonl_line(
    failure: &Failure,
    extra: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (input, format) = match &failure.input {
        None => (serde_json::Value::Null, serde_json::Value::Null),
        Some(i) => match i.to_json() {
            Some(Ok(json)) => (json, "json".into()),
            _ => (i.debug().into(), "debug".into()),
        },
    };
    let mut line = serde_json::json!({
        "stage": &*failure.stage,
        "error": failure.error.to_string(),
        "kind": failure.error.kind(),
        "attempts": failure.attempts,
        "input": input,
        "input_format": format,
        "at_ms": at_ms,
    });
    if let Some(o) = line.as_object_mut() {
        o.extend(extra);
    }
    line
}

/// Opens a JSON-lines dead-letter file to append to, created if missing.
#[cfg(feature = "jsonl")]
fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// A JSON-lines dead-letter file written outside a run: the lines of
/// [`DeadLetter::jsonl`], for failures that a program collects itself (from another
/// process, another machine, a continuation of its own). The file is opened (created if
/// missing, appended to) at the first failure, so no file means nothing failed; each line
/// is written whole at once, so a process killed later keeps what it wrote.
///
/// ```
/// use flowline::{DeadLetterFile, Failure, ItemError};
/// let path = std::env::temp_dir().join(format!("flowline-doc-dlf-{}.jsonl", std::process::id()));
/// # let _ = std::fs::remove_file(&path);
/// let file = DeadLetterFile::new(&path);
/// assert!(!path.exists());
/// let failure = Failure::new("fetch", ItemError::user("HTTP 503"), 3);
/// let mut extra = serde_json::Map::new();
/// extra.insert("status".into(), 503.into());
/// file.write(&failure, extra).unwrap();
/// let line = std::fs::read_to_string(&path).unwrap();
/// assert!(line.contains(r#""error":"HTTP 503""#) && line.contains(r#""status":503"#), "{line}");
/// assert_eq!(file.written(), 1);
/// # std::fs::remove_file(&path).unwrap();
/// ```
#[cfg(feature = "jsonl")]
#[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
pub struct DeadLetterFile {
    path: std::path::PathBuf,
    file: Mutex<Option<std::fs::File>>,
    written: AtomicU64,
}

#[cfg(feature = "jsonl")]
impl fmt::Debug for DeadLetterFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterFile")
            .field("path", &self.path)
            .field("written", &self.written())
            .finish()
    }
}

#[cfg(feature = "jsonl")]
impl DeadLetterFile {
    /// A file at `path`, opened at the first failure.
    ///
    /// ```
    /// let file = flowline::DeadLetterFile::new("failed.jsonl");
    /// assert_eq!(file.path(), std::path::Path::new("failed.jsonl"));
    /// ```
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        DeadLetterFile {
            path: path.into(),
            file: Mutex::new(None),
            written: AtomicU64::new(0),
        }
    }

    /// Where the file is.
    ///
    /// ```
    /// let file = flowline::DeadLetterFile::new("failed.jsonl");
    /// assert!(file.path().ends_with("failed.jsonl"));
    /// ```
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The line `failure` is written as, with `extra` fields (see
    /// [`DeadLetter::with_fields`]).
    ///
    /// ```
    /// use flowline::{DeadLetterFile, Failure, ItemError};
    /// let f = Failure::new("fetch", ItemError::user("boom"), 1);
    /// let line = DeadLetterFile::line(&f, serde_json::Map::new());
    /// assert_eq!(line["stage"], "fetch");
    /// assert_eq!(line["kind"], "error");
    /// ```
    pub fn line(
        failure: &Failure,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> serde_json::Value {
        jsonl_line(failure, extra)
    }

    /// Appends the line of `failure` with `extra` fields. An error opening or writing the
    /// file is returned (the failure is counted as written either way: the caller reports
    /// it elsewhere).
    ///
    /// ```
    /// use flowline::{DeadLetterFile, Failure, ItemError};
    /// let file = DeadLetterFile::new("/nonexistent-dir/failed.jsonl");
    /// let f = Failure::new("fetch", ItemError::user("boom"), 1);
    /// assert!(file.write(&f, serde_json::Map::new()).is_err());
    /// ```
    pub fn write(
        &self,
        failure: &Failure,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> std::io::Result<()> {
        use std::io::Write;
        self.written.fetch_add(1, Relaxed);
        let mut line = jsonl_line(failure, extra).to_string();
        line.push('\n');
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let file = match &mut *g {
            Some(file) => file,
            None => g.insert(open_append(&self.path)?),
        };
        file.write_all(line.as_bytes())
    }

    /// How many failures were written (or tried).
    ///
    /// ```
    /// assert_eq!(flowline::DeadLetterFile::new("failed.jsonl").written(), 0);
    /// ```
    pub fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }
}

enum Live {
    Report,
    Callback(Callback),
    Channel(Mutex<Option<mpsc::UnboundedSender<Failure>>>),
    #[cfg(feature = "jsonl")]
    Jsonl(Mutex<std::io::BufWriter<std::fs::File>>, Option<Fields>),
}

/// The run-time side of a dead-letter target.
pub(crate) struct DeadLetters {
    live: Live,
    count: AtomicU64,
    sample: Mutex<Vec<Failure>>,
    forwarder: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl DeadLetters {
    /// Opens the target (a file, a forwarding task). Must run inside a tokio runtime.
    pub(crate) fn open(cfg: &DeadLetter) -> Result<Self, Error> {
        let mut forwarder = None;
        let live = match &cfg.target {
            Target::Report => Live::Report,
            Target::Callback(f) => Live::Callback(f.clone()),
            Target::Channel(tx) => {
                let (qtx, mut qrx) = mpsc::unbounded_channel::<Failure>();
                let tx = tx.clone();
                forwarder = Some(tokio::spawn(async move {
                    while let Some(f) = qrx.recv().await {
                        if tx.send(f).await.is_err() {
                            break;
                        }
                    }
                }));
                Live::Channel(Mutex::new(Some(qtx)))
            }
            #[cfg(feature = "jsonl")]
            Target::Jsonl(path, fields) => {
                let file = open_append(path).map_err(|e| {
                    Error::DeadLetter(format!("cannot open {}: {e}", path.display()))
                })?;
                Live::Jsonl(Mutex::new(std::io::BufWriter::new(file)), fields.clone())
            }
        };
        Ok(DeadLetters {
            live,
            count: AtomicU64::new(0),
            sample: Mutex::new(Vec::new()),
            forwarder: Mutex::new(forwarder),
        })
    }

    pub(crate) fn record(&self, failure: Failure) {
        self.count.fetch_add(1, Relaxed);
        {
            let mut sample = self.sample.lock().unwrap_or_else(|p| p.into_inner());
            if sample.len() < Report::FAILURE_SAMPLE {
                sample.push(failure.clone());
            }
        }
        match &self.live {
            Live::Report => {}
            Live::Callback(f) => f(&failure),
            Live::Channel(q) => {
                if let Some(q) = q.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    let _ = q.send(failure);
                }
            }
            #[cfg(feature = "jsonl")]
            Live::Jsonl(w, fields) => {
                use std::io::Write;
                let extra = fields.as_ref().map(|f| f(&failure)).unwrap_or_default();
                let line = jsonl_line(&failure, extra);
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = writeln!(w, "{line}") {
                    tracing::error!(error = %e, "cannot write a dead letter to the JSONL file");
                }
            }
        }
    }

    /// Flushes files and waits until queued failures reached their channel.
    pub(crate) async fn close(&self) {
        match &self.live {
            Live::Channel(q) => {
                q.lock().unwrap_or_else(|p| p.into_inner()).take();
                let handle = self
                    .forwarder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(h) = handle {
                    let _ = h.await;
                }
            }
            #[cfg(feature = "jsonl")]
            Live::Jsonl(w, _) => {
                use std::io::Write;
                let _ = w.lock().unwrap_or_else(|p| p.into_inner()).flush();
            }
            _ => {}
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub(crate) fn sample(&self) -> Vec<Failure> {
        self.sample
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
