//! `Pipeline::from_fn` / `try_from_fn`: a generator from an async closure.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Pull, Pulled};
use crate::failure::{BoxError, ItemError};
use crate::plan::Pipeline;

pub(crate) struct FnPull<F, Fut> {
    f: F,
    pending: Option<Pin<Box<Fut>>>,
}

impl<T, E, F, Fut> Pull<T> for FnPull<F, Fut>
where
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<Option<T>, E>> + Send,
    E: Into<BoxError>,
{
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>> {
        while out.len() < max {
            let fut = self.pending.get_or_insert_with(|| Box::pin((self.f)()));
            match fut.as_mut().poll(cx) {
                Poll::Ready(r) => {
                    self.pending = None;
                    match r {
                        Ok(Some(x)) => out.push(x),
                        Ok(None) => return Poll::Ready(Ok(Pulled::End)),
                        Err(e) => return Poll::Ready(Err(ItemError::user(e))),
                    }
                }
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(Pulled::More))
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A generator: `next` is called for the next item until it returns `None`. It is called
    /// only when the pipeline has room, one call at a time.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut n = 0;
    /// let out = Pipeline::from_fn(move || {
    ///     n += 1;
    ///     let next = (n <= 3).then_some(n);
    ///     async move { next }
    /// })
    /// .collect()
    /// .await
    /// .unwrap();
    /// assert_eq!(out, vec![1, 2, 3]);
    /// # }
    /// ```
    pub fn from_fn<F, Fut>(mut next: F) -> Pipeline<T>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Option<T>> + Send + 'static,
    {
        Pipeline::try_from_fn(move || {
            let fut = next();
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        })
    }

    /// A generator that may fail. An error ends the source: the items already pulled still
    /// finish, then the run returns [`Error::Source`](crate::Error::Source) with the report.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut page = 0;
    /// let err = Pipeline::try_from_fn(move || {
    ///     page += 1;
    ///     let p = page;
    ///     async move { if p < 3 { Ok(Some(p)) } else { Err("database went away") } }
    /// })
    /// .run()
    /// .await
    /// .unwrap_err();
    /// assert_eq!(err.report().unwrap().delivered(), 2);
    /// assert!(err.to_string().contains("database went away"));
    /// # }
    /// ```
    pub fn try_from_fn<F, Fut, E>(next: F) -> Pipeline<T>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        Pipeline::from_pull(
            "source",
            FnPull {
                f: next,
                pending: None,
            },
        )
    }
}
