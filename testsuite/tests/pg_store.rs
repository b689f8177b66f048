//! The PostgreSQL stores under faults: a dropped connection is retried, a failed commit
//! moves nothing, errors name the table and the statement (never the data), a bad table
//! name is refused, and `commit_with` writes the effect and the keys together or not at all.
//! The behaviour every store shares is in `store_contract.rs`.

mod support;

use std::time::Duration;

use flowline::prelude::*;
use flowline::{CheckpointStore, Page, Reservation, Store};
use flowline_postgres::{PgCheckpoints, PgOptions, PgStore};

fn keys(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

/// Ends every connection of the stores (they all name themselves `flowline`).
async fn drop_connections(admin: &flowline_postgres::deadpool_postgres::Pool) -> i64 {
    let c = admin.get().await.unwrap();
    let rows = c
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'flowline' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    rows.len() as i64
}

#[tokio::test]
async fn postgres_stores_under_faults() {
    let mut server = support::pg::PgServer::start();
    let url = server.database();
    // A pool that is not one of the stores', to end the stores' connections from.
    let admin = PgCheckpoints::connect_with(
        &format!("{url} application_name=admin"),
        PgOptions::new().pool_size(1),
    )
    .await
    .unwrap();
    let admin = admin.pool().clone();

    // Bad names are refused up front, naming the option and the value.
    for (name, bad) in [
        ("PgStore", "x; drop table items"),
        ("PgCheckpoints", "9lives"),
    ] {
        let opts = PgOptions::new().table(bad);
        let e = if name == "PgStore" {
            PgStore::connect_with(&url, opts).await.unwrap_err()
        } else {
            PgCheckpoints::connect_with(&url, opts).await.unwrap_err()
        };
        let e = e.to_string();
        assert!(e.contains(&format!("{name} option `table`")), "{e}");
        assert!(e.contains(&format!("{bad:?}")), "{e}");
    }
    let e = PgStore::connect_with(&url, PgOptions::new().pool_size(0))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`pool_size`"), "{e}");

    // A dropped connection is retried: every call after the drop succeeds.
    let store = PgStore::connect(&url).await.unwrap().scope("faults");
    let cps = PgCheckpoints::connect(&url).await.unwrap();
    let ttl = Duration::from_secs(600);
    for round in 0..3 {
        let k = keys(&[&format!("d{round}")]);
        assert_eq!(
            store.reserve(&k, ttl).await.unwrap(),
            vec![Reservation::Reserved]
        );
        cps.commit("job", &round.to_string()).await.unwrap();
        assert!(drop_connections(&admin).await > 0, "round {round}");
        store.commit(&k).await.unwrap();
        assert_eq!(
            store.handle().reserve(&k, ttl).await.unwrap(),
            vec![Reservation::AlreadyDone]
        );
        assert_eq!(
            cps.load("job").await.unwrap().as_deref(),
            Some(round.to_string().as_str())
        );
        drop_connections(&admin).await;
    }

    // A failed checkpoint commit moves nothing, and its error names the table and the
    // statement but not the cursor.
    cps.commit("job", "10").await.unwrap();
    admin
        .get()
        .await
        .unwrap()
        .batch_execute(
            "ALTER TABLE flowline_checkpoints ADD CONSTRAINT short_cursor CHECK (length(cursor) < 20)",
        )
        .await
        .unwrap();
    let secret = "cursor-with-a-secret-0123456789";
    let e = cps.commit("job", secret).await.unwrap_err().to_string();
    assert!(e.contains("flowline_checkpoints"), "{e}");
    assert!(e.contains("checkpoint commit"), "{e}");
    assert!(!e.contains(secret), "the error quotes the data: {e}");
    assert_eq!(cps.load("job").await.unwrap().as_deref(), Some("10"));

    // The cursor source over that store: a commit the server refuses for good (not a
    // fault that passes) ends the run with an error naming the store, and keeps the old
    // checkpoint, so a rerun starts from an item that really ended.
    let fetch = |c: Option<String>| async move {
        let n: u64 = c.map_or(0, |c| c.trim_start_matches('x').parse().unwrap_or(0));
        // From 30 on the cursor is too long for the constraint above.
        let cursor = if n + 10 >= 30 {
            format!("{}{}", "x".repeat(30), n + 10)
        } else {
            (n + 10).to_string()
        };
        Ok::<_, String>(if n < 50 {
            Page::next((n..n + 10).collect::<Vec<u64>>(), cursor)
        } else {
            Page::end(vec![])
        })
    };
    cps.commit("src", "0").await.unwrap();
    // The last page's cursor is always long, so the final commit is always refused.
    let e = Pipeline::from_cursor(cps.clone(), "src", fetch)
        .run()
        .await
        .unwrap_err();
    assert!(matches!(e, flowline::Error::Outage { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("checkpoint store of `src`"), "{msg}");
    assert!(msg.contains("short_cursor"), "{msg}");
    assert!(
        !msg.contains("xxxxxxxxxx"),
        "the error quotes the cursor: {msg}"
    );
    // Commits are coalesced, so which of the short cursors got written varies; the long
    // ones never did.
    let kept = cps.load("src").await.unwrap();
    assert!(
        matches!(kept.as_deref(), Some("0" | "10" | "20")),
        "{kept:?}"
    );

    // commit_with: effect and keys in one transaction.
    admin
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE sent (id BIGINT NOT NULL CHECK (id <> 13))")
        .await
        .unwrap();
    let sent = |admin: flowline_postgres::deadpool_postgres::Pool| async move {
        let c = admin.get().await.unwrap();
        let r = c.query_one("SELECT count(*) FROM sent", &[]).await.unwrap();
        r.get::<_, i64>(0)
    };
    let worker = store.clone().holder("w");
    let k = keys(&["e1", "e2"]);
    worker.reserve(&k, ttl).await.unwrap();
    // The effect fails: no key is done, the reservation stands and can be released.
    let e = worker
        .commit_with(&k, async |tx| {
            tx.execute("INSERT INTO sent VALUES (1), (13)", &[]).await
        })
        .await
        .unwrap_err();
    // The effect's own error comes back as it was (here a tokio_postgres::Error).
    let db = e
        .downcast_ref::<flowline_postgres::tokio_postgres::Error>()
        .unwrap();
    let db = db.as_db_error().unwrap();
    assert!(db.message().contains("sent_id_check"), "{db}");
    assert_eq!(sent(admin.clone()).await, 0);
    assert_eq!(
        store.handle().reserve(&k, ttl).await.unwrap(),
        vec![Reservation::Busy, Reservation::Busy]
    );
    // A key not reserved by this holder: the effect is rolled back.
    let e = worker
        .commit_with(&keys(&["e1", "never"]), async |tx| {
            tx.execute("INSERT INTO sent VALUES (1)", &[]).await
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not reserved"), "{e}");
    assert_eq!(sent(admin.clone()).await, 0);
    // Across a dropped connection, then for real: both keys done, one effect row each.
    drop_connections(&admin).await;
    let n = worker
        .commit_with(&k, async |tx| {
            tx.execute("INSERT INTO sent VALUES (1), (2)", &[]).await
        })
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(sent(admin.clone()).await, 2);
    assert_eq!(
        store.handle().reserve(&k, ttl).await.unwrap(),
        vec![Reservation::AlreadyDone, Reservation::AlreadyDone]
    );
    // Done keys cannot be committed again: the effect is not written twice.
    let e = worker
        .commit_with(&k, async |tx| {
            tx.execute("INSERT INTO sent VALUES (3)", &[]).await
        })
        .await;
    assert!(e.is_err());
    assert_eq!(sent(admin.clone()).await, 2);

    // A server that is not there: an error after the retry window, not a hang.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let start = std::time::Instant::now();
    let e = PgCheckpoints::connect_with(
        &format!("host=127.0.0.1 port={gone} user=postgres"),
        PgOptions::new().retry_for(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(e.to_string().contains("flowline_checkpoints"), "{e}");
}
