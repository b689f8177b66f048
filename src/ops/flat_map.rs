//! `flat_map`: each item becomes any number of items (from an iterator).

use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::chunk::Emit;
use crate::runtime::fused::PerItem;

pub(crate) fn flat_map<T, U, I, F>(p: Pipeline<T>, mut f: F) -> Pipeline<U>
where
    T: Send + 'static,
    U: Send + 'static,
    I: IntoIterator<Item = U>,
    F: FnMut(T) -> I + Send + 'static,
{
    fuse(
        p,
        "flat_map",
        PerItem::<_, false>(move |item: T, out: &mut Emit<_>| {
            for u in f(item) {
                out.push(u)
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn expands_and_counts_inputs_and_outputs() {
        let (out, report) = Pipeline::from_iter(0..4u32)
            .flat_map(|x| 0..x)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![0, 0, 1, 0, 1, 2]);
        let s = report.stage("flat_map").unwrap();
        // item 0 produced nothing: dropped; the other three passed and emitted 6 outputs.
        assert_eq!((s.received, s.passed, s.dropped, s.emitted), (4, 3, 1, 6));
        assert!(s.is_balanced());
    }
}
