//! Where a run's inputs come from: lines of a file or stdin (records ended by a newline or
//! NUL), a range of numbers, `:::` arguments and their combinations, or the rows of a SQL
//! query paged by its key; and which of them a resumed run skips.

use std::collections::HashSet;
use std::path::Path;

use flowline::prelude::*;
use flowline_sqlite::Keyset;
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

/// Rows of a query, each its columns joined by tabs, read by flowline's cursor source over
/// flowline-sqlite's [`Keyset`]: a page at a time in key order (`WHERE key > last`, so that
/// a page never repeats or skips a row), the next page read when this one is out. A
/// database locked by a writer is an outage: the source waits and reads the page again
/// (flowline's default policy), so no input is skipped or failed for it; a query that
/// cannot run ends the run.
pub(crate) struct SqlPager {
    rows: Option<flowline::ItemStream<Vec<u8>>>,
}

impl SqlPager {
    fn open(keyset: Keyset) -> SqlPager {
        // The cursor is kept in memory only: a resumed run skips by job number or by input.
        let opts = flowline::CursorOptions::new().read_ahead(0);
        let rows = Pipeline::from_cursor_with(
            flowline::MemoryCheckpoints::new(),
            "sql",
            opts,
            keyset.fetch(row_bytes),
        )
        .run()
        .into_stream();
        SqlPager { rows: Some(rows) }
    }

    async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(rows) = &mut self.rows else {
            return Ok(None);
        };
        if let Some(row) = futures::StreamExt::next(rows).await {
            return Ok(Some(row));
        }
        let Some(rows) = self.rows.take() else {
            return Ok(None);
        };
        match rows.finish().await {
            Ok(_) => Ok(None),
            Err(flowline::Error::Source { error, .. }) => Err(format!("sql: {error}")),
            Err(e) => Err(format!("sql: {e}")),
        }
    }
}

/// A row as one input: its columns joined by tabs, NULL as nothing.
fn row_bytes(r: &rusqlite::Row<'_>) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::types::Value as V;
    let cols = r.as_ref().column_count();
    let mut fields = Vec::with_capacity(cols);
    for i in 0..cols {
        fields.push(match r.get::<_, V>(i)? {
            V::Null => Vec::new(),
            V::Integer(x) => x.to_string().into_bytes(),
            V::Real(x) => x.to_string().into_bytes(),
            V::Text(s) => s.into_bytes(),
            V::Blob(b) => b,
        });
    }
    Ok(fields.join(&b'\t'))
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
            let keyset = Keyset::new(db, query, key);
            // The first row now: a bad query fails before anything runs. A lock is waited
            // out, as the pages are.
            let first = keyset.clone().page_size(1);
            flowline::Outage::default()
                .retry("sql", || first.page(None, |_| Ok(())))
                .await
                .map_err(|e| e.to_string())?;
            let total = if want_total {
                keyset.count().await.ok()
            } else {
                None
            };
            (Reader::Sql(SqlPager::open(keyset)), total)
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
