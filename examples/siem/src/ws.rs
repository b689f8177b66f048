//! `GET /ws`: every stored event, and every alert's outcome (`{"outcome": {...}}`), as JSON
//! text, to every connected viewer: all of them to a viewer with the viewer token, its own
//! account's only to a viewer with an account's key.
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
use tokio::sync::broadcast::error::TryRecvError;

/// The sending side, held by the pipeline's last stage. Dropping it closes every client
/// (close code 1001, going away) after the events before it.
pub type Hub = broadcast::Sender<Msg>;

/// One message of the hub: its JSON text and the account it belongs to (cheap to clone:
/// the text is shared).
#[derive(Debug, Clone)]
pub struct Msg {
    account: i64,
    json: Utf8Bytes,
}

impl Msg {
    /// `json` about `account`'s data.
    pub fn new(account: i64, json: String) -> Msg {
        Msg {
            account,
            json: Utf8Bytes::from(json),
        }
    }

    /// Its JSON text.
    #[cfg(test)]
    pub fn text(&self) -> &str {
        self.json.as_str()
    }
}

/// What a viewer may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every account's (the viewer token).
    All,
    /// One account's (that account's API key).
    Account(i64),
}

impl Scope {
    /// Whether a viewer of this scope sees data of `account`.
    pub fn sees(self, account: i64) -> bool {
        match self {
            Scope::All => true,
            Scope::Account(a) => a == account,
        }
    }

    /// The account to filter by, if any.
    pub fn account(self) -> Option<i64> {
        match self {
            Scope::All => None,
            Scope::Account(a) => Some(a),
        }
    }
}

/// Close code for a client cut off for being too slow (1008: policy violation).
pub const TOO_SLOW: u16 = 1008;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// How long one write may wait for the client's socket.
    pub write_timeout: Duration,
}

/// The most events written before one flush.
const MAX_BURST: usize = 256;

/// `first` and whatever else is ready after it, up to `max` events: they go out with one
/// flush, one syscall per burst rather than per event. `Err` (with the count missed) when
/// the client fell further behind than the ring while its last write was waiting: the
/// events it missed are gone, so it must be cut off, not go on without them.
fn burst(
    first: Msg,
    events: &mut broadcast::Receiver<Msg>,
    max: usize,
    scope: Scope,
) -> Result<Vec<Utf8Bytes>, u64> {
    let mut out = Vec::new();
    if scope.sees(first.account) {
        out.push(first.json);
    }
    // Counted in messages taken, seen or not: a burst stays bounded either way.
    let mut taken = 1;
    while taken < max {
        match events.try_recv() {
            Ok(more) => {
                taken += 1;
                if scope.sees(more.account) {
                    out.push(more.json);
                }
            }
            Err(TryRecvError::Lagged(missed)) => return Err(missed),
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    Ok(out)
}

/// Serves one client until it leaves, falls behind or the hub closes.
pub async fn serve_client(
    socket: WebSocket,
    mut events: broadcast::Receiver<Msg>,
    limits: ClientLimits,
    scope: Scope,
) {
    metrics::gauge!("siem_ws_clients").increment(1.0);
    let (mut tx, mut rx) = socket.split();
    let close = loop {
        tokio::select! {
            got = events.recv() => match got {
                Ok(first) => {
                    let Ok(burst) = burst(first, &mut events, MAX_BURST, scope) else {
                        break Some((TOO_SLOW, "too slow: fell behind the buffer"));
                    };
                    if burst.is_empty() {
                        continue;
                    }
                    let write = async {
                        for event in burst {
                            tx.feed(Message::Text(event)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn text(i: usize) -> Msg {
        Msg::new(i as i64 % 2, i.to_string())
    }

    fn json(i: usize) -> Utf8Bytes {
        Utf8Bytes::from(i.to_string())
    }

    #[test]
    fn a_burst_takes_what_is_ready_up_to_the_limit() {
        let (hub, mut rx) = broadcast::channel(16);
        for i in 0..10 {
            hub.send(text(i)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let got = burst(first, &mut rx, 4, Scope::All).unwrap();
        assert_eq!(got, (0..4).map(json).collect::<Vec<_>>());
        let first = rx.try_recv().unwrap();
        assert_eq!(burst(first, &mut rx, 100, Scope::All).unwrap().len(), 6);
    }

    #[test]
    fn an_account_viewer_gets_its_own_account_only() {
        let (hub, mut rx) = broadcast::channel(16);
        for i in 0..10 {
            hub.send(text(i)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let got = burst(first, &mut rx, 100, Scope::Account(1)).unwrap();
        assert_eq!(got, [1, 3, 5, 7, 9].map(json));
    }

    #[test]
    fn a_client_that_fell_behind_the_ring_is_told_not_given_a_gap() {
        let (hub, mut rx) = broadcast::channel(4);
        hub.send(text(0)).unwrap();
        let first = rx.try_recv().unwrap();
        // While event 0 was being written, ten more came: the ring keeps four.
        for i in 1..=10 {
            hub.send(text(i)).unwrap();
        }
        assert_eq!(burst(first, &mut rx, MAX_BURST, Scope::All), Err(6));
    }
}
