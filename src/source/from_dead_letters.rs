//! `Pipeline::from_dead_letters`: the failures of an earlier run, read back from a
//! dead-letter file ([`DeadLetter::jsonl`](crate::DeadLetter::jsonl)) to be run again.

use std::fs::File;
use std::io::{BufRead, BufReader, Read as _};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::task::{Context, Poll};

use serde_core::de::DeserializeOwned;

use super::{Pull, Pulled};
use crate::failure::ItemError;
use crate::plan::Pipeline;

/// The longest line read (a dead letter's input is one item; a longer line is not one of
/// ours, and is not read into memory whole).
const MAX_LINE: u64 = 16 << 20;

pub(crate) struct DeadLetterPull<T> {
    path: PathBuf,
    reader: Option<BufReader<File>>,
    /// The number of the last line read (from 1).
    line: u64,
    buf: String,
    _item: PhantomData<fn() -> T>,
}

impl<T> DeadLetterPull<T> {
    fn error(&self, why: impl std::fmt::Display) -> ItemError {
        ItemError::user(format!("{}:{}: {why}", self.path.display(), self.line))
    }
}

/// The item of one dead-letter line, or why there is none.
fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let line: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not a dead letter (not JSON: {e})"))?;
    let stage = line.get("stage").and_then(|s| s.as_str()).unwrap_or("?");
    match line.get("input_format").and_then(|f| f.as_str()) {
        Some("json") => {}
        Some("debug") => {
            return Err(format!(
                "the input that failed at stage `{stage}` was kept as `Debug` text, which cannot \
                 be read back: keep it with `keep_input_json()` to replay it"
            ));
        }
        _ if line.get("input").is_some_and(|i| i.is_null()) => {
            return Err(format!(
                "the failure at stage `{stage}` kept no input: keep it with \
                 `keep_input_json()` to replay it"
            ));
        }
        _ => return Err("not a dead letter (no `input_format`)".to_string()),
    }
    let input = line.get("input").cloned().unwrap_or_default();
    serde_json::from_value(input)
        .map_err(|e| format!("the input that failed at stage `{stage}` is not an item: {e}"))
}

impl<T: DeserializeOwned + Send> Pull<T> for DeadLetterPull<T> {
    fn poll_pull(
        &mut self,
        _cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>> {
        if self.reader.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.reader = Some(BufReader::new(f)),
                Err(e) => {
                    return Poll::Ready(Err(ItemError::user(format!(
                        "cannot open the dead letters {}: {e}",
                        self.path.display()
                    ))));
                }
            }
        }
        while out.len() < max {
            let Some(reader) = self.reader.as_mut() else {
                return Poll::Ready(Ok(Pulled::End));
            };
            self.buf.clear();
            let read = reader.by_ref().take(MAX_LINE + 1).read_line(&mut self.buf);
            self.line += 1;
            match read {
                Ok(0) => return Poll::Ready(Ok(Pulled::End)),
                Ok(n) if n as u64 > MAX_LINE => {
                    let why = format!("line longer than {MAX_LINE} bytes: not a dead letter");
                    return Poll::Ready(Err(self.error(why)));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(self.error(e))),
            }
            let text = self.buf.trim();
            if text.is_empty() {
                continue;
            }
            match parse(text) {
                Ok(item) => out.push(item),
                Err(why) => return Poll::Ready(Err(self.error(why))),
            }
        }
        Poll::Ready(Ok(Pulled::More))
    }
}

impl<T: DeserializeOwned + Send + 'static> Pipeline<T> {
    /// The failed items of an earlier run, read back from its dead-letter file
    /// ([`DeadLetter::jsonl`](crate::DeadLetter::jsonl)) so that they can be run again: each
    /// line's `input`, kept by a stage with
    /// [`keep_input_json`](crate::AsyncStage::keep_input_json), becomes an item (a
    /// `Deserialize` type, usually the type the failing stage took). Blank lines are skipped.
    ///
    /// A line that cannot be replayed is an error, never skipped (a replay that left
    /// failures out would lose them): a line that is not a dead letter, an input kept as
    /// `Debug` text (`keep_input`) or not kept, or an input that is not a `T`. The source
    /// stops at that line: the items before it still run, and the run returns
    /// [`Error::Source`](crate::Error::Source) whose message names the file and the line
    /// number. The file is read with blocking reads, a chunk of lines at a time, as it is
    /// pulled: meant for a local file.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let path = std::env::temp_dir().join(format!("flowline-replay-{}.jsonl", std::process::id()));
    /// # let _ = std::fs::remove_file(&path);
    /// // A run where 2 and 4 fail; their inputs go to the file as JSON.
    /// let report = Pipeline::from_iter(1..=5u32)
    ///     .try_map_async("check", |x| async move { if x % 2 == 0 { Err("down") } else { Ok(x) } })
    ///     .keep_input_json()
    ///     .run()
    ///     .dead_letter(DeadLetter::jsonl(&path))
    ///     .await.unwrap();
    /// assert_eq!(report.failures, 2);
    ///
    /// // Later, once the service is back: run the failures again.
    /// let replayed = Pipeline::<u32>::from_dead_letters(&path)
    ///     .map_async("check", |x| async move { x })
    ///     .collect().await.unwrap();
    /// assert_eq!(replayed, vec![2, 4]);
    /// # std::fs::remove_file(&path).unwrap();
    /// # }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "jsonl")))]
    pub fn from_dead_letters(path: impl Into<PathBuf>) -> Pipeline<T> {
        Pipeline::from_pull(
            "dead_letters",
            DeadLetterPull {
                path: path.into(),
                reader: None,
                line: 0,
                buf: String::new(),
                _item: PhantomData,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::path::PathBuf;

    /// A fresh file path in the temporary directory, removed when dropped.
    struct TempPath(PathBuf);
    impl TempPath {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("flowline-{}-{name}.jsonl", std::process::id()));
            let _ = std::fs::remove_file(&p);
            TempPath(p)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A stage that fails the orders whose id is in `down`; inputs kept as JSON.
    fn checkout(p: Pipeline<(u32, String)>, down: fn(u32) -> bool) -> impl Flow<Item = String> {
        p.try_map_async("checkout", move |(id, sku): (u32, String)| async move {
            if down(id) {
                Err(format!("order {id}: 503"))
            } else {
                Ok(format!("{id}:{sku}"))
            }
        })
        .keep_input_json()
    }

    #[tokio::test]
    async fn failures_go_to_the_file_and_run_again_from_it() {
        let path = TempPath::new("round-trip");
        let orders = (0..10u32).map(|id| (id, format!("sku \"{id}\"")));
        let report = checkout(Pipeline::from_iter(orders), |id| id % 3 == 0)
            .run()
            .dead_letter(DeadLetter::jsonl(&path.0))
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (6, 4));
        let text = std::fs::read_to_string(&path.0).unwrap();
        assert!(
            text.lines()
                .next()
                .unwrap()
                .contains(r#""input":[0,"sku \"0\""],"input_format":"json""#),
            "{text}"
        );
        // The service is back: every failure passes now.
        let replayed = checkout(Pipeline::from_dead_letters(&path.0), |_| false)
            .collect()
            .await
            .unwrap();
        assert_eq!(
            replayed,
            vec!["0:sku \"0\"", "3:sku \"3\"", "6:sku \"6\"", "9:sku \"9\""]
        );
    }

    async fn replay_error(lines: &str) -> (String, u64) {
        let path = TempPath::new(&format!("bad-{}", lines.len()));
        std::fs::write(&path.0, lines).unwrap();
        let err = Pipeline::<(u32, String)>::from_dead_letters(&path.0)
            .run()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Source { .. }), "{err}");
        let delivered = err.report().unwrap().delivered();
        let msg = err.to_string();
        assert!(msg.contains(&path.0.display().to_string()), "{msg}");
        (msg, delivered)
    }

    #[tokio::test]
    async fn a_line_that_cannot_be_replayed_stops_the_source_at_its_number() {
        let good = r#"{"stage":"s","input":[1,"a"],"input_format":"json"}"#;
        let (msg, delivered) = replay_error(&format!("{good}\n\n{{\"stage\": tru\n{good}\n")).await;
        assert!(
            msg.contains(".jsonl:3: not a dead letter (not JSON"),
            "{msg}"
        );
        assert_eq!(delivered, 1);
        let (msg, _) = replay_error(&format!("{good}\n[1, 2]\n")).await;
        assert!(
            msg.contains(":2: not a dead letter (no `input_format`)"),
            "{msg}"
        );
        let wrong = r#"{"stage":"s","input":{"id":1},"input_format":"json"}"#;
        let (msg, _) = replay_error(&format!("{wrong}\n")).await;
        assert!(
            msg.contains(":1: the input that failed at stage `s` is not an item"),
            "{msg}"
        );
        let (msg, delivered) = replay_error(&"x".repeat(17 << 20)).await;
        assert!(msg.contains(":1: line longer than"), "{msg}");
        assert_eq!(delivered, 0);
    }

    #[tokio::test]
    async fn debug_only_dead_letters_are_refused_with_the_way_to_keep_json() {
        let path = TempPath::new("debug-only");
        Pipeline::from_iter([(1u32, "a".to_string()), (2, "b".to_string())])
            .try_map_async("pay", |_: (u32, String)| async { Err::<(), _>("declined") })
            .keep_input()
            .run()
            .dead_letter(DeadLetter::jsonl(&path.0))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path.0).unwrap();
        assert!(
            text.contains(r#""input":"(1, \"a\")","input_format":"debug""#),
            "{text}"
        );
        let err = Pipeline::<(u32, String)>::from_dead_letters(&path.0)
            .run()
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(":1: the input that failed at stage `pay` was kept as `Debug` text"),
            "{msg}"
        );
        assert!(msg.contains("keep_input_json()"), "{msg}");
        assert_eq!(err.report().unwrap().delivered(), 0);

        let not_kept = r#"{"stage":"pay","input":null,"input_format":null}"#;
        let (msg, _) = replay_error(&format!("{not_kept}\n")).await;
        assert!(
            msg.contains(":1: the failure at stage `pay` kept no input"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_named() {
        let path = TempPath::new("missing");
        let err = Pipeline::<u32>::from_dead_letters(&path.0)
            .run()
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot open the dead letters"), "{msg}");
        assert!(msg.contains(&path.0.display().to_string()), "{msg}");
    }
}
