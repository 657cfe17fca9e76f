//! One client connection: the CONNECT handshake, then the read loop that
//! decodes packets and runs the protocol, beside the writer that sends what
//! the session queued.
//!
//! The reader and the writer are two futures joined in one task: the reader
//! never waits for the socket to become writable and the writer never waits
//! for input, and neither needs a task of its own. When either ends, the other
//! is told through [`ConnectionControl`]; the writer gets
//! [`CLOSE_GRACE`] to flush what is queued (MQTT 5: a final DISCONNECT with
//! the reason), then the socket is dropped.
//!
//! Every way out of [`serve`] (a protocol error, a timeout, a takeover, a
//! panic unwinding through it) drops the attached `Connection` and the
//! [`ConnectionPermit`], which detach the
//! session, publish the will when due and uncount the connection.
//!
//! The task's state is every connection's memory for its whole life, so
//! what this module keeps across an `.await` is chosen with care (see
//! docs/ARCHITECTURE.md and `broker/tests/footprint.rs`).
//!
//! # Layout
//!
//! This file holds the task ([`serve`]), the read loop and what every
//! packet's handling shares (`Exit`, acknowledgements, the close). The
//! rest, one file a stage:
//!
//! - `open.rs`: everything up to CONNACK (`open`, `Connection::accept`),
//!   and whether a session may be resumed (`not_resumed`);
//! - `publish.rs`: an incoming PUBLISH;
//! - `subscribe.rs`: SUBSCRIBE and UNSUBSCRIBE, and the retained messages
//!   a subscription matched.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tern_codec::{
    decode_packet,
    properties::{ConnAckProperties, SubAckProperties, UnsubAckProperties},
    ConnAck, Connect, Disconnect, Packet, ProtocolVersion, PubAck, Publish, QoS, ReasonCode,
    SubAck, Subscribe, UnsubAck, Unsubscribe, Will,
};
use tern_router::{
    parse_shared, validate_topic_name, RecentMatch, SubscribeOutcome, SubscriptionOptions,
};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::acl::ClientAcl;
use crate::auth::{AuthExchange, AuthStep};
use crate::auth_rules::{AuthRules, Login};
use crate::broker::{Broker, SessionRef, StagedFanout};
use crate::handshake::{
    auth_packet, authenticate, check_connect, count_decode_error, fit_connack, fits_client,
    is_empty_response_topic, misstates_utf8, read_connect, will_allowed, write_direct,
    Authenticated, HandshakeFailure,
};
use crate::incomplete::{shed_grown_buffer, OVER_INCOMPLETE_LIMIT};
use crate::log_throttle::{throttled, throttled_by};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::persistence::Journal;
use crate::pool::BUFFER_SIZE;
use crate::registry::ConnectionPermit;
use crate::session::{AttachParams, ConnectionControl, HandOver, Session};
use crate::topic_alias::{AliasError, InboundAliases};
use crate::transport::{linger, read_pooled, TransportRead, TransportWrite};
use crate::wake_batch::WakeBatch;
use crate::writer::{write_loop, WriterContext};
use tern_storage::{Op, StoreError, SubscriptionRecord};

mod open;
mod publish;
mod subscribe;

use open::open;

/// Replies (acks, PINGRESP ...) queued for a client and not yet written above
/// which the broker stops reading from it: a client that sends without
/// reading cannot make the broker queue replies without bound.
pub const MAX_UNSENT_CONTROL_PACKETS: usize = 4096;

/// Time the writer gets to flush after the connection decided to close.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why a connection ended.
#[derive(Debug)]
enum Exit {
    /// The client sent DISCONNECT; `with_will` for reason code 0x04.
    ClientDisconnect { with_will: bool },
    /// The client closed the socket without DISCONNECT, or it failed.
    Closed,
    /// The broker closes the connection, with this reason for MQTT 5.
    Error(ReasonCode, Box<str>),
    /// Closed by the broker on purpose: takeover or shutdown.
    Kicked(Option<ReasonCode>),
}

impl Exit {
    fn disconnect_reason(&self) -> Option<ReasonCode> {
        match self {
            Exit::Error(code, _) => Some(*code),
            Exit::Kicked(code) => *code,
            _ => None,
        }
    }

    /// Whether the client is sent nothing more but the DISCONNECT
    /// (`ConnectionControl::close_withholding`): its credentials no longer
    /// hold. The reader ends a connection with 0x87 only then: a
    /// re-authentication that failed or proved another user.
    fn withholds(&self) -> bool {
        matches!(self, Exit::Error(ReasonCode::NotAuthorized, _))
    }

    /// The broker ended the connection (a protocol error, a takeover, a
    /// shutdown, a keep alive timeout): the client may still be sending.
    fn ended_by_broker(&self) -> bool {
        matches!(self, Exit::Error(..) | Exit::Kicked(_))
    }

    /// Whether the will goes out (at once, or after its delay): unless the
    /// client ended with DISCONNECT 0x00 (MQTT-3.1.2-8). A shutdown closes
    /// the connection without one too: its wills go to the durable
    /// sessions and the retained store, and a delayed one is kept with its
    /// session, to go out after the restart unless the client is back
    /// first, as after a crash.
    fn publishes_will(&self) -> bool {
        match self {
            Exit::ClientDisconnect { with_will } => *with_will,
            _ => true,
        }
    }
}

/// Bytes of packets a connection's reader decodes and handles before it
/// lets the other tasks of its worker thread run.
///
/// A client whose socket is always readable (it sends faster than the
/// broker decodes) would otherwise keep its reader in one poll for as long
/// as it sends: every read finds bytes, and tokio's cooperative budget only
/// counts reads, which a buffer grown for large packets makes arbitrarily
/// large. Nothing else on that worker runs meanwhile, and while the other
/// workers sleep nobody polls the I/O driver either: every client waits
/// (PUBLISHes of 145,000 user properties each stalled every client for
/// 1.1-1.2 s). The heaviest packets to decode (MQTT 5 user properties,
/// about 25 ns a byte) make a turn of 512 KiB about 13 ms. It is above
/// what the cooperative budget lets a reader of pooled 4 KiB reads take in
/// one poll (64 reads, 256 KiB), so that ordinary traffic keeps its
/// cadence: at 128 KiB, a fan-out to 100 subscribers cost 8% more CPU per
/// delivery, its writers woken twice as often.
const DECODE_BYTES_PER_TURN: u32 = 512 * 1024;

/// How long a connection closed by a takeover still waits for bytes its
/// client sent before connecting again. Packets of two connections can
/// arrive out of order (even on loopback, under load), so a DISCONNECT sent
/// just before the new CONNECT may still be on its way; waiting longer only
/// delays a takeover of a silent connection (see
/// `SessionRegistry::take_over`, which waits for this reader).
const TAKEOVER_LAST_READ: Duration = Duration::from_millis(20);

/// Serves one TCP connection until it closes.
///
/// This function and the others that build a connection's task return an
/// `async move` block rather than being `async fn`s: an `async fn` keeps its
/// arguments twice in its state (as captured and as moved into the body),
/// and that state is every connection's memory for its whole life.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
pub fn serve_tcp(
    broker: Arc<Broker>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    async move {
        let _ = stream.set_nodelay(true);
        // Borrowed halves: both live in this task, so they need no `Arc`.
        let (mut reader, writer) = stream.split();
        // Boxed, the permit moved in within a closure: once per connection,
        // and a permit bound here would be part of every connection's task.
        let lingering = serve(broker, &mut reader, writer, &peer)
            .await
            .map(|permit| Box::pin(linger_counted(&mut reader, permit)));
        if let Some(lingering) = lingering {
            lingering.await;
        }
    }
}

/// [`linger`]s on a connection the broker ended, then lets its permit go:
/// the socket counts as a connection (against `limits.max_connections`, and
/// for a shutdown, which waits for it) until it is closed. For at most
/// [`LINGER`](crate::transport::LINGER), or in a shutdown for as long as
/// the client keeps sending (up to [`SHUTDOWN_GRACE`](crate::server::SHUTDOWN_GRACE),
/// when the shutdown stops waiting anyway): a client behind on reading
/// what was flushed to it (a subscriber with a backlog, acknowledging it)
/// still reads it, and the DISCONNECT after it, instead of having the
/// connection reset under it a second after the shutdown began.
pub(crate) async fn linger_counted<R: TransportRead>(reader: &mut R, permit: ConnectionPermit) {
    let wait = if permit.shutting_down {
        crate::server::SHUTDOWN_GRACE
    } else {
        crate::transport::LINGER
    };
    linger(reader, wait).await;
    drop(permit);
}

/// Serves one connection, whatever carries its bytes (TCP, WebSocket ...),
/// until it closes. The transport only moves bytes: everything MQTT happens
/// here, identically for every transport.
///
/// `peer` (for logs) is borrowed: its owner, the transport's task, keeps it
/// anyway, and a copy would be 32 more bytes of every connection.
///
/// Returns the connection's permit when the broker ended the connection
/// after its CONNACK: the caller then lets the client's last bytes in
/// (`transport::linger`) before it drops the socket, and the permit after
/// it, so that the socket is counted (and a shutdown waits for it) until
/// then.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
pub fn serve<'p, R, W>(
    broker: Arc<Broker>,
    mut reader: R,
    mut writer: W,
    peer: &'p SocketAddr,
) -> impl Future<Output = Option<ConnectionPermit>> + Send + use<'p, R, W>
where
    R: TransportRead,
    W: TransportWrite,
{
    async move {
        let permit = broker.registry.admit();
        Metrics::inc(&broker.metrics.connections_accepted);
        let mut buf = broker.pool.take();
        // Boxed: what it takes to get to CONNACK (the CONNECT, the
        // authentication exchanges, the connect timeout, a refusal) is needed
        // once, and inline it would be part of every connection's task for
        // the connection's whole life.
        let (mut conn, control) = Box::pin(open(
            &broker,
            &mut reader,
            &mut writer,
            &mut buf,
            &permit,
            *peer,
        ))
        .await?;
        let protocol = conn.protocol;
        tracing::debug!(%peer, client_id = %conn.session.client_id, ?protocol, "client connected");

        let exit = {
            // Pinned in place: the reader and the writer run side by side in
            // this one task, whose size every connection pays for its life.
            let mut writer_fut = std::pin::pin!(write_loop(
                WriterContext {
                    session: Arc::clone(&conn.session),
                    connection_id: permit.id,
                    control: Arc::clone(&control),
                    protocol,
                    client_max_packet: conn.client_max_packet,
                    client_topic_alias_max: conn.client_topic_alias_max,
                    metrics: Arc::clone(&broker.metrics),
                },
                writer,
            ));
            let mut reader_fut = std::pin::pin!(conn.read_loop(&mut reader, &mut buf, &control));
            let mut writer_done = false;
            // One await for both halves, also after the writer is done (the
            // reader then returns promptly): a second await point would add
            // its own slots to the task's state.
            let exit = loop {
                tokio::select! {
                    exit = &mut reader_fut => break exit,
                    () = &mut writer_fut, if !writer_done => {
                        writer_done = true;
                        control.close(None);
                    }
                }
            };
            broker.registry.reader_finished(&control);
            match exit.disconnect_reason() {
                Some(code) if exit.withholds() => control.close_withholding(code),
                reason => {
                    control.close(reason);
                }
            }
            if !writer_done {
                // Boxed: once per connection, and its timer would otherwise
                // be part of the task's size for the connection's whole life.
                let _ = Box::pin(tokio::time::timeout(CLOSE_GRACE, &mut writer_fut)).await;
            }
            exit
        };
        match &exit {
            Exit::Error(code, why) => {
                // Limited per reason code: one client's storm of one
                // mistake leaves others' different ones in the log.
                throttled_by!(*code as usize, WARN, %peer, client_id = %conn.session.client_id, ?code, "closing connection: {why}");
            }
            other => {
                tracing::debug!(%peer, client_id = %conn.session.client_id, exit = ?other, "client disconnected");
            }
        }
        let new_expiry = match exit {
            Exit::ClientDisconnect { .. } => conn.disconnect_expiry,
            _ => None,
        };
        conn.finish(exit.publishes_will(), new_expiry);
        let mut permit = permit;
        permit.shutting_down = broker.is_shutting_down();
        exit.ended_by_broker().then_some(permit)
    }
}

/// Waits while the reader is paused (see `read_loop`): until the
/// client has read its replies (`backlog`), until `full_queue` has room,
/// or until the broker is under its outbound budget. Returns how the
/// connection must end, if it must.
async fn paused(
    broker: &Broker,
    backlog: bool,
    full_queue: Option<Arc<Session>>,
    control: &ConnectionControl,
) -> Option<Exit> {
    let budget = &broker.registry.context().budget;
    let room = async {
        match &full_queue {
            Some(full) => full.wait_for_room().await,
            None => std::future::pending().await,
        }
    };
    // Over the budget: a sweep now, and the keep alive sweep's while it
    // stays over, exempt the queues no writer has taken from for
    // `queue_full_wait_ms` (stalled subscribers), so that they cannot keep
    // every reader paused.
    let below = async {
        broker.exempt_stalled_queues();
        budget.wait_until_below().await;
    };
    tokio::select! {
        () = below, if !backlog && full_queue.is_none() => None,
        () = room, if !backlog => None,
        () = control.drained.wait(), if backlog => None,
        () = control.wake_reader.wait() => control.is_closing().then(|| closed_by_broker(control)),
    }
}

/// What [`Connection::handle_read`] did with a read's packets.
#[derive(Default)]
struct ReadHandled {
    /// Whether a packet was decoded (keep alive restarts).
    decoded: bool,
    /// Whether every whole packet was handled: what `buf` holds then is one
    /// incomplete packet.
    drained: bool,
    /// Whether a packet larger than a pooled buffer was among them (see
    /// `shed_grown_buffer`).
    large: bool,
    /// A SUBSCRIBE waiting for a walk permit, with the packets after it
    /// still in `buf`. Boxed: rare.
    awaits_walk: Option<Box<Packet>>,
}

/// Waits for one of the broker's permits to walk a large retained store
/// (`Broker::retained_walks`); `None` if the broker closes the connection
/// meanwhile, even as a permit comes free.
async fn walk_permit(broker: &Broker, control: &ConnectionControl) -> Option<OwnedSemaphorePermit> {
    let permit = Arc::clone(&broker.retained_walks).acquire_owned();
    tokio::pin!(permit);
    while !control.is_closing() {
        tokio::select! {
            biased;
            () = control.wake_reader.wait() => {}
            permit = &mut permit => return permit.ok().filter(|_| !control.is_closing()),
        }
    }
    None
}

/// How a connection the broker closed ends: a keep alive timeout (see
/// keep_alive.rs) as an error, logged and publishing the will; a takeover or
/// shutdown as a kick.
fn closed_by_broker(control: &ConnectionControl) -> Exit {
    match control.close_reason() {
        Some(ReasonCode::KeepAliveTimeout) => {
            Exit::Error(ReasonCode::KeepAliveTimeout, "keep alive timed out".into())
        }
        reason => Exit::Kicked(reason),
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close_down(None);
        self.broker.incomplete.release(&mut self.incomplete_counted);
    }
}

/// The enhanced authentication (MQTT 5 section 4.12) of a connection.
struct EnhancedAuth {
    /// The method CONNECT chose; every AUTH must name it.
    method: Bytes,
    /// A re-authentication in progress (AUTH 0x19 received).
    reauthentication: Option<Box<dyn AuthExchange>>,
}

/// Protocol state of one connection after CONNECT.
struct Connection {
    broker: Arc<Broker>,
    connection_id: u64,
    protocol: ProtocolVersion,
    session: Arc<Session>,
    expiry_interval: u32,
    /// In seconds; 0: none.
    keep_alive: u16,
    /// What the last read left ends in an incomplete packet (the reader's
    /// copy of `ConnectionControl::is_incomplete`; kept up to date only
    /// without keep alive).
    incomplete: bool,
    /// The CONNECT asked for a session expiry of 0 (or none): its DISCONNECT
    /// may not raise it (MQTT-3.14.2-2). `expiry_interval` may be 0 for
    /// another reason, `limits.max_session_expiry_secs`.
    connect_expiry_zero: bool,
    send_quota: u16,
    client_max_packet: Option<u32>,
    client_topic_alias_max: u16,
    /// Boxed: most connections have none, and this lives as long as the task.
    will: Option<Box<Will>>,
    /// The session's attach generation while this connection is attached.
    /// Never 0: an attach counts the generation up first (`Session::attach`),
    /// which lets the option take 8 bytes, not 16, in every connection's
    /// task.
    attached: Option<NonZeroU64>,
    /// Made at the first PUBLISH with an alias: most clients use none.
    topic_aliases: Option<Box<InboundAliases>>,
    /// A session expiry interval changed by the client's DISCONNECT.
    disconnect_expiry: Option<u32>,
    /// Enhanced authentication, when CONNECT chose a method. Boxed: few
    /// clients use it.
    enhanced_auth: Option<Box<EnhancedAuth>>,
    /// Bytes of packets decoded since the reader last yielded for them or
    /// paused (see [`DECODE_BYTES_PER_TURN`]). Not reset when it waits for
    /// input, which costs a reader that often waits one needless yield per
    /// turn's bytes, and keeps the count out of the read path.
    decoded_this_turn: u32,
    /// What the incomplete packet in the read buffer counts against
    /// `limits.max_incomplete_bytes` (see incomplete.rs); released when the
    /// connection ends.
    incomplete_counted: u32,
    /// The connection's shared signals and flags; also counts the
    /// acknowledgements waiting for the store (see
    /// [`Connection::acknowledge_then`]).
    control: Arc<ConnectionControl>,
    /// A subscriber whose full queue took this client's last publish beyond
    /// its bound: the reader waits for it before reading on.
    full_queue: Option<Arc<Session>>,
    /// The subscribers of the topic this client last published to, reused
    /// while nothing changes (see `Broker::publish_from_client`). Kept while
    /// the client is idle: it pins one snapshot of the router at most (a
    /// session that ended since holds no messages), replaced at the next
    /// publish.
    recent_route: Option<RecentMatch<SessionRef>>,
    /// QoS 0 messages of the current read, delivered subscriber by
    /// subscriber at the end of the read (see `Broker::publish_from_client`).
    staged: StagedFanout,
    /// What this client may publish and subscribe to, when the broker has
    /// `[[auth.acl]]` rules (compiled at CONNECT, see acl.rs).
    acl: Option<Box<ClientAcl>>,
}

impl Connection {
    /// Closes down with the will decision made, and the session expiry the
    /// client's DISCONNECT set (applied only if this connection still owns
    /// the session).
    fn finish(mut self, publish_will: bool, new_expiry: Option<u32>) {
        if !publish_will {
            self.will = None;
        }
        self.close_down(new_expiry);
    }

    /// Detaches from the session (once): publishes the will when due and
    /// lets the session expire or end.
    fn close_down(&mut self, new_expiry: Option<u32>) {
        let Some(generation) = self.attached.take() else {
            return;
        };
        self.broker.connection_closed(
            &self.session,
            self.connection_id,
            generation.get(),
            self.will.take().map(|w| *w),
            new_expiry,
        );
    }

    /// Reads and handles packets until the connection must close.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice"
    )]
    fn read_loop<'a, R: TransportRead>(
        &'a mut self,
        reader: &'a mut R,
        buf: &'a mut BytesMut,
        control: &'a Arc<ConnectionControl>,
    ) -> impl Future<Output = Exit> + Send + 'a {
        // An async block, not an async fn: see `serve_tcp`.
        async move {
            let session = &Arc::clone(&self.session);
            loop {
                // The read's packets, up to a SUBSCRIBE that waits for a walk
                // permit, if one does. A block: what it keeps ends before the
                // awaits after it, so that it does not grow every
                // connection's task.
                {
                    let read = match self.handle_read(session, buf) {
                        Ok(read) => read,
                        Err(exit) => return exit,
                    };
                    if read.drained {
                        if read.large {
                            shed_grown_buffer(buf, &self.broker.pool);
                        }
                        if let Err(exit) = self.count_incomplete(buf) {
                            // Its memory goes now, not when the connection
                            // has finished closing.
                            *buf = BytesMut::new();
                            return exit;
                        }
                    }
                    // A complete packet restarts the keep alive wait (see
                    // keep_alive.rs); once per read rather than per packet.
                    if read.decoded {
                        control.packet_received(self.broker.keep_alive.now_ms());
                    }
                    // Without keep alive, an incomplete packet is timed instead
                    // (see keep_alive.rs); a store only when that changes.
                    if self.keep_alive == 0 && buf.is_empty() == self.incomplete {
                        self.incomplete = !buf.is_empty();
                        control.set_incomplete(self.incomplete, self.broker.keep_alive.now_ms());
                    }
                    // After the keep alive stamp: the wait counts against keep
                    // alive as a pause for back-pressure does.
                    if let Some(subscribe) = read.awaits_walk {
                        // Boxed: rare, and inline its state would grow every
                        // connection's task.
                        let walk = self.subscribe_after_walk(session, subscribe, control);
                        if let Err(exit) = Box::pin(walk).await {
                            return exit;
                        }
                        if !control.is_closing() {
                            // The packets after the SUBSCRIBE are still in
                            // `buf`; the checks below run after them.
                            continue;
                        }
                    }
                }
                if control.is_closing() {
                    if control.close_reason() == Some(ReasonCode::SessionTakenOver) {
                        // Boxed: rare, and inline its state would grow every
                        // connection's task.
                        return Box::pin(self.last_words(reader, buf, control)).await;
                    }
                    return closed_by_broker(control);
                }
                let budget = &self.broker.registry.context().budget;
                let unsent = session.control_backlog(self.connection_id)
                    + self.control.acks_awaiting_store();
                let backlog = unsent > MAX_UNSENT_CONTROL_PACKETS;
                let full_queue = self.full_queue.take();
                if backlog || full_queue.is_some() || budget.is_over() {
                    // Back-pressure: stop reading (so TCP slows the client down)
                    // until this client has read the replies it was sent, until
                    // a subscriber's full queue has room (bounded by
                    // `queue_full_wait_ms`), or until writers have drained the
                    // broker under its budget. Keep alive keeps running: a
                    // client stuck for 1.5 x keep alive is closed, which also
                    // releases what it held.
                    // Boxed: the wait is rare, and inline its state would grow
                    // every idle connection's task.
                    let paused = paused(&self.broker, backlog, full_queue, control);
                    if let Some(exit) = Box::pin(paused).await {
                        if control.close_reason() != Some(ReasonCode::SessionTakenOver) {
                            return exit;
                        }
                        // Taken over while paused: its last words are read
                        // at the top of the loop.
                    }
                    self.decoded_this_turn = 0;
                    continue;
                }
                if self.decoded_this_turn >= DECODE_BYTES_PER_TURN {
                    // Others run before this reader decodes on (what `buf`
                    // holds first, then what the socket has).
                    self.decoded_this_turn = 0;
                    tokio::task::yield_now().await;
                    continue;
                }
                if buf.is_empty() && buf.capacity() > 0 {
                    // Everything read has been handled: idle connections hold
                    // no read buffer.
                    self.broker.pool.give(std::mem::take(buf));
                }
                // Reads first: a connection closed by a takeover still
                // handles what it had received (a DISCONNECT sent just before
                // the new CONNECT decides its will and session expiry);
                // `is_closing` is checked after every read.
                tokio::select! {
                    biased;
                    read = read_pooled(reader, buf, &self.broker.pool) => match read {
                        Ok(0) => return Exit::Closed,
                        Ok(n) => Metrics::add(&self.broker.metrics.bytes_received, n as u64),
                        Err(e) => {
                            if crate::transport::peer_violation(&self.broker.metrics, &e) {
                                throttled!(INFO, client_id = %session.client_id, "closed: {e}");
                            }
                            return Exit::Closed;
                        }
                    },
                    // Closing: handled at the top of the loop.
                    () = control.wake_reader.wait() => {}
                }
            }
        }
    }

    /// Decodes and handles the packets `buf` holds, up to a SUBSCRIBE that
    /// must wait for a walk permit (see [`walks_far`](Self::walks_far)),
    /// whose subscribers' writers are woken once for everything it queued
    /// for them (see wake_batch.rs). `Err`: the connection must close.
    fn handle_read(
        &mut self,
        session: &Arc<Session>,
        buf: &mut BytesMut,
    ) -> Result<ReadHandled, Exit> {
        let mut read = ReadHandled::default();
        let max_packet = self.broker.config.limits.max_packet_size as usize;
        let batch = WakeBatch::open();
        loop {
            let before = buf.len();
            match decode_packet(buf, self.protocol, max_packet) {
                Ok(Some(packet)) => {
                    Metrics::inc(&self.broker.metrics.packets_received);
                    read.decoded = true;
                    // At most `max_packet`, which is a u32.
                    let size = before - buf.len();
                    self.decoded_this_turn = self
                        .decoded_this_turn
                        .saturating_add(u32::try_from(size).unwrap_or(u32::MAX));
                    read.large |= size > BUFFER_SIZE;
                    // The packet counted as incomplete is whole.
                    self.broker.incomplete.release(&mut self.incomplete_counted);
                    // A SUBSCRIBE that walks a large retained store is
                    // handled with a walk permit; one that must wait for
                    // it ends the batch, and the read loop waits.
                    let walk = match &packet {
                        Packet::Subscribe(s) if self.walks_far(s) => {
                            match Arc::clone(&self.broker.retained_walks).try_acquire_owned() {
                                Ok(permit) => Some(permit),
                                Err(_) => {
                                    read.awaits_walk = Some(Box::new(packet));
                                    break;
                                }
                            }
                        }
                        _ => None,
                    };
                    let handled = self.handle(session, packet);
                    drop(walk);
                    if let Err(exit) = handled {
                        // What it published before is delivered.
                        self.deliver_staged(session);
                        return Err(exit);
                    }
                    if self.staged.is_due() {
                        self.deliver_staged(session);
                    }
                    if self.full_queue.is_some() || self.decoded_this_turn >= DECODE_BYTES_PER_TURN
                    {
                        break;
                    }
                    batch.flush_if_due();
                }
                Ok(None) => {
                    read.drained = true;
                    break;
                }
                Err(e) => {
                    self.deliver_staged(session);
                    count_decode_error(&self.broker.metrics, &e);
                    // Only a CONNECT names a protocol: a second one is a
                    // Protocol Error whatever it names (MQTT-3.1.0-2; 0x84
                    // is no DISCONNECT code).
                    let code = match e {
                        tern_codec::DecodeError::UnsupportedProtocolVersion { .. } => {
                            ReasonCode::ProtocolError
                        }
                        _ => e.reason_code(),
                    };
                    return Err(Exit::Error(code, e.to_string().into()));
                }
            }
        }
        // Before the batch wakes the writers it filled.
        self.deliver_staged(session);
        Ok(read)
    }

    /// Handles a SUBSCRIBE that walks a large retained store once one of
    /// the broker's walk permits is free (see [`walk_permit`]), with its
    /// subscribers' writers woken as one batch, as the read loop's are. A
    /// SUBSCRIBE of a connection the broker closes meanwhile is not
    /// applied: the read loop's checks end the connection.
    async fn subscribe_after_walk(
        &mut self,
        session: &Arc<Session>,
        subscribe: Box<Packet>,
        control: &ConnectionControl,
    ) -> Result<(), Exit> {
        let Some(permit) = walk_permit(&self.broker, control).await else {
            return Ok(());
        };
        let handled = {
            let _batch = WakeBatch::open();
            self.handle(session, *subscribe)
        };
        drop(permit);
        handled
    }

    /// The end of a connection closed by a takeover. What its client sent
    /// before it connected again counts, a DISCONNECT above all (its will,
    /// its session expiry): it may be in `buf` behind packets a paused read
    /// left undecoded, still unread behind them, or arrive after the new
    /// connection's CONNECT (packets of two connections can arrive out of
    /// order). So this reads on for up to [`TAKEOVER_LAST_READ`], skipping
    /// every packet but a DISCONNECT, whose effect is returned. Skipped
    /// packets are those of a client that has connected again: a QoS 1/2
    /// one comes again on the new connection, a QoS 0 one is lost, as at
    /// most once allows.
    async fn last_words<R: TransportRead>(
        &mut self,
        reader: &mut R,
        buf: &mut BytesMut,
        control: &ConnectionControl,
    ) -> Exit {
        let max_packet = self.broker.config.limits.max_packet_size as usize;
        let deadline = tokio::time::Instant::now() + TAKEOVER_LAST_READ;
        loop {
            loop {
                match decode_packet(buf, self.protocol, max_packet) {
                    Ok(Some(Packet::Disconnect(disconnect))) => {
                        return match self.on_disconnect(disconnect) {
                            Err(exit) => exit,
                            Ok(()) => closed_by_broker(control),
                        };
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return closed_by_broker(control),
                }
            }
            let read =
                tokio::time::timeout_at(deadline, read_pooled(reader, buf, &self.broker.pool));
            match read.await {
                Ok(Ok(n @ 1..)) => {
                    Metrics::add(&self.broker.metrics.bytes_received, n as u64);
                }
                _ => return closed_by_broker(control),
            }
        }
    }

    /// Counts the incomplete packet `buf` holds against
    /// `limits.max_incomplete_bytes` (incomplete.rs): an error, its count
    /// released, when it grew while the broker holds more than that.
    fn count_incomplete(&mut self, buf: &BytesMut) -> Result<(), Exit> {
        let incomplete = &self.broker.incomplete;
        if incomplete.record(&mut self.incomplete_counted, buf) {
            return Ok(());
        }
        incomplete.release(&mut self.incomplete_counted);
        Metrics::inc(&self.broker.metrics.incomplete_packets_refused);
        Err(Exit::Error(
            ReasonCode::QuotaExceeded,
            OVER_INCOMPLETE_LIMIT.into(),
        ))
    }

    /// Delivers the QoS 0 messages staged during this read; a subscriber
    /// whose queue took them beyond its bound pauses this reader.
    fn deliver_staged(&mut self, session: &Arc<Session>) {
        if let Some(full) = self.broker.deliver_staged(&mut self.staged) {
            // A client publishing to its own full queue would wait for its
            // own acknowledgements, which it is not read for.
            if !Arc::ptr_eq(&full, session) && self.full_queue.is_none() {
                self.full_queue = Some(full);
            }
        }
    }

    /// Handles one packet from the client.
    fn handle(&mut self, session: &Arc<Session>, packet: Packet) -> Result<(), Exit> {
        if !matches!(packet, Packet::Publish(_)) {
            // Whatever answers this packet goes out after the deliveries of
            // the publishes before it, as when they were not staged.
            self.deliver_staged(session);
        }
        match packet {
            Packet::Publish(publish) => self.on_publish(session, publish),
            Packet::PubAck(ack) => {
                session.puback(ack.packet_id);
                Ok(())
            }
            Packet::PubRec(ack) => {
                session.pubrec(self.connection_id, ack.packet_id, ack.code);
                Ok(())
            }
            Packet::PubRel(ack) => {
                let mut journal = Journal::new();
                let known = session.pubrel(ack.packet_id, &mut journal);
                let code = if known || !self.protocol.is_v5() {
                    ReasonCode::Success
                } else {
                    ReasonCode::PacketIdentifierNotFound
                };
                self.acknowledge(
                    Packet::PubComp(PubAck {
                        packet_id: ack.packet_id,
                        code,
                        ..PubAck::default()
                    }),
                    journal,
                );
                Ok(())
            }
            Packet::PubComp(ack) => {
                session.pubcomp(ack.packet_id);
                Ok(())
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(session, subscribe),
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(session, unsubscribe),
            Packet::PingReq => {
                self.send(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(disconnect) => self.on_disconnect(disconnect),
            Packet::Connect(_) => Err(self.protocol_error("second CONNECT")),
            Packet::Auth(auth) => self.on_auth(*auth),
            other => Err(self.protocol_error(&format!(
                "{:?} may not be sent by a client",
                other.packet_type()
            ))),
        }
    }

    fn protocol_error(&self, why: &str) -> Exit {
        Metrics::inc(&self.broker.metrics.protocol_errors);
        Exit::Error(ReasonCode::ProtocolError, why.into())
    }

    fn send(&self, packet: Packet) {
        self.session.send_control(self.connection_id, packet);
    }

    /// Sends an acknowledgement once the state it acknowledges (in
    /// `journal`) is durable; see [`acknowledge_then`](Self::acknowledge_then).
    fn acknowledge(&self, packet: Packet, journal: Journal) {
        self.acknowledge_then(packet, journal, || true, |_| {});
    }

    /// Sends `packet` (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK) once the
    /// changes in `journal` are durable and `holds()` says that what it
    /// acknowledges is still so, then runs `then(true)`.
    ///
    /// Acknowledgements leave in the order the packets arrived (MQTT 4.6):
    /// while any waits for the store, later ones wait behind it even when
    /// they store nothing (the writer completes in submission order). If the
    /// store fails, `then(false)` undoes what the packet would have
    /// acknowledged, before the client is told: MQTT 5 acks carry "quota
    /// exceeded" (disk full) or "implementation specific error"; MQTT 3.x
    /// PUBACK and PUBREC have no error code, so the connection is closed
    /// instead and the client sends the message again when it reconnects.
    fn acknowledge_then(
        &self,
        packet: Packet,
        mut journal: Journal,
        holds: impl FnOnce() -> bool + Send + 'static,
        then: impl FnOnce(bool) + Send + 'static,
    ) {
        let Some(persistence) = self.broker.persistence.as_ref() else {
            self.send(packet);
            then(true);
            return;
        };
        if !journal.must_wait() && self.control.acks_awaiting_store() == 0 {
            self.send(packet);
            then(true);
            return;
        }
        self.control.ack_awaits_store();
        let session = Arc::clone(&self.session);
        let (connection_id, v5) = (self.connection_id, self.protocol.is_v5());
        let control = Arc::clone(&self.control);
        journal.after(move |result| {
            match result {
                Ok(()) if holds() => {
                    session.send_control(connection_id, packet);
                    control.ack_released();
                    then(true);
                }
                _ => {
                    // Undone first: a client told of the failure may act on
                    // it at once (an MQTT 5 client reuses the packet id).
                    then(false);
                    let disk_full = result.as_ref().is_err_and(StoreError::is_disk_full);
                    match refused_ack(packet, disk_full, v5) {
                        Some(reply) => {
                            session.send_control(connection_id, reply);
                        }
                        None => session.close_connection(connection_id, None),
                    }
                    control.ack_released();
                }
            }
        });
        persistence.commit(journal);
    }

    /// Re-authentication (MQTT 5 section 4.12.1): AUTH 0x19 starts a new
    /// exchange with the CONNECT's method; 0x18 continues it.
    fn on_auth(&mut self, auth: tern_codec::Auth) -> Result<(), Exit> {
        let Some(enhanced) = self.enhanced_auth.as_mut() else {
            return Err(self.protocol_error("AUTH without an authentication method in CONNECT"));
        };
        let method = enhanced.method.clone();
        if auth.properties.authentication_method.as_ref() != Some(&method) {
            return Err(self.protocol_error("AUTH with a different authentication method"));
        }
        let exchange = match (auth.code, enhanced.reauthentication.take()) {
            (ReasonCode::ReAuthenticate, None) => {
                self.broker.auth_rules().authenticator.start(&method)
            }
            (ReasonCode::ContinueAuthentication, Some(exchange)) => Some(exchange),
            _ => None,
        };
        let Some(mut exchange) = exchange else {
            return Err(self.protocol_error("AUTH out of sequence"));
        };
        match exchange.step(auth.properties.authentication_data.as_deref()) {
            AuthStep::Continue(data) => {
                let reply = auth_packet(ReasonCode::ContinueAuthentication, &method, data);
                self.send_auth(reply)?;
                if let Some(enhanced) = self.enhanced_auth.as_mut() {
                    enhanced.reauthentication = Some(exchange);
                }
                Ok(())
            }
            AuthStep::Success { data, user } => {
                // One connection is one user: its ACL was compiled for, and
                // a reload of `[auth]` judges, the user proved at CONNECT.
                let proved = self
                    .session
                    .attached_login()
                    .and_then(|(login, _)| login.user);
                if proved.as_deref() != Some(user.as_str()) {
                    return Err(Exit::Error(
                        ReasonCode::NotAuthorized,
                        "re-authenticated as another user".into(),
                    ));
                }
                self.send_auth(auth_packet(
                    ReasonCode::Success,
                    &method,
                    data.unwrap_or_default(),
                ))
            }
            AuthStep::Failure => Err(Exit::Error(
                ReasonCode::NotAuthorized,
                "re-authentication failed".into(),
            )),
        }
    }

    /// Sends an AUTH of re-authentication. One larger than the client's
    /// Maximum Packet Size is not sent (MQTT-3.1.2-24), and the exchange
    /// cannot go on without it: re-authentication fails (DISCONNECT 0x87,
    /// MQTT 5 section 4.12.1).
    fn send_auth(&self, auth: Packet) -> Result<(), Exit> {
        if !fits_client(&auth, self.client_max_packet) {
            Metrics::inc(&self.broker.metrics.acks_dropped_oversized);
            return Err(Exit::Error(
                ReasonCode::NotAuthorized,
                "re-authentication failed: its AUTH would exceed the client's Maximum Packet Size"
                    .into(),
            ));
        }
        self.send(auth);
        Ok(())
    }

    fn on_disconnect(&mut self, disconnect: Disconnect) -> Result<(), Exit> {
        if let Some(secs) = disconnect.properties.session_expiry_interval {
            // MQTT-3.14.2-2: an expiry of 0 at CONNECT cannot be raised now.
            if self.connect_expiry_zero && secs != 0 {
                return Err(self.protocol_error("session expiry raised from 0 at DISCONNECT"));
            }
            let secs = secs.min(self.broker.config.limits.max_session_expiry_secs);
            self.disconnect_expiry = Some(secs);
            self.session
                .set_expiry_at_disconnect(self.connection_id, secs);
        }
        // MQTT-3.14.4-3 and MQTT-3.1.2-8: only a normal disconnection (0x00)
        // discards the will; 0x04 and every error code keep it.
        Err(Exit::ClientDisconnect {
            with_will: disconnect.code != ReasonCode::Success,
        })
    }
}

/// What to send instead of `ack` when the state it acknowledges could not
/// be stored; `None`: the packet has no way to say so (MQTT 3.x PUBACK,
/// PUBREC, UNSUBACK), close the connection instead.
fn refused_ack(ack: Packet, disk_full: bool, v5: bool) -> Option<Packet> {
    let code = if disk_full {
        ReasonCode::QuotaExceeded
    } else {
        ReasonCode::ImplementationSpecificError
    };
    match ack {
        Packet::PubAck(a) if v5 => Some(Packet::PubAck(PubAck { code, ..a })),
        Packet::PubRec(a) if v5 => Some(Packet::PubRec(PubAck { code, ..a })),
        Packet::SubAck(mut a) => {
            let refused = if v5 {
                code
            } else {
                ReasonCode::UnspecifiedError
            };
            a.codes.iter_mut().for_each(|c| *c = refused);
            Some(Packet::SubAck(a))
        }
        Packet::UnsubAck(mut a) if v5 => {
            // UNSUBACK has no "quota exceeded" (MQTT 5 3.11.3).
            a.codes
                .iter_mut()
                .for_each(|c| *c = ReasonCode::ImplementationSpecificError);
            Some(Packet::UnsubAck(a))
        }
        // The flow is over in memory either way, and PUBCOMP has no error
        // code: the client must be able to finish it.
        Packet::PubComp(a) => Some(Packet::PubComp(a)),
        _ => None,
    }
}
