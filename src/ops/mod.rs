//! Every operator, one file each, with its options, docs and tests. [`Flow`](crate::Flow)'s
//! methods are one-line calls into these modules.

pub(crate) mod batch;
pub(crate) mod batch_dedup;
pub(crate) mod buffer;
pub(crate) mod debounce;
pub(crate) mod dedup;
pub(crate) mod filter;
pub(crate) mod filter_map;
pub(crate) mod flat_map;
pub(crate) mod idempotent;
pub(crate) mod inspect;
pub(crate) mod map;
pub(crate) mod map_async;
pub(crate) mod operator;
pub(crate) mod pace;
pub(crate) mod scan;
pub(crate) mod take;
pub(crate) mod throttle;
pub(crate) mod unbatch;
pub(crate) mod window;

use crate::plan::Pipeline;
use crate::runtime::fused::{ChunkOp, fused};

/// Appends a fused operator named `name` to `p`: it runs in the task that pulls its input.
pub(crate) fn fuse<T, U, Op>(p: Pipeline<T>, name: &'static str, op: Op) -> Pipeline<U>
where
    T: Send + 'static,
    U: Send + 'static,
    Op: ChunkOp<T, U> + 'static,
{
    p.then(move |b, up| fused(b, up, name, op))
}
