//! The records the store keeps: plain Rust values, no MQTT framing.
//!
//! QoS values are the MQTT numbers (0, 1, 2) as `u8`; topics and payloads are
//! bytes exactly as the broker holds them; MQTT 5 properties are opaque bytes
//! that the broker serialises and parses itself. Times are Unix time (seconds
//! for sessions, milliseconds for message expiry) so they survive a restart,
//! unlike `Instant`.

use std::sync::Arc;

use bytes::Bytes;

/// A persistent session (one whose expiry interval is non-zero, or an MQTT
/// 3.1.1 session without clean session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_id: Arc<str>,
    /// 3 (3.1), 4 (3.1.1) or 5.
    pub protocol_level: u8,
    /// Session Expiry Interval in seconds; `u32::MAX` never expires.
    pub expiry_interval: u32,
    /// The will to publish if the session ends without a clean disconnect.
    pub will: Option<WillRecord>,
    /// Unix seconds the session was created.
    pub created_at: u64,
    /// Unix seconds of the last connect or disconnect; the expiry interval
    /// counts from here once the client is offline.
    pub last_seen: u64,
    /// Written while a client was connected (at its CONNECT), not at a
    /// disconnect. Found after a crash, it means the connection was lost
    /// when the broker stopped, however long ago `last_seen` is: the expiry
    /// interval and the will delay count from the restart, never from the
    /// CONNECT. Records of schema version 1 have no such flag and read as
    /// `false`.
    pub connected: bool,
    /// The user the session's last client proved (the broker's topic
    /// permissions resume a session only for the same user); `None` for a
    /// client that proved none, and for records of schema version 2 or
    /// older.
    pub owner: Option<Arc<str>>,
}

/// A will message as stored with its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillRecord {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Will Delay Interval in seconds.
    pub delay_interval: u32,
    /// MQTT 5 will properties, serialised by the broker.
    pub properties: Bytes,
}

/// One subscription of a session, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    pub client_id: Arc<str>,
    /// The filter as subscribed (including a `$share/group/` prefix).
    pub filter: String,
    /// Maximum QoS granted.
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0, 1 or 2 (MQTT 5 Retain Handling).
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// An application message stored once and referenced by queue entries and
/// retained records (see the crate docs for the reference counting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// Chosen by the broker, unique for the life of the store; continue from
    /// [`Store::last_message_id`](crate::Store::last_message_id) after a
    /// restart.
    pub id: u64,
    pub topic: Bytes,
    pub payload: Bytes,
    /// QoS as published.
    pub qos: u8,
    /// RETAIN as published.
    pub retain: bool,
    /// MQTT 5 publish properties, serialised by the broker.
    pub properties: Bytes,
    /// Unix milliseconds at which the Message Expiry Interval runs out.
    pub expires_at: Option<u64>,
}

/// Where an outgoing QoS 1/2 delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Queued, not yet sent (no packet id, or its id is not yet on the wire).
    Pending,
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitingAck,
    /// PUBREL sent, waiting for PUBCOMP (QoS 2).
    AwaitingComp,
}

/// One message in one session's queue (offline queue and in-flight window
/// alike), ordered by `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub client_id: Arc<str>,
    /// Position in the session's queue; the broker allocates it increasing
    /// (continue from [`Store::last_seq`](crate::Store::last_seq)).
    pub seq: u64,
    pub message_id: u64,
    /// QoS of this delivery (the minimum of published and granted).
    pub qos: u8,
    pub packet_id: Option<u16>,
    pub state: DeliveryState,
    pub dup: bool,
    /// RETAIN of this delivery (set only for Retain As Published
    /// subscriptions and retained messages sent at subscribe).
    pub retain: bool,
    /// Subscription identifiers to send with the delivery.
    pub subscription_ids: Vec<u32>,
    /// What the delivery counts against its session's queue bound, as the
    /// broker reckoned it when it queued the delivery (the broker's
    /// `max_queued_bytes`), so that a restart can count a queue it does not
    /// read. `None` in an entry written before schema version 5.
    pub weight: Option<u32>,
    /// The shared subscription the delivery came through, if it came
    /// through one: it may go to another member of that group instead
    /// (MQTT 5 section 4.8.2). `None` as well in an entry written before
    /// schema version 5.
    pub shared: Option<SharedGroupRecord>,
}

/// A shared subscription's group: its name and its filter (without the
/// `$share/{name}/` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedGroupRecord {
    /// `Arc`s, so that the broker's many queue entries of one group share
    /// its strings instead of copying them per delivery.
    pub group: Arc<str>,
    pub filter: Arc<str>,
}

/// A retained message: the topic points at a stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRecord {
    pub topic: String,
    pub message_id: u64,
}
