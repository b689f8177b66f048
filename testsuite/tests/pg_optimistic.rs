//! An optimistic `PgStore` (no lease written when reserving): done keys are skipped, a
//! key in flight in this process is busy, another holder's live lease is respected, and
//! `commit_with` writes each key once, done, with the effect — or nothing at all.

mod support;

use std::time::Duration;

use flowline::prelude::*;
use flowline::{Reservation, Store};
use flowline_postgres::PgStore;

use Reservation::{AlreadyDone, Busy, Reserved};

fn keys(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn an_optimistic_store_writes_each_key_once_and_keeps_effects_exactly_once() {
    let mut server = support::pg::PgServer::start();
    let url = server.database();
    let leased = PgStore::connect(&url).await.unwrap().scope("opt");
    let pool = leased.pool().clone();
    pool.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE sent (id BIGINT NOT NULL CHECK (id <> 13))")
        .await
        .unwrap();
    let sent = || async {
        let c = pool.get().await.unwrap();
        let r = c.query_one("SELECT count(*) FROM sent", &[]).await.unwrap();
        r.get::<_, i64>(0)
    };
    let rows = || async {
        let c = pool.get().await.unwrap();
        let r = c
            .query_one("SELECT count(*) FROM flowline_idempotency", &[])
            .await
            .unwrap();
        r.get::<_, i64>(0)
    };
    let long = Duration::from_secs(3600);
    let a = leased.handle().optimistic();

    // Reserving writes nothing; a key in flight here is busy, in the same call or later.
    let k = keys(&["a1", "a2", "a1"]);
    assert_eq!(
        a.reserve(&k, long).await.unwrap(),
        vec![Reserved, Reserved, Busy]
    );
    assert_eq!(rows().await, 0, "no lease is written");
    assert_eq!(a.reserve(&k[..1], long).await.unwrap(), vec![Busy]);

    // A key this handle does not hold: the effect is rolled back.
    let e = a
        .commit_with(&keys(&["a1", "never"]), async |tx| {
            tx.execute("INSERT INTO sent VALUES (1)", &[]).await
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not reserved"), "{e}");
    // The effect fails: nothing is written, the keys are still held.
    let e = a
        .commit_with(&k[..2], async |tx| {
            tx.execute("INSERT INTO sent VALUES (1), (13)", &[]).await
        })
        .await
        .unwrap_err();
    assert!(
        e.downcast_ref::<flowline_postgres::tokio_postgres::Error>()
            .is_some()
    );
    assert_eq!((sent().await, rows().await), (0, 0));
    // For real: effect and keys together, each key one row, done for every holder.
    let n = a
        .commit_with(&k[..2], async |tx| {
            tx.execute("INSERT INTO sent VALUES (1), (2)", &[]).await
        })
        .await
        .unwrap();
    assert_eq!((n, sent().await, rows().await), (2, 2, 2));
    assert_eq!(
        leased.handle().reserve(&k[..2], long).await.unwrap(),
        vec![AlreadyDone, AlreadyDone]
    );
    assert_eq!(
        a.reserve(&k[..2], long).await.unwrap(),
        vec![AlreadyDone, AlreadyDone]
    );
    // The idempotent stage's commit of the same keys afterwards changes nothing.
    a.commit(&k[..2]).await.unwrap();
    // Done keys cannot be committed again.
    assert!(
        a.commit_with(&k[..2], async |tx| {
            tx.execute("INSERT INTO sent VALUES (3)", &[]).await
        })
        .await
        .is_err()
    );
    assert_eq!(sent().await, 2);

    // Another holder's live lease is respected; an expired one is taken over.
    let b = leased.handle();
    assert_eq!(
        b.reserve(&keys(&["b1"]), long).await.unwrap(),
        vec![Reserved]
    );
    assert_eq!(a.reserve(&keys(&["b1"]), long).await.unwrap(), vec![Busy]);
    let short = keys(&["b2"]);
    b.reserve(&short, Duration::from_millis(5)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(a.reserve(&short, long).await.unwrap(), vec![Reserved]);
    a.commit(&short).await.unwrap();
    b.commit(&short).await.unwrap(); // no longer b's: ignored
    assert_eq!(b.reserve(&short, long).await.unwrap(), vec![AlreadyDone]);

    // Released keys are free again; committed ones are done.
    let r = keys(&["r1", "r2"]);
    assert_eq!(a.reserve(&r, long).await.unwrap(), vec![Reserved, Reserved]);
    a.release(&r[..1]).await.unwrap();
    a.commit(&r[1..]).await.unwrap();
    assert_eq!(
        a.reserve(&r, long).await.unwrap(),
        vec![Reserved, AlreadyDone]
    );

    // Two optimistic holders take the same key: one effect gets through.
    let c = leased.handle().optimistic();
    let d = leased.handle().optimistic();
    let x = keys(&["x"]);
    assert_eq!(c.reserve(&x, long).await.unwrap(), vec![Reserved]);
    assert_eq!(d.reserve(&x, long).await.unwrap(), vec![Reserved]);
    let first = c
        .commit_with(&x, async |tx| {
            tx.execute("INSERT INTO sent VALUES (7)", &[]).await
        })
        .await;
    let second = d
        .commit_with(&x, async |tx| {
            tx.execute("INSERT INTO sent VALUES (8)", &[]).await
        })
        .await;
    assert!(first.is_ok() && second.is_err(), "{first:?} {second:?}");
    assert_eq!(sent().await, 3);

    // In a pipeline: a rerun over the same rows writes nothing again.
    let run = |store: PgStore| {
        let effects = store.clone();
        Pipeline::from_iter(100..160i64)
            .idempotent(store, |id| *id)
            .batch(25, Duration::from_millis(5))
            .try_map_async("write", move |ids: Vec<i64>| {
                let effects = effects.clone();
                async move {
                    let names: Vec<String> = ids.iter().map(i64::to_string).collect();
                    effects
                        .commit_with(&names, async |tx| {
                            tx.execute("INSERT INTO sent SELECT unnest($1::bigint[])", &[&ids])
                                .await
                        })
                        .await
                }
            })
            .run()
    };
    let first = run(leased.handle().optimistic()).await.unwrap();
    assert_eq!((first.delivered(), first.failures), (3, 0));
    assert_eq!(sent().await, 63);
    let again = run(leased.handle().optimistic()).await.unwrap();
    assert_eq!(again.stage("idempotent").unwrap().dropped, 60);
    assert_eq!(sent().await, 63);
}
