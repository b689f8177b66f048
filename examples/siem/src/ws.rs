//! `GET /ws`: every stored event, as JSON text, to every connected client.
//!
//! The fan-out is a `tokio::sync::broadcast` channel: sending never waits for a client, and
//! each client may be at most `buffer` events behind (the channel's ring is the bounded
//! buffer of every client). A client further behind, or whose socket does not take a write
//! within `write_timeout`, is cut off with a close frame: a slow reader never slows the
//! pipeline or the other clients, and costs no unbounded memory.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::broadcast;

/// The sending side, held by the pipeline's last stage. Dropping it closes every client
/// (close code 1001, going away) after the events before it.
pub type Hub = broadcast::Sender<Utf8Bytes>;

/// Close code for a client cut off for being too slow (1008: policy violation).
pub const TOO_SLOW: u16 = 1008;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// How long one write may wait for the client's socket.
    pub write_timeout: Duration,
}

/// Serves one client until it leaves, falls behind or the hub closes.
pub async fn serve_client(
    socket: WebSocket,
    mut events: broadcast::Receiver<Utf8Bytes>,
    limits: ClientLimits,
) {
    metrics::gauge!("siem_ws_clients").increment(1.0);
    let (mut tx, mut rx) = socket.split();
    let close = loop {
        tokio::select! {
            got = events.recv() => match got {
                Ok(first) => {
                    // Whatever else is ready goes out with it, then one flush: one syscall
                    // per burst rather than per event.
                    let write = async {
                        tx.feed(Message::Text(first)).await?;
                        for _ in 0..255 {
                            match events.try_recv() {
                                Ok(more) => tx.feed(Message::Text(more)).await?,
                                Err(_) => break,
                            }
                        }
                        tx.flush().await
                    };
                    match tokio::time::timeout(limits.write_timeout, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break None, // the client is gone
                        Err(_) => break Some((TOO_SLOW, "too slow: a write timed out")),
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    break Some((TOO_SLOW, "too slow: fell behind the buffer"));
                }
                Err(broadcast::error::RecvError::Closed) => break Some((1001, "server shutting down")),
            },
            incoming = rx.next() => match incoming {
                // Clients send nothing we need; pings are answered by the socket itself.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
                Some(Ok(_)) => {}
            },
        }
    };
    if let Some((code, reason)) = close {
        if code == TOO_SLOW {
            metrics::counter!("siem_ws_cut_off_total").increment(1);
        }
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        // The close frame may not get through a full socket: bounded, then the
        // connection is dropped anyway.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tx.send(frame).await?;
            tx.close().await
        })
        .await;
    }
    metrics::gauge!("siem_ws_clients").decrement(1.0);
}
