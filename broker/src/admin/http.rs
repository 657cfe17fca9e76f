//! The read-only admin endpoint of a running broker: HTTP/1.1, GET only,
//! one request per connection. The store's views are JSON; the broker's
//! counters and gauges are Prometheus text (`/metrics`), its liveness a small
//! JSON document (`/health`).
//!
//! Requests are parsed with `httparse`; the head is capped at
//! [`MAX_HEAD`] bytes and must arrive within [`READ_TIMEOUT`]. Each
//! connection is one task, at most [`MAX_CONNECTIONS`] at a time (more are
//! answered 429; [`MAX_LIVE_CONNECTIONS`] and [`LIVE_READ_TIMEOUT`] where
//! only `/metrics` and `/health` are served). Every store call runs on a blocking thread
//! (`spawn_blocking`): the store is synchronous and may touch the disk.
//!
//! Single records are answered with a `Content-Length` body. Lists that
//! grow with the store (`/v1/sessions`, `/v1/retained`, `/v1/export`) are
//! streamed with `Transfer-Encoding: chunked` as the blocking thread walks
//! the store: it fills 64 KiB chunks into a small bounded channel, so a slow
//! client slows the walk instead of growing memory. A failure before the
//! first chunk is a 500; one after it ends the connection without the last
//! chunk, which a client reports as a truncated response.
//!
//! Routes (see docs/admin.md):
//!
//! ```text
//! GET /v1/sessions                          every session, streamed
//! GET /v1/sessions/{client_id}              one session
//! GET /v1/sessions/{client_id}/queue?limit=N  its first N queue entries (1..=10000, default 100)
//! GET /v1/retained?filter=F                 retained messages matching F (default #), streamed
//! GET /v1/retained/{topic}                  one retained message with its payload
//! GET /v1/stats                             store statistics
//! GET /v1/export                            everything, one JSON document, streamed
//! GET /metrics                              counters and gauges, Prometheus text format
//! GET /health                               200 while serving, 503 once shutting down
//!                                            or once the store writer has stopped
//! ```
//!
//! In memory mode there is no store: the `/v1` routes answer 404 saying so,
//! and `/metrics` and `/health` work as always. The metrics listener
//! (`[admin] metrics_bind`) is the same server without the store.
//!
//! Path segments and query values are percent-decoded (`+` is not a space:
//! it is the MQTT wildcard); the topic of `/v1/retained/{topic}` is the rest
//! of the path and may contain `/`.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tern_storage::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use super::error::AdminError;
use super::model::{self, ErrorBody, StatsView};
use super::render;
use crate::broker::Broker;
use crate::config::DurabilityMode;
use crate::log_throttle::throttled;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time allowed for the whole request head to arrive.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The same where only `/metrics` and `/health` are served (the metrics
/// listener, memory mode): a scraper or health check sends its request at
/// once, and a client that does not must not hold a place for long.
pub const LIVE_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for one write of the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are answered 429. Store walks are
/// heavy; the live routes are cheap, and a health check crowded out would
/// look like a broker that is down, hence the larger bound where only they
/// are served.
pub const MAX_CONNECTIONS: usize = 16;
pub const MAX_LIVE_CONNECTIONS: usize = 256;
/// Bytes per chunk of a streamed body.
const STREAM_CHUNK: usize = 64 * 1024;
/// Chunks a streamed body may have in flight between the store walk and the
/// socket.
const STREAM_DEPTH: usize = 4;
/// Most headers a request may carry.
const MAX_HEADERS: usize = 32;
/// After answering, how long unread request bytes are drained so that
/// closing does not reset the connection under the client's read.
const LINGER: Duration = Duration::from_secs(1);
/// Pause after a failed accept (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// `Content-Type` of the JSON answers.
const JSON: &str = "application/json";

/// What the endpoint reads.
#[derive(Clone)]
pub struct AdminSources {
    /// The durable store the `/v1` routes read; `None` in memory mode (they
    /// answer 404).
    pub store: Option<Arc<dyn Store>>,
    /// The running broker `/metrics` and `/health` describe; `None` when a
    /// store is served on its own (they answer 404).
    pub broker: Option<Arc<Broker>>,
}

impl AdminSources {
    /// A running broker and its store, if it keeps one.
    pub fn of_broker(broker: &Arc<Broker>) -> AdminSources {
        AdminSources {
            store: broker.persistence.as_ref().map(|p| Arc::clone(p.store())),
            broker: Some(Arc::clone(broker)),
        }
    }

    /// A running broker's `/metrics` and `/health`, without its store (the
    /// metrics listener, which may face other hosts).
    pub fn of_broker_metrics(broker: &Arc<Broker>) -> AdminSources {
        AdminSources {
            store: None,
            broker: Some(Arc::clone(broker)),
        }
    }

    /// A store alone.
    pub fn of_store(store: Arc<dyn Store>) -> AdminSources {
        AdminSources {
            store: Some(store),
            broker: None,
        }
    }
}

/// Serves the read-only admin API on `listener` until `shutdown` turns true.
///
/// Also returns when every sender of `shutdown` is gone. Connections still
/// open then are aborted; their blocking store walks stop at their next
/// chunk.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    sources: AdminSources,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let live_only = sources.store.is_none();
    let (cap, head_timeout) = if live_only {
        (MAX_LIVE_CONNECTIONS, LIVE_READ_TIMEOUT)
    } else {
        (MAX_CONNECTIONS, READ_TIMEOUT)
    };
    let permits = Arc::new(Semaphore::new(cap));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop_requested(&mut shutdown) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        tasks.spawn(connection(stream, sources.clone(), head_timeout, permit));
                    }
                    Err(_) => {
                        tasks.spawn(busy(stream));
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "admin endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    tasks.shutdown().await;
    drop(listener);
}

/// Resolves when the flag turns true or its senders are all dropped.
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    // An error means no sender is left: nobody can ask any more, so stop.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A request the endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Sessions,
    Session(String),
    Queue { client_id: String, limit: u32 },
    Retained { filter: String },
    RetainedShow(String),
    Stats,
    Export,
    Metrics,
    Health,
}

/// An answer, ready to write.
enum Reply {
    /// A complete body, sent with `Content-Length`.
    Fixed {
        status: u16,
        body: Vec<u8>,
        content_type: &'static str,
        allow_get: bool,
    },
    /// A body produced on a blocking thread, sent chunked.
    Stream {
        chunks: mpsc::Receiver<Vec<u8>>,
        done: JoinHandle<Result<(), AdminError>>,
    },
}

impl Reply {
    fn failure(status: u16, message: impl Into<String>) -> Reply {
        let mut body = Vec::new();
        let error = ErrorBody {
            error: message.into(),
        };
        // Writing into a Vec cannot fail.
        let _ = render::write_pretty(&mut body, &error);
        Reply::Fixed {
            status,
            body,
            content_type: JSON,
            allow_get: status == 405,
        }
    }

    /// A JSON document with `status`.
    fn json(status: u16, value: &impl Serialize) -> Reply {
        let mut body = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = render::write_pretty(&mut body, value);
        Reply::Fixed {
            status,
            body,
            content_type: JSON,
            allow_get: false,
        }
    }

    fn error(e: &AdminError) -> Reply {
        let status = e.http_status();
        if status >= 500 {
            throttled!(WARN, error = %e, "admin endpoint: request failed");
        }
        Reply::failure(status, e.to_string())
    }
}

/// One connection: read a request, answer it, close.
async fn connection(
    mut stream: TcpStream,
    sources: AdminSources,
    head_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) {
    let reply = match timeout(head_timeout, read_head(&mut stream)).await {
        Err(_) => Reply::failure(408, "the request head did not arrive in time"),
        Ok(Head::Closed) => return,
        Ok(Head::Invalid(reply)) => reply,
        Ok(Head::Request { method, target }) => match route(&method, &target) {
            Ok(route) => answer(route, &sources).await,
            Err(reply) => reply,
        },
    };
    if let Err(e) = send(&mut stream, reply).await {
        tracing::debug!(error = %e, "admin endpoint: response not delivered");
    }
    linger_close(stream).await;
}

/// Answers a connection over the limit.
async fn busy(mut stream: TcpStream) {
    // 429, not 503: a health check must not read "too busy to answer you"
    // as "the broker is shutting down".
    let reply = Reply::failure(429, "too many admin connections; retry shortly");
    let _ = timeout(LINGER, send(&mut stream, reply)).await;
}

/// What arrived on a connection.
enum Head {
    Request {
        method: String,
        target: String,
    },
    /// Closed (or failed) before a whole head arrived.
    Closed,
    /// Not a request we accept; answer and close.
    Invalid(Reply),
}

/// Reads and parses the request head, at most [`MAX_HEAD`] bytes. A body,
/// if any, is ignored.
async fn read_head(stream: &mut TcpStream) -> Head {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0; 1024];
    loop {
        let room = (MAX_HEAD + 1 - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Head::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => {
                return Head::Request {
                    method: request.method.unwrap_or_default().to_owned(),
                    target: request.path.unwrap_or_default().to_owned(),
                }
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
            Ok(_) => return Head::Invalid(Reply::failure(400, "request head larger than 8 KiB")),
            Err(e) => {
                return Head::Invalid(Reply::failure(400, format!("malformed HTTP request: {e}")))
            }
        }
    }
}

/// Maps a request to a [`Route`], or to the error answer.
fn route(method: &str, target: &str) -> Result<Route, Reply> {
    if method != "GET" {
        return Err(Reply::failure(
            405,
            format!("method {method} not allowed: the admin endpoint is read-only (GET only)"),
        ));
    }
    parse_target(target).map_err(|e| Reply::error(&e))
}

/// Parses the request target (origin form: path and optional query).
fn parse_target(target: &str) -> Result<Route, AdminError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let not_found = || {
        AdminError::NotFound(format!(
            "no such route {path:?}; the routes are /v1/sessions, /v1/sessions/ID, \
             /v1/sessions/ID/queue, /v1/retained, /v1/retained/TOPIC, /v1/stats, /v1/export, \
             /metrics, /health"
        ))
    };
    match path {
        "/metrics" => return Ok(Route::Metrics),
        "/health" => return Ok(Route::Health),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err(not_found());
    };
    // The topic is the rest of the path, '/' included.
    if let Some(topic) = rest.strip_prefix("retained/") {
        if topic.is_empty() {
            return Err(not_found());
        }
        return Ok(Route::RetainedShow(decode(topic, "the topic")?));
    }
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        ["sessions"] => Ok(Route::Sessions),
        ["sessions", id] if !id.is_empty() => Ok(Route::Session(decode(id, "the client id")?)),
        ["sessions", id, "queue"] if !id.is_empty() => Ok(Route::Queue {
            client_id: decode(id, "the client id")?,
            limit: queue_limit(query)?,
        }),
        ["retained"] => {
            let filter = query_param(query, "filter")?
                .unwrap_or_else(|| model::DEFAULT_RETAINED_FILTER.to_owned());
            model::check_retained_filter(&filter)?;
            Ok(Route::Retained { filter })
        }
        ["stats"] => Ok(Route::Stats),
        ["export"] => Ok(Route::Export),
        _ => Err(not_found()),
    }
}

fn queue_limit(query: &str) -> Result<u32, AdminError> {
    let Some(limit) = query_param(query, "limit")? else {
        return Ok(model::DEFAULT_QUEUE_LIMIT);
    };
    let limit = limit.parse().map_err(|_| {
        AdminError::BadRequest(format!(
            "limit must be a number between 1 and {}, not {limit:?}",
            model::MAX_QUEUE_LIMIT
        ))
    })?;
    model::check_queue_limit(limit)
}

/// The decoded value of the first `name=value` pair of `query`.
fn query_param(query: &str, name: &str) -> Result<Option<String>, AdminError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(key, "the query")? == name {
            return decode(value, "the query").map(Some);
        }
    }
    Ok(None)
}

fn decode(s: &str, what: &str) -> Result<String, AdminError> {
    percent_decode(s).ok_or_else(|| {
        AdminError::BadRequest(format!(
            "bad percent-encoding in {what} (or not UTF-8 once decoded)"
        ))
    })
}

/// Strict percent-decoding: `%` must be followed by two hex digits and the
/// result must be UTF-8. `+` stays `+`.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// The answer of `/health`.
#[derive(Serialize)]
struct HealthView {
    /// `serving`; or, with status 503, `shutting_down`, or `store_stopped`
    /// (the store writer stopped: no change to durable state can be made).
    status: &'static str,
    uptime_secs: u64,
    connections: usize,
    sessions: usize,
    /// `fsync`, `interval` or `memory`.
    durability: &'static str,
    /// Store submissions that failed since the start (absent in memory mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    store_failures: Option<u64>,
}

fn health(broker: &Broker) -> Reply {
    let status = if broker.is_shutting_down() {
        "shutting_down"
    } else if broker
        .persistence
        .as_ref()
        .is_some_and(|p| !p.writer_running())
    {
        "store_stopped"
    } else {
        "serving"
    };
    let view = HealthView {
        status,
        uptime_secs: broker.uptime().as_secs(),
        connections: broker.registry.connection_count(),
        sessions: broker.registry.session_count(),
        durability: match broker.config.storage.durability {
            DurabilityMode::Fsync => "fsync",
            DurabilityMode::Interval => "interval",
            DurabilityMode::Memory => "memory",
        },
        store_failures: broker.persistence.as_ref().map(|p| p.writer_stats().failed),
    };
    Reply::json(if status == "serving" { 200 } else { 503 }, &view)
}

/// Answers a route: the broker's views at once, the store's on a blocking
/// thread.
async fn answer(route: Route, sources: &AdminSources) -> Reply {
    let broker = sources.broker.as_deref();
    match (route, broker) {
        (Route::Metrics, Some(broker)) => Reply::Fixed {
            status: 200,
            body: crate::prometheus::render(broker).into_bytes(),
            content_type: crate::prometheus::CONTENT_TYPE,
            allow_get: false,
        },
        (Route::Health, Some(broker)) => health(broker),
        (Route::Metrics | Route::Health, None) => {
            Reply::failure(404, "no running broker is served here")
        }
        (route, _) => match sources.store.clone() {
            Some(store) => answer_from_store(route, store).await,
            None => Reply::failure(
                404,
                "no store is served here (memory mode, or the metrics listener): \
                 only /metrics and /health",
            ),
        },
    }
}

/// Runs a store route's work on a blocking thread.
async fn answer_from_store(route: Route, store: Arc<dyn Store>) -> Reply {
    match route {
        Route::Sessions => stream(store, |s, out| {
            render::write_json_array(out, model::session_rows(s))
        }),
        Route::Session(id) => fixed(store, move |s| model::session_view(s, &id)).await,
        Route::Queue { client_id, limit } => {
            fixed(store, move |s| model::queue_view(s, &client_id, limit)).await
        }
        Route::Retained { filter } => stream(store, move |s, out| {
            render::write_json_array(out, model::retained_rows(s, &filter))
        }),
        Route::RetainedShow(topic) => fixed(store, move |s| model::retained_view(s, &topic)).await,
        Route::Stats => fixed(store, |s| Ok(StatsView::from(s.stats()?))).await,
        Route::Export => stream(store, model::write_export),
        Route::Metrics | Route::Health => Reply::failure(404, "no running broker is served here"),
    }
}

/// A view computed (and serialised) on a blocking thread, answered whole.
async fn fixed<T, F>(store: Arc<dyn Store>, view: F) -> Reply
where
    T: Serialize,
    F: FnOnce(&dyn Store) -> Result<T, AdminError> + Send + 'static,
{
    let work = tokio::task::spawn_blocking(move || {
        let value = view(&*store)?;
        let mut body = Vec::new();
        render::write_pretty(&mut body, &value)?;
        Ok::<_, AdminError>(body)
    });
    match work.await {
        Ok(Ok(body)) => Reply::Fixed {
            status: 200,
            body,
            content_type: JSON,
            allow_get: false,
        },
        Ok(Err(e)) => Reply::error(&e),
        Err(e) => Reply::failure(500, format!("the store task failed: {e}")),
    }
}

/// A body written on a blocking thread and streamed as it is produced.
fn stream<F>(store: Arc<dyn Store>, produce: F) -> Reply
where
    F: FnOnce(&dyn Store, &mut dyn Write) -> Result<(), AdminError> + Send + 'static,
{
    let (tx, chunks) = mpsc::channel(STREAM_DEPTH);
    let done = tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter {
            tx,
            buf: Vec::with_capacity(STREAM_CHUNK),
        };
        produce(&*store, &mut out)?;
        out.flush()?;
        Ok(())
    });
    Reply::Stream { chunks, done }
}

/// A `Write` for a blocking thread that hands full chunks to the async side.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(STREAM_CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the admin client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= STREAM_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            self.send()
        }
    }
}

/// Writes the reply.
async fn send(stream: &mut TcpStream, reply: Reply) -> io::Result<()> {
    match reply {
        Reply::Fixed {
            status,
            body,
            content_type,
            allow_get,
        } => send_fixed(stream, status, &body, content_type, allow_get).await,
        Reply::Stream { chunks, done } => send_stream(stream, chunks, done).await,
    }
}

async fn send_fixed(
    stream: &mut TcpStream,
    status: u16,
    body: &[u8],
    content_type: &str,
    allow_get: bool,
) -> io::Result<()> {
    let mut out = head(
        status,
        content_type,
        allow_get,
        &format!("Content-Length: {}", body.len()),
    );
    out.extend_from_slice(body);
    write_all(stream, &out).await
}

/// Streams a body: the head goes out with the first chunk, so a walk that
/// fails before producing anything still gets an error status.
async fn send_stream(
    stream: &mut TcpStream,
    mut chunks: mpsc::Receiver<Vec<u8>>,
    done: JoinHandle<Result<(), AdminError>>,
) -> io::Result<()> {
    let Some(first) = chunks.recv().await else {
        let reply = match done.await {
            Ok(Ok(())) => Reply::Fixed {
                status: 200,
                body: Vec::new(),
                content_type: JSON,
                allow_get: false,
            },
            Ok(Err(e)) => Reply::error(&e),
            Err(e) => Reply::failure(500, format!("the store task failed: {e}")),
        };
        return Box::pin(send(stream, reply)).await;
    };
    write_all(
        stream,
        &head(200, JSON, false, "Transfer-Encoding: chunked"),
    )
    .await?;
    write_chunk(stream, &first).await?;
    while let Some(chunk) = chunks.recv().await {
        write_chunk(stream, &chunk).await?;
    }
    match done.await {
        Ok(Ok(())) => write_all(stream, b"0\r\n\r\n").await,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "admin endpoint: streamed response failed mid-way");
            Err(io::Error::other("the response was cut short"))
        }
        Err(e) => Err(io::Error::other(format!("the store task failed: {e}"))),
    }
}

fn head(status: u16, content_type: &str, allow_get: bool, framing: &str) -> Vec<u8> {
    let allow = if allow_get { "Allow: GET\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n{allow}{framing}\r\n\r\n",
        reason(status)
    )
    .into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    write_all(stream, &out).await
}

async fn write_all(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    match timeout(WRITE_TIMEOUT, stream.write_all(data)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the admin client stopped reading",
        )),
    }
}

/// Ends the response (FIN), then drains what the client still sends for a
/// moment, so the close does not reset the connection before it has read
/// the answer.
async fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0; 1024];
    let drain = async {
        let mut total = 0;
        while let Ok(n @ 1..) = stream.read(&mut sink).await {
            total += n;
            if total > 64 * 1024 {
                break;
            }
        }
    };
    let _ = timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let ok = |t: &str| parse_target(t).unwrap();
        assert_eq!(ok("/v1/sessions"), Route::Sessions);
        assert_eq!(ok("/v1/sessions/a%2Fb%20c"), Route::Session("a/b c".into()));
        assert_eq!(
            ok("/v1/sessions/x/queue?limit=7"),
            Route::Queue {
                client_id: "x".into(),
                limit: 7
            }
        );
        assert_eq!(
            ok("/v1/sessions/x/queue"),
            Route::Queue {
                client_id: "x".into(),
                limit: 100
            }
        );
        assert_eq!(ok("/v1/retained"), Route::Retained { filter: "#".into() });
        assert_eq!(
            ok("/v1/retained?filter=a/%2B"),
            Route::Retained {
                filter: "a/+".into()
            }
        );
        assert_eq!(
            ok("/v1/retained?filter=a/+"),
            Route::Retained {
                filter: "a/+".into()
            }
        );
        assert_eq!(
            ok("/v1/retained/a/b%23"),
            Route::RetainedShow("a/b#".into())
        );
        assert_eq!(ok("/v1/retained//x"), Route::RetainedShow("/x".into()));
        assert_eq!(ok("/v1/stats"), Route::Stats);
        assert_eq!(ok("/v1/export?x=1"), Route::Export);
        assert_eq!(ok("/metrics"), Route::Metrics);
        assert_eq!(ok("/health"), Route::Health);
    }

    #[test]
    fn bad_targets() {
        let status = |t: &str| parse_target(t).unwrap_err().http_status();
        for t in [
            "/",
            "/v1",
            "/v1/",
            "/v2/sessions",
            "/v1/sessions/",
            "/v1/nope",
            "/v1/metrics",
            "/metrics/x",
            "*",
        ] {
            assert_eq!(status(t), 404, "{t}");
        }
        for t in [
            "/v1/sessions/%zz",
            "/v1/sessions/%",
            "/v1/sessions/%C3",
            "/v1/sessions/x/queue?limit=0",
            "/v1/sessions/x/queue?limit=10001",
            "/v1/sessions/x/queue?limit=ten",
            "/v1/retained?filter=a/%23/b",
            "/v1/retained?filter=",
            "/v1/retained?filter=%FF",
        ] {
            assert_eq!(status(t), 400, "{t}");
        }
    }

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%2fb%2B+").as_deref(), Some("a/b++"));
        assert_eq!(percent_decode("%E2%82%AC").as_deref(), Some("€"));
        assert_eq!(percent_decode("%+1"), None);
        assert_eq!(percent_decode("%1"), None);
        assert_eq!(percent_decode("%FF"), None);
    }
}
