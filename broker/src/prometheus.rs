//! The broker's counters and gauges in the Prometheus text exposition format
//! (version 0.0.4), served at `GET /metrics` by the admin endpoint.
//!
//! Counters come from [`Metrics`](crate::metrics::Metrics), named
//! `tern_<field>_total`, with the field's doc comment as their help text.
//! Gauges are read at the moment of the request from the single sources of
//! truth: the session registry (connections, sessions), the router
//! (subscriptions), the retained store, the outbound budget, the read-buffer
//! pool and the store writer. Nothing is cached or sampled in between, so a
//! scrape is always current and costs nothing while nobody scrapes.
//!
//! Rendering takes a handful of short locks (the registry's session map to
//! count it, the router's and retained store's read locks); none is held
//! while the text is written to the socket.

use std::fmt::{Display, Write};

use crate::broker::Broker;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prefix of every metric name.
const PREFIX: &str = "tern_";

/// What a sample is, for its `# TYPE` line.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// The exposition of `broker` now.
pub fn render(broker: &Broker) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let m = &mut out;
    // Writing to a String cannot fail; `write!`'s results are ignored below.
    let _ = writeln!(
        m,
        "# HELP {PREFIX}build_info The running Tern version (always 1).\n\
         # TYPE {PREFIX}build_info gauge\n\
         {PREFIX}build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let uptime = broker.uptime().as_secs_f64();
    sample(
        m,
        "uptime_seconds",
        Kind::Gauge,
        "Seconds since the broker started.",
        format!("{uptime:.3}"),
    );

    let limits = &broker.config.limits;
    let registry = &broker.registry;
    sample(
        m,
        "connections",
        Kind::Gauge,
        "Open client connections (TCP, TLS, WebSocket).",
        registry.connection_count(),
    );
    sample(
        m,
        "connections_max",
        Kind::Gauge,
        "limits.max_connections.",
        limits.max_connections,
    );
    sample(
        m,
        "sessions",
        Kind::Gauge,
        "Sessions held, connected or not.",
        registry.session_count(),
    );
    sample(
        m,
        "subscriptions",
        Kind::Gauge,
        "Subscriptions in the router, shared ones included.",
        broker.router.subscription_count(),
    );
    sample(
        m,
        "retained_messages",
        Kind::Gauge,
        "Retained messages held (the broker's own $SYS topics excluded).",
        broker.retained_count(),
    );
    sample(m, "retained_bytes", Kind::Gauge, "Memory of the retained messages as counted against limits.max_retained_bytes (topic, payload, properties, the message and the store's nodes for its topic; $SYS excluded).", broker.retained_bytes());

    let waiting_retained = &registry.context().waiting_retained;
    sample(
        m,
        "retained_waiting",
        Kind::Gauge,
        "Retained messages found by SUBSCRIBEs and waiting in their sessions for room in the queues, against limits.max_waiting_retained.",
        waiting_retained.waiting(),
    );
    sample(
        m,
        "retained_waiting_max",
        Kind::Gauge,
        "limits.max_waiting_retained.",
        limits.max_waiting_retained,
    );
    let budget = &registry.context().budget;
    sample(
        m,
        "outbound_queued_bytes",
        Kind::Gauge,
        "Bytes queued for subscribers, or taken by their writers and not yet written, that count towards the outbound budget (what they hold in memory).",
        budget.queued(),
    );
    sample(
        m,
        "outbound_exempt_bytes",
        Kind::Gauge,
        "Bytes queued for subscribers that no longer count towards the outbound budget: queues at their connection's bound (limits.max_client_outbound_bytes), or not taken from for limits.queue_full_wait_ms while the budget was over. Memory all the same.",
        budget.exempt_queued(),
    );
    sample(
        m,
        "outbound_budget_bytes",
        Kind::Gauge,
        "limits.max_outbound_bytes: above it, publishers are no longer read.",
        limits.max_outbound_bytes,
    );
    sample(
        m,
        "incomplete_packet_bytes",
        Kind::Gauge,
        "Read buffers grown for packets still arriving (larger than a pooled buffer), across all connected clients, against limits.max_incomplete_bytes.",
        broker.incomplete.held(),
    );
    sample(
        m,
        "incomplete_connect_bytes",
        Kind::Gauge,
        "The same for clients still connecting (before CONNACK), against a bound of their own of limits.max_incomplete_bytes.",
        broker.incomplete_connecting.held(),
    );

    let (hits, misses) = broker.pool.stats();
    sample(
        m,
        "read_buffer_pool_hits_total",
        Kind::Counter,
        "Read buffers taken from the pool.",
        hits,
    );
    sample(
        m,
        "read_buffer_pool_misses_total",
        Kind::Counter,
        "Read buffers allocated because the pool was empty.",
        misses,
    );
    sample(
        m,
        "read_buffer_pool_idle",
        Kind::Gauge,
        "Read buffers idle in the pool.",
        broker.pool.idle(),
    );

    if let Some(persistence) = &broker.persistence {
        let w = persistence.writer_stats();
        sample(
            m,
            "store_batches_total",
            Kind::Counter,
            "Batches of durable changes submitted to the store writer.",
            w.submitted,
        );
        sample(
            m,
            "store_syncs_total",
            Kind::Counter,
            "Store syncs (flushes to disk).",
            w.syncs,
        );
        sample(m, "store_failures_total", Kind::Counter, "Store submissions that failed (their clients got an error reason code, not an acknowledgement).", w.failed);
        sample(
            m,
            "store_writer_running",
            Kind::Gauge,
            "1 while the store writer runs; 0 once a panic in the store ended it (every durable change fails: restart the broker).",
            u8::from(persistence.writer_running()),
        );
    }

    for (name, help, value) in broker.metrics.counters() {
        sample(m, &format!("{name}_total"), Kind::Counter, help, value);
    }
    out
}

/// Writes one metric: its help, its type and its value.
fn sample(out: &mut String, name: &str, kind: Kind, help: &str, value: impl Display) {
    let kind = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    };
    let _ = write!(out, "# HELP {PREFIX}{name} ");
    escape_help(out, help);
    let _ = write!(
        out,
        "\n# TYPE {PREFIX}{name} {kind}\n{PREFIX}{name} {value}\n"
    );
}

/// Help text as the format wants it: `\` and line feeds escaped.
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    /// The value of the sample named `name` in an exposition.
    fn value(text: &str, name: &str) -> Option<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
    }

    #[test]
    fn counters_and_gauges_are_exported_with_help_and_type() {
        let broker = Broker::new(Config::default());
        Metrics::add(&broker.metrics.messages_dropped_qos0, 7);
        Metrics::inc(&broker.metrics.malformed_packets);
        let text = render(&broker);
        assert_eq!(
            value(&text, "tern_messages_dropped_qos0_total").as_deref(),
            Some("7")
        );
        assert_eq!(
            value(&text, "tern_malformed_packets_total").as_deref(),
            Some("1")
        );
        assert_eq!(value(&text, "tern_connections").as_deref(), Some("0"));
        assert_eq!(value(&text, "tern_retained_waiting").as_deref(), Some("0"));
        assert_eq!(
            value(&text, "tern_retained_waiting_max").as_deref(),
            Some("4000000")
        );
        assert!(text.contains("# TYPE tern_messages_dropped_qos0_total counter\n"));
        assert!(text.contains(
            "# HELP tern_messages_dropped_qos0_total QoS 0 deliveries dropped because the subscriber's queue was full.\n"
        ));
        assert!(text.contains("# TYPE tern_sessions gauge\n"));
        // No store in memory mode: no store metrics.
        assert_eq!(value(&text, "tern_store_syncs_total"), None);
        // Every counter of Metrics is there, and every sample has its TYPE.
        for (name, _, _) in broker.metrics.counters() {
            assert!(
                value(&text, &format!("tern_{name}_total")).is_some(),
                "{name}"
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split([' ', '{']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }

    #[test]
    fn help_text_is_escaped() {
        let mut out = String::new();
        escape_help(&mut out, "a\\b\nc");
        assert_eq!(out, "a\\\\b\\nc");
    }
}
