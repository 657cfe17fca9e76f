//! The figures of a run: computed from raw counts, printed as text or JSON.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procfs::BrokerSample;

/// A latency histogram in nanoseconds: 1 µs to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of a histogram of nanoseconds, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        })
    }
}

/// What a throughput or latency run counted.
#[derive(Debug, Clone, Default)]
pub struct RunCounts {
    pub sent: u64,
    /// PUBACKs (QoS 1) or PUBCOMPs (QoS 2) received by publishers.
    pub acked: u64,
    /// Deliveries counted when the publishers' time was up.
    pub received_running: u64,
    /// Deliveries counted at the end of the drain.
    pub received_total: u64,
    /// Deliveries one publish should produce.
    pub fanout: u64,
    /// Seconds the publishers ran.
    pub run_s: f64,
    /// Seconds from the publishers' stop to the last delivery (or to the
    /// end of the drain window when it did not complete).
    pub drain_s: f64,
    /// Whether every expected delivery arrived within the drain window.
    pub drain_complete: bool,
    /// Seconds from the publishers' start to the end of the drain: the
    /// window of the CPU figures.
    pub window_s: f64,
    pub broker_pid: Option<u32>,
    pub broker_before: Option<BrokerSample>,
    pub broker_after: Option<BrokerSample>,
    pub generator_cpu_s: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BrokerFigures {
    pub pid: u32,
    /// Broker CPU seconds (utime + stime) from the publishers' start to the
    /// end of the drain.
    pub cpu_s: f64,
    /// Cores the broker used on average over that window.
    pub cpu_cores: f64,
    /// Deliveries per broker CPU-second.
    pub deliveries_per_cpu_s: Option<f64>,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GeneratorFigures {
    /// tern-bench's own CPU seconds over the same window as the broker's.
    pub cpu_s: f64,
    pub cpu_cores: f64,
    pub threads: usize,
}

/// Every figure of a p2p / fan-out / fan-in / latency run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ThroughputReport {
    pub scenario: String,
    pub mqtt_version: String,
    pub qos: u8,
    pub payload: usize,
    /// MQTT 5 properties of the messages and subscriptions.
    pub properties: MessageProperties,
    pub publishers: usize,
    pub subscribers: usize,
    pub shared: bool,
    /// Target messages per second over all publishers; 0 = unlimited.
    pub rate_target: f64,
    pub inflight: Option<usize>,
    pub duration_s: f64,
    pub drain_limit_s: f64,
    pub sent: u64,
    pub sent_per_s: f64,
    pub acked: Option<u64>,
    /// PUBACKs (QoS 1) or PUBCOMPs (QoS 2) per second while publishers ran.
    pub acks_per_s: Option<f64>,
    /// sent x deliveries per message.
    pub expected: u64,
    pub received_running: u64,
    pub received: u64,
    /// Deliveries per second while the publishers ran.
    pub delivered_per_s_running: f64,
    /// All deliveries over the run plus the drain.
    pub delivered_per_s_total: f64,
    /// Share of the expected deliveries that arrived while publishers ran.
    pub delivered_running_fraction: f64,
    /// Share of the expected deliveries that arrived by the end of the drain.
    pub delivered_fraction: f64,
    /// expected - received (never negative).
    pub dropped: u64,
    /// received - expected when more arrived than expected (QoS 1 duplicates).
    pub excess: u64,
    pub drain_s: f64,
    pub drain_complete: bool,
    /// Connections the broker closed (or that broke) during the run.
    pub connections_lost: usize,
    /// Publish -> receive latency in microseconds (payloads of 8+ bytes).
    pub latency_us: Option<Percentiles>,
    pub broker: Option<BrokerFigures>,
    pub generator: GeneratorFigures,
}

/// The MQTT 5 properties a run's messages and subscriptions carry (all
/// unset for 3.1.1): what makes a broker encode a delivery's header of its
/// own rather than share one.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MessageProperties {
    /// User Properties per PUBLISH.
    pub user_properties: usize,
    /// Message Expiry Interval of every PUBLISH, seconds.
    pub message_expiry_s: Option<u32>,
    /// Whether subscriptions carry a Subscription Identifier.
    pub subscription_id: bool,
}

impl MessageProperties {
    /// ", 4 user properties, expiry 60 s, subscription id", or nothing.
    fn text(&self) -> String {
        let mut s = String::new();
        if self.user_properties > 0 {
            s += &format!(", {} user properties", self.user_properties);
        }
        if let Some(expiry) = self.message_expiry_s {
            s += &format!(", expiry {expiry} s");
        }
        if self.subscription_id {
            s += ", subscription id";
        }
        s
    }
}

/// Settings that shape the report but are not counts.
#[derive(Debug, Clone)]
pub struct Setup {
    pub scenario: String,
    pub mqtt_version: String,
    pub qos: u8,
    pub payload: usize,
    pub properties: MessageProperties,
    pub publishers: usize,
    pub subscribers: usize,
    pub shared: bool,
    pub rate_target: f64,
    pub inflight: usize,
    pub drain_limit_s: f64,
    pub threads: usize,
}

fn per_s(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn fraction(n: u64, of: u64) -> f64 {
    if of == 0 {
        1.0
    } else {
        n as f64 / of as f64
    }
}

pub fn throughput_report(
    setup: &Setup,
    c: &RunCounts,
    latency: Option<&Histogram<u64>>,
) -> ThroughputReport {
    let expected = c.sent.saturating_mul(c.fanout);
    let broker = match (c.broker_pid, c.broker_before, c.broker_after) {
        (Some(pid), Some(b), Some(a)) => {
            let cpu_s = (a.cpu_s - b.cpu_s).max(0.0);
            Some(BrokerFigures {
                pid,
                cpu_s,
                cpu_cores: if c.window_s > 0.0 {
                    cpu_s / c.window_s
                } else {
                    0.0
                },
                deliveries_per_cpu_s: (cpu_s > 0.0).then(|| c.received_total as f64 / cpu_s),
                rss_kib_before: b.rss_kib,
                rss_kib_after: a.rss_kib,
            })
        }
        _ => None,
    };
    let acking = setup.qos > 0;
    ThroughputReport {
        scenario: setup.scenario.clone(),
        mqtt_version: setup.mqtt_version.clone(),
        qos: setup.qos,
        payload: setup.payload,
        properties: setup.properties.clone(),
        publishers: setup.publishers,
        subscribers: setup.subscribers,
        shared: setup.shared,
        rate_target: setup.rate_target,
        inflight: acking.then_some(setup.inflight),
        duration_s: c.run_s,
        drain_limit_s: setup.drain_limit_s,
        sent: c.sent,
        sent_per_s: per_s(c.sent, c.run_s),
        acked: acking.then_some(c.acked),
        acks_per_s: acking.then(|| per_s(c.acked, c.run_s)),
        expected,
        received_running: c.received_running,
        received: c.received_total,
        delivered_per_s_running: per_s(c.received_running, c.run_s),
        delivered_per_s_total: per_s(c.received_total, c.run_s + c.drain_s),
        delivered_running_fraction: fraction(c.received_running, expected),
        delivered_fraction: fraction(c.received_total, expected),
        dropped: expected.saturating_sub(c.received_total),
        excess: c.received_total.saturating_sub(expected),
        drain_s: c.drain_s,
        drain_complete: c.drain_complete,
        connections_lost: 0,
        latency_us: latency.and_then(Percentiles::of),
        broker,
        generator: GeneratorFigures {
            cpu_s: c.generator_cpu_s,
            cpu_cores: if c.window_s > 0.0 {
                c.generator_cpu_s / c.window_s
            } else {
                0.0
            },
            threads: setup.threads,
        },
    }
}

/// Every figure of a `conn` run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConnReport {
    pub scenario: String,
    pub mqtt_version: String,
    /// `tcp` or `ws` (MQTT over WebSocket).
    pub transport: String,
    pub connections_target: usize,
    /// Target connections per second; 0 = as fast as possible.
    pub rate_target: f64,
    pub attempted: usize,
    /// CONNACK with success.
    pub connected: usize,
    /// CONNACK with a failure code, or the connection closed before CONNACK.
    pub refused: usize,
    /// TCP connect error or timeout (no CONNACK in time).
    pub failed: usize,
    /// Seconds from the first attempt to the last answer.
    pub ramp_s: f64,
    pub connects_per_s: f64,
    /// TCP connect to CONNACK, in microseconds, successful connections only.
    pub connect_us: Option<Percentiles>,
    pub broker: Option<ConnBroker>,
    pub generator: GeneratorFigures,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConnBroker {
    pub pid: u32,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    /// (after - before) / connected.
    pub rss_kib_per_connection: Option<f64>,
    pub cpu_s: f64,
}

pub fn rss_per_connection(before_kib: u64, after_kib: u64, connected: usize) -> Option<f64> {
    (connected > 0).then(|| (after_kib as f64 - before_kib as f64) / connected as f64)
}

fn si(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 || x == x.trunc() {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

impl ThroughputReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "{}{}: {} publisher(s) -> {} subscriber(s), MQTT {}, QoS {}, {} B payload{}, rate {}{}",
            self.scenario,
            if self.shared { " (shared)" } else { "" },
            self.publishers,
            self.subscribers,
            self.mqtt_version,
            self.qos,
            self.payload,
            self.properties.text(),
            if self.rate_target > 0.0 {
                format!("{}/s", si(self.rate_target))
            } else {
                "unlimited".into()
            },
            self.inflight
                .map(|w| format!(", inflight {w}"))
                .unwrap_or_default(),
        ));
        line(format!(
            "  sent        {} in {:.2} s = {}/s",
            self.sent,
            self.duration_s,
            si(self.sent_per_s)
        ));
        if let (Some(acked), Some(rate)) = (self.acked, self.acks_per_s) {
            line(format!(
                "  acked       {} ({}/s while running)",
                acked,
                si(rate)
            ));
        }
        line(format!(
            "  delivered   {} of {} expected ({:.2}%), {} dropped{}",
            self.received,
            self.expected,
            100.0 * self.delivered_fraction,
            self.dropped,
            if self.excess > 0 {
                format!(", {} extra", self.excess)
            } else {
                String::new()
            }
        ));
        line(format!(
            "  running     {} delivered = {}/s ({:.2}% of expected while publishers ran)",
            self.received_running,
            si(self.delivered_per_s_running),
            100.0 * self.delivered_running_fraction
        ));
        line(format!(
            "  with drain  {}/s; drain {:.3} s ({}, limit {} s)",
            si(self.delivered_per_s_total),
            self.drain_s,
            if self.drain_complete {
                "complete"
            } else {
                "INCOMPLETE"
            },
            self.drain_limit_s
        ));
        if self.connections_lost > 0 {
            line(format!(
                "  LOST        {} connection(s) closed by the broker or broken",
                self.connections_lost
            ));
        }
        if let Some(l) = &self.latency_us {
            line(format!(
                "  latency     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max),
                l.count
            ));
        }
        if let Some(b) = &self.broker {
            line(format!(
                "  broker      pid {}: {:.2} CPU-s ({:.2} cores), {} deliveries per CPU-s, RSS {} -> {} KiB",
                b.pid,
                b.cpu_s,
                b.cpu_cores,
                b.deliveries_per_cpu_s.map(si).unwrap_or_else(|| "-".into()),
                b.rss_kib_before,
                b.rss_kib_after
            ));
        }
        line(format!(
            "  generator   {:.2} CPU-s ({:.2} cores, {} threads)",
            self.generator.cpu_s, self.generator.cpu_cores, self.generator.threads
        ));
        s
    }
}

impl ConnReport {
    pub fn text(&self) -> String {
        let mut s = format!(
            "conn: {} connections at {}/s, MQTT {}{}\n  connected   {} of {} attempted; {} refused, {} failed\n  ramp        {:.2} s = {}/s\n",
            self.connections_target,
            si(self.rate_target),
            self.mqtt_version,
            if self.transport == "ws" {
                " over WebSocket"
            } else {
                ""
            },
            self.connected,
            self.attempted,
            self.refused,
            self.failed,
            self.ramp_s,
            si(self.connects_per_s)
        );
        if let Some(l) = &self.connect_us {
            s += &format!(
                "  connect     p50 {}  p90 {}  p99 {}  max {}\n",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.max)
            );
        }
        if let Some(b) = &self.broker {
            s += &format!(
                "  broker      RSS {} -> {} KiB = {} KiB per connection; {:.2} CPU-s\n",
                b.rss_kib_before,
                b.rss_kib_after,
                b.rss_kib_per_connection
                    .map(|k| format!("{k:.2}"))
                    .unwrap_or_else(|| "-".into()),
                b.cpu_s
            );
        }
        s += &format!(
            "  generator   {:.2} CPU-s ({} threads)\n",
            self.generator.cpu_s, self.generator.threads
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(qos: u8) -> Setup {
        Setup {
            scenario: "fan-out".into(),
            mqtt_version: "3.1.1".into(),
            qos,
            payload: 64,
            properties: MessageProperties::default(),
            publishers: 1,
            subscribers: 10,
            shared: false,
            rate_target: 0.0,
            inflight: 64,
            drain_limit_s: 5.0,
            threads: 2,
        }
    }

    #[test]
    fn rates_fractions_and_drops() {
        let c = RunCounts {
            sent: 1000,
            acked: 0,
            received_running: 6000,
            received_total: 9000,
            fanout: 10,
            run_s: 2.0,
            drain_s: 1.0,
            drain_complete: false,
            window_s: 4.0,
            broker_pid: Some(7),
            broker_before: Some(BrokerSample {
                cpu_s: 1.0,
                rss_kib: 100,
            }),
            broker_after: Some(BrokerSample {
                cpu_s: 4.0,
                rss_kib: 300,
            }),
            generator_cpu_s: 2.0,
        };
        let r = throughput_report(&setup(0), &c, None);
        assert_eq!(r.expected, 10_000);
        assert_eq!(r.sent_per_s, 500.0);
        assert_eq!(r.delivered_per_s_running, 3000.0);
        assert_eq!(r.delivered_per_s_total, 3000.0);
        assert_eq!(r.delivered_running_fraction, 0.6);
        assert_eq!(r.delivered_fraction, 0.9);
        assert_eq!((r.dropped, r.excess), (1000, 0));
        assert_eq!(r.acked, None);
        assert_eq!(r.acks_per_s, None);
        let b = r.broker.unwrap();
        assert_eq!(b.cpu_s, 3.0);
        assert_eq!(b.cpu_cores, 0.75);
        assert_eq!(b.deliveries_per_cpu_s, Some(3000.0));
        assert_eq!(r.generator.cpu_cores, 0.5);
    }

    #[test]
    fn qos1_reports_acks_and_duplicates() {
        let c = RunCounts {
            sent: 100,
            acked: 90,
            received_running: 100,
            received_total: 1002,
            fanout: 10,
            run_s: 0.5,
            drain_complete: true,
            ..RunCounts::default()
        };
        let r = throughput_report(&setup(1), &c, None);
        assert_eq!(r.acked, Some(90));
        assert_eq!(r.acks_per_s, Some(180.0));
        assert_eq!((r.dropped, r.excess), (0, 2));
        assert!(r.broker.is_none());
        assert!(r.text().contains("2 extra"));
        // Nothing expected is not a division by zero.
        let r = throughput_report(&setup(1), &RunCounts::default(), None);
        assert_eq!(r.delivered_fraction, 1.0);
        assert_eq!(r.sent_per_s, 0.0);
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = new_histogram();
        assert_eq!(Percentiles::of(&h), None);
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let p = Percentiles::of(&h).unwrap();
        assert_eq!(p.count, 1000);
        let close = |a: f64, b: f64| (a - b).abs() / b < 0.002;
        assert!(close(p.p50, 500.0), "{}", p.p50);
        assert!(close(p.p90, 900.0), "{}", p.p90);
        assert!(close(p.p99, 990.0), "{}", p.p99);
        assert!(close(p.max, 1000.0), "{}", p.max);
        assert!(close(p.mean, 500.5), "{}", p.mean);
    }

    #[test]
    fn rss_per_connection_math() {
        assert_eq!(rss_per_connection(1000, 3048, 2048), Some(1.0));
        assert_eq!(rss_per_connection(1000, 900, 100), Some(-1.0));
        assert_eq!(rss_per_connection(1000, 2000, 0), None);
    }

    #[test]
    fn json_has_every_figure() {
        let r = throughput_report(&setup(0), &RunCounts::default(), None);
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "sent",
            "received",
            "received_running",
            "delivered_per_s_running",
            "delivered_per_s_total",
            "delivered_running_fraction",
            "dropped",
            "drain_s",
            "generator",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }
}
