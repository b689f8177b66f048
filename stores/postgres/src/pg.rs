//! What the PostgreSQL stores share: the connection pool, the options,
//! table names checked as SQL identifiers, retries of calls whose connection dropped, and
//! errors that name the table and the statement.
//!
//! Both stores reach the server through a [`deadpool_postgres::Pool`] (no TLS: a server
//! that requires it is reached through a pool the caller builds, handed to `from_pool`).

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolError, QueueMode, RecyclingMethod, Runtime,
};

use flowline::BoxError;

use crate::transient::is_transient_pg;

/// Options of [`PgStore`](crate::PgStore) and [`PgCheckpoints`](crate::PgCheckpoints): the
/// table, the pool size when the store opens its own pool, and how long a call whose
/// connection dropped is retried.
///
/// ```
/// use flowline_postgres::PgOptions;
/// use std::time::Duration;
/// let opts = PgOptions::new()
///     .table("orders_keys")
///     .pool_size(4)
///     .retry_for(Duration::from_secs(10));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub(crate) table: Option<String>,
    pub(crate) pool_size: usize,
    pub(crate) retry_for: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            table: None,
            pool_size: 4,
            retry_for: Duration::from_secs(5),
        }
    }
}

impl PgOptions {
    /// The defaults: the store's own table name (`flowline_idempotency` or
    /// `flowline_checkpoints`), a pool of 4 connections, calls retried for 5 s.
    ///
    /// ```
    /// let opts = flowline_postgres::PgOptions::new();
    /// # let _ = opts;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The table the store keeps its rows in, created if missing: a SQL identifier
    /// (letters, digits and `_`, not starting with a digit, at most 63 bytes), optionally
    /// `schema.table`. Anything else is refused when the store opens, with an error that
    /// names the option and the value; a name is never spliced into SQL unchecked.
    ///
    /// ```
    /// let opts = flowline_postgres::PgOptions::new().table("etl.checkpoints");
    /// # let _ = opts;
    /// ```
    pub fn table(mut self, name: &str) -> Self {
        self.table = Some(name.to_string());
        self
    }

    /// Connections in the pool the store opens with `connect` (default 4; must be more than
    /// zero). Ignored by `from_pool`.
    ///
    /// ```
    /// let opts = flowline_postgres::PgOptions::new().pool_size(8);
    /// # let _ = opts;
    /// ```
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// How long a store call is retried, with exponential backoff from 20 ms up to 1 s, when
    /// its connection dropped or none could be made (default 5 s; zero: one attempt). A dead
    /// connection is dropped from the pool and a new one made, so a restarted server is
    /// found again. Past the window the error comes back marked
    /// [`Transient`](flowline::Transient), and the run's [`Outage`](flowline::Outage) policy
    /// goes on trying; an error from the server about the statement itself is never retried
    /// and comes back marked [`Permanent`](flowline::Permanent).
    ///
    /// ```
    /// let opts = flowline_postgres::PgOptions::new().retry_for(std::time::Duration::from_secs(30));
    /// # let _ = opts;
    /// ```
    pub fn retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }
}

/// The checked, quoted table name, as spliced into statements.
pub(crate) fn table_ident(store: &str, value: &str) -> Result<String, BoxError> {
    let parts: Vec<&str> = value.split('.').collect();
    let ok = (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            let mut chars = p.chars();
            p.len() <= 63
                && chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if !ok {
        return Err(format!(
            "{store} option `table`: {value:?} is not a SQL identifier (letters, digits and _, \
             not starting with a digit, at most 63 bytes; optionally schema.table)"
        )
        .into());
    }
    // Quoted, so that a name that happens to be a keyword still works; the check above
    // leaves nothing that could close the quotes.
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

/// A pool of `size` connections to `url` (a `postgresql://` URL or `key=value` string),
/// without TLS.
pub(crate) fn pool(store: &str, url: &str, size: usize) -> Result<Pool, BoxError> {
    if size == 0 {
        return Err(format!("{store} option `pool_size`: 0 must be more than zero").into());
    }
    // The URL may carry a password: it is not repeated in the error.
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("{store}: the connection string does not parse: {e}"))?;
    if config.get_application_name().is_none() {
        config.application_name("flowline");
    }
    config.connect_timeout(Duration::from_secs(10));
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            // A connection that the server closed is noticed by the pool, not handed out.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        // The connection used last is handed out next: a run of calls one after another
        // (a cursor's pages) stays on one warm server process instead of going round all
        // of them.
        .queue_mode(QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| format!("{store}: cannot build the connection pool: {e}").into())
}

/// Why a call failed, and whether trying it again on another connection may help.
pub(crate) struct Failed {
    pub(crate) error: BoxError,
    pub(crate) transient: bool,
}

impl Failed {
    /// The error, marked for flowline ([`flowline::Transient`] or [`flowline::Permanent`]):
    /// the text names the table and the statement, and the marker keeps what the driver's
    /// error said about trying again.
    pub(crate) fn into_error(self) -> BoxError {
        if self.transient {
            Box::new(flowline::Transient::new(self.error))
        } else {
            Box::new(flowline::Permanent::new(self.error))
        }
    }
}

/// A failure of `statement` (a short name, never the data) on `table`.
pub(crate) fn sql_failed(table: &str, statement: &str, e: tokio_postgres::Error) -> Failed {
    let transient = is_transient_pg(&e);
    let why = match e.as_db_error() {
        // The message and the SQLSTATE; not the detail, which may quote the row's values.
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => flowline::error_chain(&e),
    };
    Failed {
        error: format!("PostgreSQL {statement} on table {table} failed: {why}").into(),
        transient,
    }
}

/// A pool that could not hand out a connection.
pub(crate) fn pool_failed(table: &str, e: PoolError) -> Failed {
    let transient = match &e {
        PoolError::Backend(e) => is_transient_pg(e),
        PoolError::Timeout(_) => true,
        _ => false,
    };
    let why = match &e {
        PoolError::Backend(e) => match e.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => flowline::error_chain(e),
        },
        other => other.to_string(),
    };
    Failed {
        error: format!("PostgreSQL connection for table {table} failed: {why}").into(),
        transient,
    }
}

/// Waits between attempts: 20 ms, 40 ms, … up to 1 s, for at most `retry_for` after the
/// first failure.
pub(crate) struct Backoff {
    retry_for: Duration,
    started: Option<tokio::time::Instant>,
    wait: Duration,
}

impl Backoff {
    pub(crate) fn new(retry_for: Duration) -> Self {
        Backoff {
            retry_for,
            started: None,
            wait: Duration::from_millis(20),
        }
    }

    /// Waits before the next attempt, or gives the error back when the failure is not
    /// transient or the window has passed.
    pub(crate) async fn wait_or_fail(&mut self, f: Failed) -> Result<(), BoxError> {
        let first = *self.started.get_or_insert_with(tokio::time::Instant::now);
        if !f.transient || first.elapsed() + self.wait > self.retry_for {
            return Err(f.into_error());
        }
        tracing::warn!(error = %f.error, retry_in = ?self.wait, "PostgreSQL call failed; retrying");
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Duration::from_secs(1));
        Ok(())
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the retry window has passed.
pub(crate) async fn retrying<T, F, Fut>(retry_for: Duration, mut attempt: F) -> Result<T, BoxError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failed>>,
{
    let mut backoff = Backoff::new(retry_for);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(f) => backoff.wait_or_fail(f).await?,
        }
    }
}

/// Creates a table with `ddl` unless it exists. Two workers starting at once may both try;
/// the loser's "already exists" is not an error.
pub(crate) async fn create_table(
    pool: &Pool,
    table: &str,
    retry_for: Duration,
    ddl: &str,
) -> Result<(), BoxError> {
    retrying(retry_for, || async {
        let client = pool.get().await.map_err(|e| pool_failed(table, e))?;
        match client.batch_execute(ddl).await {
            Ok(()) => Ok(()),
            Err(e)
                if e.code().is_some_and(|c| {
                    *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                        || *c == tokio_postgres::error::SqlState::DUPLICATE_TABLE
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(sql_failed(table, "CREATE TABLE", e)),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers_or_a_clear_error() {
        assert_eq!(table_ident("S", "flowline_x").unwrap(), "\"flowline_x\"");
        assert_eq!(table_ident("S", "etl.cp_1").unwrap(), "\"etl\".\"cp_1\"");
        for bad in [
            "",
            "1abc",
            "a-b",
            "x; drop table y",
            "a\"b",
            "a.b.c",
            "a.",
            "été",
            &"x".repeat(64),
        ] {
            let e = table_ident("PgStore", bad).unwrap_err().to_string();
            assert!(e.contains("PgStore option `table`"), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_zero_pool_or_a_bad_url_is_an_error_not_a_panic() {
        let e = pool("PgStore", "postgresql://x@127.0.0.1/db", 0).unwrap_err();
        assert!(e.to_string().contains("`pool_size`"), "{e}");
        let e = pool("PgStore", "postgresql://x:secret@127.0.0.1:notaport/db", 2).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_backoff_and_others_are_not() {
        let mut n = 0;
        let r: Result<u32, BoxError> = retrying(Duration::from_secs(5), || {
            n += 1;
            let k = n;
            async move {
                if k < 4 {
                    Err(Failed {
                        error: "dropped".into(),
                        transient: true,
                    })
                } else {
                    Ok(k)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 4);
        let mut n = 0;
        let r: Result<u32, BoxError> = retrying(Duration::from_secs(5), || {
            n += 1;
            async {
                Err(Failed {
                    error: "syntax".into(),
                    transient: false,
                })
            }
        })
        .await;
        let e = r.unwrap_err();
        assert_eq!(e.to_string(), "syntax");
        assert!(
            e.is::<flowline::Permanent>(),
            "a statement error is marked permanent"
        );
        assert_eq!(n, 1);
        let start = tokio::time::Instant::now();
        let r: Result<u32, BoxError> = retrying(Duration::from_secs(2), || async {
            Err(Failed {
                error: "down".into(),
                transient: true,
            })
        })
        .await;
        let e = r.unwrap_err();
        assert!(
            flowline::is_transient(&*e),
            "past the window: still transient, for the outage policy"
        );
        assert!(
            start.elapsed() <= Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}
