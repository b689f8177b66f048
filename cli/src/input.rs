//! Where a run's inputs come from: lines of a file or stdin (records ended by a newline or
//! NUL), a range of numbers, `:::` arguments and their combinations, or the rows of a SQL
//! query paged by its key; and which of them a resumed run skips.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};

use tokio::io::AsyncBufReadExt;

use crate::spec::Source;

/// The inputs, read lazily.
pub(crate) enum Reader {
    /// Records ended by `delim` (`\n`, or NUL with `-0`), the delimiter removed.
    Lines(Box<dyn tokio::io::AsyncBufRead + Send + Unpin>, u8),
    Seq {
        next: i64,
        end: i64,
        step: i64,
        done: bool,
    },
    List(std::vec::IntoIter<Vec<u8>>),
    Table(std::vec::IntoIter<Vec<Vec<u8>>>),
    Sql(SqlPager),
}

impl Reader {
    async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        match self {
            Reader::Lines(r, delim) => {
                let mut rec = Vec::new();
                let n = r
                    .read_until(*delim, &mut rec)
                    .await
                    .map_err(|e| format!("reading input: {e}"))?;
                if n == 0 {
                    return Ok(None);
                }
                if rec.last() == Some(delim) {
                    rec.pop();
                }
                Ok(Some(rec))
            }
            Reader::Seq {
                next,
                end,
                step,
                done,
            } => {
                if *done || *next > *end {
                    return Ok(None);
                }
                let v = *next;
                match next.checked_add(*step) {
                    Some(n) => *next = n,
                    None => *done = true,
                }
                Ok(Some(v.to_string().into_bytes()))
            }
            Reader::List(it) => Ok(it.next()),
            Reader::Table(it) => Ok(it.next().map(|args| args.join(&b'\t'))),
            Reader::Sql(p) => p.next().await,
        }
    }

    /// The next input as its arguments: one, the columns `colsep` splits it into, or a
    /// row of `:::` groups.
    pub(crate) async fn next_args(
        &mut self,
        colsep: Option<&regex::bytes::Regex>,
    ) -> Result<Option<Vec<Vec<u8>>>, String> {
        if let Reader::Table(it) = self {
            return Ok(it.next());
        }
        Ok(self.next().await?.map(|rec| match colsep {
            Some(re) => re.split(&rec).map(<[u8]>::to_vec).collect(),
            None => vec![rec],
        }))
    }
}

/// Rows of a query, a page at a time, in key order: `WHERE key > last` so that a page
/// never repeats or skips a row.
pub(crate) struct SqlPager {
    db: PathBuf,
    query: String,
    key: String,
    last: Option<rusqlite::types::Value>,
    page: VecDeque<Vec<u8>>,
    end: bool,
}

impl SqlPager {
    async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        if self.page.is_empty() && !self.end {
            let (rows, last) =
                read_page(&self.db, &self.query, &self.key, &self.last, 1000).await?;
            if rows.len() < 1000 {
                self.end = true;
            }
            if last.is_some() {
                self.last = last;
            }
            self.page.extend(rows);
        }
        Ok(self.page.pop_front())
    }
}

type Page = (Vec<Vec<u8>>, Option<rusqlite::types::Value>);

/// The page of `n` rows after `last`. A database locked by a writer is an
/// outage: the source waits and reads the page again (flowline's default policy), so no
/// input is skipped or failed for it; a bad query or a missing table ends the run at once.
async fn read_page(
    db: &Path,
    query: &str,
    key: &str,
    last: &Option<rusqlite::types::Value>,
    n: usize,
) -> Result<Page, String> {
    flowline::Outage::default()
        .retry("sql", || {
            let (db, query, key, last) = (
                db.to_path_buf(),
                query.to_string(),
                key.to_string(),
                last.clone(),
            );
            async move {
                tokio::task::spawn_blocking(move || sql_page(&db, &query, &key, last, n))
                    .await
                    .map_err(|e| -> flowline::BoxError { Box::new(flowline::Permanent::new(e)) })?
            }
        })
        .await
        .map_err(|e| e.to_string())
}

fn sql_page(
    db: &Path,
    query: &str,
    key: &str,
    last: Option<rusqlite::types::Value>,
    n: usize,
) -> Result<Page, flowline::BoxError> {
    use rusqlite::types::Value as V;
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| flowline::Permanent::new(format!("cannot open {}: {e}", db.display())))?;
    // A short lock (a writer's commit) is waited out here; a longer one is an outage.
    conn.busy_timeout(std::time::Duration::from_secs(1))
        .map_err(flowline_sqlite::classify)?;
    let sql = match last {
        Some(_) => {
            format!("SELECT * FROM ({query}) WHERE \"{key}\" > ?1 ORDER BY \"{key}\" LIMIT {n}")
        }
        None => format!("SELECT * FROM ({query}) ORDER BY \"{key}\" LIMIT {n}"),
    };
    let mut st = conn.prepare(&sql).map_err(flowline_sqlite::classify)?;
    let cols = st.column_count();
    let key_idx = (0..cols)
        .find(|&i| st.column_name(i).is_ok_and(|c| c == key))
        .ok_or_else(|| flowline::Permanent::new(format!("the query has no column `{key}`")))?;
    let params: Vec<V> = last.into_iter().collect();
    let mut rows = st
        .query(rusqlite::params_from_iter(params))
        .map_err(flowline_sqlite::classify)?;
    let mut out = Vec::new();
    let mut last_key = None;
    while let Some(r) = rows.next().map_err(flowline_sqlite::classify)? {
        let mut fields = Vec::with_capacity(cols);
        for i in 0..cols {
            let v: V = r.get(i).map_err(flowline_sqlite::classify)?;
            if i == key_idx {
                last_key = Some(v.clone());
            }
            fields.push(match v {
                V::Null => Vec::new(),
                V::Integer(x) => x.to_string().into_bytes(),
                V::Real(x) => x.to_string().into_bytes(),
                V::Text(s) => s.into_bytes(),
                V::Blob(b) => b,
            });
        }
        out.push(fields.join(&b'\t'));
    }
    Ok((out, last_key))
}

fn count_records(path: &Path, delim: u8) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut last) = (0u64, delim);
    loop {
        let k = f.read(&mut buf).ok()?;
        if k == 0 {
            break;
        }
        n += memchr::memchr_iter(delim, &buf[..k]).count() as u64;
        last = buf[k - 1];
    }
    Some(n + u64::from(last != delim))
}

/// Opens the source: its reader and, when it is cheap to know, how many inputs it holds.
pub(crate) async fn open_source(
    source: &Source,
    want_total: bool,
    delim: u8,
) -> Result<(Reader, Option<u64>), String> {
    Ok(match source {
        Source::Lines(None) => {
            let r: Box<dyn tokio::io::AsyncBufRead + Send + Unpin> = Box::new(
                tokio::io::BufReader::with_capacity(1 << 16, tokio::io::stdin()),
            );
            (Reader::Lines(r, delim), None)
        }
        Source::Lines(Some(path)) => {
            let f = tokio::fs::File::open(path)
                .await
                .map_err(|e| format!("stage `lines`: cannot open {}: {e}", path.display()))?;
            let total = if want_total {
                count_records(path, delim)
            } else {
                None
            };
            let r: Box<dyn tokio::io::AsyncBufRead + Send + Unpin> =
                Box::new(tokio::io::BufReader::with_capacity(1 << 16, f));
            (Reader::Lines(r, delim), total)
        }
        Source::Seq { start, end, step } => {
            let total = ((*end as i128 - *start as i128) / *step as i128 + 1) as u64;
            (
                Reader::Seq {
                    next: *start,
                    end: *end,
                    step: *step,
                    done: false,
                },
                Some(total),
            )
        }
        Source::Args(list) => (
            Reader::List(list.clone().into_iter()),
            Some(list.len() as u64),
        ),
        Source::Table(rows) => (
            Reader::Table(rows.clone().into_iter()),
            Some(rows.len() as u64),
        ),
        Source::Sql { db, query, key } => {
            if !db.exists() {
                return Err(format!("stage `sql`: no database at {}", db.display()));
            }
            // The first page now: a bad query fails before anything runs.
            read_page(db, query, key, &None, 1).await?;
            let total = if want_total {
                let (db3, q3) = (db.clone(), query.clone());
                tokio::task::spawn_blocking(move || {
                    rusqlite::Connection::open(&db3).ok().and_then(|c| {
                        c.query_row(&format!("SELECT count(*) FROM ({q3})"), [], |r| {
                            r.get::<_, i64>(0)
                        })
                        .ok()
                    })
                })
                .await
                .ok()
                .flatten()
                .map(|n| n.max(0) as u64)
            } else {
                None
            };
            (
                Reader::Sql(SqlPager {
                    db: db.clone(),
                    query: query.clone(),
                    key: key.clone(),
                    last: None,
                    page: VecDeque::new(),
                    end: false,
                }),
                total,
            )
        }
    })
}

/// The job numbers a joblog has (all, or with `only_ok` those that succeeded).
pub(crate) fn joblog_seqs(path: &Path, only_ok: bool) -> HashSet<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let seq = f.first()?.parse().ok()?;
            let ok = f.get(6) == Some(&"0") && f.get(7) == Some(&"0");
            (!only_ok || ok).then_some(seq)
        })
        .collect()
}

/// Every input read, in a random order (`--shuf`).
pub(crate) async fn shuffled(r: Reader) -> Result<(Reader, Option<u64>), String> {
    let mut r = match r {
        Reader::Table(rows) => {
            let mut all = rows.collect::<Vec<_>>();
            shuffle(&mut all);
            let n = all.len() as u64;
            return Ok((Reader::Table(all.into_iter()), Some(n)));
        }
        other => other,
    };
    let mut one = Vec::new();
    while let Some(x) = r.next().await? {
        one.push(x);
    }
    shuffle(&mut one);
    let n = one.len() as u64;
    Ok((Reader::List(one.into_iter()), Some(n)))
}

/// Fisher-Yates with xorshift seeded from the clock: an order, not a secret.
fn shuffle<T>(v: &mut [T]) {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
