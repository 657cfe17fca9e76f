//! Command line and the concrete plan it resolves to.

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use tern_codec::properties::PublishProperties;
use tern_codec::{ProtocolVersion, QoS};

/// tern-bench: an MQTT load generator. Scenarios are named after the Open
/// MQTT Benchmark Suite.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "tern-bench",
    version,
    about = "An MQTT load generator: scenarios p2p, fan-out, fan-in, conn and latency \
             (named after the Open MQTT Benchmark Suite), and two stand-in brokers: sink \
             (the generator's ceiling) and relay (the machine's latency floor). \
             See docs/performance.md."
)]
pub struct Args {
    /// p2p: N publisher/subscriber pairs, one topic per pair.
    /// fan-out: publishers -> N subscribers of one topic.
    /// fan-in: N publishers (one topic each) -> subscribers of `PREFIX/fanin/+`
    /// (with --shared: `$share/g/PREFIX/fanin/+`, each message to one of them).
    /// conn: ramp to N idle connections at --rate per second.
    /// latency: a steady --rate to N subscribers, publish->receive percentiles.
    /// sink: not a benchmark but a broker stand-in on --port that accepts
    /// everything and delivers nothing, for --duration seconds, to measure
    /// the generator's own ceiling.
    /// relay: not a benchmark but a broker stand-in on --port that forwards
    /// every PUBLISH unchanged to every subscribed connection, one blocking
    /// write each, for --duration seconds: the machine's floor for a
    /// broker's fan-out latency.
    #[arg(value_enum)]
    pub scenario: Scenario,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// QoS of the publishes and of the subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes; 8 or more carries a send timestamp.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Messages per second over all publishers (0 = as fast as possible);
    /// for `conn`, connections per second. Default: 0, latency 1000, conn 2000.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds the publishers run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Publishers (p2p: pairs). Default: p2p 50, fan-out 1, fan-in 16, latency 1.
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Subscribers. Default: fan-out 100, fan-in 1 (2 with --shared), latency 100;
    /// p2p always one per publisher.
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// `conn`: connections to open (default 10000); `p2p`: pairs.
    #[arg(long)]
    pub connections: Option<usize>,
    /// 3 (= MQTT 3.1.1) or 5.
    #[arg(long = "mqtt-version", default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=5))]
    pub mqtt_version: u8,
    /// QoS 1/2 publishers: un-acknowledged messages outstanding per publisher.
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// fan-in: subscribe with `$share/g/...`.
    #[arg(long)]
    pub shared: bool,
    /// Subscribers keep persistent sessions (3.1.1 clean session 0, MQTT 5
    /// session expiry 1 h), so QoS 1/2 deliveries to them go through a
    /// broker's durable store. The sessions stay behind after the run.
    #[arg(long)]
    pub persistent: bool,
    /// The broker's pid, to read its CPU time and RSS from /proc.
    #[arg(long = "broker-pid")]
    pub broker_pid: Option<u32>,
    /// Print one JSON object with every figure instead of text.
    #[arg(long)]
    pub json: bool,
    /// After the publishers stop, wait at most this long for stragglers.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// End the drain early when nothing has arrived for this long (0 = never).
    #[arg(long = "drain-idle", default_value_t = 2.0)]
    pub drain_idle: f64,
    /// Bytes of PUBLISH packets per write (rounded to whole packets).
    #[arg(long = "batch-bytes", default_value_t = 64 * 1024)]
    pub batch_bytes: usize,
    /// Send buffer of each publisher's socket (SO_SNDBUF; the kernel doubles
    /// it); 0 = the kernel's autotuning. A publisher that a broker slows down
    /// with TCP back-pressure would otherwise have up to `tcp_wmem`'s maximum
    /// (4 MiB) written but not yet read by the broker: counted as sent, and
    /// seconds of latency that no broker can drain (see docs/performance.md).
    #[arg(long = "publisher-sndbuf", default_value_t = 64 * 1024)]
    pub publisher_sndbuf: usize,
    /// Runtime worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// First topic level of every topic used.
    #[arg(long = "topic-prefix", default_value = "bench")]
    pub topic_prefix: String,
    /// Seconds to wait for TCP connect + CONNACK (and SUBACK).
    #[arg(long = "connect-timeout", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// `conn`: seconds to hold the connections before reading the broker's RSS.
    #[arg(long, default_value_t = 1.0)]
    pub hold: f64,
    /// Keep alive in CONNECT, seconds (0 = none; rumqttd refuses 0).
    /// Subscribers send PINGREQ every half of it.
    #[arg(long = "keep-alive", default_value_t = 60)]
    pub keep_alive: u16,
    /// On IPv4 loopback, spread connections over this many source addresses
    /// 127.0.X.1 (each with its own ephemeral ports); 0 = one address.
    #[arg(long = "source-ips", default_value_t = 64)]
    pub source_ips: usize,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// The transport of the connections: MQTT over TCP, over TLS
    /// (--ca-file, --tls-name; every scenario), or over WebSocket (RFC 6455,
    /// subprotocol `mqtt`, at --ws-path on --port; `conn` only).
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// `--transport ws`: the path of the broker's WebSocket endpoint.
    #[arg(long = "ws-path", default_value = "/mqtt")]
    pub ws_path: String,
    /// `--transport tls`: PEM file of the CA that signed the broker's
    /// certificate (verified, as any TLS client would).
    #[arg(long = "ca-file")]
    pub ca_file: Option<std::path::PathBuf>,
    /// `--transport tls`: the name the broker's certificate must carry.
    #[arg(long = "tls-name", default_value = "localhost")]
    pub tls_name: String,
    /// MQTT 5: every PUBLISH carries this many User Properties
    /// (`k0`=`v`, `k1`=`v`, ...), which the broker forwards.
    #[arg(long = "user-properties", default_value_t = 0)]
    pub user_properties: usize,
    /// MQTT 5: every PUBLISH carries this Message Expiry Interval (seconds),
    /// which the broker forwards counted down.
    #[arg(long = "message-expiry")]
    pub message_expiry: Option<u32>,
    /// MQTT 5: subscribers subscribe with a Subscription Identifier, which
    /// the broker adds to every delivery.
    #[arg(long = "subscription-id")]
    pub subscription_id: bool,
}

/// The most `--user-properties` a PUBLISH may carry.
const MAX_USER_PROPERTIES: usize = 1000;

/// How a `conn` connection reaches the broker.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
    /// MQTT over TLS (rustls).
    Tls,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    P2p,
    FanOut,
    FanIn,
    Conn,
    Latency,
    Sink,
    Relay,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::P2p => "p2p",
            Scenario::FanOut => "fan-out",
            Scenario::FanIn => "fan-in",
            Scenario::Conn => "conn",
            Scenario::Latency => "latency",
            Scenario::Sink => "sink",
            Scenario::Relay => "relay",
        }
    }
}

/// Who publishes where and who subscribes to what.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub scenario: Scenario,
    pub version: ProtocolVersion,
    pub qos: QoS,
    pub publishers: usize,
    pub subscribers: usize,
    /// Messages (or, for conn, connections) per second in total; 0 = unlimited.
    pub rate: f64,
    /// Topic of publisher `i`.
    pub pub_topics: Vec<String>,
    /// Filter of subscriber `i`.
    pub sub_filters: Vec<String>,
    /// How many deliveries one published message should produce.
    pub fanout: u64,
    /// conn: connections to open.
    pub connections: usize,
    pub inflight: usize,
    /// The properties of every PUBLISH (MQTT 5; none for 3.1.1).
    pub publish_properties: PublishProperties,
    /// The Subscription Identifier of every SUBSCRIBE (MQTT 5).
    pub subscription_id: Option<u32>,
}

impl Args {
    /// Checks the options and works out the concrete plan.
    pub fn plan(&self) -> Result<Plan, String> {
        let version = match self.mqtt_version {
            3 | 4 => ProtocolVersion::V311,
            5 => ProtocolVersion::V5,
            v => return Err(format!("--mqtt-version {v}: use 3 (3.1.1) or 5")),
        };
        let qos = QoS::from_u8(self.qos).ok_or("--qos must be 0, 1 or 2")?;
        if self.duration.is_nan() || self.duration <= 0.0 {
            return Err("--duration must be positive".into());
        }
        if self.drain < 0.0 || self.drain_idle < 0.0 {
            return Err("--drain and --drain-idle cannot be negative".into());
        }
        if self.inflight == 0 || self.inflight > 32_768 {
            return Err("--inflight must be 1..=32768".into());
        }
        if self.shared && self.scenario != Scenario::FanIn {
            return Err("--shared only applies to fan-in".into());
        }
        if self.transport == Transport::Ws && self.scenario != Scenario::Conn {
            return Err("--transport ws only applies to conn".into());
        }
        if self.transport == Transport::Tls && self.ca_file.is_none() {
            return Err(
                "--transport tls needs --ca-file (the CA of the broker's certificate)".into(),
            );
        }
        if !self.ws_path.starts_with('/') {
            return Err("--ws-path must start with /".into());
        }
        let v5_options =
            self.user_properties > 0 || self.message_expiry.is_some() || self.subscription_id;
        if v5_options
            && matches!(
                self.scenario,
                Scenario::Conn | Scenario::Sink | Scenario::Relay
            )
        {
            return Err(
                "--user-properties, --message-expiry and --subscription-id shape the messages \
                 of p2p, fan-out, fan-in and latency"
                    .into(),
            );
        }
        if v5_options && version != ProtocolVersion::V5 {
            return Err(
                "--user-properties, --message-expiry and --subscription-id need --mqtt-version 5"
                    .into(),
            );
        }
        // Far more than any real message carries, and each takes 10+ bytes
        // of every packet: a typo, not a plan.
        if self.user_properties > MAX_USER_PROPERTIES {
            return Err(format!("--user-properties: at most {MAX_USER_PROPERTIES}"));
        }
        let publish_properties = PublishProperties {
            message_expiry_interval: self.message_expiry,
            user_properties: (0..self.user_properties)
                .map(|i| (Bytes::from(format!("k{i}")), Bytes::from_static(b"v")))
                .collect(),
            ..PublishProperties::default()
        };
        let rate = self.rate.unwrap_or(match self.scenario {
            Scenario::Latency => 1000.0,
            Scenario::Conn => 2000.0,
            _ => 0.0,
        });
        if rate.is_nan() || rate < 0.0 || !rate.is_finite() {
            return Err("--rate must be a non-negative number".into());
        }
        if self.scenario == Scenario::Latency && rate == 0.0 {
            return Err("latency needs a --rate above 0".into());
        }
        let p = &self.topic_prefix;
        let (publishers, subscribers) = match self.scenario {
            Scenario::P2p => {
                let n = self.publishers.or(self.connections).unwrap_or(50);
                if let Some(s) = self.subscribers {
                    if s != n {
                        return Err("p2p has one subscriber per publisher".into());
                    }
                }
                (n, n)
            }
            Scenario::FanOut => (
                self.publishers.unwrap_or(1),
                self.subscribers.unwrap_or(100),
            ),
            Scenario::FanIn => (
                self.publishers.unwrap_or(16),
                self.subscribers.unwrap_or(if self.shared { 2 } else { 1 }),
            ),
            Scenario::Latency => (
                self.publishers.unwrap_or(1),
                self.subscribers.unwrap_or(100),
            ),
            Scenario::Conn | Scenario::Sink | Scenario::Relay => (0, 0),
        };
        if !matches!(
            self.scenario,
            Scenario::Conn | Scenario::Sink | Scenario::Relay
        ) && (publishers == 0 || subscribers == 0)
        {
            return Err("at least one publisher and one subscriber are needed".into());
        }
        let (pub_topics, sub_filters, fanout): (Vec<String>, Vec<String>, u64) = match self.scenario
        {
            Scenario::P2p => (
                (0..publishers).map(|i| format!("{p}/p2p/{i}")).collect(),
                (0..subscribers).map(|i| format!("{p}/p2p/{i}")).collect(),
                1,
            ),
            Scenario::FanOut => (
                vec![format!("{p}/fanout"); publishers],
                vec![format!("{p}/fanout"); subscribers],
                subscribers as u64,
            ),
            Scenario::Latency => (
                vec![format!("{p}/latency"); publishers],
                vec![format!("{p}/latency"); subscribers],
                subscribers as u64,
            ),
            Scenario::FanIn => {
                let filter = if self.shared {
                    format!("$share/g/{p}/fanin/+")
                } else {
                    format!("{p}/fanin/+")
                };
                (
                    (0..publishers).map(|i| format!("{p}/fanin/{i}")).collect(),
                    vec![filter; subscribers],
                    if self.shared { 1 } else { subscribers as u64 },
                )
            }
            Scenario::Conn | Scenario::Sink | Scenario::Relay => (Vec::new(), Vec::new(), 0),
        };
        let connections = match self.scenario {
            Scenario::Conn => self.connections.unwrap_or(10_000),
            Scenario::Sink | Scenario::Relay => 0,
            _ => publishers + subscribers,
        };
        Ok(Plan {
            scenario: self.scenario,
            version,
            qos,
            publishers,
            subscribers,
            rate,
            pub_topics,
            sub_filters,
            fanout,
            connections,
            inflight: self.inflight,
            publish_properties,
            subscription_id: self.subscription_id.then_some(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut all = vec!["tern-bench"];
        all.extend_from_slice(args);
        Args::try_parse_from(all).map_err(|e| e.to_string())?.plan()
    }

    #[test]
    fn defaults_follow_the_scenario() {
        let p = plan(&["fan-out"]).unwrap();
        assert_eq!((p.publishers, p.subscribers, p.fanout), (1, 100, 100));
        assert_eq!(p.rate, 0.0);
        assert_eq!(p.version, ProtocolVersion::V311);
        assert_eq!(p.qos, QoS::AtMostOnce);

        let p = plan(&["p2p"]).unwrap();
        assert_eq!((p.publishers, p.subscribers, p.fanout), (50, 50, 1));
        assert_eq!(p.pub_topics[7], "bench/p2p/7");
        assert_eq!(p.sub_filters[7], "bench/p2p/7");

        let p = plan(&["latency"]).unwrap();
        assert_eq!((p.publishers, p.subscribers, p.rate), (1, 100, 1000.0));

        let p = plan(&["conn"]).unwrap();
        assert_eq!((p.connections, p.rate), (10_000, 2000.0));
    }

    #[test]
    fn fan_in_plain_and_shared() {
        let p = plan(&["fan-in", "--subscribers", "3"]).unwrap();
        assert_eq!(p.publishers, 16);
        assert_eq!(p.fanout, 3, "every plain subscriber gets every message");
        assert_eq!(p.sub_filters[0], "bench/fanin/+");
        assert_eq!(p.pub_topics[15], "bench/fanin/15");

        let p = plan(&["fan-in", "--shared", "--subscribers", "4"]).unwrap();
        assert_eq!(p.fanout, 1, "a shared group gets each message once");
        assert_eq!(p.sub_filters[3], "$share/g/bench/fanin/+");
    }

    #[test]
    fn options_parse() {
        let p = plan(&[
            "p2p",
            "--connections",
            "8",
            "--qos",
            "1",
            "--mqtt-version",
            "5",
            "--rate",
            "5000",
            "--inflight",
            "16",
            "--topic-prefix",
            "x",
        ])
        .unwrap();
        assert_eq!((p.publishers, p.subscribers), (8, 8));
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(p.version, ProtocolVersion::V5);
        assert_eq!(p.rate, 5000.0);
        assert_eq!(p.inflight, 16);
        assert_eq!(p.pub_topics[0], "x/p2p/0");
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(plan(&["p2p", "--qos", "3"]).is_err());
        assert!(
            plan(&["p2p", "--mqtt-version", "4"]).is_ok(),
            "4 is 3.1.1's level"
        );
        assert!(plan(&["p2p", "--mqtt-version", "6"]).is_err());
        assert!(plan(&["p2p", "--duration", "0"]).is_err());
        assert!(plan(&["p2p", "--subscribers", "3", "--publishers", "2"]).is_err());
        assert!(plan(&["fan-out", "--shared"]).is_err());
        assert!(plan(&["latency", "--rate", "0"]).is_err());
        assert!(plan(&["fan-out", "--subscribers", "0"]).is_err());
        assert!(plan(&["fan-in", "--inflight", "0"]).is_err());
        assert!(plan(&["nonsense"]).is_err());
        assert!(plan(&["p2p", "--transport", "ws"]).is_err());
        assert!(plan(&["conn", "--transport", "ws"]).is_ok());
        assert!(plan(&["conn", "--transport", "ws", "--ws-path", "mqtt"]).is_err());
        assert!(plan(&["conn", "--transport", "tls"]).is_err());
        assert!(plan(&["conn", "--transport", "tls", "--ca-file", "ca.pem"]).is_ok());
        assert!(plan(&["p2p", "--transport", "tls", "--ca-file", "ca.pem"]).is_ok());
        assert!(plan(&["p2p", "--transport", "tls"]).is_err());
        assert!(plan(&["fan-out", "--subscription-id"]).is_err());
        assert!(plan(&["fan-out", "--message-expiry", "60"]).is_err());
        assert!(plan(&["fan-out", "--user-properties", "2"]).is_err());
        let too_many = (MAX_USER_PROPERTIES + 1).to_string();
        let v5 = ["fan-out", "--mqtt-version", "5", "--user-properties"];
        assert!(plan(&[&v5[..], &[too_many.as_str()]].concat()).is_err());
        let conn = ["conn", "--mqtt-version", "5", "--subscription-id"];
        assert!(plan(&conn).is_err());
    }

    #[test]
    fn mqtt5_properties_reach_the_plan() {
        let p = plan(&[
            "fan-out",
            "--mqtt-version",
            "5",
            "--user-properties",
            "2",
            "--message-expiry",
            "60",
            "--subscription-id",
        ])
        .unwrap();
        assert_eq!(p.publish_properties.message_expiry_interval, Some(60));
        assert_eq!(
            p.publish_properties.user_properties,
            vec![
                (Bytes::from_static(b"k0"), Bytes::from_static(b"v")),
                (Bytes::from_static(b"k1"), Bytes::from_static(b"v")),
            ]
        );
        assert_eq!(p.subscription_id, Some(1));
        let p = plan(&["fan-out", "--mqtt-version", "5"]).unwrap();
        assert!(p.publish_properties.is_empty());
        assert_eq!(p.subscription_id, None);
    }
}
