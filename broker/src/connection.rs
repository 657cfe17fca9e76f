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

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
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

use crate::acl::ClientAcl;
use crate::auth::{AuthExchange, AuthStep};
use crate::auth_rules::{AuthRules, Login};
use crate::broker::{Broker, SessionRef, StagedFanout};
use crate::handshake::{
    auth_packet, authenticate, check_connect, count_decode_error, fit_connack, misstates_utf8,
    read_connect, will_allowed, write_direct, Authenticated, HandshakeFailure,
};
use crate::log_throttle::throttled;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::persistence::Journal;
use crate::registry::ConnectionPermit;
use crate::session::{AttachParams, ConnectionControl, Delivery, HandOver, Session};
use crate::topic_alias::{AliasError, InboundAliases};
use crate::transport::{linger, read_pooled, TransportRead, TransportWrite};
use crate::wake_batch::WakeBatch;
use crate::writer::{write_loop, WriterContext};
use tern_storage::{Op, StoreError, SubscriptionRecord};

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
/// for a shutdown, which waits for it) until it is closed.
pub(crate) async fn linger_counted<R: TransportRead>(reader: &mut R, permit: ConnectionPermit) {
    linger(reader).await;
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
                reason => control.close(reason),
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
                throttled!(WARN, %peer, client_id = %conn.session.client_id, ?code, "closing connection: {why}");
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
        exit.ended_by_broker().then_some(permit)
    }
}

/// Everything up to CONNACK: the CONNECT (and authentication) within the
/// connect timeout, the session opened and attached, CONNACK sent. `None`
/// when the connection ends there (refused, timed out, closed, replaced).
async fn open<R, W>(
    broker: &Arc<Broker>,
    reader: &mut R,
    writer: &mut W,
    buf: &mut BytesMut,
    permit: &ConnectionPermit,
    peer: SocketAddr,
) -> Option<(Connection, Arc<ConnectionControl>)>
where
    R: TransportRead,
    W: AsyncWrite + Unpin + Send,
{
    let max_packet = broker.config.limits.max_packet_size as usize;

    let (accepted, login, rules) = {
        let handshake = tokio::time::timeout(broker.config.connect_timeout(), async {
            let connect = read_connect(&mut *reader, &mut *buf, max_packet, &broker.metrics)
                .await
                .map_err(|failure| (None, failure))?;
            if !permit.admitted {
                Metrics::inc(&broker.metrics.connections_refused);
                let busy = if connect.protocol.is_v5() {
                    ReasonCode::ServerBusy
                } else {
                    ReasonCode::ServerUnavailable
                };
                return Err((Some(connect), HandshakeFailure::Refused(busy)));
            }
            // One set of `[auth]` rules decides the whole handshake
            // (auth_rules.rs), taken once the CONNECT is in.
            let rules = broker.auth_rules();
            let certificate = reader.client_certificate();
            if let Some(code) = check_connect(broker, &rules, &connect, certificate) {
                return Err((Some(connect), HandshakeFailure::Refused(code)));
            }
            match authenticate(
                broker,
                &rules,
                &connect,
                &mut *reader,
                &mut *writer,
                &mut *buf,
            )
            .await
            {
                Ok(authenticated) => {
                    match authenticated.proven(&rules, &connect, reader.client_certificate()) {
                        Some(authenticated) if will_allowed(&rules, &connect, &authenticated) => {
                            Ok((connect, authenticated, rules))
                        }
                        _ => Err((
                            Some(connect),
                            HandshakeFailure::Refused(ReasonCode::NotAuthorized),
                        )),
                    }
                }
                Err(failure) => Err((Some(connect), failure)),
            }
        })
        .await;
        let (connect, authenticated, rules) = match handshake {
            Err(_) => {
                Metrics::inc(&broker.metrics.connect_timeouts);
                throttled!(INFO, %peer, "closed: no CONNECT within the connect timeout");
                return None;
            }
            Ok(Ok(done)) => done,
            Ok(Err((connect, failure))) => {
                refuse(broker, writer, peer, connect.as_deref(), failure).await;
                return None;
            }
        };
        // `[auth]` reloaded since the rules were taken (during an AUTH
        // exchange, or the takeover's wait): judged as connected clients
        // are, before the client can take over or open anything.
        let login = authenticated.login();
        let revoked = || broker.revoked_since(&rules, &login, connect.client_id_str());
        if revoked() {
            let failure = HandshakeFailure::Refused(ReasonCode::NotAuthorized);
            refuse(broker, writer, peer, Some(&connect), failure).await;
            return None;
        }
        let mut replacing = None;
        // Decided once, before the hand-over: a session that handed its
        // shared messages over is replaced even if it could be resumed by
        // the time `accept` opens it (its subscriptions changed meanwhile).
        let mut replace = false;
        if !connect.client_id.is_empty() {
            broker.registry.take_over(connect.client_id_str()).await;
            if revoked() {
                let failure = HandshakeFailure::Refused(ReasonCode::NotAuthorized);
                refuse(broker, writer, peer, Some(&connect), failure).await;
                return None;
            }
            if let Some(existing) = broker.registry.get(connect.client_id_str()) {
                // Asked only of a session the registry would resume (as
                // `Registry::open` does); one with expiry 0 is never
                // resumed, and hands over anyway.
                let resumable = !existing.is_ended() && existing.expiry_interval() != 0;
                replace = connect.clean_start
                    || resumable && {
                        let user = authenticated.user.as_deref();
                        let acl = rules.client_acl(user, connect.client_id_str());
                        let why = not_resumed(broker, &existing, acl.as_ref());
                        why.inspect(|&why| count_not_resumed(broker, &existing, why))
                            .is_some()
                    };
                replacing = hand_over_before_replacing(broker, &existing, replace).await;
            }
        }
        let accepted =
            Connection::accept(broker, &rules, *connect, replace, permit.id, authenticated);
        // The session replaced (if any) has ended in `accept`.
        drop(replacing);
        let accepted = match accepted {
            Ok(accepted) => accepted,
            Err(connect) => {
                // A new session beyond `limits.max_sessions`.
                Metrics::inc(&broker.metrics.connections_refused);
                let failure = HandshakeFailure::Refused(ReasonCode::QuotaExceeded);
                refuse(broker, writer, peer, Some(&connect), failure).await;
                return None;
            }
        };
        (accepted, login, rules)
    };
    let Accepted {
        connection: mut conn,
        connack,
        discarded_stored,
    } = accepted;
    let protocol = conn.protocol;
    // Attach before CONNACK so that every exit from here on (a failed CONNACK
    // write included) runs the close-down logic of `Connection`. Nothing else
    // writes to the socket until the writer starts, so CONNACK stays first.
    let control = Arc::clone(&conn.control);
    if !conn.attach(login.clone()) {
        tracing::debug!(%peer, "session replaced before it could be attached");
        return None;
    };
    let discard_failed = match (&broker.persistence, discarded_stored) {
        (Some(persistence), true) => match persistence.sync().await {
            Ok(()) => false,
            Err(e) => {
                throttled!(WARN, client_id = %conn.session.client_id, error = %e, "refused: the discarded session's deletion could not be stored");
                true
            }
        },
        _ => false,
    };
    let revoked = broker.revoked_since(&rules, &login, &conn.session.client_id);
    if revoked || discard_failed {
        // Reloaded between the last check and the attach, and its sweep of
        // the connected clients did not see this one: refused after all,
        // its will withheld. Or the store failed under the discarded
        // session: refused as unavailable, like any write the store lost.
        let refusal = ConnAck {
            code: if revoked {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::ServerUnavailable
            },
            ..ConnAck::default()
        };
        write_direct(writer, &Packet::ConnAck(refusal), protocol, &broker.metrics).await;
        broker.registry.reader_finished(&control);
        conn.finish(false, None);
        return None;
    }
    let connack_sent =
        write_direct(writer, &Packet::ConnAck(connack), protocol, &broker.metrics).await;
    if !connack_sent {
        // No reader will run: a takeover must not wait for one.
        broker.registry.reader_finished(&control);
    }
    connack_sent.then_some((conn, control))
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
    // Over the budget: a sweep every `queue_full_wait_ms` exempts the
    // queues no writer has taken since the last one (stalled subscribers),
    // so that they cannot keep every reader paused.
    let below = async {
        let every = Duration::from_millis(broker.config.limits.queue_full_wait_ms.max(100));
        loop {
            tokio::select! {
                () = budget.wait_until_below() => return,
                () = tokio::time::sleep(every) => broker.exempt_stalled_queues(),
            }
        }
    };
    tokio::select! {
        () = below, if !backlog && full_queue.is_none() => None,
        () = room, if !backlog => None,
        () = control.drained.wait(), if backlog => None,
        () = control.wake_reader.wait() => control.is_closing().then(|| closed_by_broker(control)),
    }
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

/// Answers a failed handshake: CONNACK with the reason (in the client's
/// protocol version), or the 3.1.1-format CONNACK 0x01 for an unknown
/// protocol (MQTT-3.1.2-2), then the connection closes.
async fn refuse<W: AsyncWrite + Unpin>(
    broker: &Broker,
    writer: &mut W,
    peer: SocketAddr,
    connect: Option<&Connect>,
    failure: HandshakeFailure,
) {
    let (code, connect) = match (failure, connect) {
        (HandshakeFailure::Unsupported(name, level), _) => {
            throttled!(INFO, %peer, name, level, "refused: unsupported protocol version");
            // A client that said level 5 (under another protocol name)
            // reads a 5.0 CONNACK, 0x84 "unsupported protocol version";
            // any other the 3.1.1 one, 0x01 "unacceptable protocol
            // version", whose format every version before 5 shares.
            let format = if level == 5 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V311
            };
            let connack = Packet::ConnAck(ConnAck {
                code: ReasonCode::UnsupportedProtocolVersion,
                ..ConnAck::default()
            });
            write_direct(writer, &connack, format, &broker.metrics).await;
            return;
        }
        (HandshakeFailure::Closed(reason), _) => {
            tracing::debug!(%peer, reason, "connection closed during CONNECT");
            return;
        }
        (HandshakeFailure::Violation(reason), _) => {
            throttled!(INFO, %peer, "closed during CONNECT: {reason}");
            return;
        }
        (HandshakeFailure::Invalid { why, code, v5 }, _) => {
            throttled!(INFO, %peer, ?code, "refused: invalid CONNECT: {why}");
            if v5 {
                let connack = Packet::ConnAck(ConnAck {
                    code,
                    ..ConnAck::default()
                });
                write_direct(writer, &connack, ProtocolVersion::V5, &broker.metrics).await;
            }
            return;
        }
        (HandshakeFailure::Refused(code), Some(connect)) => (code, connect),
        (HandshakeFailure::Refused(_), None) => return,
    };
    throttled!(INFO, %peer, client_id = connect.client_id_str(), ?code, "connection refused");
    let mut properties = ConnAckProperties::default();
    if matches!(code, ReasonCode::UseAnotherServer | ReasonCode::ServerMoved) {
        properties.server_reference = broker.config.mqtt.server_reference.clone().map(Bytes::from);
    }
    let connack = Packet::ConnAck(ConnAck {
        code,
        properties,
        ..ConnAck::default()
    });
    write_direct(writer, &connack, connect.protocol, &broker.metrics).await;
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close_down(None);
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
    attached: Option<u64>,
    /// Made at the first PUBLISH with an alias: most clients use none.
    topic_aliases: Option<Box<InboundAliases>>,
    /// A session expiry interval changed by the client's DISCONNECT.
    disconnect_expiry: Option<u32>,
    /// Enhanced authentication, when CONNECT chose a method. Boxed: few
    /// clients use it.
    enhanced_auth: Option<Box<EnhancedAuth>>,
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

/// Why a CONNECT let in with `acl` (none: no `[auth]` rules apply to its
/// client) may not resume `session`, the session of its client id; `None`
/// when it may. Only the user that owns a session resumes it (its
/// subscriptions, and what they queued or sent while it was offline, are
/// its owner's), only under the deny rules it was made with, and only
/// while it holds no subscription these rules would refuse (rules can
/// change).
fn not_resumed(
    broker: &Broker,
    session: &Arc<Session>,
    acl: Option<&ClientAcl>,
) -> Option<NotResumed> {
    // A session withholds what its rules denied when it was made: one made
    // under other deny rules (`[auth]` was reloaded since) is not resumed,
    // so nothing it holds slips past the rules now.
    let wanted = acl.and_then(ClientAcl::denied_topics);
    if session.denied_topics() != wanted.as_deref() {
        return Some(NotResumed::OtherDenyRules);
    }
    let acl = acl?;
    let owned = session.owner().as_deref() == acl.user();
    let allowed = || {
        broker
            .router
            .subscriptions_of(&SessionRef(Arc::clone(session)))
            .iter()
            .all(|(filter, _)| acl.may_subscribe(parse_shared(filter).map_or(filter, |(_, f)| f)))
    };
    (!owned || !allowed()).then_some(NotResumed::OtherUserOrRefusedSubscriptions)
}

/// Logs (throttled) and counts a session that a CONNECT may not resume.
fn count_not_resumed(broker: &Broker, session: &Session, why: NotResumed) {
    Metrics::inc(&broker.metrics.sessions_not_resumed);
    throttled!(INFO, client_id = %session.client_id, "session not resumed: {why}");
}

/// Why a session is not resumed by a CONNECT of its client id without
/// Clean Start: the session is replaced by a new one, as with Clean Start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotResumed {
    /// It was made under other ACL deny rules (`[auth]` was reloaded
    /// since, or it was made for a client the rules treat otherwise).
    OtherDenyRules,
    /// Another user's, or it holds subscriptions the ACL refuses this client.
    OtherUserOrRefusedSubscriptions,
}

impl std::fmt::Display for NotResumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotResumed::OtherDenyRules => "made under other ACL deny rules (or for another user)",
            NotResumed::OtherUserOrRefusedSubscriptions => {
                "another user's, or it holds subscriptions the ACL refuses this client"
            }
        })
    }
}

/// What [`Connection::accept`] made of a CONNECT.
struct Accepted {
    connection: Connection,
    connack: ConnAck,
    /// A stored session of the client id was discarded for a new one (clean
    /// start, or a session that may not be resumed). Its deletion is
    /// submitted without waiting, like every session end's; the CONNACK,
    /// which tells the client the old session is gone, must wait for it to
    /// be durable, or a crash right after would bring the old session back.
    discarded_stored: bool,
}

/// Longest a connect waits for the hand-over of the shared messages of the
/// session it finds ([`hand_over_before_replacing`]): a store stalled
/// longer than this holds the client no longer. The hand-over's writes
/// still reach the store writer ahead of the session's end; only a crash
/// in between could then lose what was moved.
const HAND_OVER_WAIT: Duration = Duration::from_secs(5);

/// Before a connect takes `existing`, its client id's session, over: a
/// hand-over of its shared messages under way (its expiry, or its last
/// connection's close) finishes first, and a session this connect will
/// replace (`replaces`: Clean Start, or a session it may not resume; or
/// expiry 0: never resumed) hands what it kept to other members
/// (`Broker::hand_over_shared_before_end`). Returns the
/// guard of that hand-over, to hold until the session has ended in
/// [`Connection::accept`], so that no shared group gives it a message
/// meanwhile. Waits at most [`HAND_OVER_WAIT`].
async fn hand_over_before_replacing(
    broker: &Arc<Broker>,
    existing: &Arc<Session>,
    replaces: bool,
) -> Option<HandOver> {
    let hand_over = async {
        existing.hand_overs_done(0).await;
        if !replaces && existing.expiry_interval() != 0 {
            return None;
        }
        let guard = existing.begin_hand_over();
        let due = |s: &Session| !s.is_ended();
        broker.hand_over_shared_before_end(existing, due).await;
        // One that began meanwhile (the close of the connection taken
        // over) finishes first too.
        existing.hand_overs_done(1).await;
        Some(guard)
    };
    match tokio::time::timeout(HAND_OVER_WAIT, hand_over).await {
        Ok(guard) => guard,
        Err(_) => {
            tracing::warn!(client_id = %existing.client_id, "the hand-over of a replaced session's shared messages is still waiting for the store; connecting without waiting longer");
            None
        }
    }
}

impl Connection {
    /// Opens (or resumes) the session and prepares the CONNACK; with
    /// `replace`, an existing session is replaced, not resumed. Gives the
    /// CONNECT back when the client would need a new session and the broker
    /// holds `limits.max_sessions`.
    fn accept(
        broker: &Arc<Broker>,
        rules: &AuthRules,
        connect: Connect,
        replace: bool,
        connection_id: u64,
        authenticated: Authenticated,
    ) -> Result<Accepted, Box<Connect>> {
        let limits = &broker.config.limits;
        let protocol = connect.protocol;
        let v5 = protocol.is_v5();
        let mut props = ConnAckProperties::default();

        let client_id: String = if connect.client_id.is_empty() {
            let id = format!("tern-{:016x}", broker.registry.next_id() ^ random_seed());
            props.assigned_client_identifier = Some(Bytes::from(id.clone()));
            id
        } else {
            connect.client_id_str().to_owned()
        };
        let acl = rules
            .client_acl(authenticated.user.as_deref(), &client_id)
            .map(Box::new);

        let requested_expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry_interval = requested_expiry.min(limits.max_session_expiry_secs);
        if v5 && expiry_interval != requested_expiry {
            props.session_expiry_interval = Some(expiry_interval);
        }

        let mut keep_alive = connect.keep_alive;
        if limits.max_keepalive_secs > 0
            && (keep_alive == 0 || keep_alive > limits.max_keepalive_secs)
        {
            keep_alive = limits.max_keepalive_secs;
            if v5 {
                props.server_keep_alive = Some(keep_alive);
            }
        }

        let denied = acl.as_deref().and_then(ClientAcl::denied_topics);
        // Asked again under the registry's lock: the session may have
        // changed since the handshake found it resumable.
        let resumable = |existing: &Arc<Session>| {
            let why = not_resumed(broker, existing, acl.as_deref());
            why.inspect(|&why| count_not_resumed(broker, existing, why))
                .is_none()
        };
        let on_replace = |old: &Arc<Session>| {
            broker
                .router
                .remove_subscriber(&SessionRef(Arc::clone(old)));
        };
        let Ok(opened) = broker.registry.open(
            &client_id,
            connect.clean_start || replace,
            denied,
            resumable,
            on_replace,
        ) else {
            return Err(Box::new(connect));
        };
        if let Some((old, Some(pending))) = &opened.replaced {
            broker.publish_will(&pending.will, old);
        }
        // Stored while it lasted (`Session::update_durability`): its end
        // is a deletion in the store.
        let discarded_stored = broker.persistence.is_some()
            && opened
                .replaced
                .as_ref()
                .is_some_and(|(old, _)| old.expiry_interval() != 0);

        if v5 && connect.properties.request_response_information == Some(1) {
            let info = format!(
                "{}{}",
                broker.config.mqtt.response_information_prefix, client_id
            );
            props.response_information = Some(Bytes::from(info));
        }
        props.authentication_method = authenticated.method.clone();
        props.authentication_data = authenticated.data;
        if v5 {
            props.receive_maximum = Some(limits.receive_maximum);
            // The largest packet MQTT allows is 268,435,460 bytes, but
            // clients (paho among them) refuse a CONNACK that advertises
            // more than 268,435,455: advertised at most that.
            props.maximum_packet_size = Some(limits.max_packet_size.min(268_435_455));
            props.topic_alias_maximum = Some(limits.topic_alias_maximum);
            // Absent, each of these means "available" too (MQTT 5
            // 3.2.2.3.5, .11-.13); said outright, for clients that look
            // for them before they use the feature.
            props.retain_available = Some(1);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifiers_available = Some(1);
            props.shared_subscription_available = Some(1);
        }
        let session_present = opened.session_present && protocol != ProtocolVersion::V31;
        let send_quota = connect
            .properties
            .receive_maximum
            .unwrap_or(u16::MAX)
            .min(limits.max_inflight);
        let connection = Connection {
            broker: Arc::clone(broker),
            connection_id,
            protocol,
            session: opened.session,
            expiry_interval,
            keep_alive,
            incomplete: false,
            connect_expiry_zero: requested_expiry == 0,
            send_quota,
            client_max_packet: connect.properties.maximum_packet_size,
            client_topic_alias_max: if v5 {
                connect.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            will: connect.will.map(|w| Box::new(w.into_owned())),
            attached: None,
            topic_aliases: None,
            disconnect_expiry: None,
            enhanced_auth: authenticated.method.map(|method| {
                Box::new(EnhancedAuth {
                    // A copy: a slice would keep the CONNECT's read buffer alive.
                    method: Bytes::copy_from_slice(&method),
                    reauthentication: None,
                })
            }),
            control: Arc::new(ConnectionControl::default()),
            full_queue: None,
            recent_route: None,
            staged: StagedFanout::default(),
            acl,
        };
        let mut connack = ConnAck {
            session_present,
            code: ReasonCode::Success,
            properties: props,
        };
        if v5 {
            fit_connack(&mut connack, connection.client_max_packet);
        }
        Ok(Accepted {
            connection,
            connack,
            discarded_stored,
        })
    }

    /// Attaches this connection to its session. From then on, dropping the
    /// connection (on any path, panics included) runs the close-down logic;
    /// [`finish`](Self::finish) does the same with the will decision made.
    /// False when the session was replaced before it could be attached.
    fn attach(&mut self, login: Login) -> bool {
        let Some(generation) = self.session.attach(
            AttachParams {
                connection_id: self.connection_id,
                protocol: self.protocol,
                send_quota: self.send_quota,
                expiry_interval: self.expiry_interval,
                owner: login.user.clone(),
                login,
            },
            Arc::clone(&self.control),
            self.will.as_deref(),
        ) else {
            return false;
        };
        self.attached = Some(generation);
        self.broker.keep_alive.watch(
            self.connection_id,
            &self.control,
            Duration::from_secs(self.keep_alive.into()),
            Duration::from_secs(self.broker.config.limits.incomplete_packet_timeout_secs),
        );
        if self.broker.is_shutting_down() {
            // Attached after shutdown kicked every attached session.
            self.control.close(Some(ReasonCode::ServerShuttingDown));
        }
        true
    }

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
            generation,
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
                let mut decoded = false;
                // Subscribers' writers are woken once for everything this read
                // queued for them (see wake_batch.rs); dropped, and so flushed,
                // before the next await.
                {
                    // Read here, not kept across the await below: every byte
                    // held there is every connection's memory.
                    let max_packet = self.broker.config.limits.max_packet_size as usize;
                    let batch = WakeBatch::open();
                    loop {
                        match decode_packet(buf, self.protocol, max_packet) {
                            Ok(Some(packet)) => {
                                Metrics::inc(&self.broker.metrics.packets_received);
                                decoded = true;
                                if let Err(exit) = self.handle(session, packet) {
                                    // What it published before is delivered.
                                    self.deliver_staged(session);
                                    return exit;
                                }
                                if self.staged.is_due() {
                                    self.deliver_staged(session);
                                }
                                if self.full_queue.is_some() {
                                    break;
                                }
                                batch.flush_if_due();
                            }
                            Ok(None) => break,
                            Err(e) => {
                                self.deliver_staged(session);
                                count_decode_error(&self.broker.metrics, &e);
                                // Only a CONNECT names a protocol: a second one
                                // is a Protocol Error whatever it names
                                // (MQTT-3.1.0-2; 0x84 is no DISCONNECT code).
                                let code = match e {
                                    tern_codec::DecodeError::UnsupportedProtocolVersion {
                                        ..
                                    } => ReasonCode::ProtocolError,
                                    _ => e.reason_code(),
                                };
                                return Exit::Error(code, e.to_string().into());
                            }
                        }
                    }
                    // Before the batch wakes the writers it filled.
                    self.deliver_staged(session);
                }
                // A complete packet restarts the keep alive wait (see
                // keep_alive.rs); once per read rather than per packet.
                if decoded {
                    control.packet_received(self.broker.keep_alive.now_ms());
                }
                // Without keep alive, an incomplete packet is timed instead
                // (see keep_alive.rs); a store only when that changes.
                if self.keep_alive == 0 && buf.is_empty() == self.incomplete {
                    self.incomplete = !buf.is_empty();
                    control.set_incomplete(self.incomplete, self.broker.keep_alive.now_ms());
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
            Packet::Auth(auth) => self.on_auth(auth),
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

    fn on_publish(&mut self, session: &Arc<Session>, mut publish: Publish) -> Result<(), Exit> {
        let v5 = self.protocol.is_v5();
        if v5 && !publish.properties.subscription_identifiers.is_empty() {
            return Err(self.protocol_error("PUBLISH from a client with a subscription identifier"));
        }
        let topic = self.resolve_topic(&mut publish)?;
        let topic_str = std::str::from_utf8(&topic).unwrap_or("");
        // The topic this connection last routed to passed the checks below
        // then; a client publishing to one topic is not checked again.
        let checked = self
            .recent_route
            .as_ref()
            .is_some_and(|recent| recent.topic() == topic_str);
        if !checked && validate_topic_name(topic_str).is_err() {
            Metrics::inc(&self.broker.metrics.protocol_errors);
            return Err(Exit::Error(
                ReasonCode::TopicNameInvalid,
                format!("invalid topic name {topic_str:?}").into(),
            ));
        }
        if !checked && self.broker.config.limits.too_many_levels(topic_str) {
            Metrics::inc(&self.broker.metrics.protocol_errors);
            return Err(Exit::Error(
                ReasonCode::TopicNameInvalid,
                "topic name with more than limits.max_topic_levels levels".into(),
            ));
        }
        if v5
            && self.broker.config.mqtt.check_payload_format
            && misstates_utf8(
                publish.properties.payload_format_indicator,
                &publish.payload,
            )
        {
            // MQTT-3.3.2-4 allows refusing it: an ack with 0x99, or for QoS 0
            // (which has no ack) closing with 0x99.
            Metrics::inc(&self.broker.metrics.publishes_denied);
            let ack = PubAck {
                packet_id: publish.packet_id.unwrap_or(0),
                code: ReasonCode::PayloadFormatInvalid,
                ..PubAck::default()
            };
            match publish.qos {
                QoS::AtMostOnce => {
                    return Err(Exit::Error(
                        ReasonCode::PayloadFormatInvalid,
                        "payload is not the UTF-8 its format indicator says".into(),
                    ))
                }
                QoS::AtLeastOnce => self.acknowledge(Packet::PubAck(ack), Journal::new()),
                QoS::ExactlyOnce => self.acknowledge(Packet::PubRec(ack), Journal::new()),
            }
            return Ok(());
        }
        // Topics starting with '$' belong to the broker ($SYS, $share ...);
        // the others to whom the ACL (if any) gives them.
        let why = if topic_str.starts_with('$') {
            Some("publish to a $ topic denied")
        } else if self
            .acl
            .as_deref()
            .is_some_and(|acl| !acl.may_publish(topic_str))
        {
            Some("publish denied by the ACL")
        } else {
            None
        };
        let denied = why.is_some();
        if let Some(why) = why {
            Metrics::inc(&self.broker.metrics.publishes_denied);
            tracing::debug!(client_id = %session.client_id, topic = topic_str, "{why}");
        }
        let mut journal = Journal::new();
        let (qos, packet_id) = (publish.qos, publish.packet_id);
        // Called at most once: topic, payload and properties move into the
        // message (no reference count taken on the read buffer but theirs).
        let route = move |this: &mut Self, journal: &mut Journal| {
            if !denied {
                let message = Message::new(
                    topic,
                    publish.payload,
                    publish.qos,
                    publish.retain,
                    publish.properties,
                    session.id,
                );
                let full = this.broker.publish_from_client(
                    &message,
                    journal,
                    &mut this.recent_route,
                    &mut this.staged,
                );
                // A client publishing to its own full queue would wait for
                // its own acknowledgements, which it is not read for.
                this.full_queue = full.filter(|s| !Arc::ptr_eq(s, session));
            }
        };
        let code = if denied {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        };
        match (qos, packet_id) {
            (QoS::AtMostOnce, _) => {
                route(self, &mut journal);
                // A retained message is stored; nobody waits for it.
                self.broker.commit(journal);
            }
            (QoS::AtLeastOnce, Some(packet_id)) => {
                route(self, &mut journal);
                self.acknowledge(
                    Packet::PubAck(PubAck {
                        packet_id,
                        code,
                        ..PubAck::default()
                    }),
                    journal,
                );
            }
            (QoS::ExactlyOnce, Some(packet_id)) => {
                let mut opened = false;
                if !denied {
                    let limit = self.broker.config.limits.receive_maximum;
                    match session.incoming_qos2(packet_id, limit, &mut journal) {
                        Ok(true) => {
                            opened = true;
                            route(self, &mut journal);
                        }
                        // Sent again: acknowledged once the first copy's
                        // batch, perhaps committed by an earlier connection
                        // and still being written, is durable.
                        Ok(false) => journal.after_earlier(),
                        Err(_) => {
                            Metrics::inc(&self.broker.metrics.protocol_errors);
                            return Err(Exit::Error(
                                ReasonCode::ReceiveMaximumExceeded,
                                "more QoS 2 messages in flight than Receive Maximum".into(),
                            ));
                        }
                    }
                }
                let pubrec = Packet::PubRec(PubAck {
                    packet_id,
                    code,
                    ..PubAck::default()
                });
                // A copy sent again is acknowledged only if the first one
                // was stored: a failure abandoned its flow meanwhile.
                let first = (!opened && !denied).then(|| Arc::clone(session));
                let session = Arc::clone(session);
                self.acknowledge_then(
                    pubrec,
                    journal,
                    move || first.is_none_or(|s| s.has_incoming_qos2(packet_id)),
                    move |stored| {
                        // The flow this PUBLISH opened ends with the
                        // failure; see `Session::abandon_incoming_qos2`.
                        if opened && !stored {
                            session.abandon_incoming_qos2(packet_id);
                        }
                    },
                );
            }
            _ => return Err(self.protocol_error("QoS > 0 PUBLISH without a packet identifier")),
        }
        Ok(())
    }

    /// Resolves an MQTT 5 topic alias (MQTT-3.3.2-7 .. 3.3.2-12).
    /// Takes the topic out of `publish`, or the one its alias stands for.
    fn resolve_topic(&mut self, publish: &mut Publish) -> Result<Bytes, Exit> {
        let Some(alias) = publish.properties.topic_alias else {
            return Ok(std::mem::take(&mut publish.topic));
        };
        let maximum = if self.protocol.is_v5() {
            self.broker.config.limits.topic_alias_maximum
        } else {
            0
        };
        self.topic_aliases
            .get_or_insert_with(|| Box::new(InboundAliases::new(maximum)))
            .resolve(alias, &publish.topic)
            .map_err(|e| match e {
                AliasError::OutOfRange(_) => {
                    Metrics::inc(&self.broker.metrics.protocol_errors);
                    Exit::Error(ReasonCode::TopicAliasInvalid, e.to_string().into())
                }
                AliasError::Unknown(_) => self.protocol_error(&e.to_string()),
            })
    }

    fn on_subscribe(&mut self, session: &Arc<Session>, subscribe: Subscribe) -> Result<(), Exit> {
        let v5 = self.protocol.is_v5();
        let subscriber = SessionRef(Arc::clone(session));
        let subscription_id = subscribe.properties.subscription_identifier;
        let durable = session.is_durable();
        let mut journal = Journal::new();
        let mut added = Vec::new();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained: Vec<(Arc<Message>, SubscriptionOptions)> = Vec::new();
        let mut retained_filters: HashMap<&str, std::ops::Range<usize>> = HashMap::new();
        // More than the session may hold waiting would be dropped anyway.
        let limits = &self.broker.config.limits;
        let retained_cap = limits
            .max_pending_retained
            .saturating_sub(session.retained_waiting());
        // MQTT-3.8.3-4, checked before any filter is applied: the packet is
        // refused whole, not after some of its filters took effect.
        if v5
            && subscribe
                .filters
                .iter()
                .any(|r| r.no_local && parse_shared(r.filter_str()).is_some())
        {
            return Err(self.protocol_error("No Local on a shared subscription"));
        }
        // MQTT 3.x: a filter that breaks the syntax rules (MQTT-4.7.1-2/3,
        // MQTT-4.7.3-1) is a protocol violation, and the connection closes
        // (MQTT-4.8.0-1), before any filter of the packet took effect. 5.0
        // refuses it alone in SUBACK (0x8F).
        if !v5 && any_invalid_filter(subscribe.filters.iter().map(|r| r.filter_str())) {
            return Err(self.invalid_filter_3x());
        }
        // A refused filter's SUBACK code: MQTT 3.x has only 0x80.
        let refused = |code| {
            if v5 {
                code
            } else {
                ReasonCode::UnspecifiedError
            }
        };
        let mut held = self.broker.router.subscription_count_of(&subscriber);
        let mut held_cost = self.broker.router.subscription_cost_of(&subscriber);
        let mut over_quota = 0usize;
        for request in &subscribe.filters {
            let filter = request.filter_str();
            let parsed = parse_shared(filter);
            let shared = parsed.is_some();
            let acl_filter = parsed.map_or(filter, |(_, f)| f);
            if limits.too_many_levels(acl_filter) {
                Metrics::inc(&self.broker.metrics.subscriptions_refused);
                codes.push(refused(ReasonCode::TopicFilterInvalid));
                continue;
            }
            if self.acl.as_deref().is_some_and(|acl| {
                tern_router::validate_filter(filter).is_ok() && !acl.may_subscribe(acl_filter)
            }) {
                Metrics::inc(&self.broker.metrics.subscriptions_denied);
                tracing::debug!(client_id = %session.client_id, filter, "subscription denied by the ACL");
                codes.push(refused(ReasonCode::NotAuthorized));
                continue;
            }
            let cost = tern_router::subscription_cost(filter);
            let over = held >= limits.max_subscriptions_per_client
                || held_cost + cost > limits.max_subscription_bytes_per_client;
            if over
                && tern_router::validate_filter(filter).is_ok()
                && !self.broker.router.is_subscribed(&subscriber, filter)
            {
                over_quota += 1;
                Metrics::inc(&self.broker.metrics.subscriptions_refused);
                codes.push(refused(ReasonCode::QuotaExceeded));
                continue;
            }
            let options = SubscriptionOptions {
                qos: request.qos as u8,
                no_local: request.no_local,
                retain_as_published: request.retain_as_published,
                retain_handling: request.retain_handling as u8,
                subscription_id,
            };
            match self.broker.router.subscribe(&subscriber, filter, options) {
                Ok(outcome) => {
                    if outcome == SubscribeOutcome::New {
                        held += 1;
                        held_cost += cost;
                    }
                    codes.push(ReasonCode::granted(request.qos));
                    if durable {
                        journal.push(Op::PutSubscription(subscription_record(
                            session, filter, &options,
                        )));
                        added.push(filter.to_owned());
                    }
                    let send_retained = match request.retain_handling {
                        tern_codec::RetainHandling::SendAtSubscribe => true,
                        tern_codec::RetainHandling::SendIfNew => outcome == SubscribeOutcome::New,
                        tern_codec::RetainHandling::DoNotSend => false,
                    };
                    // Retained messages are not sent to shared subscriptions.
                    // A filter repeated in this SUBSCRIBE gets them again,
                    // as a second SUBSCRIBE replacing the subscription would
                    // (MQTT-3.8.4-3, -4), with this occurrence's options:
                    // copied from its first occurrence, not looked up again,
                    // so that repeating a filter costs no more lookups.
                    if send_retained && !shared {
                        if let Some(range) = retained_filters.get(filter) {
                            let room = retained_cap.saturating_sub(retained.len());
                            let copied = range.len().min(room);
                            let start = retained.len();
                            retained.extend_from_within(range.start..range.start + copied);
                            for entry in &mut retained[start..] {
                                entry.1 = options;
                            }
                            let beyond = range.len() - copied;
                            Metrics::add(
                                &self.broker.metrics.messages_dropped_queue_full,
                                beyond as u64,
                            );
                        } else {
                            let start = retained.len();
                            collect_retained(
                                &self.broker,
                                filter,
                                options,
                                &mut retained,
                                retained_cap,
                            );
                            retained_filters.insert(filter, start..retained.len());
                        }
                    }
                }
                Err(e) => {
                    Metrics::inc(&self.broker.metrics.subscriptions_refused);
                    tracing::debug!(client_id = %session.client_id, filter, error = %e, "subscription refused");
                    codes.push(refused(ReasonCode::TopicFilterInvalid));
                }
            }
        }
        if over_quota > 0 {
            throttled!(
                INFO,
                client_id = %session.client_id,
                refused = over_quota,
                held,
                held_bytes = held_cost,
                "subscriptions refused: limits.max_subscriptions_per_client or max_subscription_bytes_per_client reached"
            );
        }
        // A takeover with clean start may have ended this session while we
        // subscribed: its cleanup ran first, so undo ours (the session's
        // `ended` flag is set before its subscriptions are removed).
        if session.is_ended() {
            self.broker.router.remove_subscriber(&subscriber);
        }
        let suback = Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            codes,
            properties: SubAckProperties::default(),
        });
        // Retained messages follow the SUBACK. If the subscriptions could
        // not be stored the client was told so: they are removed again.
        let (broker, session) = (Arc::clone(&self.broker), Arc::clone(session));
        self.acknowledge_then(
            suback,
            journal,
            || true,
            move |stored| {
                if stored {
                    deliver_retained(&session, retained);
                } else {
                    let subscriber = SessionRef(Arc::clone(&session));
                    for filter in added {
                        broker.router.unsubscribe(&subscriber, &filter);
                    }
                }
            },
        );
        Ok(())
    }

    fn on_unsubscribe(
        &mut self,
        session: &Arc<Session>,
        unsubscribe: Unsubscribe,
    ) -> Result<(), Exit> {
        // As in SUBSCRIBE: MQTT 3.x has no code to refuse one filter with.
        let filters = unsubscribe.filters.iter();
        if !self.protocol.is_v5()
            && any_invalid_filter(filters.map(|f| std::str::from_utf8(f).unwrap_or("")))
        {
            return Err(self.invalid_filter_3x());
        }
        let subscriber = SessionRef(Arc::clone(session));
        let durable = session.is_durable();
        let mut journal = Journal::new();
        let codes = unsubscribe
            .filters
            .iter()
            .map(|filter| {
                let filter = std::str::from_utf8(filter).unwrap_or("");
                if tern_router::validate_filter(filter).is_err() {
                    // As SUBSCRIBE answers it (no such subscription can exist).
                    return ReasonCode::TopicFilterInvalid;
                }
                if self.broker.router.unsubscribe(&subscriber, filter) {
                    if durable {
                        journal.push(Op::DeleteSubscription {
                            client_id: Arc::clone(&session.client_id),
                            filter: filter.to_owned(),
                        });
                    }
                    ReasonCode::Success
                } else {
                    ReasonCode::NoSubscriptionExisted
                }
            })
            .collect();
        let unsuback = Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            codes: if self.protocol.is_v5() {
                codes
            } else {
                Vec::new()
            },
            properties: UnsubAckProperties::default(),
        });
        self.acknowledge(unsuback, journal);
        Ok(())
    }

    /// An MQTT 3.x SUBSCRIBE or UNSUBSCRIBE with an invalid filter: the
    /// connection closes (3.x has no DISCONNECT to say why).
    fn invalid_filter_3x(&self) -> Exit {
        Metrics::inc(&self.broker.metrics.subscriptions_refused);
        Metrics::inc(&self.broker.metrics.protocol_errors);
        Exit::Error(
            ReasonCode::TopicFilterInvalid,
            "invalid topic filter (an MQTT 3.x protocol violation)".into(),
        )
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
                self.send(auth_packet(
                    ReasonCode::ContinueAuthentication,
                    &method,
                    data,
                ));
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
                self.send(auth_packet(
                    ReasonCode::Success,
                    &method,
                    data.unwrap_or_default(),
                ));
                Ok(())
            }
            AuthStep::Failure => Err(Exit::Error(
                ReasonCode::NotAuthorized,
                "re-authentication failed".into(),
            )),
        }
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

/// Sends the retained messages a SUBACK promised, after it.
/// Adds the retained messages matching `filter` to `retained`, up to `cap`
/// in all; those beyond it are counted as dropped (a SUBSCRIBE of many
/// overlapping filters must not make the broker hold more than a session
/// can take). A filter that finds the cap reached is not matched at all,
/// and counts as one drop.
fn collect_retained(
    broker: &Broker,
    filter: &str,
    options: SubscriptionOptions,
    retained: &mut Vec<(Arc<Message>, SubscriptionOptions)>,
    cap: usize,
) {
    if retained.len() >= cap {
        Metrics::inc(&broker.metrics.messages_dropped_queue_full);
        return;
    }
    // Only as many as there is room for are collected; the rest are
    // counted as dropped.
    let (found, beyond) = broker
        .retained
        .matching_at_most(filter, cap - retained.len());
    retained.extend(found.into_iter().map(|(_, message)| (message, options)));
    Metrics::add(&broker.metrics.messages_dropped_queue_full, beyond as u64);
}

fn deliver_retained(session: &Arc<Session>, retained: Vec<(Arc<Message>, SubscriptionOptions)>) {
    let now = std::time::Instant::now();
    let mut journal = Journal::new();
    for (message, options) in retained {
        if message.is_expired(now) || session.denies(&message) {
            continue;
        }
        let granted = QoS::from_u8(options.qos).unwrap_or(QoS::AtMostOnce);
        let ids = options.subscription_id.into_iter().collect();
        let delivery = Delivery::new(&message, message.qos.min(granted), true, ids);
        // The subscriber's own retained messages: nobody to slow down, so
        // what its queues cannot take is dropped (and counted).
        let _ = session.deliver_retained(delivery, &mut journal);
    }
    session.commit(journal);
}

/// The durable record of a subscription.
fn subscription_record(
    session: &Session,
    filter: &str,
    options: &SubscriptionOptions,
) -> SubscriptionRecord {
    SubscriptionRecord {
        client_id: Arc::clone(&session.client_id),
        filter: filter.to_owned(),
        qos: options.qos,
        no_local: options.no_local,
        retain_as_published: options.retain_as_published,
        retain_handling: options.retain_handling,
        subscription_id: options.subscription_id,
    }
}

/// Whether any of `filters` breaks the topic filter syntax (an empty
/// filter, `#` not last or not alone in its level, `+` not alone in its
/// level, a malformed shared subscription).
fn any_invalid_filter<'f>(mut filters: impl Iterator<Item = &'f str>) -> bool {
    filters.any(|filter| tern_router::validate_filter(filter).is_err())
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

/// A per-process value mixed into assigned client identifiers so that two
/// broker runs do not hand out the same ids.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        h.finish()
    })
}
