//! A websocket client that never reads is cut off; the others get everything.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_the_others_get_everything() {
    let siem = support::start(&[
        "--ws-buffer",
        "256",
        "--batch",
        "64",
        "--ws-write-timeout-ms",
        "300",
        "--alert-threshold",
        "10",
    ])
    .await;
    // The slow client's socket takes little: a small receive buffer, never read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(siem.service.addr()).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(
        format!("ws://{}/ws?token={}", siem.service.addr(), support::TOKEN),
        stream,
    )
    .await
    .unwrap();
    let mut fast = vec![siem.ws().await, siem.ws().await];
    let n = 3_000;
    let message = "x".repeat(2_000);
    let readers: Vec<_> = fast
        .drain(..)
        .map(|mut ws| tokio::spawn(async move { support::read_events(&mut ws, n).await.len() }))
        .collect();
    for i in 0..n {
        let body = format!(r#"{{"id":"s{i}","kind":"k","severity":1,"message":"{message}"}}"#);
        assert_eq!(siem.post("key-1", &body).await.status(), 202);
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), n);
    }
    // Now the slow client reads: what was in its socket, then the end (a close frame, or the
    // connection dropped), well before all the events.
    let mut got = 0;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Text(_))) => got += 1,
                Some(Ok(Message::Close(frame))) => break format!("close {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("error {e}"),
                None => break "end".to_string(),
            }
        }
    })
    .await
    .expect("the slow client was never cut off");
    assert!(got < n, "the slow client got all {n} events ({ended})");
    let text = siem.metrics().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("siem_ws_cut_off_total") && !l.ends_with(" 0")),
        "{text}"
    );
    siem.service.shutdown().await.unwrap();
    assert_eq!(flowline_siem::counts(&siem.db).unwrap()["events"], n as u64);
}
