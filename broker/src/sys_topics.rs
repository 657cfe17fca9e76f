//! `$SYS` topics: the broker's own figures, published as retained MQTT
//! messages under `$SYS/broker/...` every `mqtt.sys_interval_secs`.
//!
//! The names follow Mosquitto's where the figure is the same (monitoring
//! tools and dashboards read those), so a client that subscribes to
//! `$SYS/#` sees the version, the uptime, connection and session counts,
//! and the message and byte totals. Each figure is published only when its
//! text changed since the last round: a broker nobody uses publishes the
//! uptime and nothing else (the `$SYS` deliveries themselves count in
//! `messages/sent` and `bytes/sent`, so those move while someone reads
//! `$SYS/#`).
//!
//! Invariants:
//! - `$SYS` messages live in memory only: they are retained (a new
//!   subscriber gets the latest values at once) but never written to the
//!   store, and they do not count as received messages.
//! - Clients cannot publish under `$SYS` (any `$` topic is refused, see
//!   connection/publish.rs), and `#` or `+` at the first level never match it
//!   (MQTT-4.7.2-1): only an explicit `$SYS/...` subscription sees them.
//! - One task per broker, woken once per interval: the cost does not grow
//!   with connections or threads (the figures are O(1) reads).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tern_codec::QoS;
use tokio::time::MissedTickBehavior;

use crate::broker::Broker;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::persistence::Journal;

/// The figures of one round, as (topic, text).
fn figures(broker: &Broker) -> Vec<(&'static str, String)> {
    let m = &broker.metrics;
    let registry = &broker.registry;
    let dropped = Metrics::get(&m.messages_dropped_qos0)
        + Metrics::get(&m.messages_dropped_queue_full)
        + Metrics::get(&m.messages_dropped_oversized);
    vec![
        (
            "$SYS/broker/version",
            format!("tern {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", broker.uptime().as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            registry.connection_count().to_string(),
        ),
        (
            "$SYS/broker/clients/total",
            registry.session_count().to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            broker.router.subscription_count().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            broker.retained_count().to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            Metrics::get(&m.messages_received).to_string(),
        ),
        (
            "$SYS/broker/messages/sent",
            Metrics::get(&m.messages_delivered).to_string(),
        ),
        ("$SYS/broker/messages/dropped", dropped.to_string()),
        (
            "$SYS/broker/bytes/received",
            Metrics::get(&m.bytes_received).to_string(),
        ),
        (
            "$SYS/broker/bytes/sent",
            Metrics::get(&m.bytes_sent).to_string(),
        ),
    ]
}

/// Publishes the `$SYS` topics every `mqtt.sys_interval_secs` until the
/// broker shuts down; returns at once when the interval is 0.
pub async fn run(broker: Arc<Broker>) {
    let every = broker.config.mqtt.sys_interval_secs;
    if every == 0 {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(every));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = broker.shutdown_signal();
    let mut last: Vec<(&'static str, String)> = Vec::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => last = publish_changed(&broker, last),
            () = crate::server::shutdown_requested(&mut shutdown) => return,
        }
    }
}

/// Publishes each figure whose text differs from `last`; returns this
/// round's figures.
fn publish_changed(
    broker: &Broker,
    last: Vec<(&'static str, String)>,
) -> Vec<(&'static str, String)> {
    let now = figures(broker);
    for (i, (topic, text)) in now.iter().enumerate() {
        if last.get(i).is_some_and(|(_, old)| old == text) {
            continue;
        }
        publish(broker, topic, text);
    }
    now
}

/// Retains and delivers one `$SYS` message (QoS 0, in memory only).
fn publish(broker: &Broker, topic: &'static str, text: &str) {
    // Origin 0 is no session's id: No Local never hides it.
    let message = Message::new(
        Bytes::from_static(topic.as_bytes()),
        Bytes::copy_from_slice(text.as_bytes()),
        QoS::AtMostOnce,
        true,
        None,
        0,
    );
    broker.retain_system(topic, Arc::clone(&message));
    let mut journal = Journal::new();
    // QoS 0: nobody is made to wait, whatever the queues hold.
    let _full = broker.route(&message, &mut journal);
    if journal.has_changes() {
        broker.commit(journal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn only_changed_figures_are_published_and_they_are_retained() {
        let broker = Broker::new(Config::default());
        let first = publish_changed(&broker, Vec::new());
        assert_eq!(broker.retained.len(), first.len());
        // Outside the retained limits and figures.
        assert_eq!(broker.retained_count(), 0);
        assert_eq!(broker.retained_bytes(), 0);
        let version = broker
            .retained
            .get("$SYS/broker/version")
            .expect("retained");
        assert_eq!(
            &version.payload[..],
            format!("tern {}", env!("CARGO_PKG_VERSION")).as_bytes()
        );
        assert!(version.retain);
        // Nothing changed: nothing is published again (the retained value is
        // the same Arc).
        let second = publish_changed(&broker, first);
        let again = broker.retained.get("$SYS/broker/version").unwrap();
        assert!(Arc::ptr_eq(&version, &again));
        // A figure that changed is published anew.
        Metrics::add(&broker.metrics.messages_received, 41);
        publish_changed(&broker, second);
        let received = broker
            .retained
            .get("$SYS/broker/messages/received")
            .unwrap();
        assert_eq!(&received.payload[..], b"41");
        // $SYS publications are not counted as received messages.
        assert_eq!(Metrics::get(&broker.metrics.messages_received), 41);
    }
}
