//! `Pipeline::from_channel`: items sent into a tokio mpsc channel.

use std::task::{Context, Poll};

use tokio::sync::mpsc;

use super::{Pull, Pulled};
use crate::failure::ItemError;
use crate::plan::Pipeline;

pub(crate) struct ChannelPull<T>(pub(crate) mpsc::Receiver<T>);

impl<T: Send> Pull<T> for ChannelPull<T> {
    fn poll_pull(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<T>,
    ) -> Poll<Result<Pulled, ItemError>> {
        match self.0.poll_recv_many(cx, out, max) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(0) => Poll::Ready(Ok(Pulled::End)),
            Poll::Ready(_) => Poll::Ready(Ok(Pulled::More)),
        }
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline over the items sent into a tokio channel; it ends when every sender is
    /// dropped. The channel's own bound back-pressures the senders.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (tx, rx) = tokio::sync::mpsc::channel(8);
    /// tokio::spawn(async move {
    ///     for i in 0..3 { tx.send(i).await.unwrap(); }
    /// });
    /// let out = Pipeline::from_channel(rx).collect().await.unwrap();
    /// assert_eq!(out, vec![0, 1, 2]);
    /// # }
    /// ```
    pub fn from_channel(rx: mpsc::Receiver<T>) -> Pipeline<T> {
        Pipeline::from_pull("source", ChannelPull(rx))
    }
}
