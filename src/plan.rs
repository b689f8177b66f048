//! `Pipeline<T>`, the lazy plan, and [`IntoPipeline`], the one trait every builder of a plan
//! implements.

use std::fmt;
use std::time::Duration;

use crate::error::Error;
use crate::observe::Start;
use crate::runtime::{Build, BuildFn, Plan, Upstream};

/// What a plan carries besides its build step: problems found while it was written, and
/// what is known of its size. Run-wide settings (deadline, error policy, dead letters) are
/// not here: they belong to the run ([`RunOptions`](crate::RunOptions)), not to a point in
/// the chain.
#[derive(Default)]
pub(crate) struct Settings {
    /// Configuration errors found while the plan was written; all are reported at once,
    /// before anything runs.
    pub(crate) errors: Vec<Error>,
    /// The number of items the source will produce, when known.
    pub(crate) total: Option<u64>,
}

impl Settings {
    /// Records a configuration error unless `value` is more than zero; true if it is.
    pub(crate) fn require_positive(
        &mut self,
        stage: &str,
        option: &'static str,
        value: Duration,
    ) -> bool {
        if value.is_zero() {
            self.errors.push(Error::config(
                stage,
                option,
                value,
                "must be more than zero",
            ));
        }
        !value.is_zero()
    }

    /// The settings of several plans joined into one (merge, zip, a graph): every problem of
    /// every part; the item total is left unknown.
    pub(crate) fn join(all: impl IntoIterator<Item = Settings>) -> Settings {
        Settings {
            errors: all.into_iter().flat_map(|s| s.errors).collect(),
            total: None,
        }
    }
}

/// A lazy plan of a pipeline whose items are `T`. Nothing runs until a terminal
/// ([`Flow::run`], [`Flow::for_each`], [`Flow::collect`], [`Flow::into_stream`],
/// [`Flow::spawn`]) is awaited or called. Operators come from the [`Flow`] trait
/// (`use flowline::prelude::*`).
///
/// [`Flow`]: crate::Flow
/// [`Flow::run`]: crate::Flow::run
/// [`Flow::for_each`]: crate::Flow::for_each
/// [`Flow::collect`]: crate::Flow::collect
/// [`Flow::into_stream`]: crate::Flow::into_stream
/// [`Flow::spawn`]: crate::Flow::spawn
///
/// ```
/// use flowline::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let plan = Pipeline::from_iter(0..5u32).map(|x| x + 1);   // nothing has run yet
/// let out = plan.collect().await.unwrap();
/// assert_eq!(out, vec![1, 2, 3, 4, 5]);
/// # }
/// ```
#[must_use = "a pipeline does nothing until a terminal (`run`, `collect`, `for_each`, `into_stream`, `spawn`) is awaited"]
pub struct Pipeline<T> {
    pub(crate) build: BuildFn<T>,
    pub(crate) settings: Settings,
}

impl<T> fmt::Debug for Pipeline<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("total", &self.settings.total)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// Appends a step to the plan: `f` receives the upstream and returns the new one.
    pub(crate) fn then<U: Send + 'static>(
        self,
        f: impl FnOnce(&mut Build, Upstream<T>) -> Upstream<U> + Send + 'static,
    ) -> Pipeline<U> {
        let build = self.build;
        Pipeline {
            build: Box::new(move |b| {
                let up = build(b);
                f(b, up)
            }),
            settings: self.settings,
        }
    }

    /// Adds a run-level observer, made by `make` from what is known of the plan (its size);
    /// a problem with the observer's options fails the run before it starts.
    pub(crate) fn observed(
        mut self,
        make: impl FnOnce(&Settings) -> Result<Start, Error>,
    ) -> Pipeline<T> {
        match make(&self.settings) {
            Err(e) => {
                self.settings.errors.push(e);
                self
            }
            Ok(start) => self.then(move |b, up| {
                let task = start(b.run.clone());
                b.observe(task);
                up
            }),
        }
    }

    /// The plan as a run takes it: how to build it, and the problems found while planning.
    pub(crate) fn into_plan(self) -> Plan<T> {
        Plan {
            build: self.build,
            errors: self.settings.errors,
        }
    }
}

/// Anything that ends in a plan: a [`Pipeline`], or a stage still being configured (like
/// [`AsyncStage`](crate::AsyncStage)). Every `IntoPipeline` is a [`Flow`](crate::Flow), so it
/// has all the operators.
///
/// ```
/// use flowline::prelude::*;
/// let stage = Pipeline::from_iter(0..3u32).map_async("work", |x| async move { x }).workers(2);
/// let plan: Pipeline<u32> = stage.into_pipeline();
/// # let _ = plan;
/// ```
pub trait IntoPipeline: Sized + Send + 'static {
    /// The type of the items the plan produces.
    type Item: Send + 'static;

    /// Ends any stage configuration and returns the plan.
    fn into_pipeline(self) -> Pipeline<Self::Item>;
}

impl<T: Send + 'static> IntoPipeline for Pipeline<T> {
    type Item = T;
    fn into_pipeline(self) -> Pipeline<T> {
        self
    }
}
