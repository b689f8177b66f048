//! [`Loader`]: a dataloader. Concurrent `load(key)` calls — from any stage, any worker, any
//! task — coalesce into one call of the user's batch function.
//!
//! How a batch forms (all on tokio's clock, no counting of `yield_now`s): the first key of a
//! batch starts a `max_wait` timer; the batch is dispatched when it holds `max_batch`
//! distinct keys or when the timer fires, whichever comes first. A key that is already
//! queued or in flight is not asked for again: its load waits for the same answer. With the
//! optional cache, answers are kept (bounded, with a TTL) and later loads of the key are
//! answered without a call.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::Error;
use crate::failure::BoxError;
use crate::runtime::ttl_map::TtlMap;

/// Why a load has no answer. A key the batch function did not return is not an error: the
/// load answers `Ok(None)`.
///
/// ```
/// use flowline::LoadError;
/// let e = LoadError::Batch(std::sync::Arc::from(flowline::BoxError::from("db down")));
/// assert_eq!(e.to_string(), "batch call failed: db down");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LoadError {
    /// The batch call failed; every load waiting on it gets this.
    Batch(Arc<BoxError>),
    /// The batch call answered an error for this key.
    Key(Arc<BoxError>),
    /// The batch function panicked.
    Panicked(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Batch(e) => write!(f, "batch call failed: {e}"),
            LoadError::Key(e) => write!(f, "{e}"),
            LoadError::Panicked(e) => write!(f, "batch call panicked: {e}"),
        }
    }
}

impl std::error::Error for LoadError {}

type Answer<V> = Result<Option<V>, LoadError>;
type BatchResult<K, V> = Result<HashMap<K, Result<V, BoxError>>, BoxError>;
type BatchFn<K, V> =
    dyn Fn(Vec<K>) -> Pin<Box<dyn Future<Output = BatchResult<K, V>> + Send>> + Send + Sync;

struct State<K, V> {
    /// Keys of the batch being formed, in arrival order.
    queued: Vec<K>,
    /// Which batch is being formed (so a timer fires only for its own batch).
    generation: u64,
    /// Loads waiting, per key queued or in flight.
    waiting: HashMap<K, Vec<oneshot::Sender<Answer<V>>>>,
    cache: Option<TtlMap<K, Option<V>>>,
}

struct Inner<K, V> {
    state: Mutex<State<K, V>>,
    call: Box<BatchFn<K, V>>,
    max_batch: usize,
    max_wait: Duration,
    calls: std::sync::atomic::AtomicU64,
}

/// A dataloader handle: cheap to clone, usable from any task.
///
/// ```
/// use flowline::Loader;
/// use std::collections::HashMap;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let users = Loader::new(100, Duration::from_millis(5), |ids: Vec<u32>| async move {
///     // one query for the whole batch: SELECT ... WHERE id IN (...)
///     Ok::<_, std::io::Error>(ids.into_iter().filter(|id| *id != 0).map(|id| (id, format!("user-{id}"))).collect::<HashMap<_, _>>())
/// }).unwrap();
/// let (a, b, missing) = tokio::join!(users.load(1), users.load(2), users.load(0));
/// assert_eq!(a.unwrap().as_deref(), Some("user-1"));
/// assert_eq!(b.unwrap().as_deref(), Some("user-2"));
/// assert_eq!(missing.unwrap(), None);                    // not found is not an error
/// assert_eq!(users.batch_calls(), 1);                   // one call for all three
/// # }
/// ```
pub struct Loader<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for Loader<K, V> {
    fn clone(&self) -> Self {
        Loader {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V> std::fmt::Debug for Loader<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("max_batch", &self.inner.max_batch)
            .field("max_wait", &self.inner.max_wait)
            .finish_non_exhaustive()
    }
}

impl<K, V> Loader<K, V> {
    /// The longest `max_wait` a loader takes: one hour.
    ///
    /// ```
    /// assert_eq!(flowline::Loader::<u32, u32>::MAX_WAIT.as_secs(), 3600);
    /// ```
    pub const MAX_WAIT: Duration = Duration::from_secs(3600);
}

impl<K, V> Loader<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A loader calling `f` with batches of up to `max_batch` distinct keys, gathered for at
    /// most `max_wait` after the first. `f` returns the values it found; a key it leaves out
    /// loads as `Ok(None)`. `max_batch` must be at least 1 and `max_wait` more than zero and
    /// at most [`Loader::MAX_WAIT`] (an hour; a batch that waits longer than that for keys
    /// is a mistake, and `Duration::MAX` would park every load for good); every bad value is
    /// named in one [`Error::Config`].
    ///
    /// ```
    /// use flowline::Loader;
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// let err = Loader::new(0, Duration::ZERO, |k: Vec<u8>| async move {
    ///     Ok::<_, String>(HashMap::<u8, u8>::new())
    /// }).unwrap_err().to_string();
    /// assert!(err.contains("max_batch") && err.contains("max_wait"), "{err}");
    /// ```
    ///
    ///
    /// ```
    /// use flowline::Loader;
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let squares = Loader::new(50, Duration::from_millis(2), |keys: Vec<u64>| async move {
    ///     Ok::<_, String>(keys.into_iter().map(|k| (k, k * k)).collect::<HashMap<_, _>>())
    /// }).unwrap();
    /// assert_eq!(squares.load(7).await.unwrap(), Some(49));
    /// # }
    /// ```
    pub fn new<F, Fut, E>(max_batch: usize, max_wait: Duration, f: F) -> Result<Self, Error>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        Self::with_key_errors(max_batch, max_wait, move |keys| {
            let fut = f(keys);
            async move {
                fut.await.map(|found| {
                    found
                        .into_iter()
                        .map(|(k, v)| (k, Ok::<V, BoxError>(v)))
                        .collect()
                })
            }
        })
    }

    /// Like [`new`](Loader::new), for a batch function that can fail per key: such a key
    /// loads as `Err(LoadError::Key(..))`, the others of the batch are unaffected.
    ///
    /// ```
    /// use flowline::{Loader, LoadError};
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let l = Loader::with_key_errors(10, Duration::from_millis(1), |keys: Vec<u8>| async move {
    ///     Ok::<_, String>(keys.into_iter().map(|k| (k, if k == 7 { Err("locked".to_string()) } else { Ok(k) })).collect::<HashMap<_, _>>())
    /// }).unwrap();
    /// let r = l.load_many(vec![1, 7]).await;
    /// assert_eq!(r[0].as_ref().unwrap(), &Some(1));
    /// assert!(matches!(&r[1], Err(LoadError::Key(e)) if e.to_string() == "locked"));
    /// # }
    /// ```
    pub fn with_key_errors<F, Fut, E, KE>(
        max_batch: usize,
        max_wait: Duration,
        f: F,
    ) -> Result<Self, Error>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, Result<V, KE>>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
        KE: Into<BoxError> + 'static,
    {
        check(max_batch, max_wait)?;
        let call = move |keys: Vec<K>| {
            let fut = f(keys);
            Box::pin(async move {
                match fut.await {
                    Ok(found) => Ok(found
                        .into_iter()
                        .map(|(k, r)| (k, r.map_err(Into::into)))
                        .collect()),
                    Err(e) => Err(e.into()),
                }
            }) as Pin<Box<dyn Future<Output = BatchResult<K, V>> + Send>>
        };
        Ok(Loader {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queued: Vec::new(),
                    generation: 0,
                    waiting: HashMap::new(),
                    cache: None,
                }),
                call: Box::new(call),
                max_batch,
                max_wait,
                calls: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Keeps answers (found and not found; not errors) for `ttl`, at most `capacity` keys,
    /// the oldest evicted first. Both must be more than zero.
    ///
    /// ```
    /// use flowline::Loader;
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let l = Loader::new(10, Duration::from_millis(1), |k: Vec<u8>| async move {
    ///     Ok::<_, String>(k.into_iter().map(|k| (k, k)).collect::<HashMap<_, _>>())
    /// }).unwrap().cache(1_000, Duration::from_secs(60)).unwrap();
    /// l.load(1).await.unwrap();
    /// l.load(1).await.unwrap();
    /// assert_eq!(l.batch_calls(), 1);
    /// # }
    /// ```
    pub fn cache(self, capacity: usize, ttl: Duration) -> Result<Self, Error> {
        if capacity == 0 {
            return Err(Error::config(
                "loader",
                "cache.capacity",
                capacity,
                "must be at least 1",
            ));
        }
        if ttl.is_zero() {
            return Err(Error::config(
                "loader",
                "cache.ttl",
                ttl,
                "must be more than zero",
            ));
        }
        self.lock().cache = Some(TtlMap::new(Some(ttl), capacity));
        Ok(self)
    }

    /// How many times the batch function has been called.
    ///
    /// ```
    /// use flowline::Loader;
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let squares = Loader::new(50, Duration::from_millis(2), |keys: Vec<u64>| async move {
    ///     Ok::<_, String>(keys.into_iter().map(|k| (k, k * k)).collect::<HashMap<_, _>>())
    /// }).unwrap();
    /// let _ = tokio::join!(squares.load(1), squares.load(2));
    /// assert_eq!(squares.batch_calls(), 1);
    /// # }
    /// ```
    pub fn batch_calls(&self) -> u64 {
        self.inner.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads one key: `Ok(Some(v))` found, `Ok(None)` not found, `Err` if the batch call
    /// or this key failed.
    ///
    /// ```
    /// use flowline::Loader;
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let squares = Loader::new(50, Duration::from_millis(2), |keys: Vec<u64>| async move {
    ///     Ok::<_, String>(keys.into_iter().map(|k| (k, k * k)).collect::<HashMap<_, _>>())
    /// }).unwrap();
    /// assert_eq!(squares.load(3).await.unwrap(), Some(9));
    /// # }
    /// ```
    pub async fn load(&self, key: K) -> Result<Option<V>, LoadError> {
        let rx = {
            let mut state = self.lock();
            match self.enqueue(&mut state, key) {
                Ok(answer) => return answer,
                Err(rx) => rx,
            }
        };
        Self::wait(rx).await
    }

    /// Loads several keys (answers in the same order); they join the current batch together.
    ///
    /// ```
    /// use flowline::Loader;
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let squares = Loader::new(50, Duration::from_millis(2), |keys: Vec<u64>| async move {
    ///     Ok::<_, String>(keys.into_iter().map(|k| (k, k * k)).collect::<HashMap<_, _>>())
    /// }).unwrap();
    /// let r = squares.load_many(vec![2, 3]).await;
    /// assert_eq!((r[0].clone().unwrap(), r[1].clone().unwrap()), (Some(4), Some(9)));
    /// # }
    /// ```
    pub async fn load_many(&self, keys: Vec<K>) -> Vec<Result<Option<V>, LoadError>> {
        let waits: Vec<Result<Answer<V>, oneshot::Receiver<Answer<V>>>> = {
            let mut state = self.lock();
            keys.into_iter()
                .map(|k| self.enqueue(&mut state, k))
                .collect()
        };
        let mut out = Vec::with_capacity(waits.len());
        for w in waits {
            out.push(match w {
                Ok(answer) => answer,
                Err(rx) => Self::wait(rx).await,
            });
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn wait(rx: oneshot::Receiver<Answer<V>>) -> Answer<V> {
        rx.await
            .unwrap_or_else(|_| Err(LoadError::Panicked("the batch call was lost".into())))
    }

    /// Answers from the cache, or registers a waiter (queueing the key if it is neither
    /// queued nor in flight) and dispatches the batch when it is full.
    fn enqueue(
        &self,
        state: &mut State<K, V>,
        key: K,
    ) -> Result<Answer<V>, oneshot::Receiver<Answer<V>>> {
        if let Some(cache) = &state.cache {
            if let Some(v) = cache.get(&key, Instant::now()) {
                return Ok(Ok(v.clone()));
            }
        }
        let (tx, rx) = oneshot::channel();
        if let Some(waiters) = state.waiting.get_mut(&key) {
            waiters.push(tx);
            return Err(rx);
        }
        state.waiting.insert(key.clone(), vec![tx]);
        state.queued.push(key);
        if state.queued.len() >= self.inner.max_batch {
            self.dispatch(state);
        } else if state.queued.len() == 1 {
            let generation = state.generation;
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(me.inner.max_wait).await;
                let mut state = me.lock();
                if state.generation == generation && !state.queued.is_empty() {
                    me.dispatch(&mut state);
                }
            });
        }
        Err(rx)
    }

    /// Sends the queued keys to the batch function (in a task of its own) and starts a new
    /// batch.
    fn dispatch(&self, state: &mut State<K, V>) {
        state.generation += 1;
        let keys = std::mem::take(&mut state.queued);
        self.inner
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            let call = std::panic::catch_unwind(AssertUnwindSafe(|| (me.inner.call)(keys.clone())));
            let result = match call {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(panic) => Err(panic),
            };
            let mut state = me.lock();
            let now = Instant::now();
            match result {
                Ok(Ok(mut found)) => {
                    for key in keys {
                        let answer = match found.remove(&key) {
                            Some(Ok(v)) => Ok(Some(v)),
                            Some(Err(e)) => Err(LoadError::Key(Arc::new(e))),
                            None => Ok(None),
                        };
                        if let (Some(cache), Ok(v)) = (state.cache.as_mut(), &answer) {
                            cache.insert(key.clone(), v.clone(), now);
                        }
                        answer_all(&mut state, &key, answer);
                    }
                }
                Ok(Err(e)) => {
                    let e = LoadError::Batch(Arc::new(e));
                    for key in keys {
                        answer_all(&mut state, &key, Err(e.clone()));
                    }
                }
                Err(panic) => {
                    let e = LoadError::Panicked(crate::failure::panic_message(&*panic));
                    for key in keys {
                        answer_all(&mut state, &key, Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Every problem of a loader's settings at once.
fn check(max_batch: usize, max_wait: Duration) -> Result<(), Error> {
    let mut problems = Vec::new();
    if max_batch == 0 {
        problems.push(Error::config(
            "loader",
            "max_batch",
            max_batch,
            "must be at least 1",
        ));
    }
    if max_wait.is_zero() {
        problems.push(Error::config(
            "loader",
            "max_wait",
            max_wait,
            "must be more than zero (a batch could not gather a second key)",
        ));
    } else if max_wait > Loader::<(), ()>::MAX_WAIT {
        problems.push(Error::config(
            "loader",
            "max_wait",
            max_wait,
            "must be at most 1 hour",
        ));
    }
    Error::all_config(problems).map_or(Ok(()), Err)
}

fn answer_all<K: Hash + Eq, V: Clone>(state: &mut State<K, V>, key: &K, answer: Answer<V>) {
    if let Some(waiters) = state.waiting.remove(key) {
        for w in waiters {
            let _ = w.send(answer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Fetched = Arc<Mutex<Vec<Vec<u32>>>>;

    fn recording(max_batch: usize, wait_ms: u64) -> (Loader<u32, String>, Fetched) {
        let fetched: Fetched = Arc::default();
        let f = fetched.clone();
        let l = Loader::with_key_errors(
            max_batch,
            Duration::from_millis(wait_ms),
            move |keys: Vec<u32>| {
                f.lock().unwrap().push(keys.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    if keys.contains(&666) {
                        return Err("batch exploded".to_string());
                    }
                    Ok(keys
                        .into_iter()
                        .filter(|k| k % 10 != 9) // keys ending in 9 do not exist
                        .map(|k| {
                            let v = if k % 10 == 7 {
                                Err(format!("key {k} is locked"))
                            } else {
                                Ok(format!("v{k}"))
                            };
                            (k, v)
                        })
                        .collect::<HashMap<_, _>>())
                }
            },
        )
        .unwrap();
        (l, fetched)
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_loads_over_a_hundred_keys_make_one_batch_call() {
        let (l, fetched) = recording(100, 10);
        let loads = (0..1000u32).map(|i| {
            let l = l.clone();
            tokio::spawn(async move { (i % 100, l.load(i % 100).await) })
        });
        let answers = futures_util::future::join_all(loads).await;
        // 100 distinct keys fill exactly one batch of max_batch = 100: one call, and every
        // later load of a key joins the in-flight call.
        assert_eq!(l.batch_calls(), 1);
        let fetched = fetched.lock().unwrap().clone();
        assert_eq!(fetched.len(), 1);
        let mut keys = fetched[0].clone();
        keys.sort();
        assert_eq!(keys, (0..100).collect::<Vec<_>>());
        let (mut found, mut missing, mut errors) = (0, 0, 0);
        for a in answers {
            let (k, r) = a.unwrap();
            match r {
                Ok(Some(v)) => {
                    assert_eq!(v, format!("v{k}"));
                    found += 1
                }
                Ok(None) => {
                    assert_eq!(k % 10, 9);
                    missing += 1
                }
                Err(LoadError::Key(e)) => {
                    assert_eq!(e.to_string(), format!("key {k} is locked"));
                    errors += 1
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((found, missing, errors), (800, 100, 100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_goes_after_max_wait() {
        let (l, fetched) = recording(100, 10);
        let start = Instant::now();
        let (a, b) = tokio::join!(l.load(1), async {
            tokio::time::sleep(Duration::from_millis(4)).await;
            l.load(2).await
        });
        assert_eq!(
            (a.unwrap(), b.unwrap()),
            (Some("v1".into()), Some("v2".into()))
        );
        assert_eq!(*fetched.lock().unwrap(), vec![vec![1, 2]]);
        // 10 ms max_wait from the first key + 3 ms call
        assert_eq!(start.elapsed(), Duration::from_millis(13));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_fails_only_its_own_loads() {
        let (l, _) = recording(2, 10);
        let r = l.load_many(vec![1, 666, 2, 3]).await;
        // batches: [1, 666] (fails) and [2, 3]
        assert!(matches!(&r[0], Err(LoadError::Batch(e)) if e.to_string() == "batch exploded"));
        assert!(matches!(&r[1], Err(LoadError::Batch(_))));
        assert_eq!(r[2].as_ref().unwrap().as_deref(), Some("v2"));
        assert_eq!(r[3].as_ref().unwrap().as_deref(), Some("v3"));
    }

    #[tokio::test(start_paused = true)]
    async fn cache_answers_until_ttl_then_calls_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let l =
            Loader::new(10, Duration::from_millis(1), move |keys: Vec<u32>| {
                c.fetch_add(1, Ordering::Relaxed);
                async move {
                    Ok::<_, String>(keys.into_iter().map(|k| (k, k)).collect::<HashMap<_, _>>())
                }
            })
            .unwrap()
            .cache(10, Duration::from_secs(1))
            .unwrap();
        assert_eq!(l.load(5).await.unwrap(), Some(5));
        tokio::time::sleep(Duration::from_millis(990)).await;
        assert_eq!(l.load(5).await.unwrap(), Some(5));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.load(5).await.unwrap(), Some(5));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_batch_function_fails_its_loads() {
        let l = Loader::new(10, Duration::from_millis(1), |_keys: Vec<u32>| async move {
            if true {
                panic!("boom");
            }
            Ok::<HashMap<u32, u32>, String>(HashMap::new())
        })
        .unwrap();
        assert!(matches!(l.load(1).await, Err(LoadError::Panicked(m)) if m == "boom"));
    }

    #[test]
    fn zero_max_batch_is_rejected() {
        let err = Loader::new(0, Duration::from_millis(1), |_k: Vec<u8>| async move {
            Ok::<HashMap<u8, u8>, String>(HashMap::new())
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `loader`: max_batch = 0: must be at least 1"
        );
    }

    fn problems(max_batch: usize, max_wait: Duration) -> Vec<(&'static str, String)> {
        let made = Loader::new(max_batch, max_wait, |_k: Vec<u8>| async move {
            Ok::<HashMap<u8, u8>, String>(HashMap::new())
        });
        match made {
            Ok(_) => Vec::new(),
            Err(Error::Config { problems }) => {
                problems.into_iter().map(|p| (p.option, p.value)).collect()
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_max_wait_of_zero_or_over_an_hour_is_rejected_with_every_problem_at_once() {
        assert_eq!(
            problems(1, Duration::ZERO),
            vec![("max_wait", "0ns".to_string())]
        );
        assert_eq!(
            problems(0, Duration::MAX),
            vec![
                ("max_batch", "0".to_string()),
                ("max_wait", "18446744073709551615.999999999s".to_string())
            ]
        );
        let just_over = Loader::<u8, u8>::MAX_WAIT + Duration::from_nanos(1);
        assert_eq!(problems(1, just_over).len(), 1);
        assert!(problems(1, Loader::<u8, u8>::MAX_WAIT).is_empty());
        assert!(problems(usize::MAX, Duration::from_nanos(1)).is_empty());
    }
}
