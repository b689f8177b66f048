//! `filter`: keep the items a predicate accepts; the rest are counted as dropped.

use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::chunk::Emit;
use crate::runtime::fused::PerItem;

pub(crate) fn filter<T, F>(p: Pipeline<T>, mut keep: F) -> Pipeline<T>
where
    T: Send + 'static,
    F: FnMut(&T) -> bool + Send + 'static,
{
    fuse(
        p,
        "filter",
        PerItem::<_, true>(move |item: T, out: &mut Emit<_>| {
            if keep(&item) {
                out.push(item)
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn drops_are_counted() {
        let (out, report) = Pipeline::from_iter(0..100u32)
            .filter(|x| x % 3 == 0)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out.len(), 34);
        let f = report.stage("filter").unwrap();
        assert_eq!((f.received, f.passed, f.dropped), (100, 34, 66));
    }

    #[tokio::test]
    async fn a_filter_that_drops_everything_still_ends() {
        let report = Pipeline::from_iter(0..100_000u32)
            .filter(|_| false)
            .run()
            .await
            .unwrap();
        assert_eq!(report.stage("filter").unwrap().dropped, 100_000);
        assert_eq!(report.delivered(), 0);
    }
}
