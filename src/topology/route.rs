//! `route(n, |item| index)`: split one pipeline into `n`, each item to the branch its index
//! names.

use crate::error::Error;
use crate::plan::Pipeline;
use crate::topology::fork::split_chunk;
use crate::topology::{rejected, split_by};

/// Splits `p` into `n` pipelines; `pick` returns each item's branch. An index `>= n` fails
/// that item (dead letter) at the router.
pub(crate) fn route<T, F>(p: Pipeline<T>, n: usize, mut pick: F) -> Vec<Pipeline<T>>
where
    T: Send + 'static,
    F: FnMut(&T) -> usize + Send + 'static,
{
    if n == 0 {
        return rejected(
            p,
            Error::config("route", "branches", 0usize, "must be at least 1"),
        );
    }
    let labels = (0..n).map(|i| i.to_string()).collect();
    split_by(
        p,
        "route",
        "route",
        labels,
        false,
        move |chunk, parts, stats, run| split_chunk(chunk, parts, &mut pick, stats, run),
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn every_item_reaches_the_branch_it_names_in_order() {
        let lanes = Pipeline::from_iter(0..3_000u32).route(3, |x| (x % 3) as usize);
        let outs: Vec<Collected<u32>> = (0..3).map(|_| Collected::new()).collect();
        let graph = lanes
            .into_iter()
            .zip(&outs)
            .fold(Graph::new(), |g, (l, out)| g.collect(l, out));
        let report = graph.run().await.unwrap();
        for (i, out) in outs.iter().enumerate() {
            let want: Vec<u32> = (0..3_000).filter(|x| x % 3 == i as u32).collect();
            assert_eq!(out.take(), want);
        }
        assert_eq!(report.delivered(), 3_000);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn an_index_out_of_range_fails_the_item() {
        let lanes =
            Pipeline::from_iter(0..10u32).route(2, |x| if *x == 5 { 9 } else { (x % 2) as usize });
        let graph = lanes.into_iter().fold(Graph::new(), Graph::discard);
        let report = graph.run().await.unwrap();
        let router = report.stage("route").unwrap();
        assert_eq!((router.received, router.passed, router.failed), (10, 9, 1));
        assert_eq!(report.failures, 1);
        assert_eq!(
            report.failure_sample[0].error.to_string(),
            "route index 9 is out of range for 2 branches"
        );
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn zero_branches_is_a_config_error() {
        let lanes = Pipeline::from_iter(0..10u32).route(0, |_| 0);
        assert_eq!(lanes.len(), 1);
        let err = lanes.into_iter().next().unwrap().run().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `route`: branches = 0: must be at least 1"
        );
    }
}
