//! One contract for every store: the same checks run against the memory, SQLite,
//! PostgreSQL and Redis stores, for idempotency ([`Store`]) and checkpoints ([`CheckpointStore`]).
//!
//! Idempotency: reserve, commit, release; a done key is `AlreadyDone`; a key another holder
//! reserved is `Busy` and its commit or release by anyone else changes nothing; an expired
//! reservation is taken over and its old holder can no longer commit it; a named holder
//! restarted under the same name takes back its earlier life's reservations, and the same
//! key twice in one life is busy; a holder renews its own reservations (leases) and no
//! other's; a failed key is free again, and only its holder's fail counts. Checkpoints: load, commit (overwrites), clear, per name.

mod support;

use std::sync::Arc;
use std::time::Duration;

use flowline::{CheckpointStore, Reservation, Store};

use Reservation::{AlreadyDone, Busy, Reserved};

/// Opens a new holder on the store's shared state; named when given a name.
type Open = Box<dyn Fn(Option<&str>) -> futures::future::BoxFuture<'static, Arc<dyn Store>>>;

fn keys(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

async fn idempotency_contract(open: Open) {
    let long = Duration::from_secs(3600);
    let (a, b) = (open(None).await, open(None).await);

    // An empty chunk costs nothing and says nothing.
    assert_eq!(a.reserve(&[], long).await.unwrap(), vec![]);

    // Reserve, commit one, release the other: done stays done, released is free again.
    let k = keys(&["k1", "k2"]);
    assert_eq!(a.reserve(&k, long).await.unwrap(), vec![Reserved, Reserved]);
    a.commit(&k[..1]).await.unwrap();
    a.release(&k[1..]).await.unwrap();
    assert_eq!(
        b.reserve(&k, long).await.unwrap(),
        vec![AlreadyDone, Reserved]
    );
    b.commit(&k[1..]).await.unwrap();
    assert_eq!(
        a.reserve(&k, long).await.unwrap(),
        vec![AlreadyDone, AlreadyDone]
    );

    // Busy: another holder's live reservation; its commit and release are not ours.
    let k3 = keys(&["k3"]);
    assert_eq!(a.reserve(&k3, long).await.unwrap(), vec![Reserved]);
    assert_eq!(b.reserve(&k3, long).await.unwrap(), vec![Busy]);
    b.commit(&k3).await.unwrap();
    b.release(&k3).await.unwrap();
    assert_eq!(b.reserve(&k3, long).await.unwrap(), vec![Busy]);
    // The same key again in the same life is busy too (a duplicate in flight).
    assert_eq!(a.reserve(&k3, long).await.unwrap(), vec![Busy]);
    a.commit(&k3).await.unwrap();
    assert_eq!(b.reserve(&k3, long).await.unwrap(), vec![AlreadyDone]);

    // A key twice in one chunk: the first copy is reserved, the second is busy.
    let dup = keys(&["k4", "k4", "k5"]);
    assert_eq!(
        a.reserve(&dup, long).await.unwrap(),
        vec![Reserved, Busy, Reserved]
    );
    a.commit(&dup).await.unwrap();
    assert_eq!(
        b.reserve(&dup, long).await.unwrap(),
        vec![AlreadyDone, AlreadyDone, AlreadyDone]
    );

    // Expiry: an expired reservation is taken over; the old holder cannot commit it.
    let k6 = keys(&["k6"]);
    assert_eq!(
        a.reserve(&k6, Duration::from_millis(5)).await.unwrap(),
        vec![Reserved]
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(b.reserve(&k6, long).await.unwrap(), vec![Reserved]);
    a.commit(&k6).await.unwrap();
    a.release(&k6).await.unwrap();
    assert_eq!(a.reserve(&k6, long).await.unwrap(), vec![Busy]);
    b.commit(&k6).await.unwrap();
    assert_eq!(a.reserve(&k6, long).await.unwrap(), vec![AlreadyDone]);

    // Renewal: a holder extends its own live reservations and no one else's; a done key,
    // a released one, or one taken over after it expired is not brought back.
    let k9 = keys(&["k9", "k10", "k1"]);
    let short = Duration::from_millis(300);
    assert_eq!(a.reserve(&k9[..1], short).await.unwrap(), vec![Reserved]);
    assert_eq!(b.reserve(&k9[1..2], long).await.unwrap(), vec![Reserved]);
    assert_eq!(a.renew(&[], long).await.unwrap(), Vec::<bool>::new());
    assert_eq!(a.renew(&k9, long).await.unwrap(), vec![true, false, false]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.reserve(&k9[..1], long).await.unwrap(), vec![Busy]);
    assert_eq!(b.reserve(&k9[2..], long).await.unwrap(), vec![AlreadyDone]);
    b.release(&k9[1..2]).await.unwrap();
    assert_eq!(b.renew(&k9[1..2], long).await.unwrap(), vec![false]);
    assert_eq!(a.reserve(&k9[1..2], long).await.unwrap(), vec![Reserved]);
    let k11 = keys(&["k11"]);
    assert_eq!(
        a.reserve(&k11, Duration::from_millis(5)).await.unwrap(),
        vec![Reserved]
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(b.reserve(&k11, long).await.unwrap(), vec![Reserved]);
    assert_eq!(a.renew(&k11, long).await.unwrap(), vec![false]);
    assert_eq!(b.renew(&k11, long).await.unwrap(), vec![true]);
    assert_eq!(a.reserve(&k11, long).await.unwrap(), vec![Busy]);

    // Fail: a failed key is free to reserve again (a store may also remember it as
    // failed); only its holder's fail counts, and a failed key is not done.
    let k12 = keys(&["k12", "k13"]);
    assert_eq!(
        a.reserve(&k12, long).await.unwrap(),
        vec![Reserved, Reserved]
    );
    b.fail(&k12).await.unwrap(); // not b's: nothing
    assert_eq!(b.reserve(&k12, long).await.unwrap(), vec![Busy, Busy]);
    a.fail(&k12[..1]).await.unwrap();
    a.commit(&k12[1..]).await.unwrap();
    a.commit(&k12[..1]).await.unwrap(); // no longer reserved: nothing
    assert_eq!(
        b.reserve(&k12, long).await.unwrap(),
        vec![Reserved, AlreadyDone]
    );
    a.fail(&k12[..1]).await.unwrap(); // b's now: nothing
    assert_eq!(a.reserve(&k12[..1], long).await.unwrap(), vec![Busy]);
    b.commit(&k12[..1]).await.unwrap();
    assert_eq!(a.reserve(&k12[..1], long).await.unwrap(), vec![AlreadyDone]);

    // Holder takeover: a worker restarted under its name takes back its reservations;
    // a worker with another name (even a longer one starting alike) does not.
    let k7 = keys(&["k7"]);
    let crashed = open(Some("w1")).await;
    assert_eq!(crashed.reserve(&k7, long).await.unwrap(), vec![Reserved]);
    let other = open(Some("w10")).await;
    assert_eq!(other.reserve(&k7, long).await.unwrap(), vec![Busy]);
    assert_eq!(b.reserve(&k7, long).await.unwrap(), vec![Busy]);
    let restarted = open(Some("w1")).await;
    assert_eq!(restarted.reserve(&k7, long).await.unwrap(), vec![Reserved]);
    assert_eq!(restarted.reserve(&k7, long).await.unwrap(), vec![Busy]);
    crashed.commit(&k7).await.unwrap(); // no longer the crashed life's: ignored
    assert_eq!(other.reserve(&k7, long).await.unwrap(), vec![Busy]);
    restarted.commit(&k7).await.unwrap();
    assert_eq!(other.reserve(&k7, long).await.unwrap(), vec![AlreadyDone]);
    // A name with `#` in it is a worker of its own: `w1#2` is no life of `w1`.
    let k8 = keys(&["k8"]);
    let hashed = open(Some("w1#2")).await;
    assert_eq!(hashed.reserve(&k8, long).await.unwrap(), vec![Reserved]);
    let w1 = open(Some("w1")).await;
    assert_eq!(w1.reserve(&k8, long).await.unwrap(), vec![Busy]);
}

async fn checkpoint_contract(store: Arc<dyn CheckpointStore>) {
    assert_eq!(store.load("a").await.unwrap(), None);
    store.commit("a", "1").await.unwrap();
    store.commit("a", "2").await.unwrap();
    let odd = "it's \"quoted\"; ☃ -- not SQL";
    store.commit("b", odd).await.unwrap();
    assert_eq!(store.load("a").await.unwrap().as_deref(), Some("2"));
    assert_eq!(store.load("b").await.unwrap().as_deref(), Some(odd));
    store.clear("a").await.unwrap();
    assert_eq!(store.load("a").await.unwrap(), None);
    assert_eq!(store.load("b").await.unwrap().as_deref(), Some(odd));
    store.clear("never-set").await.unwrap();
    store.commit("a", "3").await.unwrap();
    assert_eq!(store.load("a").await.unwrap().as_deref(), Some("3"));
}

#[tokio::test]
async fn memory_stores_keep_the_contract() {
    let state = flowline::MemoryStore::new();
    let open: Open = Box::new(move |name| {
        let h = state.handle();
        let h = match name {
            Some(n) => h.holder(n),
            None => h,
        };
        Box::pin(async move { Arc::new(h) as Arc<dyn Store> })
    });
    idempotency_contract(open).await;
    checkpoint_contract(Arc::new(flowline::MemoryCheckpoints::new())).await;
}

#[tokio::test]
async fn sqlite_stores_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let p = path.clone();
    // Each holder on a connection of its own, as separate processes would be.
    let open: Open = Box::new(move |name| {
        let s = flowline_sqlite::SqliteStore::open(&p)
            .unwrap()
            .scope("contract");
        let s = match name {
            Some(n) => s.holder(n),
            None => s,
        };
        Box::pin(async move { Arc::new(s) as Arc<dyn Store> })
    });
    idempotency_contract(open).await;
    let cp = flowline_sqlite::SqliteCheckpoints::open(&path).unwrap();
    checkpoint_contract(Arc::new(cp)).await;
}

#[tokio::test]
async fn postgres_stores_keep_the_contract() {
    use flowline_postgres::{PgCheckpoints, PgOptions, PgStore};
    let mut server = support::pg::PgServer::start();
    let url = server.database();
    let base = PgStore::connect(&url).await.unwrap().scope("contract");
    let pool = base.pool().clone();
    // Holders on the shared pool, and one store opened anew per worker, as on another
    // machine.
    let open: Open = Box::new(move |name| {
        let (base, pool) = (base.clone(), pool.clone());
        let name = name.map(str::to_string);
        Box::pin(async move {
            let s = match name {
                Some(n) => PgStore::from_pool(pool, PgOptions::new())
                    .await
                    .unwrap()
                    .scope("contract")
                    .holder(&n),
                None => base.handle(),
            };
            Arc::new(s) as Arc<dyn Store>
        })
    });
    idempotency_contract(open).await;
    let cp = PgCheckpoints::connect_with(&url, PgOptions::new().table("contract_checkpoints"))
        .await
        .unwrap();
    checkpoint_contract(Arc::new(cp)).await;
}

#[tokio::test]
async fn redis_stores_keep_the_contract() {
    use flowline_redis::{RedisCheckpoints, RedisStore};
    let server = flowline_redis::test_server::RedisServer::start(false);
    let url = server.url();
    let base = RedisStore::open(&url).unwrap().scope("contract");
    // Each holder on a store opened anew, as on another machine, or a handle of the base.
    let open: Open = Box::new(move |name| {
        let s = match name {
            Some(n) => RedisStore::open(&url).unwrap().scope("contract").holder(n),
            None => base.handle(),
        };
        Box::pin(async move { Arc::new(s) as Arc<dyn Store> })
    });
    idempotency_contract(open).await;
    let cp = RedisCheckpoints::open(&server.url()).unwrap();
    checkpoint_contract(Arc::new(cp)).await;
}
