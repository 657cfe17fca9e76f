//! The start of a connection, before a session exists: reading CONNECT,
//! deciding whether to accept it, and running an MQTT 5 enhanced
//! authentication exchange (AUTH packets) when the client asks for one.
//!
//! Everything here is bounded by the connect timeout of the caller, reads
//! only what the client sent, and answers refusals with the CONNACK reason
//! code the specification names.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tern_codec::properties::{AuthProperties, ConnAckProperties};
use tern_codec::{
    decode_packet, encode_packet, encoded_len, Auth, ConnAck, Connect, DecodeError, Packet,
    ProtocolVersion, ReasonCode, Will,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::AuthStep;
use crate::auth_rules::{AuthRules, Credential, Login};
use crate::broker::Broker;
use crate::config::CertificateIdentity;
use crate::incomplete::{shed_grown_buffer, IncompleteCount, OVER_INCOMPLETE_LIMIT};
use crate::log_throttle::throttled;
use crate::metrics::Metrics;
use crate::pool::BUFFER_SIZE;
use crate::transport::ClientCertificate;

/// A read buffer grows by at least this much when it is full; small enough
/// that an idle connection holds little, large enough for typical packets.
pub const READ_CHUNK: usize = 4096;

/// Why the handshake ended without a session.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// CONNECT named a protocol we do not speak.
    Unsupported(String, u8),
    /// Refused with this CONNACK reason code.
    Refused(ReasonCode),
    /// The connection closed; nothing more to send.
    Closed(String),
    /// The client broke the protocol before its CONNECT was whole (a first
    /// packet other than CONNECT, a WebSocket frame that breaks RFC 6455):
    /// counted, logged, and closed with nothing more to send.
    Violation(String),
    /// The CONNECT could not be decoded (malformed, a protocol error, too
    /// large): `code` says why, answered in a CONNACK when the CONNECT is
    /// recognisably an MQTT 5 one (`v5`; MQTT 5 3.1.4 allows 0x81, 0x82,
    /// 0x95), otherwise the connection is only closed (3.x has no such code).
    Invalid {
        why: String,
        code: ReasonCode,
        v5: bool,
    },
}

/// Whether `buf` starts with the fixed header and protocol name of an MQTT 5
/// CONNECT (`10 <length> 00 04 "MQTT" 05`), however broken the rest.
fn looks_like_v5_connect(buf: &[u8]) -> bool {
    if buf.first() != Some(&0x10) {
        return false;
    }
    // The remaining length: 1 to 4 bytes, the last without the high bit.
    let Some(len_len) = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0) else {
        return false;
    };
    buf.get(2 + len_len..9 + len_len) == Some(&[0, 4, b'M', b'Q', b'T', b'T', 5][..])
}

/// The outcome of enhanced authentication, for the CONNACK.
#[derive(Debug, Default)]
pub struct Authenticated {
    pub method: Option<Bytes>,
    pub data: Option<Bytes>,
    /// Who the client proved to be (see [`Authenticated::proven`]).
    pub user: Option<String>,
    /// What its admission rested on (set by [`Authenticated::proven`]).
    pub by: Credential,
}

impl Authenticated {
    /// Settles who the client is, for the ACL and the session's owner: the
    /// identity its client certificate carries
    /// (`listeners.tls_client_identity`), else the user enhanced
    /// authentication proved, else the CONNECT's user name when a password
    /// was checked against `[[auth.users]]` for it. A user name nothing was
    /// checked against (no users configured, or a client certificate took
    /// the password's place) proves nothing.
    ///
    /// `None` when a certificate's identity and the user enhanced
    /// authentication proved differ: one connection is one user (a
    /// re-authentication as another user would end it anyway).
    pub fn proven(
        mut self,
        rules: &AuthRules,
        connect: &Connect,
        certificate: Option<&ClientCertificate>,
    ) -> Option<Authenticated> {
        if let Some(identity) = certificate.and_then(|c| c.identity.as_deref()) {
            if self.user.as_deref().is_some_and(|user| user != identity) {
                return None;
            }
            self.user = Some(identity.to_owned());
            self.by = Credential::Certificate;
            return Some(self);
        }
        let password_checked = certificate.is_none()
            && connect.properties.authentication_method.is_none()
            && !rules.config.users.is_empty();
        if self.user.is_none() && password_checked {
            self.user = connect
                .username
                .as_deref()
                .and_then(|u| std::str::from_utf8(u).ok())
                .map(str::to_owned);
        }
        self.by = if self.method.is_some() {
            Credential::Enhanced
        } else if certificate.is_some() {
            Credential::Certificate
        } else if connect.username.is_none() {
            Credential::Anonymous
        } else if password_checked {
            Credential::Password
        } else {
            Credential::Unchecked
        };
        Some(self)
    }

    /// How the client was let in, for its connection (auth_rules.rs).
    pub fn login(&self) -> Login {
        Login {
            user: self.user.as_deref().map(Arc::from),
            by: self.by,
        }
    }
}

/// Whether the ACL (if any) lets the client publish its will; checked once
/// the client is authenticated.
pub fn will_allowed(rules: &AuthRules, connect: &Connect, authenticated: &Authenticated) -> bool {
    let (Some(acl), Some(will)) = (&rules.acl, &connect.will) else {
        return true;
    };
    let topic = std::str::from_utf8(&will.topic).unwrap_or("");
    acl.for_client(authenticated.user.as_deref(), connect.client_id_str())
        .may_publish(topic)
}

/// Reads the next whole packet, as MQTT 5 (a CONNECT names its own
/// version); `in_auth`: an AUTH of the exchange a 5.0 CONNECT started.
/// Protocol-level decode failures are counted. What it holds of a packet
/// still arriving counts against `limits.max_incomplete_bytes`, in the
/// bound of clients still connecting (incomplete.rs), until it returns or
/// is cancelled.
pub async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    broker: &Broker,
    in_auth: bool,
) -> Result<Packet, HandshakeFailure> {
    let max_packet = broker.config.limits.max_packet_size as usize;
    let metrics = &broker.metrics;
    let mut incomplete = IncompleteCount::new(&broker.incomplete_connecting);
    loop {
        // Before decoding, which takes the frame out of `buf`.
        let v5_connect = looks_like_v5_connect(buf);
        let before = buf.len();
        match decode_packet(buf, ProtocolVersion::V5, max_packet) {
            Ok(Some(packet)) => {
                Metrics::inc(&metrics.packets_received);
                if before - buf.len() > BUFFER_SIZE {
                    shed_grown_buffer(buf, &broker.pool);
                }
                return Ok(packet);
            }
            Ok(None) => {
                if !incomplete.record(buf) {
                    Metrics::inc(&metrics.incomplete_packets_refused);
                    *buf = BytesMut::new();
                    return Err(HandshakeFailure::Invalid {
                        why: OVER_INCOMPLETE_LIMIT.into(),
                        code: ReasonCode::QuotaExceeded,
                        v5: in_auth || v5_connect,
                    });
                }
            }
            Err(DecodeError::UnsupportedProtocolVersion { name, level }) => {
                Metrics::inc(&metrics.protocol_errors);
                return Err(HandshakeFailure::Unsupported(name, level));
            }
            Err(e) => {
                count_decode_error(metrics, &e);
                return Err(HandshakeFailure::Invalid {
                    why: e.to_string(),
                    code: e.reason_code(),
                    v5: v5_connect,
                });
            }
        }
        buf.reserve(READ_CHUNK);
        match reader.read_buf(buf).await {
            Ok(0) => return Err(HandshakeFailure::Closed("end of stream".into())),
            Ok(n) => Metrics::add(&metrics.bytes_received, n as u64),
            Err(e) if crate::transport::peer_violation(metrics, &e) => {
                return Err(HandshakeFailure::Violation(e.to_string()))
            }
            Err(e) => return Err(HandshakeFailure::Closed(e.to_string())),
        }
    }
}

/// Reads until a whole CONNECT has arrived. Anything else first is a
/// protocol violation (MQTT-3.1.0-1).
pub async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    broker: &Broker,
) -> Result<Box<Connect>, HandshakeFailure> {
    match read_packet(reader, buf, broker, false).await? {
        Packet::Connect(connect) => Ok(connect),
        other => {
            Metrics::inc(&broker.metrics.protocol_errors);
            Err(HandshakeFailure::Violation(format!(
                "first packet was {:?}, not CONNECT",
                other.packet_type()
            )))
        }
    }
}

/// Keeps a successful MQTT 5 CONNACK within the client's Maximum Packet Size
/// (MQTT-3.1.2-24). What goes first are the properties whose absence means
/// the same (an availability of 1, a Receive Maximum of 65,535, a Topic
/// Alias Maximum of 0), then the Response Information the server may always
/// leave out, then the Topic Alias Maximum (absent, the client uses no
/// aliases, which only costs it bytes). What a client needs to go on (its
/// assigned identifier, a shortened keep alive or session expiry, the
/// Receive Maximum and Maximum Packet Size it must not exceed) stays, even
/// when the packet is still too large: a client that cannot take 30 bytes
/// can take no PUBLISH either.
pub fn fit_connack(connack: &mut ConnAck, client_max: Option<u32>) {
    let Some(max) = client_max else { return };
    let fits = |connack: &ConnAck| {
        encoded_len(
            &Packet::ConnAck(Box::new(connack.clone())),
            ProtocolVersion::V5,
        )
        .is_ok_and(|len| len <= max as usize)
    };
    if fits(connack) {
        return;
    }
    let p = &mut connack.properties;
    for flag in [
        &mut p.retain_available,
        &mut p.wildcard_subscription_available,
        &mut p.subscription_identifiers_available,
        &mut p.shared_subscription_available,
    ] {
        if *flag == Some(1) {
            *flag = None;
        }
    }
    if p.receive_maximum == Some(u16::MAX) {
        p.receive_maximum = None;
    }
    if p.topic_alias_maximum == Some(0) {
        p.topic_alias_maximum = None;
    }
    if !fits(connack) {
        connack.properties.response_information = None;
    }
    if !fits(connack) {
        connack.properties.topic_alias_maximum = None;
    }
}

/// Writes a packet of the handshake (CONNACK, AUTH) straight to the socket,
/// before the connection's writer exists, and counts it as sent.
pub async fn write_direct<W: AsyncWrite + Unpin>(
    writer: &mut W,
    packet: &Packet,
    protocol: ProtocolVersion,
    metrics: &Metrics,
) -> bool {
    let mut out = BytesMut::new();
    if encode_packet(packet, protocol, &mut out).is_err()
        || writer.write_all(&out).await.is_err()
        || writer.flush().await.is_err()
    {
        return false;
    }
    Metrics::inc(&metrics.packets_sent);
    Metrics::add(&metrics.bytes_sent, out.len() as u64);
    true
}

/// Counts a decode error under the right metric.
pub fn count_decode_error(metrics: &Metrics, e: &DecodeError) {
    match e {
        DecodeError::PacketTooLarge { .. } => Metrics::inc(&metrics.oversized_packets),
        DecodeError::Malformed(_) => Metrics::inc(&metrics.malformed_packets),
        _ => Metrics::inc(&metrics.protocol_errors),
    }
}

/// Checks what must be refused before a session is opened: client id rules,
/// redirection, user name and password. (Enhanced authentication is run by
/// [`authenticate`].) `certificate`: the one the TLS handshake verified,
/// which stands in for a user name and password, provided it names the
/// identity `listeners.tls_client_identity` asks for.
///
/// A will is refused (0x95) when it would take more memory than the largest
/// packet a client may send (`limits.max_packet_size`): it is kept for the
/// connection's whole life, and each user property is a pair of handles
/// (64 bytes) for as few as 5 bytes on the wire, so a CONNECT of empty
/// pairs would hold 13 times its size.
pub fn check_connect(
    broker: &Broker,
    rules: &AuthRules,
    connect: &Connect,
    certificate: Option<&ClientCertificate>,
) -> Option<ReasonCode> {
    if connect.client_id.is_empty() {
        match connect.protocol {
            // 3.1 requires 1 to 23 characters; 3.1.1 requires clean session
            // for an empty id (MQTT-3.1.3-8).
            ProtocolVersion::V31 => return Some(ReasonCode::ClientIdentifierNotValid),
            ProtocolVersion::V311 if !connect.clean_start => {
                return Some(ReasonCode::ClientIdentifierNotValid)
            }
            _ => {}
        }
    }
    if let Some(will) = &connect.will {
        let topic = std::str::from_utf8(&will.topic).unwrap_or("");
        if tern_router::validate_topic_name(topic).is_err()
            || broker.config.limits.too_many_levels(topic)
        {
            return Some(ReasonCode::TopicNameInvalid);
        }
        // As for a PUBLISH (see `connection/publish.rs`).
        if is_empty_response_topic(will.properties.response_topic.as_ref()) {
            return Some(ReasonCode::ProtocolError);
        }
        if will_footprint(will) > broker.config.limits.max_packet_size as usize {
            return Some(ReasonCode::PacketTooLarge);
        }
        // As a PUBLISH would be (MQTT 5 3.1.3.2.3 allows the check): its
        // subscribers trust the indicator the will carries.
        if broker.config.mqtt.check_payload_format
            && misstates_utf8(will.properties.payload_format_indicator, &will.payload)
        {
            return Some(ReasonCode::PayloadFormatInvalid);
        }
        // `$` topics belong to the broker: a will may not publish there, as a
        // PUBLISH may not (the ACL is checked after authentication:
        // `will_allowed`).
        if topic.starts_with('$') {
            return Some(ReasonCode::NotAuthorized);
        }
    }
    if connect.protocol.is_v5() && broker.config.mqtt.server_reference.is_some() {
        return Some(if broker.config.mqtt.server_moved {
            ReasonCode::ServerMoved
        } else {
            ReasonCode::UseAnotherServer
        });
    }
    if let Some(certificate) = certificate {
        let wanted = broker.config.listeners.tls_client_identity != CertificateIdentity::None;
        if wanted && certificate.identity.is_none() {
            return Some(ReasonCode::NotAuthorized);
        }
        return None;
    }
    if connect.properties.authentication_method.is_some() {
        return None;
    }
    let auth = &rules.config;
    match &connect.username {
        None if !auth.allow_anonymous => Some(ReasonCode::NotAuthorized),
        None => None,
        Some(name) => {
            if auth.users.is_empty() && auth.allow_anonymous {
                return None;
            }
            let password = connect.password.as_deref().unwrap_or(&[]);
            let known = auth
                .users
                .iter()
                .any(|u| u.name.as_bytes() == &name[..] && u.password.as_bytes() == password);
            if known {
                None
            } else {
                Some(ReasonCode::BadUserNameOrPassword)
            }
        }
    }
}

/// Runs the enhanced authentication exchange a CONNECT asked for (MQTT 5
/// section 4.12), trading AUTH packets on the raw socket before CONNACK.
pub async fn authenticate<R, W>(
    broker: &Broker,
    rules: &AuthRules,
    connect: &Connect,
    reader: &mut R,
    writer: &mut W,
    buf: &mut BytesMut,
) -> Result<Authenticated, HandshakeFailure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(method) = connect.properties.authentication_method.clone() else {
        return Ok(Authenticated::default());
    };
    let Some(mut exchange) = rules.authenticator.start(&method) else {
        return Err(HandshakeFailure::Refused(
            ReasonCode::BadAuthenticationMethod,
        ));
    };
    let mut data = connect.properties.authentication_data.clone();
    let client_max = connect.properties.maximum_packet_size;
    loop {
        match exchange.step(data.as_deref()) {
            AuthStep::Success { user, data } => {
                // The CONNACK carries the method and the server's last data:
                // if even a CONNACK of only those is larger than the client
                // takes, the exchange cannot end (MQTT-3.1.2-24).
                let least = Packet::ConnAck(Box::new(ConnAck {
                    properties: ConnAckProperties {
                        authentication_method: Some(method.clone()),
                        authentication_data: data.clone(),
                        ..ConnAckProperties::default()
                    },
                    ..ConnAck::default()
                }));
                if !fits_client(&least, client_max) {
                    return Err(too_large_for_client(broker, "CONNACK"));
                }
                tracing::debug!(user, method = %String::from_utf8_lossy(&method), "authenticated");
                return Ok(Authenticated {
                    method: Some(method),
                    data,
                    user: Some(user.to_owned()),
                    by: Credential::Enhanced,
                });
            }
            AuthStep::Failure => return Err(HandshakeFailure::Refused(ReasonCode::NotAuthorized)),
            AuthStep::Continue(server_data) => {
                let auth = auth_packet(ReasonCode::ContinueAuthentication, &method, server_data);
                if !fits_client(&auth, client_max) {
                    return Err(too_large_for_client(broker, "AUTH"));
                }
                if !write_direct(writer, &auth, ProtocolVersion::V5, &broker.metrics).await {
                    return Err(HandshakeFailure::Closed("cannot send AUTH".into()));
                }
                let packet = read_packet(reader, buf, broker, true).await?;
                match packet {
                    Packet::Auth(a)
                        if a.code == ReasonCode::ContinueAuthentication
                            && a.properties.authentication_method.as_ref() == Some(&method) =>
                    {
                        data = a.properties.authentication_data;
                    }
                    // MQTT-3.1.2-30: a client may end the exchange with
                    // DISCONNECT, which is no error.
                    Packet::Disconnect(_) => {
                        return Err(HandshakeFailure::Closed(
                            "the client disconnected during AUTH".into(),
                        ));
                    }
                    other => {
                        // MQTT-4.12.0-4/6: anything else is a protocol error.
                        Metrics::inc(&broker.metrics.protocol_errors);
                        tracing::debug!(packet = ?other.packet_type(), "unexpected packet during AUTH");
                        return Err(HandshakeFailure::Refused(ReasonCode::ProtocolError));
                    }
                }
            }
        }
    }
}

/// Whether `packet`, encoded for MQTT 5, is within the client's Maximum
/// Packet Size (`None`: it set none).
pub fn fits_client(packet: &Packet, client_max: Option<u32>) -> bool {
    client_max.is_none_or(|max| {
        encoded_len(packet, ProtocolVersion::V5).is_ok_and(|len| len <= max as usize)
    })
}

/// The refusal of an authentication whose next packet (`what`) the client
/// could not take: it is not sent (MQTT-3.1.2-24), and the exchange cannot
/// go on without it. Counted and logged; answered with CONNACK 0x87.
fn too_large_for_client(broker: &Broker, what: &'static str) -> HandshakeFailure {
    Metrics::inc(&broker.metrics.acks_dropped_oversized);
    throttled!(
        INFO,
        what,
        "authentication refused: its next packet would exceed the client's Maximum Packet Size"
    );
    HandshakeFailure::Refused(ReasonCode::NotAuthorized)
}

/// An AUTH packet with method and data.
pub fn auth_packet(code: ReasonCode, method: &Bytes, data: Bytes) -> Packet {
    Packet::Auth(Box::new(Auth {
        code,
        properties: AuthProperties {
            authentication_method: Some(method.clone()),
            authentication_data: Some(data),
            ..AuthProperties::default()
        },
    }))
}

/// Whether a payload said to be UTF-8 (Payload Format Indicator 1) is not.
pub(crate) fn misstates_utf8(format_indicator: Option<u8>, payload: &[u8]) -> bool {
    format_indicator == Some(1) && std::str::from_utf8(payload).is_err()
}

/// Whether a Response Topic is present and empty, which no topic name may
/// be (MQTT-4.7.3-1): checked for a PUBLISH and a will alike, on the wire
/// path only (the codec also reads the messages a store kept).
pub(crate) fn is_empty_response_topic(topic: Option<&Bytes>) -> bool {
    topic.is_some_and(|t| t.is_empty())
}

/// Bytes a will holds in memory: its topic, payload and properties, each
/// user property with the pair that holds it.
fn will_footprint(will: &Will) -> usize {
    let p = &will.properties;
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
    let pairs: usize = p
        .user_properties
        .iter()
        .map(|(k, v)| {
            k.len() + v.len() + std::mem::size_of::<tern_codec::properties::UserProperty>()
        })
        .sum();
    will.topic.len()
        + will.payload.len()
        + len(&p.content_type)
        + len(&p.response_topic)
        + len(&p.correlation_data)
        + pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn connect(username: Option<&str>) -> Connect {
        Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 60,
            client_id: Bytes::from_static(b"c1"),
            will: None,
            username: username.map(|u| Bytes::copy_from_slice(u.as_bytes())),
            password: None,
            properties: Default::default(),
        }
    }

    fn proven_user(
        scram_user: Option<&str>,
        claimed: Option<&str>,
        identity: Option<&str>,
    ) -> Option<Option<String>> {
        let rules = AuthRules::new(&Config::default().auth);
        let certificate = ClientCertificate {
            identity: identity.map(Into::into),
        };
        Authenticated {
            user: scram_user.map(str::to_owned),
            ..Authenticated::default()
        }
        .proven(&rules, &connect(claimed), Some(&certificate))
        .map(|a| a.user)
    }

    #[test]
    fn a_certificate_identity_is_the_user_and_must_agree_with_enhanced_authentication() {
        // The claimed user name never counts next to a certificate.
        assert_eq!(
            proven_user(None, Some("ops"), Some("sensor-1")),
            Some(Some("sensor-1".into()))
        );
        assert_eq!(proven_user(None, Some("ops"), None), Some(None));
        // Enhanced authentication proving the same user, or another one.
        assert_eq!(
            proven_user(Some("sensor-1"), None, Some("sensor-1")),
            Some(Some("sensor-1".into()))
        );
        assert_eq!(proven_user(Some("alice"), None, Some("sensor-1")), None);
        // Without an identity from the certificate, the SCRAM user stands.
        assert_eq!(
            proven_user(Some("alice"), None, None),
            Some(Some("alice".into()))
        );
    }
}
