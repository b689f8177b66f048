//! `branch(name, predicate)` and `branch_result()`: split one pipeline in two.

use std::task::{Context, Poll};

use crate::plan::Pipeline;
use crate::runtime::chunk::Chunk;
use crate::runtime::{ChunkSource, Upstream};
use crate::topology::fork::split_chunk;
use crate::topology::split_by;

/// Splits `p` into the items `predicate` accepts and the others (router stage `name`).
pub(crate) fn branch<T, F>(
    p: Pipeline<T>,
    name: &str,
    mut predicate: F,
) -> (Pipeline<T>, Pipeline<T>)
where
    T: Send + 'static,
    F: FnMut(&T) -> bool + Send + 'static,
{
    let labels = vec!["0 (matching)".to_string(), "1 (not matching)".to_string()];
    let mut pick = move |x: &T| if predicate(x) { 0 } else { 1 };
    let mut v = split_by(
        p,
        name,
        "branch",
        labels,
        false,
        move |chunk, parts, stats, run| split_chunk(chunk, parts, &mut pick, stats, run),
    );
    let rest = v.pop().expect("two branches");
    let matching = v.pop().expect("two branches");
    (matching, rest)
}

/// Splits a pipeline of `Result`s into its `Ok` values and its `Err` values.
pub(crate) fn branch_result<A, E>(p: Pipeline<Result<A, E>>) -> (Pipeline<A>, Pipeline<E>)
where
    A: Send + 'static,
    E: Send + 'static,
{
    let labels = vec!["0 (ok)".to_string(), "1 (err)".to_string()];
    let mut pick = |r: &Result<A, E>| usize::from(r.is_err());
    let mut v = split_by(
        p,
        "branch_result",
        "branch",
        labels,
        false,
        move |chunk, parts, stats, run| split_chunk(chunk, parts, &mut pick, stats, run),
    );
    let err = v.pop().expect("two branches");
    let ok = v.pop().expect("two branches");
    (unwrap(ok, ok_value::<A, E>), unwrap(err, err_value::<A, E>))
}

/// A pipeline of `Result`s whose router guarantees one variant, seen as that variant's
/// values. Not a stage of its own: the items were counted into the branch by whatever stage
/// pulls them next.
fn unwrap<A, E, X>(p: Pipeline<Result<A, E>>, f: fn(Result<A, E>) -> X) -> Pipeline<X>
where
    A: Send + 'static,
    E: Send + 'static,
    X: Send + 'static,
{
    let Pipeline { build, settings } = p;
    Pipeline {
        build: Box::new(move |b| Box::new(Unwrap { up: build(b), f }) as Upstream<X>),
        settings,
    }
}

struct Unwrap<A, E, X> {
    up: Upstream<Result<A, E>>,
    f: fn(Result<A, E>) -> X,
}

fn ok_value<A, E>(r: Result<A, E>) -> A {
    match r {
        Ok(a) => a,
        Err(_) => unreachable!("the branch_result router sends only Ok values to the ok branch"),
    }
}

fn err_value<A, E>(r: Result<A, E>) -> E {
    match r {
        Err(e) => e,
        Ok(_) => unreachable!("the branch_result router sends only Err values to the err branch"),
    }
}

impl<A: Send + 'static, E: Send + 'static, X: Send + 'static> ChunkSource<X> for Unwrap<A, E, X> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<X>>> {
        self.up.poll_chunk(cx).map(|c| {
            c.map(|c| Chunk {
                items: c.items.into_iter().map(self.f).collect(),
                tickets: c.tickets,
            })
        })
    }

    fn discard(&mut self) -> usize {
        self.up.discard()
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn every_item_reaches_exactly_one_branch_in_order() {
        let (even, odd) = Pipeline::from_iter(0..10_000u32).branch("parity", |x| x % 2 == 0);
        let (evens, odds) = (Collected::new(), Collected::new());
        let report = Graph::new()
            .collect(even, &evens)
            .collect(odd, &odds)
            .run()
            .await
            .unwrap();
        assert_eq!(
            evens.take(),
            (0..10_000).filter(|x| x % 2 == 0).collect::<Vec<_>>()
        );
        assert_eq!(
            odds.take(),
            (0..10_000).filter(|x| x % 2 == 1).collect::<Vec<_>>()
        );
        let router = report.stage("parity").unwrap();
        assert_eq!((router.received, router.passed), (10_000, 10_000));
        assert_eq!(report.stage("collect").unwrap().received, 5_000);
        assert_eq!(report.stage("collect#2").unwrap().received, 5_000);
        assert_eq!(report.delivered(), 10_000);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn a_branch_without_a_sink_is_a_config_error() {
        let (even, _odd) = Pipeline::from_iter(0..10u32).branch("parity", |x| x % 2 == 0);
        let err = even.run().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `parity`: branch = 1 (not matching): was built but \
             never given a sink: end every branch of a split in the same run (see Graph)"
        );
    }

    #[tokio::test]
    async fn a_branch_run_apart_from_its_sibling_is_a_config_error() {
        let (even, odd) = Pipeline::from_iter(0..10u32).branch("parity", |x| x % 2 == 0);
        assert!(matches!(even.run().await, Err(Error::Config { .. })));
        let err = odd.run().await.unwrap_err();
        assert!(
            err.to_string().contains("already run in another run"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn branch_result_retry_on_err_feeds_the_ok_sink() {
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let a = attempts.clone();
        let (ok, err) = Pipeline::from_iter(0..100u32)
            .map_async("call", |x| async move {
                if x % 7 == 0 { Err(x) } else { Ok(x) }
            })
            .workers(4)
            .branch_result();
        // The err branch: a retry that calls again (here the second attempt succeeds).
        let recovered = err
            .map_async("retry", move |x| {
                a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move { x }
            })
            .into_pipeline();
        let out = Collected::new();
        let report = Graph::new()
            .collect(ok.merge_with(recovered), &out)
            .run()
            .await
            .unwrap();
        let mut got = out.take();
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(attempts.load(std::sync::atomic::Ordering::Relaxed), 15);
        assert_eq!(report.stage("retry").unwrap().received, 15);
        assert_eq!(report.delivered(), 100);
        assert!(report.is_balanced());
    }
}
