//! The idempotency store and the checkpoints against a real `redis-server` of each test's
//! own: reservations, holders, expiry, and the effect written with the commit
//! (`commit_with`) by the current holder only.

mod support;

use std::time::Duration;

use flowline::{CheckpointStore, Reservation, Store};
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisCheckpoints, RedisStore};
use redis::AsyncCommands;
use support::conn;

const TTL: Duration = Duration::from_secs(600);

fn keys(k: &[&str]) -> Vec<String> {
    k.iter().map(|s| s.to_string()).collect()
}

async fn count(url: &str, field: &str) -> Option<i64> {
    conn(url).await.hget("{s}:effects", field).await.unwrap()
}

fn incr(field: &str) -> redis::Pipeline {
    let mut p = redis::pipe();
    p.hincr("{s}:effects", field, 1);
    p
}

#[tokio::test]
async fn reserve_commit_release_between_two_holders() {
    let server = RedisServer::start(false);
    let a = RedisStore::open(&server.url()).unwrap().scope("s");
    let b = a.handle();
    let k = keys(&["k1", "k2"]);
    assert_eq!(
        a.reserve(&k, TTL).await.unwrap(),
        [Reservation::Reserved; 2]
    );
    assert_eq!(b.reserve(&k, TTL).await.unwrap(), [Reservation::Busy; 2]);
    a.commit(&k[..1]).await.unwrap();
    a.release(&k[1..]).await.unwrap();
    // B cannot commit or release what A holds or did.
    b.commit(&k).await.unwrap();
    b.release(&k).await.unwrap();
    assert_eq!(
        b.reserve(&k, TTL).await.unwrap(),
        [Reservation::AlreadyDone, Reservation::Reserved]
    );
    // Another scope is other keys.
    let other = RedisStore::open(&server.url()).unwrap().scope("t");
    assert_eq!(
        other.reserve(&k, TTL).await.unwrap(),
        [Reservation::Reserved; 2]
    );
}

#[tokio::test]
async fn commit_with_applies_the_effect_and_the_commit_together() {
    let server = RedisServer::start(false);
    let url = server.url();
    let a = RedisStore::open(&url).unwrap().scope("s");
    let k = keys(&["job-1"]);
    a.reserve(&k, TTL).await.unwrap();
    let mut effect = incr("job-1");
    effect.cmd("SET").arg("{s}:last").arg("job-1").ignore();
    let replies = a.commit_with(&k, &effect).await.unwrap();
    assert_eq!(replies.len(), 2);
    assert_eq!(
        redis::from_redis_value::<i64>(replies[0].clone()).unwrap(),
        1
    );
    assert_eq!(count(&url, "job-1").await, Some(1));
    assert_eq!(
        a.handle().reserve(&k, TTL).await.unwrap(),
        [Reservation::AlreadyDone]
    );
    // Done once: a second call applies nothing.
    let err = a.commit_with(&k, &incr("job-1")).await.unwrap_err();
    assert!(err.to_string().contains("already done"), "{err}");
    assert_eq!(count(&url, "job-1").await, Some(1));
    // No keys: the effect alone, atomically.
    a.commit_with(&[], &incr("free")).await.unwrap();
    assert_eq!(count(&url, "free").await, Some(1));
}

#[tokio::test]
async fn a_holder_that_lost_its_reservation_applies_nothing() {
    let server = RedisServer::start(false);
    let url = server.url();
    let store = RedisStore::open(&url).unwrap().scope("s");

    // Never reserved.
    let err = store
        .commit_with(&keys(&["k0"]), &incr("k0"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not reserved"), "{err}");

    // Expired and taken over by another worker: the late one must not apply its effect.
    let late = store.handle();
    let k = keys(&["k1"]);
    late.reserve(&k, Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let current = store.handle();
    assert_eq!(
        current.reserve(&k, TTL).await.unwrap(),
        [Reservation::Reserved]
    );
    let err = late.commit_with(&k, &incr("k1")).await.unwrap_err();
    assert!(err.to_string().contains("another holder"), "{err}");
    assert_eq!(
        count(&url, "k1").await,
        None,
        "the late holder's effect was applied"
    );
    current.commit_with(&k, &incr("k1")).await.unwrap();
    assert_eq!(count(&url, "k1").await, Some(1));

    // A crashed worker's earlier life, taken back by its restart under the same name.
    let crashed = store.clone().holder("w1");
    let k = keys(&["k2"]);
    crashed.reserve(&k, TTL).await.unwrap();
    let restarted = store.clone().holder("w1");
    assert_eq!(
        restarted.reserve(&k, TTL).await.unwrap(),
        [Reservation::Reserved]
    );
    assert!(crashed.commit_with(&k, &incr("k2")).await.is_err());
    restarted.commit_with(&k, &incr("k2")).await.unwrap();
    assert_eq!(count(&url, "k2").await, Some(1));

    // One key of several not held: nothing at all is applied.
    let both = keys(&["k3", "k4"]);
    let h = store.handle();
    h.reserve(&both[..1], TTL).await.unwrap();
    let mut effect = incr("k3");
    effect.hincr("{s}:effects", "k4", 1);
    assert!(h.commit_with(&both, &effect).await.is_err());
    assert_eq!(
        (count(&url, "k3").await, count(&url, "k4").await),
        (None, None)
    );
}

#[tokio::test]
async fn a_named_holder_takes_back_only_its_own_earlier_life() {
    let server = RedisServer::start(false);
    let store = RedisStore::open(&server.url()).unwrap().scope("s");
    let k = keys(&["k"]);
    // `w1#2` starts with `w1#` but is another worker.
    let other = store.clone().holder("w1#2");
    other.reserve(&k, TTL).await.unwrap();
    let w1 = store.clone().holder("w1");
    assert_eq!(w1.reserve(&k, TTL).await.unwrap(), [Reservation::Busy]);
    let w1_again = store.clone().holder("w1#2");
    assert_eq!(
        w1_again.reserve(&k, TTL).await.unwrap(),
        [Reservation::Reserved]
    );
}

#[tokio::test]
async fn a_failing_effect_command_is_named_and_leaves_the_keys_reserved() {
    let server = RedisServer::start(false);
    let url = server.url();
    let mut c = conn(&url).await;
    let _: () = c.set("{s}:text", "not a hash").await.unwrap();
    let store = RedisStore::open(&url).unwrap().scope("s");
    let k = keys(&["k"]);
    store.reserve(&k, TTL).await.unwrap();
    let mut effect = incr("k");
    effect.hincr("{s}:text", "k", 1);
    let err = store
        .commit_with(&k, &effect)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("command 2 (HINCRBY)") && err.contains("WRONGTYPE"),
        "{err}"
    );
    // Redis has no rollback: the first command stays; the key is not done.
    assert_eq!(count(&url, "k").await, Some(1));
    assert_eq!(
        store.handle().reserve(&k, TTL).await.unwrap(),
        [Reservation::Busy]
    );
    // Hostile effects fail before anything is sent.
    let mut empty = redis::pipe();
    empty.add_command(redis::Cmd::new());
    assert!(store.commit_with(&k, &empty).await.is_err());
    let mut huge = redis::pipe();
    huge.cmd("DEL").arg(vec!["x"; 8_000]);
    let err = store.commit_with(&k, &huge).await.unwrap_err().to_string();
    assert!(err.contains("8001 arguments"), "{err}");
}

#[tokio::test]
async fn wrong_types_and_bad_values_at_the_keys_are_errors() {
    let server = RedisServer::start(false);
    let url = server.url();
    let mut c = conn(&url).await;
    let _: () = c.set("flowline:{s}:idempotency", "a string").await.unwrap();
    let store = RedisStore::open(&url).unwrap().scope("s");
    let err = store.reserve(&keys(&["k"]), TTL).await.unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert!(store.commit_with(&keys(&["k"]), &incr("k")).await.is_err());

    // A field written by something else is refused, not misread.
    let _: () = c
        .hset("flowline:{t}:idempotency", "k", "junk")
        .await
        .unwrap();
    let _: () = c
        .hset("flowline:{t}:idempotency", "k2", "0:soon:x")
        .await
        .unwrap();
    let t = RedisStore::open(&url).unwrap().scope("t");
    for k in ["k", "k2"] {
        let err = t.reserve(&keys(&[k]), TTL).await.unwrap_err();
        assert!(err.to_string().contains("malformed reservation"), "{err}");
    }
    t.commit(&keys(&["k"])).await.unwrap();
    t.release(&keys(&["k"])).await.unwrap();

    // A scope that would break the hash tag fails every call, naming it.
    let bad = RedisStore::open(&url).unwrap().scope("a}b");
    let err = bad.reserve(&keys(&["k"]), TTL).await.unwrap_err();
    assert!(err.to_string().contains("\"a}b\""), "{err}");

    let _: () = c.set("cp", "a string").await.unwrap();
    let cp = RedisCheckpoints::open(&url).unwrap().key("cp");
    let err = cp.load("p").await.unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert!(cp.commit("p", "1").await.is_err());
}

#[tokio::test]
async fn checkpoints_commit_load_and_clear_by_name() {
    let server = RedisServer::start(false);
    let url = server.url();
    let cp = RedisCheckpoints::open(&url)
        .unwrap()
        .key("{jobs}:checkpoints");
    assert_eq!(cp.load("a").await.unwrap(), None);
    cp.commit("a", "10").await.unwrap();
    cp.commit("b", "7").await.unwrap();
    cp.commit("a", "20").await.unwrap();
    // Another process (another handle) sees the last commit of each name.
    let other = RedisCheckpoints::open(&url)
        .unwrap()
        .key("{jobs}:checkpoints");
    assert_eq!(other.load("a").await.unwrap().as_deref(), Some("20"));
    assert_eq!(other.load("b").await.unwrap().as_deref(), Some("7"));
    other.clear("a").await.unwrap();
    assert_eq!(cp.load("a").await.unwrap(), None);
    assert_eq!(cp.load("b").await.unwrap().as_deref(), Some("7"));
    // Another key is other checkpoints.
    let elsewhere = RedisCheckpoints::open(&url).unwrap();
    assert_eq!(elsewhere.load("b").await.unwrap(), None);
}
