//! [`StreamSink`]: a pipeline that ends in a Redis stream, so stages chain across
//! processes (one pipeline's sink is the next one's [`RedisStream`](crate::RedisStream)).

use std::time::Duration;

use flowline::{BatchSink, BoxError, ConfigProblem, Error, Outage};
use redis::aio::ConnectionManager;

use crate::conn;

type Fields = Vec<(String, Vec<u8>)>;

/// Adds every item to a stream (`XADD`, one pipelined round trip per batch), optionally
/// trimming it to about `max_len` entries (`MAXLEN ~`). A batch the server refuses (a
/// wrong type at the key) fails its items into the dead letters. While Redis is down the
/// batch is tried again under the sink's [`outage`](StreamSink::outage) policy and the job
/// waits (no item fails for it); past the limit the write fails with an
/// [`OutageError`](flowline::OutageError). An entry may be added twice when the server
/// applied a batch whose reply was lost.
///
/// ```no_run
/// use flowline::prelude::*;
/// use flowline_redis::StreamSink;
/// # #[tokio::main] async fn main() {
/// let sink = StreamSink::new("redis://127.0.0.1/", "results", |x: &u32| {
///     vec![("n".to_string(), x.to_string().into_bytes())]
/// })
/// .unwrap();
/// let (written, report) = Pipeline::from_iter(0..10u32).into_sink(sink).await.unwrap();
/// assert_eq!(written, 10);
/// # }
/// ```
pub struct StreamSink<F> {
    client: redis::Client,
    stream: String,
    max_len: Option<u64>,
    fields: F,
    conn: Option<ConnectionManager>,
    written: u64,
    server: std::sync::Arc<str>,
    outage: Outage,
}

impl<F> std::fmt::Debug for StreamSink<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSink")
            .field("stream", &self.stream)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl<F> StreamSink<F> {
    /// A sink adding to `stream` at `url`; `fields` turns an item into the entry's fields.
    ///
    /// ```
    /// let err = flowline_redis::StreamSink::new("redis://127.0.0.1/", "", |_: &u8| Vec::<(String, String)>::new())
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("stream"));
    /// ```
    pub fn new(url: &str, stream: &str, fields: F) -> Result<Self, Error> {
        let mut problems = Vec::new();
        let client = redis::Client::open(url);
        if client.is_err() {
            problems.push(ConfigProblem {
                stage: "redis sink".into(),
                option: "url",
                value: format!("{url:?}"),
                reason: "must be a redis:// URL",
            });
        }
        if let Some(why) = crate::names::bad_key(stream) {
            problems.push(ConfigProblem {
                stage: "redis sink".into(),
                option: "stream",
                value: format!("{stream:?}"),
                reason: why,
            });
        }
        match client {
            Ok(client) if problems.is_empty() => Ok(StreamSink {
                server: conn::server(&client),
                outage: Outage::default(),
                client,
                stream: stream.into(),
                max_len: None,
                fields,
                conn: None,
                written: 0,
            }),
            _ => Err(Error::Config { problems }),
        }
    }

    /// How long a batch rides out Redis being down (default [`Outage::default`]: keep
    /// trying for 5 minutes).
    ///
    /// ```
    /// let sink = flowline_redis::StreamSink::new("redis://127.0.0.1/", "s", |_: &u8| Vec::<(String, String)>::new())
    ///     .unwrap()
    ///     .outage(flowline::Outage::forever());
    /// # let _ = sink;
    /// ```
    pub fn outage(mut self, policy: Outage) -> Self {
        self.outage = policy;
        self
    }

    /// Trims the stream to about `n` entries as it adds (`MAXLEN ~ n`: whole nodes are
    /// removed, so a few more may stay). At least 1.
    ///
    /// ```
    /// let sink = flowline_redis::StreamSink::new("redis://127.0.0.1/", "s", |_: &u8| Vec::<(String, String)>::new())
    ///     .unwrap()
    ///     .max_len(10_000)
    ///     .unwrap();
    /// # let _ = sink;
    /// ```
    pub fn max_len(mut self, n: u64) -> Result<Self, Error> {
        if n == 0 || n > i64::MAX as u64 {
            return Err(Error::Config {
                problems: vec![ConfigProblem {
                    stage: "redis sink".into(),
                    option: "max_len",
                    value: n.to_string(),
                    reason: "must be at least 1",
                }],
            });
        }
        self.max_len = Some(n);
        Ok(self)
    }
}

impl<T, F> BatchSink<T> for StreamSink<F>
where
    T: Send + 'static,
    F: Fn(&T) -> Fields + Send + 'static,
{
    type Output = u64;

    async fn write(&mut self, batch: Vec<T>) -> Result<(), BoxError> {
        let mut pipe = redis::pipe();
        for item in &batch {
            let fields = (self.fields)(item);
            if fields.is_empty() {
                return Err("an entry needs at least one field".into());
            }
            let cmd = pipe.cmd("XADD").arg(&self.stream);
            if let Some(n) = self.max_len {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*");
            for (k, v) in &fields {
                cmd.arg(k).arg(v);
            }
            cmd.ignore();
        }
        let mut watch = self.outage.watch(self.server.clone());
        loop {
            let r = async {
                if self.conn.is_none() {
                    self.conn = Some(conn::connect(&self.client, Duration::from_secs(10)).await?);
                }
                match self.conn.as_mut() {
                    Some(c) => pipe.query_async::<()>(c).await,
                    None => Ok(()),
                }
            }
            .await;
            match r {
                Ok(()) => {
                    watch.succeeded();
                    self.written += batch.len() as u64;
                    return Ok(());
                }
                Err(e) if conn::is_transient(&e) => match watch.failed(conn::mark(e)) {
                    Ok(wait) => tokio::time::sleep(wait).await,
                    Err(outage) => return Err(Box::new(outage)),
                },
                Err(e) => return Err(format!("redis stream `{}`: {e}", self.stream).into()),
            }
        }
    }

    fn finish(self) -> u64 {
        self.written
    }

    fn name(&self) -> &'static str {
        "redis sink"
    }
}
