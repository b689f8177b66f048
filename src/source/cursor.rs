//! `Pipeline::from_cursor`: pages from a cursor-paginated API or a keyset query, with the
//! cursor checkpointed only past items that have finished.
//!
//! Items finish out of order when stages run concurrent workers, so "the last cursor seen"
//! is the wrong thing to save: after a crash it would skip items still in flight. Each page
//! here gets a completion ticket, shared by its items; when a page's items have all finished
//! (delivered, dropped by a filter, or failed into the dead letters), the page is done. The
//! cursor after page `k` is committed only once pages `0..=k` are all done: a low watermark
//! over page numbers. A failed item counts as finished (it is in the dead letters, which is
//! where a rerun would send it again), so it does not hold the watermark back. An item that
//! never finished (the run was cancelled, the process died) does: the rerun fetches its page
//! again, so items are never skipped, and duplicates are limited to the pages in flight.
//!
//! Commits run on a task of their own (ticket callbacks are synchronous and may fire on any
//! worker), so a slow store never slows the stages; the last watermark reached is committed
//! before the run returns.
//!
//! Servers that fail are ridden out under the run's [`Outage`](crate::Outage) policy, never
//! turned into a failure: a page fetch that fails with a transient error (see
//! [`CursorOptions::transient_if`]) is tried again, with the same cursor, after a growing
//! wait, while the source hands out nothing new; the checkpoint store's load and commits are
//! retried the same way (a commit holds the run's sources paused while it fails). An outage
//! longer than the policy ends the run with [`Error::Outage`](crate::Error::Outage): the
//! items in flight are left unfinished and the checkpoint stays before them.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Pull, Pulled, Source};
use crate::OutageWatch;
use crate::error::Error;
use crate::failure::{BoxError, ItemError};
use crate::plan::{Pipeline, Settings};
use crate::runtime::chunk::{Outcome, Ticket};
use crate::runtime::{RunCtx, Upstream};
use crate::store::checkpoint::CheckpointStore;
use crate::store::guarded::Guarded;

/// One page of a cursor source: its items, and where the next page starts.
///
/// ```
/// use flowline::Page;
/// let p: Page<u32, i64> = Page::next(vec![1, 2], 2);   // more after id 2
/// let q: Page<u32, i64> = Page::end(vec![]);          // nothing more
/// let r: Page<u32, i64> = Page::end_at(vec![3], 3);   // last page; a rerun resumes after 3
/// # let _ = (p, q, r);
/// ```
#[derive(Debug, Clone)]
pub struct Page<T, C> {
    items: Vec<T>,
    cursor: Option<C>,
    more: bool,
}

impl<T, C> Page<T, C> {
    /// A page with more after it: the next fetch gets `Some(cursor)`, and `cursor` is what
    /// is committed once this page and all before it have finished.
    ///
    /// ```
    /// let p = flowline::Page::next(vec!["a", "b"], "token-2".to_string());
    /// # let _ = p;
    /// ```
    pub fn next(items: Vec<T>, cursor: C) -> Self {
        Page {
            items,
            cursor: Some(cursor),
            more: true,
        }
    }

    /// The last page. No new cursor is committed for it, so a rerun fetches it again (an
    /// empty last page, as keyset pagination ends with, costs nothing to fetch again).
    ///
    /// ```
    /// let p: flowline::Page<u8, u64> = flowline::Page::end(vec![]);
    /// # let _ = p;
    /// ```
    pub fn end(items: Vec<T>) -> Self {
        Page {
            items,
            cursor: None,
            more: false,
        }
    }

    /// The last page, with the cursor a later run should resume from (one that picks up
    /// only what was added since).
    ///
    /// ```
    /// let p = flowline::Page::end_at(vec![41u8, 42], 42u64);
    /// # let _ = p;
    /// ```
    pub fn end_at(items: Vec<T>, cursor: C) -> Self {
        Page {
            items,
            cursor: Some(cursor),
            more: false,
        }
    }
}

/// How a page ended, for the watermark.
enum PageEnd {
    /// Every item finished; commit this cursor (if any) once all pages before are done.
    Done(Option<String>),
    /// Some item never finished: the watermark stops here for this run.
    Blocked,
}

#[derive(Default)]
struct Marks {
    /// The lowest page number not yet passed by the watermark.
    low: u64,
    ended: BTreeMap<u64, PageEnd>,
    /// The newest cursor the watermark reached and the committer has not written yet.
    to_commit: Option<String>,
    issued: u64,
    resolved: u64,
    /// The puller is gone: no more pages will be issued.
    source_gone: bool,
    /// The committer is waiting out its interval: a moving watermark need not wake it.
    resting: bool,
}

/// The low watermark over page numbers, shared by the page tickets and the committer.
#[derive(Default)]
pub(crate) struct Watermark {
    marks: Mutex<Marks>,
    changed: Notify,
}

impl Watermark {
    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn issue(self: &Arc<Self>, cursor: Option<String>) -> Ticket {
        let seq = {
            let mut m = self.lock();
            m.issued += 1;
            m.issued - 1
        };
        let w = self.clone();
        Ticket::new(move |outcome| w.page_ended(seq, cursor, outcome))
    }

    fn page_ended(&self, seq: u64, cursor: Option<String>, outcome: Outcome) {
        let mut m = self.lock();
        m.resolved += 1;
        let end = match outcome {
            Outcome::Done | Outcome::Failed => PageEnd::Done(cursor),
            Outcome::Cancelled => PageEnd::Blocked,
        };
        m.ended.insert(seq, end);
        let mut advanced = false;
        loop {
            let low = m.low;
            match m.ended.get(&low) {
                Some(PageEnd::Done(_)) => {
                    if let Some(PageEnd::Done(Some(c))) = m.ended.remove(&low) {
                        // A cursor the committer has not taken yet is overwritten: the
                        // newest one covers it.
                        m.to_commit = Some(c);
                        advanced = true;
                    }
                    m.low += 1;
                }
                _ => break,
            }
        }
        let last = m.source_gone && m.resolved == m.issued;
        // Wake the committer only when it has something to do: a cursor to write (unless
        // it is resting between commits), or the end of the run. A page that ends behind
        // an unfinished one changes neither.
        let wake = last || (advanced && !m.resting);
        drop(m);
        if wake {
            self.changed.notify_one();
        }
    }

    fn source_gone(&self) {
        self.lock().source_gone = true;
        self.changed.notify_one();
    }
}

/// Writes what the watermark reaches to the store, until every page issued has ended.
///
/// Commits are at least `every` apart: the newest cursor reached meanwhile is the one
/// written, and the last one is written as soon as the run ends. Each commit is a round
/// trip to the store (a thread hand-off for a blocking one), which on a fast pipeline cost
/// more than the reads themselves; a few milliseconds between commits only means a crash
/// replays those milliseconds of pages too.
async fn committer(
    w: Arc<Watermark>,
    store: Arc<dyn CheckpointStore>,
    name: Arc<str>,
    every: Duration,
    calls: Guarded,
) {
    let mut next_at: Option<Instant> = None;
    loop {
        let (pending, all_ended) = {
            let m = w.lock();
            (
                m.to_commit.is_some(),
                m.source_gone && m.resolved == m.issued,
            )
        };
        if pending && !all_ended {
            if let Some(at) = next_at.filter(|&at| at > Instant::now()) {
                w.lock().resting = true;
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    // The run ended: write the last cursor now.
                    _ = w.changed.notified() => {}
                }
                w.lock().resting = false;
                continue;
            }
        }
        let next = w.lock().to_commit.take();
        if let Some(mut cursor) = next {
            next_at = Some(crate::util::time::after(Instant::now(), every));
            // Retried while the store fails (the sources wait meanwhile); each try writes
            // the newest cursor the watermark has reached by then.
            let (store, name, w) = (&store, &name, &w);
            let written = calls
                .call(None, || {
                    if let Some(newer) = w.lock().to_commit.take() {
                        cursor = newer;
                    }
                    let c = cursor.clone();
                    async move { store.commit(name, &c).await }
                })
                .await;
            if written.is_none() {
                // The outage ended the run: the previous checkpoint stands, and a rerun
                // replays from it.
                return;
            }
            continue;
        }
        if all_ended {
            return;
        }
        w.changed.notified().await;
    }
}

/// Which fetch errors are transient (the server is down, not the request wrong).
type Classifier = Arc<dyn Fn(&ItemError) -> bool + Send + Sync>;

/// Options of a cursor source: read-ahead and how often the checkpoint is written.
///
/// ```
/// use flowline::CursorOptions;
/// use std::time::Duration;
/// let opts = CursorOptions::new().read_ahead(2).commit_every(Duration::ZERO);
/// # let _ = opts;
/// ```
#[derive(Clone)]
#[must_use = "an option set does nothing until it is passed to a stage or source"]
pub struct CursorOptions {
    read_ahead: usize,
    commit_every: Duration,
    transient: Classifier,
}

impl std::fmt::Debug for CursorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CursorOptions")
            .field("read_ahead", &self.read_ahead)
            .field("commit_every", &self.commit_every)
            .finish_non_exhaustive()
    }
}

impl Default for CursorOptions {
    fn default() -> Self {
        CursorOptions {
            read_ahead: 1,
            commit_every: Duration::from_millis(10),
            transient: Arc::new(ItemError::is_transient),
        }
    }
}

impl CursorOptions {
    /// One page of read-ahead, commits at least 10 ms apart.
    ///
    /// ```
    /// let opts = flowline::CursorOptions::new();
    /// # let _ = opts;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Fetch up to `pages` pages ahead of the one being handed out (0: fetch the next page
    /// only when the current one is all out). More read-ahead hides fetch latency and
    /// costs memory.
    ///
    /// ```
    /// let opts = flowline::CursorOptions::new().read_ahead(4);
    /// # let _ = opts;
    /// ```
    pub fn read_ahead(mut self, pages: usize) -> Self {
        self.read_ahead = pages;
        self
    }

    /// Write the checkpoint at most once per `interval` (default 10 ms; the newest safe
    /// cursor wins, and the last one is written when the run ends). `Duration::ZERO`
    /// writes every time the watermark moves and the store is free. A longer interval
    /// means fewer writes and, after a crash, a replay of that much more work.
    ///
    /// ```
    /// let opts = flowline::CursorOptions::new().commit_every(std::time::Duration::from_secs(1));
    /// # let _ = opts;
    /// ```
    pub fn commit_every(mut self, interval: Duration) -> Self {
        self.commit_every = interval;
        self
    }

    /// Which page fetch errors are faults of the server rather than of the request
    /// (default: [`ItemError::is_transient`], which sees [`Transient`](crate::Transient)
    /// markers and lost connections anywhere in the error's causes). A transient fetch
    /// error is tried again with the same cursor under the run's
    /// [`Outage`](crate::Outage) policy, the source handing out nothing new meanwhile; any
    /// other ends the source with that error.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{CursorOptions, MemoryCheckpoints, Page};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let mut down = 3;   // the first three fetches find the server restarting
    /// let fetch = move |c: Option<u32>| {
    ///     down -= 1;
    ///     let restarting = down >= 0;
    ///     async move {
    ///         if restarting { return Err("57P03: the database system is starting up".to_string()) }
    ///         let n = c.unwrap_or(0);
    ///         Ok(if n < 3 { Page::next(vec![n], n + 1) } else { Page::end(vec![]) })
    ///     }
    /// };
    /// let opts = CursorOptions::new().transient_if(|e| e.to_string().starts_with("57P03"));
    /// let out = Pipeline::from_cursor_with(MemoryCheckpoints::new(), "n", opts, fetch)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![0, 1, 2]);
    /// # }
    /// ```
    pub fn transient_if(mut self, f: impl Fn(&ItemError) -> bool + Send + Sync + 'static) -> Self {
        self.transient = Arc::new(f);
        self
    }
}

type Fetching<T, C, E> = Pin<Box<dyn Future<Output = Result<Page<T, C>, E>> + Send>>;

struct Fetched<T> {
    items: VecDeque<T>,
    ticket: Ticket,
    /// Some of its items are out: after a graceful stop the rest go out too, so that the
    /// page ends and its cursor is committed (a rerun then repeats none of them).
    begun: bool,
}

enum Start {
    Loading(crate::store::StoreFuture<'static, Option<String>>),
    /// The load failed: tried again when this wait is over.
    Waiting(Pin<Box<tokio::time::Sleep>>),
    Ready,
}

pub(crate) struct CursorPull<T, C, E, F> {
    fetch: F,
    name: Arc<str>,
    store: Arc<dyn CheckpointStore>,
    run: Arc<RunCtx>,
    /// The fetches' and the first load's view of their servers under the outage policy.
    watch: OutageWatch,
    transient: Classifier,
    /// A failed fetch is tried again when this wait is over.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    start: Start,
    cursor: Option<C>,
    more: bool,
    fetching: Option<Fetching<T, C, E>>,
    pages: VecDeque<Fetched<T>>,
    read_ahead: usize,
    tickets: Vec<Ticket>,
    marks: Arc<Watermark>,
}

impl<T, C, E, F> Drop for CursorPull<T, C, E, F> {
    fn drop(&mut self) {
        // Pages fetched but not handed out end here, as cancelled: the watermark stops
        // before them, and a rerun fetches them again.
        self.pages.clear();
        self.marks.source_gone();
    }
}

impl<T, C, E, F, Fut> CursorPull<T, C, E, F>
where
    T: Send + 'static,
    C: Clone + Display + FromStr + Send + 'static,
    <C as FromStr>::Err: Display,
    E: Into<BoxError> + Send + 'static,
    F: FnMut(Option<C>) -> Fut + Send,
    Fut: Future<Output = Result<Page<T, C>, E>> + Send + 'static,
{
    /// Hands out items of the oldest fetched pages, a run of each page at a time: the items
    /// move out in one `extend`, and each gets a clone of its page's ticket, except the last
    /// item of a page, which takes the page's own holder (so a page ends when its items have).
    fn emit(&mut self, max: usize, out: &mut Vec<T>) {
        while out.len() < max {
            let Some(page) = self.pages.front_mut() else {
                return;
            };
            let k = (max - out.len()).min(page.items.len());
            out.extend(page.items.drain(..k));
            if page.items.is_empty() {
                if let Some(p) = self.pages.pop_front() {
                    if k == 0 {
                        // An empty page: nothing to wait for.
                        p.ticket.finish(Outcome::Done);
                    } else {
                        self.tickets.extend((1..k).map(|_| p.ticket.clone()));
                        self.tickets.push(p.ticket);
                    }
                }
            } else {
                page.begun |= k > 0;
                self.tickets.extend((0..k).map(|_| page.ticket.clone()));
            }
        }
        // Empty pages next in line end now, not on the next call.
        while self.pages.front().is_some_and(|p| p.items.is_empty()) {
            if let Some(p) = self.pages.pop_front() {
                p.ticket.finish(Outcome::Done);
            }
        }
    }

    /// A call to a server failed with a transient error: the wait before the next try, or
    /// `None` once the outage has outlasted the policy (the run is then ended by it, and
    /// the source fetches nothing more).
    fn failed(&mut self, error: impl Into<BoxError>) -> Option<tokio::time::Duration> {
        match self.watch.failed(error) {
            Ok(wait) => Some(wait),
            Err(outage) => {
                self.more = false;
                self.run.outage_ended(outage);
                None
            }
        }
    }

    fn succeeded(&mut self) {
        if self.watch.is_down() {
            self.watch.succeeded();
        }
    }

    /// Loads the checkpoint (retried while the store fails). `Ready(Ok)`: loaded (or the
    /// outage ended the run: nothing is fetched then).
    fn poll_load(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ItemError>> {
        loop {
            match &mut self.start {
                Start::Ready => return Poll::Ready(Ok(())),
                Start::Waiting(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let (store, name) = (self.store.clone(), self.name.clone());
                    self.start = Start::Loading(Box::pin(async move { store.load(&name).await }));
                }
                Start::Loading(load) => match load.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        let e = format!(
                            "loading checkpoint `{}`: {}",
                            self.name,
                            crate::fault::error_chain(&*e)
                        );
                        match self.failed(e) {
                            Some(wait) => {
                                self.start = Start::Waiting(Box::pin(tokio::time::sleep(wait)));
                            }
                            None => {
                                self.start = Start::Ready;
                                return Poll::Ready(Ok(()));
                            }
                        }
                    }
                    Poll::Ready(Ok(saved)) => {
                        self.succeeded();
                        self.start = Start::Ready;
                        if let Some(s) = saved {
                            match s.parse::<C>() {
                                Ok(c) => self.cursor = Some(c),
                                Err(e) => {
                                    return Poll::Ready(Err(ItemError::user(format!(
                                        "checkpoint `{}` holds {s:?}, which is not a cursor: {e}",
                                        self.name
                                    ))));
                                }
                            }
                        }
                    }
                },
            }
        }
    }

    /// Starts and polls page fetches while read-ahead allows. `Ok(true)`: a page arrived.
    fn poll_fetch(&mut self, cx: &mut Context<'_>) -> Result<bool, ItemError> {
        if let Some(wait) = self.backoff.as_mut() {
            if wait.as_mut().poll(cx).is_pending() {
                return Ok(false);
            }
            self.backoff = None;
        }
        if self.fetching.is_none() && self.more && self.pages.len() <= self.read_ahead {
            self.fetching = Some(Box::pin((self.fetch)(self.cursor.clone())));
        }
        let Some(f) = self.fetching.as_mut() else {
            return Ok(false);
        };
        match f.as_mut().poll(cx) {
            Poll::Pending => Ok(false),
            Poll::Ready(Err(e)) => {
                self.fetching = None;
                let e = ItemError::user(e);
                if !(self.transient)(&e) {
                    self.more = false;
                    return Err(e);
                }
                // The same page is fetched again after the wait (the cursor has not moved).
                if let Some(wait) = self.failed(e) {
                    let mut sleep = Box::pin(tokio::time::sleep(wait));
                    // Polled once, so that the wait's end wakes this source.
                    if sleep.as_mut().poll(cx).is_pending() {
                        self.backoff = Some(sleep);
                    } else {
                        cx.waker().wake_by_ref();
                    }
                }
                Ok(false)
            }
            Poll::Ready(Ok(page)) => {
                self.succeeded();
                self.fetching = None;
                self.more = page.more;
                let commit = page.cursor.as_ref().map(|c| c.to_string());
                if page.cursor.is_some() {
                    self.cursor = page.cursor;
                }
                let ticket = self.marks.issue(commit);
                self.pages.push_back(Fetched {
                    items: page.items.into(),
                    ticket,
                    begun: false,
                });
                Ok(true)
            }
        }
    }
}

impl<T, C, E, F, Fut> Pull<T> for CursorPull<T, C, E, F>
where
    T: Send + 'static,
    C: Clone + Display + FromStr + Send + 'static,
    <C as FromStr>::Err: Display,
    E: Into<BoxError> + Send + 'static,
    F: FnMut(Option<C>) -> Fut + Send,
    Fut: Future<Output = Result<Page<T, C>, E>> + Send + 'static,
{
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>> {
        match self.poll_load(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        loop {
            self.emit(max, out);
            match self.poll_fetch(cx) {
                Ok(true) => continue,
                Ok(false) => break,
                // Items already handed out this call still go on; the error ends the source.
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let exhausted = !self.more && self.fetching.is_none() && self.pages.is_empty();
        match (out.is_empty(), exhausted) {
            (_, true) => Poll::Ready(Ok(Pulled::End)),
            (false, false) => Poll::Ready(Ok(Pulled::More)),
            (true, false) => Poll::Pending,
        }
    }

    fn poll_finish(
        &mut self,
        _cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>> {
        // Only the page begun is owed: pages read ahead and not started end cancelled when
        // the puller drops, and the watermark stops right after the begun one.
        if self.pages.front().is_some_and(|p| p.begun) {
            let ahead = self.pages.split_off(1);
            self.emit(max, out);
            let more = !self.pages.is_empty();
            self.pages.extend(ahead);
            if more {
                return Poll::Ready(Ok(Pulled::More));
            }
        }
        Poll::Ready(Ok(Pulled::End))
    }

    fn take_tickets(&mut self) -> Vec<Ticket> {
        std::mem::take(&mut self.tickets)
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A source over a paginated API or a keyset query, resumable after a crash.
    ///
    /// `fetch(cursor)` returns one [`Page`]: its items and the cursor of the next page.
    /// The first call gets the cursor committed under `name` in `store` (or `None` on a
    /// first run). Pages are fetched only as the pipeline has room, one page ahead of the
    /// one being handed out. The cursor after a page is committed once every item of that
    /// page and of all pages before it has finished — delivered, dropped by a filter, or
    /// failed into the dead letters — so a rerun after a crash skips nothing; it may repeat
    /// the items that were in flight. After a graceful stop ([`Handle::stop`](crate::Handle::stop))
    /// the page begun is handed out to its end, so a rerun repeats nothing. A transient
    /// fetch error (a lost connection, a server restarting: see
    /// [`CursorOptions::transient_if`]) is tried again under the run's
    /// [`Outage`](crate::Outage) policy; any other fetch error ends the source like
    /// [`try_from_fn`](Pipeline::try_from_fn). Either way the checkpoint stays at the last
    /// safe page.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{MemoryCheckpoints, Page};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryCheckpoints::new();
    /// let rows: Vec<u64> = (1..=25).collect();
    /// let fetch = move |after: Option<u64>| {
    ///     let after = after.unwrap_or(0);
    ///     let page: Vec<u64> = rows.iter().copied().filter(|&id| id > after).take(10).collect();
    ///     async move {
    ///         Ok::<_, std::convert::Infallible>(match page.last() {
    ///             Some(&last) => Page::next(page, last),
    ///             None => Page::end(page),
    ///         })
    ///     }
    /// };
    /// let report = Pipeline::from_cursor(store.clone(), "rows", fetch.clone())
    ///     .map_async("work", |id| async move { id })
    ///     .workers(4)
    ///     .run()
    ///     .await
    ///     .unwrap();
    /// assert_eq!(report.delivered(), 25);
    /// assert_eq!(store.get("rows").as_deref(), Some("25"));
    /// // Run again: it resumes after row 25 and finds nothing new.
    /// let again = Pipeline::from_cursor(store, "rows", fetch).run().await.unwrap();
    /// assert_eq!(again.delivered(), 0);
    /// # }
    /// ```
    pub fn from_cursor<C, E, F, Fut>(
        store: impl CheckpointStore,
        name: &str,
        fetch: F,
    ) -> Pipeline<T>
    where
        C: Clone + Display + FromStr + Send + 'static,
        <C as FromStr>::Err: Display,
        E: Into<BoxError> + Send + 'static,
        F: FnMut(Option<C>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Page<T, C>, E>> + Send + 'static,
    {
        Pipeline::from_cursor_with(store, name, CursorOptions::new(), fetch)
    }

    /// Like [`from_cursor`](Pipeline::from_cursor), with [`CursorOptions`]: read-ahead and
    /// how often the checkpoint is written.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use flowline::{CursorOptions, MemoryCheckpoints, Page};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryCheckpoints::new();
    /// let fetch = |c: Option<u32>| async move {
    ///     let n = c.unwrap_or(0);
    ///     Ok::<_, String>(if n < 3 { Page::next(vec![n], n + 1) } else { Page::end(vec![]) })
    /// };
    /// let opts = CursorOptions::new().commit_every(Duration::from_secs(1));
    /// let out = Pipeline::from_cursor_with(store.clone(), "n", opts, fetch)
    ///     .collect().await.unwrap();
    /// assert_eq!(out, vec![0, 1, 2]);
    /// assert_eq!(store.get("n").as_deref(), Some("3"), "the last cursor is written at the end");
    /// # }
    /// ```
    pub fn from_cursor_with<C, E, F, Fut>(
        store: impl CheckpointStore,
        name: &str,
        options: CursorOptions,
        fetch: F,
    ) -> Pipeline<T>
    where
        C: Clone + Display + FromStr + Send + 'static,
        <C as FromStr>::Err: Display,
        E: Into<BoxError> + Send + 'static,
        F: FnMut(Option<C>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Page<T, C>, E>> + Send + 'static,
    {
        let CursorOptions {
            read_ahead,
            commit_every,
            transient,
        } = options;
        let store: Arc<dyn CheckpointStore> = Arc::new(store);
        let name: Arc<str> = Arc::from(name);
        let mut settings = Settings::default();
        if name.is_empty() {
            settings.errors.push(Error::config(
                "source",
                "checkpoint name",
                &*name,
                "must not be empty",
            ));
        }
        Pipeline {
            build: Box::new(move |b| {
                let stats = b.stage("source", "source");
                let marks = Arc::new(Watermark::default());
                let calls = Guarded::new(b.run.clone(), format!("checkpoint store of `{name}`"));
                b.spawn(committer(
                    marks.clone(),
                    store.clone(),
                    name.clone(),
                    commit_every,
                    calls,
                ));
                let load = {
                    let (store, name) = (store.clone(), name.clone());
                    Box::pin(async move { store.load(&name).await })
                };
                let pull = CursorPull {
                    fetch,
                    watch: b.run.outage_policy.watch(format!("cursor source `{name}`")),
                    name,
                    store: store.clone(),
                    run: b.run.clone(),
                    transient: transient.clone(),
                    backoff: None,
                    start: Start::Loading(load),
                    cursor: None,
                    more: true,
                    fetching: None,
                    pages: VecDeque::new(),
                    read_ahead,
                    tickets: Vec::new(),
                    marks,
                };
                Box::new(Source::new(pull, stats, b.run.clone())) as Upstream<T>
            }),
            settings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryCheckpoints;
    use crate::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Pages of 10 over ids 0..n; the cursor is the next id to read.
    fn pages(
        n: u64,
        fetches: Arc<AtomicU64>,
    ) -> impl FnMut(Option<u64>) -> std::future::Ready<Result<Page<u64, u64>, String>> + Send + 'static
    {
        sized_pages(n, 10, fetches)
    }

    fn sized_pages(
        n: u64,
        size: u64,
        fetches: Arc<AtomicU64>,
    ) -> impl FnMut(Option<u64>) -> std::future::Ready<Result<Page<u64, u64>, String>> + Send + 'static
    {
        move |c| {
            fetches.fetch_add(1, Ordering::Relaxed);
            let from = c.unwrap_or(0);
            let to = (from + size).min(n);
            let items: Vec<u64> = (from..to).collect();
            std::future::ready(Ok(if to < n {
                Page::next(items, to)
            } else {
                Page::end_at(items, to)
            }))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn read_ahead_is_bounded_while_the_pipeline_is_full() {
        let fetches = Arc::new(AtomicU64::new(0));
        let pages = sized_pages(1_000_000, 1000, fetches.clone());
        let h = Pipeline::from_cursor(MemoryCheckpoints::new(), "t", pages)
            .map_async("slow", |x| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                x
            })
            .workers(1)
            .spawn();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The stage holds one item and a chunk of input; the source is still handing out
        // the first page and has fetched one more: nothing like all 1,000 pages.
        let f = fetches.load(Ordering::Relaxed);
        assert_eq!(f, 2, "fetched {f} pages");
        h.cancel();
        let _ = h.join().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_item_holds_the_checkpoint_and_a_rerun_repeats_only_its_window() {
        let store = MemoryCheckpoints::new();
        let fetches = Arc::new(AtomicU64::new(0));
        let h = Pipeline::from_cursor(store.clone(), "t", pages(100, fetches.clone()))
            .map_async("work", |x| async move {
                let d = if x == 25 { 3600 } else { 1 };
                tokio::time::sleep(Duration::from_millis(d * 1000)).await;
                x
            })
            .workers(8)
            .unordered()
            .spawn();
        tokio::time::sleep(Duration::from_secs(60)).await;
        // Items 0..25 finished long ago; 25 is stuck, so page 20..30 is not done.
        assert_eq!(store.get("t").as_deref(), Some("20"));
        h.cancel();
        let _ = h.join().await;
        assert_eq!(store.get("t").as_deref(), Some("20"));
        let out = Pipeline::from_cursor(store.clone(), "t", pages(100, fetches))
            .collect()
            .await
            .unwrap();
        assert_eq!(out, (20..100).collect::<Vec<_>>());
        assert_eq!(store.get("t").as_deref(), Some("100"));
    }

    #[tokio::test]
    async fn failed_items_pass_the_watermark_and_fetch_errors_keep_it() {
        let store = MemoryCheckpoints::new();
        let report = Pipeline::from_cursor(store.clone(), "t", pages(50, Arc::default()))
            .try_map_async("check", |x| async move {
                if x % 7 == 0 { Err("seven") } else { Ok(x) }
            })
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 8);
        assert_eq!(store.get("t").as_deref(), Some("50"));

        let store = MemoryCheckpoints::new();
        let fetch = |c: Option<u64>| async move {
            let from = c.unwrap_or(0);
            if from >= 30 {
                Err("db down".to_string())
            } else {
                Ok(Page::next((from..from + 10).collect::<Vec<_>>(), from + 10))
            }
        };
        let err = Pipeline::from_cursor(store.clone(), "t", fetch)
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("db down"), "{err}");
        assert_eq!(err.report().unwrap().delivered(), 30);
        assert_eq!(store.get("t").as_deref(), Some("30"));
    }

    #[tokio::test(start_paused = true)]
    async fn finishing_a_stream_early_does_not_wait_for_unread_items() {
        use futures_util::StreamExt;
        let store = MemoryCheckpoints::new();
        let mut s = Pipeline::from_cursor(store.clone(), "t", pages(20_000, Arc::default()))
            .map_async("work", |x| async move { x })
            .into_stream();
        assert_eq!(s.next().await, Some(0));
        assert_eq!(s.next().await, Some(1));
        let r = tokio::time::timeout(Duration::from_secs(60), s.finish()).await;
        let err = r.expect("finish hung").unwrap_err();
        assert!(matches!(err, Error::Cancelled { .. }));
        // Items 0 and 1 finished, but page 0..10 did not: nothing is committed.
        assert_eq!(store.get("t"), None);
    }

    /// Records every commit with the (paused) clock's time since the test started.
    #[derive(Clone, Default)]
    struct Commits(
        Arc<std::sync::Mutex<Vec<(Duration, String)>>>,
        Option<tokio::time::Instant>,
    );

    impl CheckpointStore for Commits {
        fn load<'a>(&'a self, _: &'a str) -> crate::store::StoreFuture<'a, Option<String>> {
            Box::pin(async { Ok(None) })
        }
        fn commit<'a>(&'a self, _: &'a str, c: &'a str) -> crate::store::StoreFuture<'a, ()> {
            let at = self.1.map(|t| t.elapsed()).unwrap_or_default();
            self.0.lock().unwrap().push((at, c.to_string()));
            Box::pin(async { Ok(()) })
        }
        fn clear<'a>(&'a self, _: &'a str) -> crate::store::StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn commits_are_spaced_by_the_interval_and_the_last_is_written_at_the_end() {
        let store = Commits(Arc::default(), Some(tokio::time::Instant::now()));
        // 30 pages of 10; one item per ms through a single worker: a page ends every 10 ms.
        let opts = CursorOptions::new().commit_every(Duration::from_millis(25));
        let report =
            Pipeline::from_cursor_with(store.clone(), "t", opts, pages(300, Arc::default()))
                .map_async("work", |x| async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    x
                })
                .run()
                .await
                .unwrap();
        assert_eq!(report.delivered(), 300);
        let commits = store.0.lock().unwrap().clone();
        for pair in commits.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            let last = pair[1].1 == "300";
            assert!(last || gap >= Duration::from_millis(25), "{commits:?}");
        }
        assert!(
            commits.len() <= 300 / 10 * 10 / 25 + 2,
            "not coalesced: {commits:?}"
        );
        let (at, last) = commits.last().unwrap().clone();
        assert_eq!(last, "300");
        assert_eq!(
            at, report.elapsed,
            "the last cursor is written as the run ends"
        );
        // Cursors only move forward.
        let values: Vec<u64> = commits.iter().map(|(_, c)| c.parse().unwrap()).collect();
        assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_interval_every_watermark_move_is_committed() {
        let store = Commits(Arc::default(), Some(tokio::time::Instant::now()));
        let opts = CursorOptions::new().commit_every(Duration::ZERO);
        Pipeline::from_cursor_with(store.clone(), "t", opts, pages(100, Arc::default()))
            .map_async("work", |x| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                x
            })
            .run()
            .await
            .unwrap();
        let values: Vec<String> = store
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect();
        let every_page: Vec<String> = (1..=10).map(|p| (p * 10).to_string()).collect();
        assert_eq!(values, every_page);
    }

    #[tokio::test]
    async fn a_checkpoint_that_does_not_parse_fails_the_source_by_name() {
        let store = MemoryCheckpoints::new();
        store.commit("t", "not-a-number").await.unwrap();
        let err = Pipeline::from_cursor(store, "t", pages(10, Arc::default()))
            .run()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("checkpoint `t`"), "{err}");
    }

    /// A graceful stop in the middle of a page starts no new call: the rest of the page is
    /// left unfinished, so its cursor is not committed, and a rerun starts at that page:
    /// nothing is skipped, and only the items of the begun page that were done run again.
    #[tokio::test(start_paused = true)]
    async fn a_graceful_stop_leaves_the_begun_page_unfinished_so_a_rerun_repeats_only_it() {
        let store = MemoryCheckpoints::new();
        let seen: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
        let run = |seen: Arc<std::sync::Mutex<Vec<u64>>>| {
            // Pages of 1,000, handed out in chunks of at most 512: the stop lands inside
            // a page.
            Pipeline::from_cursor(
                store.clone(),
                "t",
                sized_pages(10_000, 1000, Arc::default()),
            )
            .map_async("work", move |x| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    seen.lock().unwrap().push(x);
                    x
                }
            })
            .workers(4)
            .unordered()
        };
        let h = run(seen.clone()).spawn();
        while seen.lock().unwrap().len() < 2500 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        h.stop();
        let first = h.join().await.unwrap();
        assert_eq!(first.outcome, RunOutcome::Stopped);
        assert!(first.unfinished() > 0, "{first}");
        let done = seen.lock().unwrap().len() as u64;
        assert!((2500..3000).contains(&done), "{done}");
        let committed: u64 = store.get("t").unwrap().parse().unwrap();
        assert_eq!(committed, 2000, "the begun page is not committed");

        run(seen.clone()).run().await.unwrap();
        let mut all = seen.lock().unwrap().clone();
        all.sort_unstable();
        let repeated = all.len() as u64 - 10_000;
        all.dedup();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>(), "skipped");
        assert_eq!(repeated, done - committed, "only the begun page repeats");
    }

    fn reset() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")
    }

    /// Pages of 10 over ids 0..n, failing with a lost connection while `down(elapsed)`.
    fn flaky_pages(
        n: u64,
        fetches: Arc<AtomicU64>,
        down: impl Fn(Duration) -> bool + Send + Sync + 'static,
    ) -> impl FnMut(Option<u64>) -> std::future::Ready<Result<Page<u64, u64>, std::io::Error>>
    + Send
    + 'static {
        let start = tokio::time::Instant::now();
        move |c| {
            fetches.fetch_add(1, Ordering::Relaxed);
            if down(start.elapsed()) {
                return std::future::ready(Err(reset()));
            }
            let from = c.unwrap_or(0);
            let to = (from + 10).min(n);
            let items: Vec<u64> = (from..to).collect();
            std::future::ready(Ok(if to < n {
                Page::next(items, to)
            } else {
                Page::end_at(items, to)
            }))
        }
    }

    fn slow_work(p: Pipeline<u64>) -> Pipeline<u64> {
        p.map_async("work", |x| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            x
        })
        .workers(4)
        .into_pipeline()
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_fetch_failure_is_ridden_out_with_nothing_lost_or_repeated() {
        let store = MemoryCheckpoints::new();
        let fetches = Arc::new(AtomicU64::new(0));
        // Down from 1 s to 11 s; 1,000 items at 400 a second take 2.5 s without it.
        let window = |t: Duration| t >= Duration::from_secs(1) && t < Duration::from_secs(11);
        let pages = flaky_pages(1000, fetches.clone(), window);
        let (out, report) = slow_work(Pipeline::from_cursor(store.clone(), "t", pages))
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
        assert_eq!(
            (report.failures, report.outcome),
            (0, RunOutcome::Completed)
        );
        assert!(
            report.elapsed >= Duration::from_secs(11),
            "{:?}",
            report.elapsed
        );
        // The run resumed within a second of the server's return.
        assert!(
            report.elapsed < Duration::from_secs(14),
            "{:?}",
            report.elapsed
        );
        // 101 pages; the failed tries were spaced (about 10 s at 25 ms to 1 s apart).
        let retries = fetches.load(Ordering::Relaxed) - 101;
        assert!((8..40).contains(&retries), "{retries} retries");
        assert_eq!(store.get("t").as_deref(), Some("1000"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_outage_past_the_policy_ends_the_run_unfinished_behind_the_checkpoint() {
        let store = MemoryCheckpoints::new();
        let delivered: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
        let d = delivered.clone();
        // Down for good from 1 s.
        let pages = flaky_pages(100_000, Arc::default(), |t| t >= Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        let err = slow_work(Pipeline::from_cursor(store.clone(), "t", pages))
            .for_each(move |x| {
                d.lock().unwrap().push(x);
                async {}
            })
            .outage(crate::Outage::keep_trying_for(Duration::from_secs(5)))
            .await
            .unwrap_err();
        let Error::Outage { error, report } = &err else {
            panic!("{err}")
        };
        assert!(started.elapsed() < Duration::from_secs(8));
        assert!(
            error
                .to_string()
                .starts_with("cursor source `t` unreachable for 5"),
            "{error}"
        );
        assert!(error.to_string().contains("connection reset"), "{error}");
        assert_eq!(report.failures, 0);
        assert!(report.is_balanced());
        let mut delivered = delivered.lock().unwrap().clone();
        delivered.sort_unstable();
        let first_missing = delivered
            .iter()
            .enumerate()
            .find(|(i, x)| *i as u64 != **x)
            .map_or(delivered.len() as u64, |(i, _)| i as u64);
        let at: u64 = store.get("t").unwrap().parse().unwrap();
        assert!(
            at > 0 && at <= first_missing,
            "checkpoint {at}, first undelivered {first_missing}"
        );
        // A rerun with the server back does the rest.
        let out = Pipeline::from_cursor(store.clone(), "t", pages_ok(100_000))
            .take(10)
            .collect()
            .await
            .unwrap();
        assert_eq!(out[0], at);
    }

    fn pages_ok(
        n: u64,
    ) -> impl FnMut(Option<u64>) -> std::future::Ready<Result<Page<u64, u64>, std::io::Error>>
    + Send
    + 'static {
        flaky_pages(n, Arc::default(), |_| false)
    }

    /// Checkpoints whose server is down while `down` is set (an error before or, with
    /// `after_write`, after the write).
    #[derive(Clone, Default)]
    struct FlakyCheckpoints {
        inner: MemoryCheckpoints,
        down: Arc<std::sync::atomic::AtomicBool>,
        after_write: bool,
    }

    impl FlakyCheckpoints {
        fn gate<'a, T: Send + 'a>(
            &'a self,
            op: crate::store::StoreFuture<'a, T>,
        ) -> crate::store::StoreFuture<'a, T> {
            Box::pin(async move {
                let down = self.down.load(Ordering::Relaxed);
                if down && !self.after_write {
                    return Err(reset().into());
                }
                let r = op.await;
                if down {
                    return Err(reset().into());
                }
                r
            })
        }
    }

    impl CheckpointStore for FlakyCheckpoints {
        fn load<'a>(&'a self, n: &'a str) -> crate::store::StoreFuture<'a, Option<String>> {
            self.gate(self.inner.load(n))
        }
        fn commit<'a>(&'a self, n: &'a str, c: &'a str) -> crate::store::StoreFuture<'a, ()> {
            self.gate(self.inner.commit(n, c))
        }
        fn clear<'a>(&'a self, n: &'a str) -> crate::store::StoreFuture<'a, ()> {
            self.gate(self.inner.clear(n))
        }
    }

    fn toggle(down: Arc<std::sync::atomic::AtomicBool>, from: Duration, to: Option<Duration>) {
        down.store(from.is_zero(), Ordering::Relaxed);
        tokio::spawn(async move {
            tokio::time::sleep(from).await;
            down.store(true, Ordering::Relaxed);
            if let Some(to) = to {
                tokio::time::sleep(to - from).await;
                down.store(false, Ordering::Relaxed);
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_store_outage_is_ridden_out_with_the_job_paused() {
        for after_write in [false, true] {
            // Down at the start (the load waits) until 2 s, and again from 3 s to 8 s.
            let store = FlakyCheckpoints {
                after_write,
                ..Default::default()
            };
            store.inner.commit("t", "100").await.unwrap();
            let d = store.down.clone();
            toggle(d.clone(), Duration::ZERO, Some(Duration::from_secs(2)));
            let fetches = Arc::new(AtomicU64::new(0));
            let f = fetches.clone();
            let watcher = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                toggle(d, Duration::ZERO, Some(Duration::from_secs(5)));
                tokio::time::sleep(Duration::from_millis(500)).await;
                let at_3 = f.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(4)).await;
                (at_3, f.load(Ordering::Relaxed))
            });
            let opts = CursorOptions::new().commit_every(Duration::ZERO);
            let pages = flaky_pages(2000, fetches.clone(), |_| false);
            let (out, report) =
                slow_work(Pipeline::from_cursor_with(store.clone(), "t", opts, pages))
                    .collect_with_report()
                    .await
                    .unwrap();
            let (at_3, at_7) = watcher.await.unwrap();
            assert_eq!(
                at_3, at_7,
                "pages fetched while the checkpoint store was down"
            );
            assert_eq!(
                out,
                (100..2000).collect::<Vec<_>>(),
                "after_write {after_write}"
            );
            assert_eq!(
                (report.failures, report.outcome),
                (0, RunOutcome::Completed)
            );
            assert!(report.elapsed >= Duration::from_secs(8));
            assert_eq!(store.inner.get("t").as_deref(), Some("2000"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_store_outage_past_the_policy_ends_the_run_and_keeps_the_old_checkpoint() {
        let store = FlakyCheckpoints::default();
        toggle(store.down.clone(), Duration::from_secs(1), None);
        let opts = CursorOptions::new().commit_every(Duration::ZERO);
        let err = slow_work(Pipeline::from_cursor_with(
            store.clone(),
            "t",
            opts,
            pages_ok(100_000),
        ))
        .run()
        .outage(crate::Outage::keep_trying_for(Duration::from_secs(3)))
        .await
        .unwrap_err();
        let Error::Outage { error, report } = &err else {
            panic!("{err}")
        };
        assert!(
            error
                .to_string()
                .starts_with("checkpoint store of `t` unreachable"),
            "{error}"
        );
        assert_eq!(report.failures, 0);
        assert!(report.is_balanced());
        let at: u64 = store.inner.get("t").unwrap().parse().unwrap();
        // Written until it went down at 1 s (about 400 items a second), never past an item
        // that did not end.
        assert!(at >= 300 && at <= report.delivered(), "{at}: {report}");
    }

    #[tokio::test]
    async fn empty_pages_are_skipped_and_committed() {
        let store = MemoryCheckpoints::new();
        let fetch = |c: Option<u32>| async move {
            let n = c.unwrap_or(0);
            Ok::<_, String>(match n {
                0..5 => Page::next(if n % 2 == 0 { vec![] } else { vec![n] }, n + 1),
                _ => Page::end_at(vec![], n),
            })
        };
        let out = Pipeline::from_cursor(store.clone(), "t", fetch)
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![1, 3]);
        assert_eq!(store.get("t").as_deref(), Some("5"));
    }
}
