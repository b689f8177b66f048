//! `Keyset`: the rows of a query, a page at a time in the order of one key column, as the
//! fetch of [`Pipeline::from_cursor`](flowline::Pipeline::from_cursor).
//!
//! A page is `SELECT * FROM (query) WHERE key > last ORDER BY key LIMIT n`: rows added or
//! removed before `last` never shift a page, so no row is skipped or repeated, and the
//! cursor (the last key handed out, a [`Key`]) is all a rerun needs to resume. Each page is
//! read on its own read-only connection, on tokio's blocking pool. A file locked by another
//! connection is waited out for the busy timeout, then the fetch fails with an error marked
//! [`Transient`](flowline::Transient): the cursor source hands out nothing new and tries the
//! page again under the run's [`Outage`](flowline::Outage) policy. A query that cannot run
//! (a syntax error, a missing table or key column) is marked
//! [`Permanent`](flowline::Permanent): the source ends with it.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use flowline::{BoxError, Page, Permanent};
use rusqlite::types::Value;

/// A value of the key column: the cursor of a [`Keyset`] source.
///
/// It is written to a checkpoint store as text that says its type, so that it is compared
/// with the key column as the same type when a rerun resumes: `i:42` (an integer), `r:1.5`
/// (a real), `t:abc` (text), `b:00ff` (a blob, in hex), `n:` (NULL).
///
/// ```
/// use flowline_sqlite::Key;
/// let k: Key = "i:42".parse().unwrap();
/// assert_eq!(k, Key::from(42i64));
/// assert_eq!(Key::from("abc".to_string()).to_string(), "t:abc");
/// assert!("42".parse::<Key>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Key(Value);

impl Key {
    /// The value, as SQLite gave it.
    ///
    /// ```
    /// use flowline_sqlite::rusqlite::types::Value;
    /// assert_eq!(flowline_sqlite::Key::from(7i64).value(), &Value::Integer(7));
    /// ```
    pub fn value(&self) -> &Value {
        &self.0
    }
}

impl From<Value> for Key {
    fn from(v: Value) -> Self {
        Key(v)
    }
}

impl From<i64> for Key {
    fn from(v: i64) -> Self {
        Key(Value::Integer(v))
    }
}

impl From<String> for Key {
    fn from(v: String) -> Self {
        Key(Value::Text(v))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Value::Null => f.write_str("n:"),
            Value::Integer(i) => write!(f, "i:{i}"),
            // `f64`'s `Display` is the shortest text that parses back to the same value.
            Value::Real(r) => write!(f, "r:{r}"),
            Value::Text(t) => write!(f, "t:{t}"),
            Value::Blob(b) => {
                f.write_str("b:")?;
                b.iter().try_for_each(|x| write!(f, "{x:02x}"))
            }
        }
    }
}

/// Why a text is not a [`Key`]: the text (cut short) and what is wrong with it.
///
/// ```
/// let e = "x:1".parse::<flowline_sqlite::Key>().unwrap_err();
/// assert!(e.to_string().contains("`x:1`"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParseError {
    text: String,
    why: &'static str,
}

impl fmt::Display for KeyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a keyset cursor: `{}`: {}", self.text, self.why)
    }
}

impl std::error::Error for KeyParseError {}

impl FromStr for Key {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| KeyParseError {
            text: s.chars().take(64).collect(),
            why,
        };
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("no type prefix (i:, r:, t:, b: or n:)"))?;
        Ok(Key(match kind {
            "n" if rest.is_empty() => Value::Null,
            "n" => return Err(bad("NULL has no value")),
            "i" => Value::Integer(rest.parse().map_err(|_| bad("not an integer"))?),
            "r" => Value::Real(rest.parse().map_err(|_| bad("not a number"))?),
            "t" => Value::Text(rest.to_string()),
            "b" => {
                if rest.len() % 2 != 0 || !rest.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad("not hex digits in pairs"));
                }
                let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                Value::Blob(
                    rest.as_bytes()
                        .chunks(2)
                        .map(|p| digit(p[0]) << 4 | digit(p[1]))
                        .collect(),
                )
            }
            _ => return Err(bad("unknown type prefix (i:, r:, t:, b: or n:)")),
        }))
    }
}

/// What [`Keyset::fetch`] returns for each call: one page, on its way.
pub type PageFuture<T> = Pin<Box<dyn Future<Output = Result<Page<T, Key>, BoxError>> + Send>>;

/// The rows of a query in a SQLite file, paged by a key column, read-only.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::MemoryCheckpoints;
/// use flowline_sqlite::Keyset;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let db = dir.path().join("data.db");
/// let conn = rusqlite::Connection::open(&db).unwrap();
/// conn.execute_batch(
///     "create table users (id integer primary key, name text);
///      insert into users values (3, 'c'), (1, 'a'), (2, 'b');",
/// ).unwrap();
/// let rows = Keyset::new(&db, "select id, name from users", "id").page_size(2);
/// let store = MemoryCheckpoints::new();
/// let names = Pipeline::from_cursor(store.clone(), "users", rows.fetch(|r| r.get::<_, String>("name")))
///     .collect().await.unwrap();
/// assert_eq!(names, ["a", "b", "c"]);
/// assert_eq!(store.get("users").as_deref(), Some("i:3"), "a rerun resumes after id 3");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Keyset {
    db: PathBuf,
    query: Arc<str>,
    key: Arc<str>,
    page_size: usize,
    busy_timeout: Duration,
}

impl Keyset {
    /// The rows of `query` (any `SELECT`; it becomes a subquery) in the file `db`, paged by
    /// its column `key`: 1,000 rows a page, waiting up to 1 s for a lock before a page
    /// fetch fails as transient.
    ///
    /// ```
    /// let rows = flowline_sqlite::Keyset::new("data.db", "select * from jobs where ok = 0", "id");
    /// # let _ = rows;
    /// ```
    pub fn new(db: impl AsRef<Path>, query: &str, key: &str) -> Self {
        Keyset {
            db: db.as_ref().to_path_buf(),
            query: Arc::from(query),
            key: Arc::from(key),
            page_size: 1000,
            busy_timeout: Duration::from_secs(1),
        }
    }

    /// Rows per page (at least 1: 0 is taken as 1). A larger page means fewer queries and,
    /// after a crash, a longer replay.
    ///
    /// ```
    /// let rows = flowline_sqlite::Keyset::new("data.db", "select * from jobs", "id").page_size(100);
    /// # let _ = rows;
    /// ```
    pub fn page_size(mut self, rows: usize) -> Self {
        self.page_size = rows.max(1);
        self
    }

    /// How long a page fetch waits for a lock another connection holds before it fails as
    /// transient (the source then tries again under the run's outage policy). A short wait
    /// here reports a long lock sooner; the outage policy decides how long it is ridden out.
    ///
    /// ```
    /// use std::time::Duration;
    /// let rows = flowline_sqlite::Keyset::new("data.db", "select * from jobs", "id")
    ///     .busy_timeout(Duration::from_millis(100));
    /// # let _ = rows;
    /// ```
    pub fn busy_timeout(mut self, wait: Duration) -> Self {
        self.busy_timeout = wait;
        self
    }

    /// The page after `after` (`None`: the first page), each row made into an item by
    /// `row`. A page shorter than the page size is the last: it ends with the cursor of its
    /// last row (a later run resumes after it), or with none when it is empty.
    ///
    /// ```
    /// use flowline_sqlite::Keyset;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let db = dir.path().join("data.db");
    /// rusqlite::Connection::open(&db).unwrap()
    ///     .execute_batch("create table t (id integer primary key); insert into t values (1), (2);")
    ///     .unwrap();
    /// let rows = Keyset::new(&db, "select id from t", "id");
    /// let page = rows.page(Some(1i64.into()), |r| r.get::<_, i64>(0)).await.unwrap();
    /// # let _ = page;
    /// let err = Keyset::new(&db, "select id from t", "nope")
    ///     .page(None, |r| r.get::<_, i64>(0)).await.unwrap_err();
    /// assert_eq!(err.to_string(), "the query has no column `nope`");
    /// assert!(!flowline::is_transient(&*err));
    /// # }
    /// ```
    pub async fn page<T, F>(&self, after: Option<Key>, row: F) -> Result<Page<T, Key>, BoxError>
    where
        T: Send + 'static,
        F: Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_page(after, &row))
            .await
            .map_err(|e| -> BoxError { Box::new(Permanent::new(e)) })?
    }

    /// The fetch of a [`Pipeline::from_cursor`](flowline::Pipeline::from_cursor) source:
    /// each call reads the page after its cursor with [`page`](Keyset::page).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{CursorOptions, MemoryCheckpoints};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let db = dir.path().join("data.db");
    /// rusqlite::Connection::open(&db).unwrap()
    ///     .execute_batch("create table t (k text primary key); insert into t values ('b'), ('a');")
    ///     .unwrap();
    /// let fetch = flowline_sqlite::Keyset::new(&db, "select k from t", "k").fetch(|r| r.get::<_, String>(0));
    /// let opts = CursorOptions::new().read_ahead(0);
    /// let out = Pipeline::from_cursor_with(MemoryCheckpoints::new(), "t", opts, fetch)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, ["a", "b"]);
    /// # }
    /// ```
    pub fn fetch<T, F>(self, row: F) -> impl FnMut(Option<Key>) -> PageFuture<T> + Send + 'static
    where
        T: Send + 'static,
        F: Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T> + Send + Sync + 'static,
    {
        let row = Arc::new(row);
        move |after| {
            let (this, row) = (self.clone(), row.clone());
            Box::pin(async move { this.page(after, move |r| row(r)).await })
        }
    }

    /// How many rows the query has (`SELECT count(*)`), for a progress bar's total. Read
    /// like a page: read-only, a lock waited out for the busy timeout.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let db = dir.path().join("data.db");
    /// rusqlite::Connection::open(&db).unwrap()
    ///     .execute_batch("create table t (id integer primary key); insert into t values (1), (2);")
    ///     .unwrap();
    /// let rows = flowline_sqlite::Keyset::new(&db, "select id from t", "id");
    /// assert_eq!(rows.count().await.unwrap(), 2);
    /// # }
    /// ```
    pub async fn count(&self) -> Result<u64, BoxError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.open()?;
            let n: i64 = conn
                .query_row(&format!("SELECT count(*) FROM ({})", this.query), [], |r| {
                    r.get(0)
                })
                .map_err(crate::classify)?;
            Ok(n.max(0) as u64)
        })
        .await
        .map_err(|e| -> BoxError { Box::new(Permanent::new(e)) })?
    }

    fn open(&self) -> Result<rusqlite::Connection, BoxError> {
        use rusqlite::OpenFlags;
        // Read-only, and never created: a missing file is an error, not an empty table.
        let conn = rusqlite::Connection::open_with_flags(
            &self.db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| Permanent::new(format!("cannot open {}: {e}", self.db.display())))?;
        conn.busy_timeout(self.busy_timeout)
            .map_err(crate::classify)?;
        Ok(conn)
    }

    fn read_page<T>(
        &self,
        after: Option<Key>,
        row: &dyn Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Page<T, Key>, BoxError> {
        let conn = self.open()?;
        let (query, n) = (&self.query, self.page_size);
        // The key is an identifier: quoted, its own quotes doubled.
        let key = format!("\"{}\"", self.key.replace('"', "\"\""));
        let sql = match after {
            Some(_) => format!("SELECT * FROM ({query}) WHERE {key} > ?1 ORDER BY {key} LIMIT {n}"),
            None => format!("SELECT * FROM ({query}) ORDER BY {key} LIMIT {n}"),
        };
        let mut st = conn.prepare(&sql).map_err(crate::classify)?;
        let key_idx = (0..st.column_count())
            .find(|&i| st.column_name(i).is_ok_and(|c| c == &*self.key))
            .ok_or_else(|| Permanent::new(format!("the query has no column `{}`", self.key)))?;
        let params: Vec<Value> = after.into_iter().map(|k| k.0).collect();
        let mut rows = st
            .query(rusqlite::params_from_iter(params))
            .map_err(crate::classify)?;
        let (mut items, mut last) = (Vec::new(), None);
        while let Some(r) = rows.next().map_err(crate::classify)? {
            last = Some(Key(r.get(key_idx).map_err(crate::classify)?));
            items.push(row(r).map_err(crate::classify)?);
        }
        Ok(match last {
            Some(last) if items.len() >= n => Page::next(items, last),
            Some(last) => Page::end_at(items, last),
            None => Page::end(items),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline::prelude::*;
    use flowline::{CursorOptions, MemoryCheckpoints};
    use futures::StreamExt;

    fn table(rows: i64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("data.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(&format!(
                "create table t (id integer primary key, name text);
                 with recursive n(i) as (select 1 union all select i + 1 from n where i < {rows})
                 insert into t select i, 'n' || i from n;"
            ))
            .unwrap();
        (dir, db)
    }

    fn ids(r: &rusqlite::Row<'_>) -> rusqlite::Result<i64> {
        r.get("id")
    }

    #[test]
    fn a_key_reads_back_as_the_same_value_and_bad_text_is_an_error() {
        for v in [
            Value::Null,
            Value::Integer(i64::MIN),
            Value::Integer(0),
            Value::Real(-0.1),
            Value::Real(f64::MAX),
            Value::Text(String::new()),
            Value::Text("a:b\tc\n".into()),
            Value::Blob(vec![]),
            Value::Blob(vec![0, 0xab, 0xff]),
        ] {
            let k = Key(v);
            assert_eq!(k.to_string().parse::<Key>().unwrap(), k, "{k}");
        }
        for (text, why) in [
            ("", "no type prefix"),
            ("42", "no type prefix"),
            ("x:1", "unknown type prefix"),
            ("i:", "not an integer"),
            ("i:99999999999999999999", "not an integer"),
            ("r:one", "not a number"),
            ("b:abc", "hex"),
            ("b:zz", "hex"),
            ("b:é1", "hex"),
            ("n:0", "NULL"),
        ] {
            let e = text.parse::<Key>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{text}`")) && e.contains(why),
                "{text}: {e}"
            );
        }
        let long = format!("t{}", "x".repeat(1000));
        assert!(long.parse::<Key>().unwrap_err().to_string().len() < 200);
    }

    #[tokio::test]
    async fn pages_go_in_key_order_and_a_rerun_resumes_after_the_last() {
        let (_dir, db) = table(25);
        let rows = Keyset::new(&db, "select id, name from t where id % 2 = 1", "id").page_size(4);
        let store = MemoryCheckpoints::new();
        let run =
            |rows: Keyset| Pipeline::from_cursor(store.clone(), "t", rows.fetch(ids)).collect();
        let got = run(rows.clone()).await.unwrap();
        assert_eq!(got, (1..=25).step_by(2).collect::<Vec<_>>());
        assert_eq!(store.get("t").as_deref(), Some("i:25"));
        assert!(run(rows.clone()).await.unwrap().is_empty());
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("insert into t values (27, 'x'), (26, 'y'), (29, 'z');")
            .unwrap();
        assert_eq!(run(rows).await.unwrap(), [27, 29], "only what came after");
    }

    #[tokio::test]
    async fn the_last_page_is_the_short_one() {
        let (_dir, db) = table(4);
        let rows = Keyset::new(&db, "select id from t", "id").page_size(2);
        let after = |k: i64| rows.page(Some(k.into()), ids);
        // Full pages have more after them, a short one is the last; a page size of 0 is 1.
        let p = format!("{:?}", after(0).await.unwrap());
        assert!(p.contains("more: true") && p.contains("[1, 2]"), "{p}");
        let p = format!("{:?}", after(3).await.unwrap());
        assert!(p.contains("more: false") && p.contains("[4]"), "{p}");
        let p = format!("{:?}", after(4).await.unwrap());
        assert!(
            p.contains("more: false") && p.contains("cursor: None"),
            "{p}"
        );
        let one = Keyset::new(&db, "select id from t", "id").page_size(0);
        let p = format!("{:?}", one.page(None, ids).await.unwrap());
        assert!(p.contains("more: true") && p.contains("items: [1]"), "{p}");
        assert_eq!(one.count().await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_query_that_cannot_run_is_a_permanent_error_and_nothing_is_written() {
        let (dir, db) = table(3);
        let err = |rows: Keyset| async move { rows.page(None, ids).await.unwrap_err() };
        let e = err(Keyset::new(&db, "select id from t", "nope")).await;
        assert_eq!(e.to_string(), "the query has no column `nope`");
        assert!(!flowline::is_transient(&*e));
        let e = err(Keyset::new(&db, "select id from missing", "id")).await;
        assert!(e.to_string().contains("no such table: missing"), "{e}");
        assert!(!flowline::is_transient(&*e));
        let gone = dir.path().join("gone.db");
        let e = err(Keyset::new(&gone, "select 1 as id", "id")).await;
        assert!(e.to_string().contains("cannot open"), "{e}");
        assert!(!gone.exists(), "read-only: no file is created");
        // A key with quotes in its name is one identifier, not SQL.
        let q = "select id as \"a\"\"b\" from t";
        let quoted = Keyset::new(&db, q, "a\"b");
        let got = quoted.page(None, |r| r.get::<_, i64>(0)).await.unwrap();
        assert!(format!("{got:?}").contains("[1, 2, 3]"));
        let e = err(Keyset::new(
            &db,
            "select id from t",
            "id\" > 0; drop table t; --",
        ))
        .await;
        assert!(e.to_string().contains("has no column"), "{e}");
        assert_eq!(
            Keyset::new(&db, "select id from t", "id")
                .count()
                .await
                .unwrap(),
            3
        );
    }

    /// Another connection holds the file locked: the fetch fails as transient, the source
    /// waits and reads the page again when the lock is gone; no row is failed or skipped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_locked_file_pauses_the_source_until_the_lock_is_gone() {
        let (_dir, db) = table(10);
        let rows = Keyset::new(&db, "select id from t", "id")
            .page_size(3)
            .busy_timeout(Duration::from_millis(10));
        let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let file = db.clone();
        let holder = std::thread::spawn(move || {
            let mut lock = rusqlite::Connection::open(file).unwrap();
            let tx = lock
                .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
                .unwrap();
            locked_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            tx.commit().unwrap();
        });
        locked_rx.recv().unwrap();
        let e = rows.page(None, ids).await.unwrap_err();
        assert!(flowline::is_transient(&*e), "{e}");
        let opts = CursorOptions::new().read_ahead(0);
        let mut out =
            Pipeline::from_cursor_with(MemoryCheckpoints::new(), "t", opts, rows.fetch(ids))
                .run()
                .into_stream();
        // While the lock is held nothing comes out and the run does not end.
        let early = tokio::time::timeout(Duration::from_millis(300), out.next()).await;
        assert!(early.is_err(), "{early:?}");
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        let mut got = Vec::new();
        while let Some(id) = out.next().await {
            got.push(id);
        }
        let report = out.finish().await.unwrap();
        assert_eq!((report.failures, report.delivered()), (0, 10));
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
    }
}
