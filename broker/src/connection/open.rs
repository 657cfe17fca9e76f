//! A connection up to CONNACK: reading and checking CONNECT, authentication,
//! taking over a session another connection holds, deciding whether the
//! client may resume it (`not_resumed`, with the hand-over of the shared
//! messages of a session it replaces), and `Connection::accept`, which
//! opens the session and answers CONNACK.

use super::*;

/// Everything up to CONNACK: the CONNECT (and authentication) within the
/// connect timeout, the session opened and attached, CONNACK sent. `None`
/// when the connection ends there (refused, timed out, closed, replaced).
pub(super) async fn open<R, W>(
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
    let (accepted, login, rules) = {
        let handshake = tokio::time::timeout(broker.config.connect_timeout(), async {
            let connect = read_connect(&mut *reader, &mut *buf, broker)
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
        write_direct(
            writer,
            &Packet::ConnAck(Box::new(refusal)),
            protocol,
            &broker.metrics,
        )
        .await;
        broker.registry.reader_finished(&control);
        conn.finish(false, None);
        return None;
    }
    let connack_sent = write_direct(
        writer,
        &Packet::ConnAck(Box::new(connack)),
        protocol,
        &broker.metrics,
    )
    .await;
    if !connack_sent {
        // No reader will run: a takeover must not wait for one.
        broker.registry.reader_finished(&control);
    }
    connack_sent.then_some((conn, control))
}

/// Answers a failed handshake: CONNACK with the reason (in the client's
/// protocol version), or the 3.1.1-format CONNACK 0x01 for an unknown
/// protocol (MQTT-3.1.2-2), then the connection closes.
pub(super) async fn refuse<W: AsyncWrite + Unpin>(
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
            let connack = Packet::ConnAck(Box::new(ConnAck {
                code: ReasonCode::UnsupportedProtocolVersion,
                ..ConnAck::default()
            }));
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
                let connack = Packet::ConnAck(Box::new(ConnAck {
                    code,
                    ..ConnAck::default()
                }));
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
    let connack = Packet::ConnAck(Box::new(ConnAck {
        code,
        properties,
        ..ConnAck::default()
    }));
    write_direct(writer, &connack, connect.protocol, &broker.metrics).await;
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
            decoded_this_turn: 0,
            incomplete_counted: 0,
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
    pub(super) fn attach(&mut self, login: Login) -> bool {
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
        self.attached = NonZeroU64::new(generation);
        debug_assert!(self.attached.is_some(), "attach generations start at 1");
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
