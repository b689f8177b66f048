//! Suite `source`, PostgreSQL cases, on a cluster the bench starts itself (as the tests do,
//! `testsuite/tests/support/pg.rs`), or the server of `FLOWLINE_PG_URL`.
//!
//! - `cursor_pg`: rows through `Pipeline::from_cursor` over a PostgreSQL table (keyset pages
//!   of 1,000, checkpoints in PostgreSQL, a trivial stage) against a hand-written keyset loop
//!   doing the same reads on one connection, alternating, median of each. Rows:
//!   `FLOWLINE_BENCH_ROWS` (default 1,000,000).
//! - `exactly_once_pg`: rows/s with each batch's effect (rows inserted into an effects
//!   table) written in one transaction with the rows' idempotency keys (`idempotent` +
//!   `PgStore::commit_with`), checkpoints in PostgreSQL, against a hand-written keyset loop
//!   that writes, per page and in one transaction, the effects, the keys and the cursor.
//!   `flowline` is an [`optimistic`](PgStore::optimistic) store, the one worker of its
//!   scope like the loop (each key written once); `leased` is the default store, which
//!   writes a lease per key when it reserves and marks it done in the effect's
//!   transaction (`leased_ratio` against the same baseline).
//!   Rows: `FLOWLINE_BENCH_PG_EO_ROWS` (default 200,000).

use std::hint::black_box;
use std::time::{Duration, Instant};

use flowline::Page;
use flowline::prelude::*;
use flowline_postgres::deadpool_postgres::Pool;
use flowline_postgres::tokio_postgres::{self, NoTls};
use flowline_postgres::{PgCheckpoints, PgOptions, PgStore};

use crate::util::{alternate, emit, ns_per_item, runtime};

const PAGE: i64 = 1000;
const REPS: usize = 5;
const READ: &str = "SELECT id, payload FROM items WHERE id > $1 ORDER BY id LIMIT $2";

fn rows_from_env(var: &str, default: i64) -> i64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

async fn fill(url: &str, rows: i64) {
    let c = client(url).await;
    c.batch_execute(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, payload TEXT NOT NULL);
         CREATE TABLE effects (id BIGINT NOT NULL);",
    )
    .await
    .expect("create");
    c.execute(
        "INSERT INTO items SELECT g, 'payload-' || g FROM generate_series(1, $1::bigint) AS g",
        &[&rows],
    )
    .await
    .expect("fill");
    c.batch_execute("VACUUM ANALYZE items")
        .await
        .expect("vacuum");
}

async fn page(pool: &Pool, after: i64) -> Result<Vec<(i64, String)>, flowline::BoxError> {
    let c = pool.get().await?;
    let q = c.prepare_cached(READ).await?;
    let mut out = Vec::with_capacity(PAGE as usize);
    for r in c.query(&q, &[&after, &PAGE]).await? {
        out.push((r.try_get(0)?, r.try_get(1)?));
    }
    Ok(out)
}

fn to_page(p: Vec<(i64, String)>) -> Page<(i64, String), i64> {
    match p.last().map(|r| r.0) {
        Some(last) => Page::next(p, last),
        None => Page::end(p),
    }
}

/// The hand-written keyset loop: same reads, same trivial work, one connection.
async fn baseline_keyset(url: &str, rows: i64) {
    let c = client(url).await;
    let q = c.prepare(READ).await.expect("prepare");
    let (mut after, mut sum, mut n) = (0i64, 0u64, 0i64);
    loop {
        let p = c.query(&q, &[&after, &PAGE]).await.expect("page");
        let Some(last) = p.last().map(|r| r.get::<_, i64>(0)) else {
            break;
        };
        for r in p {
            let (id, payload): (i64, String) = (r.get(0), r.get(1));
            sum = sum.wrapping_add(id as u64 + payload.len() as u64);
            n += 1;
        }
        after = last;
    }
    assert_eq!(n, rows);
    black_box(sum);
}

async fn flowline_cursor(cps: &PgCheckpoints, name: &str, rows: i64) {
    let pool = cps.pool().clone();
    let fetch = move |c: Option<i64>| {
        let pool = pool.clone();
        async move { page(&pool, c.unwrap_or(0)).await.map(to_page) }
    };
    let report = Pipeline::from_cursor(cps.clone(), name, fetch)
        .map(|(id, payload): (i64, String)| id as u64 + payload.len() as u64)
        .run()
        .await
        .expect("run");
    assert_eq!(report.delivered(), rows as u64);
}

fn cursor_pg(url: &str) {
    let rows = rows_from_env("FLOWLINE_BENCH_ROWS", 1_000_000);
    let rt = runtime();
    rt.block_on(fill(url, rows));
    let cps = rt
        .block_on(PgCheckpoints::connect_with(url, PgOptions::new()))
        .expect("checkpoints");
    let mut rep = 0;
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    // Warm both (the table's pages in the server's cache).
    rt.block_on(baseline_keyset(url, rows));
    let (f, b) = alternate(
        REPS,
        || {
            // A fresh checkpoint name per run: each run reads the whole table.
            rep += 1;
            let name = format!("bench-{rep}");
            time(&mut || rt.block_on(flowline_cursor(&cps, &name, rows)))
        },
        || time(&mut || rt.block_on(baseline_keyset(url, rows))),
    );
    let (flow, base) = (ns_per_item(f, rows as u64), ns_per_item(b, rows as u64));
    emit(
        "source",
        "cursor_pg",
        flow,
        base,
        "ns/item",
        serde_json::json!({
            "rows": rows,
            "page": PAGE,
            "reps": REPS,
            "flowline_rows_per_s": (1e9 / flow).round(),
            "baseline_rows_per_s": (1e9 / base).round(),
        }),
    );
}

const EFFECT: &str = "INSERT INTO effects (id) SELECT unnest($1::bigint[])";

/// Per page, one transaction: the effects, the keys (done) and the cursor.
async fn baseline_exactly_once(url: &str, rows: i64) {
    let mut c = client(url).await;
    let q = c.prepare(READ).await.expect("prepare");
    let mut after = 0i64;
    let mut n = 0i64;
    loop {
        let p = c.query(&q, &[&after, &PAGE]).await.expect("page");
        let Some(last) = p.last().map(|r| r.get::<_, i64>(0)) else {
            break;
        };
        let ids: Vec<i64> = p.iter().map(|r| r.get(0)).collect();
        let keys: Vec<String> = ids.iter().map(i64::to_string).collect();
        let tx = c.transaction().await.expect("begin");
        tx.execute(EFFECT, &[&ids]).await.expect("effects");
        tx.execute(
            "INSERT INTO base_keys (scope, key, state) SELECT 'bench', k, 1 FROM unnest($1::text[]) AS k
             ON CONFLICT (scope, key) DO NOTHING",
            &[&keys],
        )
        .await
        .expect("keys");
        tx.execute(
            "INSERT INTO base_checkpoints (name, cursor) VALUES ('bench', $1)
             ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor",
            &[&last.to_string()],
        )
        .await
        .expect("cursor");
        tx.commit().await.expect("commit");
        n += ids.len() as i64;
        after = last;
    }
    assert_eq!(n, rows);
}

async fn flowline_exactly_once(cps: &PgCheckpoints, keys: &PgStore, name: &str, rows: i64) {
    let pool = cps.pool().clone();
    let fetch = move |c: Option<i64>| {
        let pool = pool.clone();
        async move { page(&pool, c.unwrap_or(0)).await.map(to_page) }
    };
    let effects = keys.clone();
    let report = Pipeline::from_cursor(cps.clone(), name, fetch)
        .idempotent(keys.clone(), |row| row.0)
        .batch(PAGE as usize, Duration::from_millis(5))
        .try_map_async("effect", move |batch: Vec<(i64, String)>| {
            let effects = effects.clone();
            async move {
                let ids: Vec<i64> = batch.iter().map(|r| r.0).collect();
                let names: Vec<String> = ids.iter().map(i64::to_string).collect();
                effects
                    .commit_with(&names, async |tx| tx.execute(EFFECT, &[&ids]).await)
                    .await
            }
        })
        .workers(2)
        .unordered()
        .run()
        .await
        .expect("run");
    assert_eq!(report.failures, 0);
    assert_eq!(
        report.stage("idempotent").expect("stage").dropped,
        0,
        "every row is new"
    );
    let _ = rows;
}

async fn reset(url: &str) {
    let c = client(url).await;
    c.batch_execute(
        "TRUNCATE effects;
         CREATE TABLE IF NOT EXISTS base_keys (scope TEXT, key TEXT, state SMALLINT, PRIMARY KEY (scope, key));
         CREATE TABLE IF NOT EXISTS base_checkpoints (name TEXT PRIMARY KEY, cursor TEXT NOT NULL);
         TRUNCATE base_keys, base_checkpoints;
         TRUNCATE flowline_idempotency, flowline_checkpoints;",
    )
    .await
    .expect("reset");
    // On its own: VACUUM cannot run inside the implicit transaction of several statements.
    c.batch_execute("VACUUM effects, base_keys, flowline_idempotency")
        .await
        .expect("vacuum");
}

fn exactly_once_pg(url: &str) {
    let rows = rows_from_env("FLOWLINE_BENCH_PG_EO_ROWS", 200_000);
    let rt = runtime();
    // The table of `cursor_pg` when it ran first; otherwise a table of this size.
    let have: i64 = rt.block_on(async {
        let c = client(url).await;
        match c.query_one("SELECT count(*) FROM items", &[]).await {
            Ok(r) => r.get(0),
            Err(_) => -1,
        }
    });
    if have < 0 {
        rt.block_on(fill(url, rows));
    }
    let rows = if have > 0 { have.min(rows) } else { rows };
    if have > rows {
        rt.block_on(async {
            client(url)
                .await
                .execute("DELETE FROM items WHERE id > $1", &[&rows])
                .await
                .expect("trim")
        });
    }
    let cps = rt
        .block_on(PgCheckpoints::connect_with(url, PgOptions::new()))
        .expect("checkpoints");
    let leased = rt
        .block_on(PgStore::from_pool(cps.pool().clone(), PgOptions::new()))
        .expect("keys")
        .scope("bench");
    // The one worker of its scope, as the baseline is: no lease, each key written once,
    // done, in the effect's transaction.
    let keys = leased.handle().optimistic();
    let mut rep = 0;
    let timed = |f: &mut dyn FnMut()| {
        rt.block_on(reset(url));
        let t = Instant::now();
        f();
        t.elapsed()
    };
    let (f, b, l) = {
        let mut fl = Vec::new();
        let mut bl = Vec::new();
        let mut ll = Vec::new();
        for _ in 0..REPS {
            rep += 1;
            let name = format!("eo-{rep}");
            fl.push(timed(&mut || {
                rt.block_on(flowline_exactly_once(&cps, &keys, &name, rows))
            }));
            bl.push(timed(&mut || rt.block_on(baseline_exactly_once(url, rows))));
            let name = format!("eo-leased-{rep}");
            ll.push(timed(&mut || {
                rt.block_on(flowline_exactly_once(&cps, &leased, &name, rows))
            }));
        }
        (
            crate::util::median(&mut fl),
            crate::util::median(&mut bl),
            crate::util::median(&mut ll),
        )
    };
    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    let per = |d: Duration| ns_per_item(d, rows as u64);
    emit(
        "source",
        "exactly_once_pg",
        per(f),
        per(b),
        "ns/item",
        serde_json::json!({
            "rows": rows,
            "page": PAGE,
            "reps": REPS,
            "flowline_rows_per_s": rate(f).round(),
            "baseline_rows_per_s": rate(b).round(),
            // With a lease per key (the default, for workers that may share keys).
            "leased": (per(l) * 1000.0).round() / 1000.0,
            "leased_ratio": (per(l) / per(b) * 1000.0).round() / 1000.0,
        }),
    );
}

/// Runs the PostgreSQL cases of the suite (all, or only `only`) on one server.
pub fn run(only: Option<&str>) {
    let want = |c: &str| only.is_none_or(|o| o == c);
    let mut server = crate::pg_server::PgServer::start();
    let url = server.database();
    if want("cursor_pg") {
        cursor_pg(&url);
    }
    if want("exactly_once_pg") {
        exactly_once_pg(&url);
    }
}
