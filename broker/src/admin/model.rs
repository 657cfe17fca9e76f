//! The JSON model of the admin views, and how each is read from a [`Store`].
//!
//! Both sides speak these types: the admin endpoint serialises them into
//! its response bodies, `tern admin --url` deserialises them back, and
//! `tern admin --data-dir` builds them straight from the store. The tables
//! and `--json` output are rendered from them alone, so the two modes print
//! the same thing.
//!
//! Every function here calls the store synchronously: run it on a blocking
//! thread (`spawn_blocking`) when on an async runtime.

use std::collections::BTreeSet;
use std::io::Write;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tern_router::{filter_matches, parse_shared, validate_filter};
use tern_storage::{
    DeliveryState, MessageRecord, QueueEntry, RetainedRecord, SessionRecord, SessionSummary,
    SharedGroupRecord, Store, StoreError, StoreStats, SubscriptionRecord, WillRecord,
    SCHEMA_VERSION,
};

use super::error::AdminError;
use super::render;

/// Default number of queue entries a `queue` view shows.
pub const DEFAULT_QUEUE_LIMIT: u32 = 100;
/// Most queue entries one `queue` view may hold (bounds the response).
pub const MAX_QUEUE_LIMIT: u32 = 10_000;
/// Default filter of the `retained` view: every topic not starting with `$`.
pub const DEFAULT_RETAINED_FILTER: &str = "#";

/// Identifies an export document (`"format"` key).
pub const EXPORT_FORMAT: &str = "tern-export";
/// Version of the export document's layout (`"version"` key).
pub const EXPORT_VERSION: u32 = 1;

/// One line of the `sessions` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    pub client_id: String,
    /// 3 (MQTT 3.1), 4 (3.1.1) or 5.
    pub protocol_level: u8,
    /// Session Expiry Interval in seconds; 4294967295 never expires.
    pub expiry_interval: u32,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the last connect or disconnect.
    pub last_seen: u64,
    pub has_will: bool,
    pub subscriptions: u64,
    pub queue_depth: u64,
    pub inflight: u64,
    pub incoming_qos2: u64,
}

/// The `session` view: one session in full (payloads excepted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub client_id: String,
    pub protocol_level: u8,
    pub expiry_interval: u32,
    pub created_at: u64,
    pub last_seen: u64,
    pub will: Option<WillView>,
    pub subscriptions: Vec<SubscriptionView>,
    pub queue_depth: u64,
    pub inflight: u64,
    pub incoming_qos2: u64,
}

/// A session's will, without its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WillView {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    /// Will Delay Interval in seconds.
    pub delay_interval: u32,
    pub payload_size: u64,
}

/// One subscription with its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionView {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// The `queue` view: the first `limit` entries of a session's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueView {
    pub client_id: String,
    pub limit: u32,
    /// True when the queue holds more entries than `limit`.
    pub truncated: bool,
    pub entries: Vec<QueueRow>,
}

/// One queue entry and a summary of the message it delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRow {
    pub seq: u64,
    pub message_id: u64,
    /// QoS of this delivery.
    pub qos: u8,
    pub state: State,
    pub packet_id: Option<u16>,
    pub dup: bool,
    /// RETAIN of this delivery.
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The shared subscription the delivery came through
    /// (`$share/{group}/{filter}`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<String>,
    /// `None` when the referenced message is missing (a damaged store).
    pub message: Option<MessageSummary>,
}

/// Where a delivery stands ([`DeliveryState`] in the JSON model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    AwaitingAck,
    AwaitingComp,
}

/// A stored message without its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSummary {
    pub topic: String,
    /// QoS as published.
    pub qos: u8,
    pub payload_size: u64,
    /// Unix milliseconds at which the message expires.
    pub expires_at: Option<u64>,
}

/// One line of the `retained` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedRow {
    pub topic: String,
    pub message_id: u64,
    /// `None` when the referenced message is missing (a damaged store).
    pub message: Option<MessageSummary>,
}

/// The `retained-show` view: one retained message with its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedView {
    pub topic: String,
    pub message_id: u64,
    pub qos: u8,
    pub expires_at: Option<u64>,
    pub payload_size: u64,
    pub payload_encoding: PayloadEncoding,
    pub payload: String,
}

/// How a payload is written in a JSON string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadEncoding {
    /// The payload is valid UTF-8 and written as is.
    Utf8,
    /// Standard base64 with padding.
    Base64,
}

/// The `stats` view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub keys: u64,
    pub live_bytes: u64,
    pub disk_bytes: u64,
    /// Disk bytes / live bytes, rounded to two decimals.
    pub space_amplification: Option<f64>,
    pub sessions: u64,
    pub subscriptions: u64,
    pub messages: u64,
    pub queue_entries: u64,
    pub retained: u64,
}

/// The answer of `delete-session`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted_session: String,
}

/// The body of every error answer of the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl From<SessionSummary> for SessionRow {
    fn from(s: SessionSummary) -> Self {
        SessionRow {
            client_id: s.session.client_id.to_string(),
            protocol_level: s.session.protocol_level,
            expiry_interval: s.session.expiry_interval,
            created_at: s.session.created_at,
            last_seen: s.session.last_seen,
            has_will: s.session.will.is_some(),
            subscriptions: s.subscriptions.len() as u64,
            queue_depth: s.queue_depth,
            inflight: s.inflight,
            incoming_qos2: s.incoming_qos2,
        }
    }
}

impl From<SessionSummary> for SessionView {
    fn from(s: SessionSummary) -> Self {
        SessionView {
            client_id: s.session.client_id.to_string(),
            protocol_level: s.session.protocol_level,
            expiry_interval: s.session.expiry_interval,
            created_at: s.session.created_at,
            last_seen: s.session.last_seen,
            will: s.session.will.as_ref().map(WillView::from),
            subscriptions: s.subscriptions.iter().map(SubscriptionView::from).collect(),
            queue_depth: s.queue_depth,
            inflight: s.inflight,
            incoming_qos2: s.incoming_qos2,
        }
    }
}

impl From<&WillRecord> for WillView {
    fn from(w: &WillRecord) -> Self {
        WillView {
            topic: text(&w.topic),
            qos: w.qos,
            retain: w.retain,
            delay_interval: w.delay_interval,
            payload_size: w.payload.len() as u64,
        }
    }
}

impl From<&SubscriptionRecord> for SubscriptionView {
    fn from(s: &SubscriptionRecord) -> Self {
        SubscriptionView {
            filter: s.filter.clone(),
            qos: s.qos,
            no_local: s.no_local,
            retain_as_published: s.retain_as_published,
            retain_handling: s.retain_handling,
            subscription_id: s.subscription_id,
        }
    }
}

impl From<DeliveryState> for State {
    fn from(s: DeliveryState) -> Self {
        match s {
            DeliveryState::Pending => State::Pending,
            DeliveryState::AwaitingAck => State::AwaitingAck,
            DeliveryState::AwaitingComp => State::AwaitingComp,
        }
    }
}

impl From<&MessageRecord> for MessageSummary {
    fn from(m: &MessageRecord) -> Self {
        MessageSummary {
            topic: text(&m.topic),
            qos: m.qos,
            payload_size: m.payload.len() as u64,
            expires_at: m.expires_at,
        }
    }
}

impl From<StoreStats> for StatsView {
    fn from(s: StoreStats) -> Self {
        StatsView {
            keys: s.keys,
            live_bytes: s.live_bytes,
            disk_bytes: s.disk_bytes,
            space_amplification: s.space_amplification().map(|a| (a * 100.0).round() / 100.0),
            sessions: s.sessions,
            subscriptions: s.subscriptions,
            messages: s.messages,
            queue_entries: s.queue_entries,
            retained: s.retained,
        }
    }
}

/// Topics are UTF-8 in MQTT; a damaged one is shown lossily rather than not
/// at all.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The error for an unknown client id (same text offline and online).
pub fn no_session(client_id: &str) -> AdminError {
    AdminError::NotFound(format!("no session with client id {client_id:?}"))
}

/// The error for a topic without a retained message.
pub fn no_retained(topic: &str) -> AdminError {
    AdminError::NotFound(format!("no retained message on topic {topic:?}"))
}

/// Every session with its counts, in client id order, read lazily from the
/// store's iterator. A session deleted while the walk goes on is skipped.
pub fn session_rows(
    store: &dyn Store,
) -> impl Iterator<Item = Result<SessionRow, AdminError>> + '_ {
    store.sessions().filter_map(move |session| {
        let summary = session.and_then(|s| store.session_summary(&s.client_id));
        summary
            .map_err(AdminError::from)
            .transpose()
            .map(|s| s.map(SessionRow::from))
    })
}

/// One session in full.
pub fn session_view(store: &dyn Store, client_id: &str) -> Result<SessionView, AdminError> {
    store
        .session_summary(client_id)?
        .map(SessionView::from)
        .ok_or_else(|| no_session(client_id))
}

/// Checks a `queue` limit: 1 to [`MAX_QUEUE_LIMIT`].
pub fn check_queue_limit(limit: u32) -> Result<u32, AdminError> {
    if (1..=MAX_QUEUE_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(AdminError::BadRequest(format!(
            "limit must be between 1 and {MAX_QUEUE_LIMIT}, not {limit}"
        )))
    }
}

/// The first `limit` entries of a session's queue, each with a summary of
/// its message (fetched one at a time).
pub fn queue_view(store: &dyn Store, client_id: &str, limit: u32) -> Result<QueueView, AdminError> {
    let limit = check_queue_limit(limit)?;
    if store.session(client_id)?.is_none() {
        return Err(no_session(client_id));
    }
    let mut entries = Vec::new();
    let mut truncated = false;
    for entry in store.queue(client_id, None) {
        if entries.len() == limit as usize {
            truncated = true;
            break;
        }
        entries.push(queue_row(store, entry?)?);
    }
    Ok(QueueView {
        client_id: client_id.to_owned(),
        limit,
        truncated,
        entries,
    })
}

fn queue_row(store: &dyn Store, e: QueueEntry) -> Result<QueueRow, StoreError> {
    let message = store.message(e.message_id)?;
    Ok(QueueRow {
        seq: e.seq,
        message_id: e.message_id,
        qos: e.qos,
        state: e.state.into(),
        packet_id: e.packet_id,
        dup: e.dup,
        retain: e.retain,
        subscription_ids: e.subscription_ids,
        shared: e.shared.as_ref().map(shared_filter),
        message: message.as_ref().map(MessageSummary::from),
    })
}

/// A shared group as the filter its members subscribed with.
fn shared_filter(g: &SharedGroupRecord) -> String {
    format!("$share/{}/{}", g.group, g.filter)
}

/// Checks a filter for the `retained` view: a valid, non-shared MQTT filter.
pub fn check_retained_filter(filter: &str) -> Result<(), AdminError> {
    if parse_shared(filter).is_some() {
        return Err(AdminError::BadRequest(format!(
            "invalid filter {filter:?}: retained messages are selected by a plain filter, \
             not a $share/GROUP/ one"
        )));
    }
    validate_filter(filter)
        .map_err(|e| AdminError::BadRequest(format!("invalid filter {filter:?}: {e}")))
}

/// The store prefix that holds every topic `filter` can match: its literal
/// levels before the first wildcard, without the `/` that precedes the
/// wildcard (`a/#` matches `a` itself).
pub fn scan_prefix(filter: &str) -> &str {
    match filter.find(['+', '#']) {
        Some(i) => {
            let literal = &filter[..i];
            literal.strip_suffix('/').unwrap_or(literal)
        }
        None => filter,
    }
}

/// The retained messages whose topic matches `filter`, in topic order, read
/// lazily from the store. The filter must have passed
/// [`check_retained_filter`].
pub fn retained_rows<'a>(
    store: &'a dyn Store,
    filter: &'a str,
) -> impl Iterator<Item = Result<RetainedRow, AdminError>> + 'a {
    store
        .retained(scan_prefix(filter))
        .filter(move |r| match r {
            Ok(r) => filter_matches(filter, &r.topic),
            Err(_) => true,
        })
        .map(move |r| Ok(retained_row(store, r?)?))
}

fn retained_row(store: &dyn Store, r: RetainedRecord) -> Result<RetainedRow, StoreError> {
    let message = store.message(r.message_id)?;
    Ok(RetainedRow {
        topic: r.topic,
        message_id: r.message_id,
        message: message.as_ref().map(MessageSummary::from),
    })
}

/// The retained message of exactly `topic`, with its payload.
pub fn retained_view(store: &dyn Store, topic: &str) -> Result<RetainedView, AdminError> {
    // The store scans by prefix; in topic order the exact topic comes first.
    let record = match store.retained(topic).next().transpose()? {
        Some(r) if r.topic == topic => r,
        _ => return Err(no_retained(topic)),
    };
    let message = store
        .message(record.message_id)?
        .ok_or_else(|| StoreError::Corrupt {
            key: format!("message {}", record.message_id),
            reason: "referenced by a retained record but missing",
        })?;
    let (payload_encoding, payload) = match std::str::from_utf8(&message.payload) {
        Ok(s) => (PayloadEncoding::Utf8, s.to_owned()),
        Err(_) => (PayloadEncoding::Base64, base64(&message.payload)),
    };
    Ok(RetainedView {
        topic: record.topic,
        message_id: record.message_id,
        qos: message.qos,
        expires_at: message.expires_at,
        payload_size: message.payload.len() as u64,
        payload_encoding,
        payload,
    })
}

/// A session of the export document; its queue is streamed after it.
#[derive(Serialize)]
struct ExportSession {
    client_id: String,
    protocol_level: u8,
    expiry_interval: u32,
    created_at: u64,
    last_seen: u64,
    will: Option<ExportWill>,
    subscriptions: Vec<SubscriptionView>,
    incoming_qos2: Vec<u16>,
}

#[derive(Serialize)]
struct ExportWill {
    topic: String,
    payload: String,
    qos: u8,
    retain: bool,
    delay_interval: u32,
    properties: String,
}

#[derive(Serialize)]
struct ExportQueueEntry {
    seq: u64,
    message_id: u64,
    qos: u8,
    packet_id: Option<u16>,
    state: State,
    dup: bool,
    retain: bool,
    subscription_ids: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared: Option<String>,
    /// What the delivery counts against `max_queued_bytes`; absent in an
    /// entry queued before schema version 5.
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

#[derive(Serialize)]
struct ExportRetained {
    topic: String,
    message_id: u64,
}

#[derive(Serialize)]
struct ExportMessage {
    id: u64,
    topic: String,
    payload: String,
    qos: u8,
    retain: bool,
    properties: String,
    expires_at: Option<u64>,
}

impl ExportSession {
    fn new(s: SessionRecord, subscriptions: Vec<SubscriptionView>, incoming: Vec<u16>) -> Self {
        ExportSession {
            will: s.will.map(|w| ExportWill {
                topic: text(&w.topic),
                payload: base64(&w.payload),
                qos: w.qos,
                retain: w.retain,
                delay_interval: w.delay_interval,
                properties: base64(&w.properties),
            }),
            client_id: s.client_id.to_string(),
            protocol_level: s.protocol_level,
            expiry_interval: s.expiry_interval,
            created_at: s.created_at,
            last_seen: s.last_seen,
            subscriptions,
            incoming_qos2: incoming,
        }
    }
}

impl From<QueueEntry> for ExportQueueEntry {
    fn from(e: QueueEntry) -> Self {
        ExportQueueEntry {
            seq: e.seq,
            message_id: e.message_id,
            qos: e.qos,
            packet_id: e.packet_id,
            state: e.state.into(),
            dup: e.dup,
            retain: e.retain,
            subscription_ids: e.subscription_ids,
            shared: e.shared.as_ref().map(shared_filter),
            weight: e.weight,
        }
    }
}

impl From<MessageRecord> for ExportMessage {
    fn from(m: MessageRecord) -> Self {
        ExportMessage {
            id: m.id,
            topic: text(&m.topic),
            payload: base64(&m.payload),
            qos: m.qos,
            retain: m.retain,
            properties: base64(&m.properties),
            expires_at: m.expires_at,
        }
    }
}

/// Writes the whole store as one JSON document, streaming: sessions (each
/// with its subscriptions, incoming QoS 2 ids and queue), retained records,
/// then every message they reference, payloads and properties in base64.
///
/// Only the set of referenced message ids is held in memory; records are
/// written as the store's iterators yield them.
pub fn write_export(store: &dyn Store, out: &mut dyn Write) -> Result<(), AdminError> {
    let mut referenced = BTreeSet::new();
    write!(
        out,
        "{{\"format\":\"{EXPORT_FORMAT}\",\"version\":{EXPORT_VERSION},\
         \"schema_version\":{SCHEMA_VERSION},\n\"sessions\":["
    )?;
    let mut first = true;
    for session in store.sessions() {
        render::array_separator(out, &mut first, "  ")?;
        write_export_session(store, session?, &mut referenced, out)?;
    }
    out.write_all(b"\n],\n\"retained\":[")?;
    let mut first = true;
    for record in store.retained("") {
        let record = record?;
        referenced.insert(record.message_id);
        render::array_separator(out, &mut first, "  ")?;
        render::write_compact(
            out,
            &ExportRetained {
                topic: record.topic,
                message_id: record.message_id,
            },
        )?;
    }
    out.write_all(b"\n],\n\"messages\":[")?;
    let mut first = true;
    for id in referenced {
        if let Some(message) = store.message(id)? {
            render::array_separator(out, &mut first, "  ")?;
            render::write_compact(out, &ExportMessage::from(message))?;
        }
    }
    out.write_all(b"\n]}\n")?;
    Ok(())
}

/// One session object of the export, its queue streamed entry by entry.
fn write_export_session(
    store: &dyn Store,
    session: SessionRecord,
    referenced: &mut BTreeSet<u64>,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let client_id = session.client_id.clone();
    let subscriptions = store
        .subscriptions(&client_id)
        .map(|s| s.map(|s| SubscriptionView::from(&s)))
        .collect::<Result<Vec<_>, _>>()?;
    let incoming = store.incoming_qos2(&client_id)?;
    let head = serde_json::to_vec(&ExportSession::new(session, subscriptions, incoming))
        .map_err(std::io::Error::from)?;
    // `head` is a JSON object, "{...}": reopen it to append the queue.
    let open = head.strip_suffix(b"}").unwrap_or(&head);
    out.write_all(open)?;
    out.write_all(b",\"queue\":[")?;
    let mut first = true;
    for entry in store.queue(&client_id, None) {
        let entry = entry?;
        referenced.insert(entry.message_id);
        render::array_separator(out, &mut first, "    ")?;
        render::write_compact(out, &ExportQueueEntry::from(entry))?;
    }
    out.write_all(if first { b"]}" } else { b"\n  ]}" })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_prefix_keeps_the_literal_levels() {
        assert_eq!(scan_prefix("#"), "");
        assert_eq!(scan_prefix("+/x"), "");
        assert_eq!(scan_prefix("a/#"), "a");
        assert_eq!(scan_prefix("a/+/c"), "a");
        assert_eq!(scan_prefix("a/b"), "a/b");
        assert_eq!(scan_prefix("/+"), "");
    }

    #[test]
    fn filters_are_checked() {
        assert!(check_retained_filter("a/+").is_ok());
        assert!(check_retained_filter("a/#/b").is_err());
        assert!(check_retained_filter("").is_err());
        assert!(check_retained_filter("$share/g/a").is_err());
    }

    #[test]
    fn queue_limit_is_bounded() {
        assert!(check_queue_limit(0).is_err());
        assert!(check_queue_limit(MAX_QUEUE_LIMIT + 1).is_err());
        assert_eq!(
            check_queue_limit(MAX_QUEUE_LIMIT).ok(),
            Some(MAX_QUEUE_LIMIT)
        );
    }
}
