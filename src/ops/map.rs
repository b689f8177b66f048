//! `map`: a synchronous 1:1 transformation, fused into the task before it.

use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::fused::MapOp;

pub(crate) fn map<T, U, F>(p: Pipeline<T>, f: F) -> Pipeline<U>
where
    T: Send + 'static,
    U: Send + 'static,
    F: FnMut(T) -> U + Send + 'static,
{
    fuse(p, "map", MapOp(f))
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn maps_in_order_and_counts() {
        let (out, report) = Pipeline::from_iter(0..1000u64)
            .map(|x| x + 1)
            .map(|x| x * 2)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, (0..1000).map(|x| (x + 1) * 2).collect::<Vec<_>>());
        let second = report.stage("map#2").unwrap();
        assert_eq!((second.received, second.passed), (1000, 1000));
    }

    #[tokio::test]
    async fn a_panic_fails_one_item_only() {
        let (out, report) = Pipeline::from_iter(0..10u32)
            .map(|x| if x == 4 { panic!("four") } else { x })
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
        assert_eq!(report.stage("map").unwrap().failed, 1);
        assert_eq!(report.failure_sample[0].error.to_string(), "panicked: four");
        assert!(report.is_balanced());
    }
}
