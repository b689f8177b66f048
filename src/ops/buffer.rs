//! `buffer(n)`: an explicit async boundary. The stages before it run in their own task and
//! may work ahead by about `n` items while the stages after it are busy.

use crate::error::Error;
use crate::plan::Pipeline;
use crate::runtime::Upstream;
use crate::runtime::chunk::CHUNK_CAP;
use crate::runtime::hop::{hop, pump};

pub(crate) fn buffer<T: Send + 'static>(mut p: Pipeline<T>, n: usize) -> Pipeline<T> {
    if n == 0 {
        p.settings.errors.push(Error::config(
            "buffer",
            "capacity",
            n,
            "must be at least 1 item",
        ));
    }
    let chunks = n.div_ceil(CHUNK_CAP).max(1);
    p.then(move |b, up| {
        let stats = b.stage("buffer", "buffer");
        let (tx, rx) = hop(chunks, &stats);
        let run = b.run.clone();
        b.spawn(pump(up, tx, stats, run));
        Box::new(rx) as Upstream<T>
    })
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn keeps_order_across_many_boundaries() {
        let mut p = Pipeline::from_iter(0..10_000u32).map(|x| x);
        for _ in 0..8 {
            p = p.buffer(64).map(|x| x);
        }
        let out = p.collect().await.unwrap();
        assert_eq!(out, (0..10_000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn zero_capacity_is_rejected_with_field_and_value() {
        let err = Pipeline::from_iter(0..3).buffer(0).run().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `buffer`: capacity = 0: must be at least 1 item"
        );
    }
}
