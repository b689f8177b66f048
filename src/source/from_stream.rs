//! `Pipeline::from_stream`: items from any `futures::Stream`.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use super::{Pull, Pulled};
use crate::failure::ItemError;
use crate::plan::Pipeline;

pub(crate) struct StreamPull<S>(pub(crate) Pin<Box<S>>);

impl<S: Stream + Send> Pull<S::Item> for StreamPull<S> {
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<S::Item>,
    ) -> Poll<Result<Pulled, ItemError>> {
        while out.len() < max {
            match self.0.as_mut().poll_next(cx) {
                Poll::Ready(Some(x)) => out.push(x),
                Poll::Ready(None) => return Poll::Ready(Ok(Pulled::End)),
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(Pulled::More))
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline over a stream. Whatever the stream has ready is taken at once (up to a
    /// chunk); the pipeline never waits to fill a chunk.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let s = futures_util::stream::iter(vec!["a", "b"]);
    /// let out = Pipeline::from_stream(s).collect().await.unwrap();
    /// assert_eq!(out, vec!["a", "b"]);
    /// # }
    /// ```
    pub fn from_stream<S>(stream: S) -> Pipeline<T>
    where
        S: Stream<Item = T> + Send + 'static,
    {
        Pipeline::from_pull("source", StreamPull(Box::pin(stream)))
    }
}
