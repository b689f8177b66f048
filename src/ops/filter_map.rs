//! `filter_map`: transform and keep the `Some`s; `None`s are counted as dropped.

use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::chunk::Emit;
use crate::runtime::fused::PerItem;

pub(crate) fn filter_map<T, U, F>(p: Pipeline<T>, mut f: F) -> Pipeline<U>
where
    T: Send + 'static,
    U: Send + 'static,
    F: FnMut(T) -> Option<U> + Send + 'static,
{
    fuse(
        p,
        "filter_map",
        PerItem::<_, true>(move |item: T, out: &mut Emit<_>| {
            if let Some(u) = f(item) {
                out.push(u)
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn keeps_somes_counts_nones() {
        let (out, report) = Pipeline::from_iter(["1", "x", "3"])
            .filter_map(|s| s.parse::<u32>().ok())
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![1, 3]);
        assert_eq!(report.stage("filter_map").unwrap().dropped, 1);
    }
}
