//! Start-up recovery: the durable store back into the broker's memory.
//!
//! [`recover`] runs once, after the store is open and **before any listener
//! opens**, so that the first client to connect already finds its session,
//! its subscriptions routed and its queue in order (a restored session whose
//! subscriptions are not in the router would silently lose every publish
//! after a restart).
//!
//! What it restores, and what it purges instead:
//!
//! - retained messages, unless expired;
//! - sessions, unless their expiry interval ran out while the broker was
//!   down (counted from the record's `last_seen`, or from now for a session
//!   whose client was connected when the broker stopped); an expired
//!   session's will is published, as it would have been at its end;
//! - each session's subscriptions (into the router), its queue in `seq`
//!   order (entries already sent come back as in-flight messages, sent again
//!   with DUP when the client returns, expired or not; entries whose PUBREL
//!   went out get their PUBREL again), and its incoming QoS 2 packet ids;
//! - a will still waiting for its delay, with what is left of the delay; a
//!   session that was online when the broker stopped without a clean close
//!   has lost its connection abnormally, so its will becomes due: at once,
//!   or after its delay counted from now.
//!
//! Purges are committed as one batch at the end. A message shared by many
//! queues is read once and shared again in memory.
//!
//! Store calls block: run it on a blocking thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_codec::{ProtocolVersion, QoS, Will};
use tern_router::SubscriptionOptions;
use tern_storage::{DeliveryState, Op, QueueEntry, Store, StoreError};

use crate::broker::{Broker, SessionRef};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::persistence::{message_from_record, unix_secs, will_from_record, Journal};
use crate::session::{queued_size, Delivery, Session, SharedOrigin};

/// What [`recover`] restored, and what is left to do before listeners
/// open.
#[derive(Debug, Default)]
pub struct Recovery {
    pub report: Recovered,
    /// Sessions that expired while the broker was down but hold deliveries
    /// from shared subscriptions: restored only to hand those to other
    /// members, then end (`Broker::expire_session`), once every session is
    /// back and before any client can connect.
    pub expired: Vec<Arc<Session>>,
}

/// What [`recover`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub sessions: usize,
    pub subscriptions: usize,
    /// Deliveries restored into memory: those that were in flight.
    pub queued: usize,
    /// Deliveries not sent yet, left in the store: each session reads them
    /// a chunk at a time as its client drains its queue.
    pub backlog: usize,
    pub retained: usize,
    /// Expired sessions, queue entries and retained messages removed.
    pub purged: usize,
    /// Wills that became due while the broker was down, published now.
    pub wills_published: usize,
}

/// Loads the durable state into `broker`. Does nothing without a store.
pub fn recover(broker: &Arc<Broker>) -> Result<Recovery, StoreError> {
    let Some(persistence) = broker.persistence.clone() else {
        return Ok(Recovery::default());
    };
    let mut expired_sessions = Vec::new();
    let store = persistence.store();
    let mut report = Recovered::default();
    let mut purge = Journal::new();
    let mut messages: HashMap<u64, Option<Arc<Message>>> = HashMap::new();
    let now = Instant::now();
    let mut load = |id: u64| -> Result<Option<Arc<Message>>, StoreError> {
        if let Some(known) = messages.get(&id) {
            return Ok(known.clone());
        }
        let message = store.message(id)?.and_then(message_from_record);
        messages.insert(id, message.clone());
        Ok(message)
    };

    for record in store.retained("") {
        let record = record?;
        match load(record.message_id)?.filter(|m| !m.is_expired(now)) {
            Some(message) => {
                broker.insert_retained(&record.topic, message);
                report.retained += 1;
            }
            None => {
                purge.push(Op::DeleteRetained {
                    topic: record.topic,
                });
                report.purged += 1;
            }
        }
    }

    let now_secs = unix_secs();
    // Each with its client id and owner: checked against this start's rules.
    let mut due_wills: Vec<(Will, Arc<str>, Option<Arc<str>>)> = Vec::new();
    for record in store.sessions() {
        let record = record?;
        let client_id = record.client_id.clone();
        // A session whose client was connected when the broker stopped lost
        // its connection then, not at its CONNECT (`last_seen`): its expiry
        // and will delay count from now (the stop's time is not known, and
        // counting from the CONNECT would purge a long-lived connection's
        // acknowledged messages).
        let offline = if record.connected {
            0
        } else {
            now_secs.saturating_sub(record.last_seen)
        };
        let will = record.will.clone().and_then(will_from_record);
        let protocol = match record.protocol_level {
            3 => Some(ProtocolVersion::V31),
            4 => Some(ProtocolVersion::V311),
            5 => Some(ProtocolVersion::V5),
            _ => None,
        };
        let expired =
            record.expiry_interval != u32::MAX && offline >= u64::from(record.expiry_interval);
        // An expired session that holds deliveries from shared
        // subscriptions comes back all the same, to hand them to other
        // members before it ends, as it would have had the broker been
        // running (see `Recovery::expired`).
        let hand_over = expired && protocol.is_some() && holds_shared(store.as_ref(), &client_id);
        let Some(protocol) = protocol.filter(|_| !expired || hand_over) else {
            if let Some(will) = will {
                due_wills.push((will, client_id.clone(), record.owner.clone()));
            }
            purge.push(Op::DeleteSession { client_id });
            report.purged += 1;
            continue;
        };

        // What its owner may not receive, under the rules of this start.
        let denied = broker
            .auth_rules()
            .acl
            .as_ref()
            .and_then(|acl| acl.denied_topics(record.owner.as_deref(), &client_id));
        let session = broker.registry.restore(&client_id, denied);
        let next_seq = store.last_seq(&client_id)?.map_or(1, |s| s + 1);
        let offline_since = if record.connected {
            now_secs
        } else {
            record.last_seen
        };
        session.restore(
            protocol,
            record.expiry_interval,
            record.created_at,
            offline_since,
            next_seq,
            record.owner.clone(),
        );
        let subscriber = SessionRef(Arc::clone(&session));
        for sub in store.subscriptions(&client_id) {
            let sub = sub?;
            let options = SubscriptionOptions {
                qos: sub.qos.min(2),
                no_local: sub.no_local,
                retain_as_published: sub.retain_as_published,
                retain_handling: sub.retain_handling,
                subscription_id: sub.subscription_id,
            };
            match broker.router.subscribe(&subscriber, &sub.filter, options) {
                Ok(_) => report.subscriptions += 1,
                Err(_) => {
                    purge.push(Op::DeleteSubscription {
                        client_id: client_id.clone(),
                        filter: sub.filter,
                    });
                    report.purged += 1;
                }
            }
        }
        // Deliveries already sent come back into the in-flight window now,
        // expired or not: their delivery has started, and they are sent
        // again (MQTT-4.4.0-1), or their PUBREL is. The others stay in the
        // store until the client drains to them (expired ones are dropped
        // then).
        let (mut backlog, mut backlog_bytes) = (0, 0);
        for entry in store.queue(&client_id, None) {
            let entry = entry?;
            if entry.state == DeliveryState::Pending {
                backlog += 1;
                backlog_bytes += match entry.weight {
                    Some(weight) => weight as usize,
                    // Queued before schema version 5: weighed from its
                    // message, read once. One that cannot be read weighs
                    // nothing here; reading the backlog later deals with
                    // it as with any damaged entry.
                    None => {
                        let message = store.message(entry.message_id).ok().flatten();
                        entry_weight(&entry, message.and_then(message_from_record).as_ref())
                    }
                };
                continue;
            }
            let qos = QoS::from_u8(entry.qos).filter(|q| *q != QoS::AtMostOnce);
            match (load(entry.message_id)?, qos) {
                (Some(message), Some(_)) => {
                    let state = entry.state;
                    if let Some(delivery) = delivery_from_entry(entry, &message) {
                        session.restore_delivery(delivery, state);
                        report.queued += 1;
                    }
                }
                _ => {
                    purge.push(Op::DeleteQueueEntry {
                        client_id: client_id.clone(),
                        seq: entry.seq,
                    });
                    report.purged += 1;
                }
            }
        }
        if backlog > 0 {
            session.restore_backlog(backlog, backlog_bytes, next_seq);
            report.backlog += backlog;
        }
        for packet_id in store.incoming_qos2(&client_id)? {
            session.restore_incoming_qos2(packet_id);
        }

        let expiry = (record.expiry_interval != u32::MAX).then(|| {
            Duration::from_secs(u64::from(record.expiry_interval).saturating_sub(offline))
        });
        let mut will_published = false;
        let will = will.and_then(|will| {
            let delay = u64::from(will.properties.will_delay_interval.unwrap_or(0));
            if offline >= delay {
                due_wills.push((will, client_id.clone(), record.owner.clone()));
                will_published = true;
                None
            } else {
                Some((will, Duration::from_secs(delay - offline)))
            }
        });
        if record.connected || will_published {
            // The record as this restart left it: offline since now (if it
            // was connected), and without a will published now, which
            // another restart must not publish again (MQTT-3.1.2-10).
            purge.push(Op::PutSession(tern_storage::SessionRecord {
                will: if will_published { None } else { record.will },
                last_seen: offline_since,
                connected: false,
                ..record
            }));
        }
        if hand_over {
            // Ended by the caller, once every session is back: a timer
            // would run while later sessions (other members) are not.
            broker.schedule_offline(&session, will, None, session.generation());
            expired_sessions.push(Arc::clone(&session));
        } else {
            broker.schedule_offline(&session, will, expiry, session.generation());
        }
        report.sessions += 1;
    }

    // Published once every session is back, so durable subscribers get them.
    for (will, client_id, owner) in &due_wills {
        broker.publish_will_of(will, 0, client_id, owner.as_deref());
    }
    report.wills_published = due_wills.len();
    Metrics::add(&broker.metrics.recovery_purged, report.purged as u64);
    broker.commit(purge);
    Ok(Recovery {
        report,
        expired: expired_sessions,
    })
}

/// Whether `client_id`'s stored queue holds a delivery that came through a
/// shared subscription (reads queue entries, not messages). A queue that
/// cannot be read counts as holding none: its session is purged, as it was
/// going to be.
fn holds_shared(store: &dyn Store, client_id: &str) -> bool {
    for entry in store.queue(client_id, None) {
        match entry {
            Ok(entry) if entry.shared.is_some() => return true,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%client_id, error = %e, "reading the queue of an expired session failed; its shared messages end with it");
                return false;
            }
        }
    }
    false
}

/// A stored queue entry as a delivery of `message`. `None` when its QoS is
/// not 1 or 2 (an entry no broker writes).
fn delivery_from_entry(entry: QueueEntry, message: &Arc<Message>) -> Option<Delivery> {
    let qos = QoS::from_u8(entry.qos).filter(|q| *q != QoS::AtMostOnce)?;
    let mut delivery = Delivery::new(
        message,
        qos,
        entry.retain,
        entry.subscription_ids.iter().copied().collect(),
    );
    delivery.packet_id = entry.packet_id;
    delivery.dup = entry.dup;
    delivery.seq = entry.seq;
    delivery.shared = entry.shared.map(|shared| {
        Box::new(SharedOrigin {
            group: shared.group,
            filter: shared.filter,
        })
    });
    Some(delivery)
}

/// What a pending entry counts against `max_queued_bytes` while it is in
/// the store: its stored weight, or for an entry queued before schema
/// version 5, which has none, what its delivery of `message` would count
/// (0 when the message is gone).
fn entry_weight(entry: &QueueEntry, message: Option<&Arc<Message>>) -> usize {
    match entry.weight {
        Some(weight) => weight as usize,
        None => message
            .and_then(|m| delivery_from_entry(entry.clone(), m))
            .map_or(0, |d| queued_size(&d)),
    }
}

/// Up to `limit` entries of a session's stored backlog, read after a
/// restart as its client drains its queue (see `Session::restore_backlog`).
#[derive(Debug, Default)]
pub struct BacklogChunk {
    /// Deliveries not sent yet, in queue order.
    pub deliveries: Vec<Delivery>,
    /// Seqs of entries whose message is gone or expired: to delete.
    pub gone: Vec<u64>,
    /// The greatest seq read (0 when none).
    pub last_seq: u64,
    /// What the deliveries and gone entries counted against
    /// `max_queued_bytes` while they were in the store.
    pub bytes: usize,
    /// True when no backlog entry is left after this chunk.
    pub exhausted: bool,
}

/// The whole of `session`'s backlog between `after` and `end`, if any of
/// it came through a shared subscription (see
/// `Broker::hand_over_shared_before_end`); otherwise an empty chunk, and no
/// message is read. Blocks on the store: call it off the async threads.
pub fn read_backlog_if_shared(
    store: &dyn Store,
    session: &Session,
    after: u64,
    end: u64,
) -> Result<BacklogChunk, StoreError> {
    for entry in store.queue(&session.client_id, Some(after)) {
        let entry = entry?;
        if entry.seq >= end {
            break;
        }
        if entry.state == DeliveryState::Pending && entry.shared.is_some() {
            return read_backlog(store, session, after, end, usize::MAX);
        }
    }
    Ok(BacklogChunk::default())
}

/// Reads the next chunk of `session`'s backlog: pending entries with a
/// seq above `after` and below `end`. One whose topic the session's client
/// may no longer receive (an ACL deny rule added since it was queued) is
/// gone like an expired one; those already sent are not checked again (the
/// client has them). Blocks on the store: call it off the async
/// threads.
pub fn read_backlog(
    store: &dyn Store,
    session: &Session,
    after: u64,
    end: u64,
    limit: usize,
) -> Result<BacklogChunk, StoreError> {
    let now = Instant::now();
    let mut chunk = BacklogChunk::default();
    for entry in store.queue(&session.client_id, Some(after)) {
        let entry = entry?;
        if entry.seq >= end {
            break;
        }
        chunk.last_seq = entry.seq;
        if entry.state != DeliveryState::Pending {
            continue;
        }
        let message = store
            .message(entry.message_id)?
            .and_then(message_from_record);
        chunk.bytes += entry_weight(&entry, message.as_ref());
        let message = message.filter(|m| !m.is_expired(now) && !session.denies(m));
        let seq = entry.seq;
        match message.and_then(|m| delivery_from_entry(entry, &m)) {
            Some(delivery) => chunk.deliveries.push(delivery),
            None => chunk.gone.push(seq),
        }
        if chunk.deliveries.len() + chunk.gone.len() >= limit {
            return Ok(chunk);
        }
    }
    chunk.exhausted = true;
    Ok(chunk)
}
