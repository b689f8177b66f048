//! `unbatch()`: flattens batches back into items; each item keeps its batch's ticket.

use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::fused::PerItem;

pub(crate) fn unbatch<T: Send + 'static>(p: Pipeline<Vec<T>>) -> Pipeline<T> {
    fuse(
        p,
        "unbatch",
        PerItem::<_, false>(|batch: Vec<T>, out: &mut crate::runtime::chunk::Emit<T>| {
            for item in batch {
                out.push(item)
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::time::Duration;

    #[tokio::test]
    async fn batch_then_unbatch_is_the_identity() {
        let (out, report) = Pipeline::from_iter(0..1000u32)
            .batch(7, Duration::from_millis(5))
            .unbatch()
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
        let u = report.stage("unbatch").unwrap();
        assert_eq!((u.received, u.emitted), (143, 1000));
        assert!(report.is_balanced());
    }
}
