//! Broker configuration: the embedded defaults, the TOML file that overrides
//! them, and the validation that refuses a bad file at start.
//!
//! Every key is documented in `docs/configuration.md` with its default. A file
//! only needs the keys it changes; an unknown key, a value of the wrong type or
//! a value out of range is an error that names the file, the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Upper bounds of the timing keys. Larger values parse, but would let a
/// silent connection hold its slot for hours, hold a crash's loss window
/// open that long, or publish `$SYS` figures never: a typo, not a choice.
const MAX_CONNECT_TIMEOUT_SECS: u64 = 3600;
/// 1.5 x 65,535 s, the longest keep alive: what a client with a keep alive
/// is held to already.
const MAX_INCOMPLETE_PACKET_TIMEOUT_SECS: u64 = 98_303;
const MAX_SYNC_INTERVAL_MS: u64 = 60_000;
const MAX_SYS_INTERVAL_SECS: u64 = 86_400;

/// Everything the broker can be told.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Addresses of the MQTT/TCP listeners.
    pub listeners: ListenersConfig,
    /// Logging.
    pub log: LogConfig,
    /// Per-connection and broker-wide limits.
    pub limits: LimitsConfig,
    /// Who may connect.
    pub auth: AuthConfig,
    /// Protocol behaviour where MQTT leaves the broker a choice.
    pub mqtt: MqttConfig,
    /// Where and how durably sessions, queues and retained messages are kept.
    pub storage: StorageConfig,
    /// The read-only admin HTTP endpoint.
    pub admin: AdminConfig,
}

/// How durable an acknowledgement is (`[storage] durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// PUBACK, PUBREC and SUBACK are sent after the state they acknowledge is
    /// synced to disk (group commit shares one sync among all clients).
    Fsync,
    /// Acknowledge at once; sync every `sync_interval_ms`. A crash loses at
    /// most that long's worth of acknowledged state.
    Interval,
    /// Keep nothing on disk: a restart loses every session, queue and
    /// retained message.
    Memory,
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The store's directory (created if missing); relative paths are
    /// relative to the working directory.
    pub data_dir: PathBuf,
    pub durability: DurabilityMode,
    /// `interval` mode: the longest an applied change waits for its sync.
    pub sync_interval_ms: u64,
    /// Most operations merged into one group commit.
    pub batch_max_ops: usize,
    /// `fsync` and `interval` modes: longest a change that sends a QoS 1
    /// message to an online persistent session waits for the subscriber's
    /// PUBACK, so that the pair nets away without touching the disk
    /// (`memory` mode never waits).
    pub batch_max_delay_us: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("data"),
            durability: DurabilityMode::Fsync,
            sync_interval_ms: 100,
            batch_max_ops: tern_storage::DEFAULT_MAX_OPS,
            batch_max_delay_us: tern_storage::DEFAULT_MAX_DELAY.as_micros() as u64,
        }
    }
}

impl StorageConfig {
    /// The writer's settings; `None` in memory mode (no store at all).
    pub fn writer_config(&self) -> Option<tern_storage::WriterConfig> {
        let mode = match self.durability {
            DurabilityMode::Fsync => tern_storage::Durability::Fsync,
            DurabilityMode::Interval => {
                tern_storage::Durability::Interval(Duration::from_millis(self.sync_interval_ms))
            }
            DurabilityMode::Memory => return None,
        };
        Some(tern_storage::WriterConfig {
            max_ops: self.batch_max_ops,
            max_delay: Duration::from_micros(self.batch_max_delay_us),
            mode,
        })
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the read-only admin HTTP endpoint (`tern admin --url`,
    /// `/metrics`, `/health`); must be a loopback address, the endpoint has
    /// no authentication. Unset: no endpoint. In memory mode it serves
    /// `/metrics` and `/health` only.
    pub bind: Option<SocketAddr>,
    /// Address of a second listener that serves only `/metrics` and
    /// `/health` (no store views), for a Prometheus server or a load
    /// balancer's health check on another host: any address. Unset: none.
    pub metrics_bind: Option<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            bind: Some(SocketAddr::from(([127, 0, 0, 1], 8090))),
            metrics_bind: None,
        }
    }
}

/// `[listeners]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenersConfig {
    /// MQTT over TCP listen addresses.
    pub tcp: Vec<SocketAddr>,
    /// MQTT over WebSocket listen addresses; empty disables WebSocket.
    pub ws: Vec<SocketAddr>,
    /// The HTTP path a WebSocket upgrade must ask for.
    pub ws_path: String,
    /// Whether the WebSocket listeners take the client address from the first
    /// entry of an `X-Forwarded-For` header (only behind a trusted proxy).
    pub ws_trust_forwarded_for: bool,
    /// Whether every WebSocket connection starts with a PROXY protocol (v1
    /// or v2) header giving the client's address (only behind a proxy that
    /// sends one; a connection without it is closed).
    pub ws_proxy_protocol: bool,
    /// MQTT over TLS listen addresses (usually port 8883); empty: none.
    /// They need `tls_cert` and `tls_key`.
    pub tls: Vec<SocketAddr>,
    /// MQTT over WebSocket over TLS (`wss://`) listen addresses, at
    /// `ws_path`, with the same certificate; empty: none.
    pub wss: Vec<SocketAddr>,
    /// The TLS listeners' certificate chain (PEM: the server's certificate
    /// first, then any intermediates), relative to the working directory.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates. When set, every
    /// TLS and WSS client must present a certificate chained to one of
    /// them, and is authenticated by it (`[auth]`'s user name and password
    /// check does not apply to it). Unset: no client certificates.
    pub tls_client_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM `X509 CRL` blocks), one per CA
    /// that issues client certificates: a client certificate one of them
    /// revokes is refused at the handshake, and so is one whose issuer has
    /// no list here (only the client's own certificate is checked). Read
    /// with the certificates, at start and on `SIGHUP`. Needs
    /// `tls_client_ca`. Unset: no revocation check.
    pub tls_client_crl: Option<PathBuf>,
    /// What a client certificate on an MQTT/TLS listener says about who
    /// the client is, for the ACL's `user` and `%u` and for who owns its
    /// session. Needs `tls_client_ca`. Not used on `wss://` (see
    /// `tls_client_ca`).
    pub tls_client_identity: CertificateIdentity,
}

/// `[listeners] tls_client_identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateIdentity {
    /// The certificate stands in for a password and names no user: the
    /// client gets the ACL rules without `user` (a claimed user name proves
    /// nothing).
    #[default]
    None,
    /// The subject's common name (CN) is the client's user; the CONNECT's
    /// user name is ignored. A certificate without one, or with a CN that is
    /// not UTF-8, is refused (CONNACK "not authorized").
    CommonName,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter directive: `error`, `warn`, `info`, `debug`, `trace`,
    /// or a full directive such as `tern=debug,info`.
    pub level: String,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections accepted at once; one more is refused with CONNACK
    /// "server unavailable" (3.x) / "server busy" (5.0).
    pub max_connections: usize,
    /// Sessions the broker holds, connected or not. A CONNECT that would
    /// create one more is refused (5.0: CONNACK 0x97 quota exceeded, 3.x:
    /// 0x03 server unavailable); resuming or replacing a session is not.
    /// Without it, a client that connects again and again with new client
    /// ids and a long session expiry grows memory and the store without
    /// end.
    pub max_sessions: usize,
    /// Largest packet accepted, in bytes, fixed header included. Larger
    /// packets close the connection (5.0: DISCONNECT 0x95). Also the most
    /// memory a will may hold for its connection's life (CONNACK 0x95).
    pub max_packet_size: u32,
    /// Outgoing QoS 1/2 messages awaiting acknowledgement per client (an MQTT 5
    /// client's smaller Receive Maximum wins).
    pub max_inflight: u16,
    /// Bytes (`Message::weight`) of the outgoing QoS 1/2 messages awaiting
    /// acknowledgement per client: the window takes a message while it
    /// holds less than this, so one message larger than it still goes.
    pub max_inflight_bytes: usize,
    /// Incoming QoS 2 messages awaiting PUBREL per client; advertised to MQTT 5
    /// clients as Receive Maximum.
    pub receive_maximum: u16,
    /// Messages a session holds while they wait to be written, for the
    /// in-flight window, or for an offline client. See `docs/configuration.md`
    /// for the overflow policy.
    pub max_queued_messages: usize,
    /// Bytes (`Message::weight`: topic, payload, properties) of the messages a session's queue may hold
    /// besides the in-flight window; with `max_queued_messages`, the bound of
    /// an offline client's queue in memory and on disk.
    pub max_queued_bytes: usize,
    /// Milliseconds a connected client's full QoS 1/2 queue may make its
    /// publishers wait (they are not read from) before the client counts as
    /// slow and what overflows its queue is dropped; 0: drop at once.
    pub queue_full_wait_ms: u64,
    /// Bytes waiting to be written to one connection above which a QoS 0
    /// delivery to it is dropped (a slow subscriber's bound).
    pub max_client_outbound_bytes: usize,
    /// Bytes of messages queued for writing, across all connections, above
    /// which the broker stops reading from clients until writers catch up.
    pub max_outbound_bytes: usize,
    /// Bytes of packets still arriving (larger than a pooled read buffer)
    /// held across all connections: a connection whose incomplete packet
    /// grows while they are over it is closed (5.0: DISCONNECT 0x97). At
    /// least `max_packet_size`.
    pub max_incomplete_bytes: usize,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Largest keep alive (seconds) a client may use; 0 means no limit. An MQTT 5
    /// client asking for more (or for 0) is told this value as Server Keep Alive.
    pub max_keepalive_secs: u16,
    /// Seconds a client without keep alive may leave a packet incomplete
    /// (since its last complete packet) before it is closed; 0: for ever.
    /// With a keep alive, 1.5 x keep alive bounds it already.
    pub incomplete_packet_timeout_secs: u64,
    /// Topic aliases an MQTT 5 client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// Upper bound for the session expiry interval a client may ask for, in
    /// seconds; `4294967295` means "never expires" is allowed.
    pub max_session_expiry_secs: u32,
    /// Subscriptions one session may hold; a SUBSCRIBE filter beyond it is
    /// refused (5.0: 0x97 quota exceeded, 3.x: 0x80).
    pub max_subscriptions_per_client: usize,
    /// Memory the subscriptions of one session may cost the router, as
    /// `tern_router::subscription_cost` counts it (a filter's text and a
    /// node for each of its levels); a SUBSCRIBE filter beyond it is refused
    /// as for `max_subscriptions_per_client`. Deep filters reach it first:
    /// without it, 10,000 filters of 128 levels would cost some 100 MB.
    pub max_subscription_bytes_per_client: usize,
    /// Levels (the parts between `/`) a topic name or filter may have: each
    /// level of a subscription or a retained message's topic is a node of
    /// the broker's trees, some 50 to 70 bytes, so a 64 KiB topic of
    /// slashes would cost MBs. More is refused: a PUBLISH or will topic as
    /// invalid (0x90), a SUBSCRIBE filter in SUBACK (5.0: 0x8F, 3.x: 0x80).
    pub max_topic_levels: usize,
    /// Retained messages matched by a session's SUBSCRIBEs that may wait
    /// for room in its queues (they are sent as the client reads); beyond
    /// it they are dropped.
    pub max_pending_retained: usize,
    /// Retained messages that may wait so in all sessions together (24
    /// bytes each, and each keeps its message alive); beyond it they are
    /// dropped. What a session's queues take at once never counts.
    pub max_waiting_retained: usize,
    /// Topics with a retained message; a retained message for one more
    /// topic is delivered but not stored.
    pub max_retained_messages: usize,
    /// Memory of all retained messages (`broker::retained_cost`: their
    /// bytes, the message, the store's nodes for their topics); a retained
    /// message that would pass it is delivered but not stored.
    pub max_retained_bytes: usize,
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether clients without a user name may connect.
    pub allow_anonymous: bool,
    /// Static user list (name and password in plain text); empty by default.
    pub users: Vec<UserEntry>,
    /// Topic permissions (`[[auth.acl]]`, see acl.rs); empty: everything is
    /// allowed.
    pub acl: Vec<crate::acl::AclRule>,
}

/// One `[[auth.users]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    pub password: String,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        ListenersConfig {
            tcp: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            ws: vec![SocketAddr::from(([127, 0, 0, 1], 8083))],
            ws_path: "/mqtt".to_owned(),
            ws_trust_forwarded_for: false,
            ws_proxy_protocol: false,
            tls: Vec::new(),
            wss: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_client_crl: None,
            tls_client_identity: CertificateIdentity::None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
        }
    }
}

impl LimitsConfig {
    /// Whether `topic` (a name, or a filter without its share prefix) has
    /// more than `max_topic_levels` levels. Scans only a topic long enough
    /// to have that many slashes, so the common short topic costs a
    /// comparison.
    pub fn too_many_levels(&self, topic: &str) -> bool {
        topic.len() >= self.max_topic_levels
            && tern_router::topic_levels(topic) > self.max_topic_levels
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_sessions: 1_000_000,
            max_packet_size: 1024 * 1024,
            max_inflight: 1024,
            max_inflight_bytes: 4 * 1024 * 1024,
            receive_maximum: 1024,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            queue_full_wait_ms: 1000,
            max_client_outbound_bytes: 4 * 1024 * 1024,
            max_outbound_bytes: 64 * 1024 * 1024,
            max_incomplete_bytes: 256 * 1024 * 1024,
            connect_timeout_secs: 10,
            max_keepalive_secs: 0,
            incomplete_packet_timeout_secs: 120,
            topic_alias_maximum: 64,
            max_session_expiry_secs: u32::MAX,
            max_subscriptions_per_client: 10_000,
            max_subscription_bytes_per_client: 16 * 1024 * 1024,
            max_topic_levels: 128,
            max_pending_retained: 100_000,
            max_waiting_retained: 4_000_000,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: true,
            users: Vec::new(),
            acl: Vec::new(),
        }
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// An MQTT 5 client that sets Request Response Information gets Response
    /// Information = this prefix followed by its client id, a topic under
    /// which it may receive responses.
    pub response_information_prefix: String,
    /// Check that a payload whose Payload Format Indicator says UTF-8 is
    /// valid UTF-8; refuse it with 0x99 otherwise.
    pub check_payload_format: bool,
    /// When set, every MQTT 5 client is redirected: CONNACK 0x9C "use another
    /// server" (or 0x9D "server moved" with `server_moved`) carrying this
    /// Server Reference. MQTT 3.x clients cannot be redirected and are served.
    pub server_reference: Option<String>,
    /// Redirect permanently (0x9D) rather than temporarily (0x9C).
    pub server_moved: bool,
    /// Seconds between two rounds of `$SYS/broker/...` figures (retained,
    /// in memory only; see sys_topics.rs). 0: no `$SYS` topics.
    pub sys_interval_secs: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            response_information_prefix: "response/".to_owned(),
            check_payload_format: true,
            server_reference: None,
            server_moved: false,
            sys_interval_secs: 10,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config{}: key `{key}`: {reason}", origin.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        origin: Option<PathBuf>,
        key: &'static str,
        reason: String,
    },
}

impl Config {
    /// Reads and validates a TOML file; keys it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { key, reason, .. } => ConfigError::Invalid {
                origin: Some(path.to_owned()),
                key,
                reason,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                origin: None,
                key,
                reason: reason.to_owned(),
            })
        };
        let l = &self.limits;
        if self.listeners.tcp.is_empty() {
            return invalid("listeners.tcp", "at least one listen address is needed");
        }
        let path = &self.listeners.ws_path;
        if !path.starts_with('/') || path.contains(|c: char| c.is_whitespace() || c == '?') {
            return invalid(
                "listeners.ws_path",
                "must start with `/` and contain no spaces or `?`",
            );
        }
        if l.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        // The smallest packet that can carry anything useful plus headroom.
        if l.max_packet_size < 64 {
            return invalid("limits.max_packet_size", "must be at least 64 bytes");
        }
        // 268,435,455 + 5 header bytes is the largest MQTT packet there is.
        if l.max_packet_size > 268_435_460 {
            return invalid(
                "limits.max_packet_size",
                "must be at most 268435460 (the MQTT maximum)",
            );
        }
        if l.max_inflight == 0 {
            return invalid("limits.max_inflight", "must be at least 1");
        }
        if l.max_inflight_bytes < 1024 {
            return invalid("limits.max_inflight_bytes", "must be at least 1024");
        }
        if l.receive_maximum == 0 {
            return invalid("limits.receive_maximum", "must be at least 1");
        }
        if l.max_queued_messages == 0 {
            return invalid("limits.max_queued_messages", "must be at least 1");
        }
        if l.queue_full_wait_ms > 60_000 {
            return invalid("limits.queue_full_wait_ms", "must be at most 60000");
        }
        if l.max_queued_bytes < 1024 {
            return invalid("limits.max_queued_bytes", "must be at least 1024");
        }
        if l.max_client_outbound_bytes < 1024 {
            return invalid("limits.max_client_outbound_bytes", "must be at least 1024");
        }
        if l.max_outbound_bytes < 64 * 1024 {
            return invalid("limits.max_outbound_bytes", "must be at least 65536");
        }
        if l.max_incomplete_bytes < l.max_packet_size as usize {
            return invalid(
                "limits.max_incomplete_bytes",
                "must be at least limits.max_packet_size",
            );
        }
        if l.connect_timeout_secs == 0 {
            return invalid("limits.connect_timeout_secs", "must be at least 1");
        }
        if l.connect_timeout_secs > MAX_CONNECT_TIMEOUT_SECS {
            return invalid("limits.connect_timeout_secs", "must be at most 3600");
        }
        if l.incomplete_packet_timeout_secs > MAX_INCOMPLETE_PACKET_TIMEOUT_SECS {
            return invalid(
                "limits.incomplete_packet_timeout_secs",
                "must be at most 98303 (1.5 x the largest keep alive)",
            );
        }
        if l.max_subscriptions_per_client == 0 {
            return invalid("limits.max_subscriptions_per_client", "must be at least 1");
        }
        if l.max_subscription_bytes_per_client < 64 * 1024 {
            return invalid(
                "limits.max_subscription_bytes_per_client",
                "must be at least 65536",
            );
        }
        if l.max_sessions == 0 {
            return invalid("limits.max_sessions", "must be at least 1");
        }
        if l.max_topic_levels == 0 {
            return invalid("limits.max_topic_levels", "must be at least 1");
        }
        if l.max_pending_retained == 0 {
            return invalid("limits.max_pending_retained", "must be at least 1");
        }
        if l.max_retained_messages == 0 {
            return invalid("limits.max_retained_messages", "must be at least 1");
        }
        if l.max_retained_bytes < 1024 {
            return invalid("limits.max_retained_bytes", "must be at least 1024");
        }
        if let Some(reference) = &self.mqtt.server_reference {
            // Sent as an MQTT UTF-8 string: an empty one redirects every
            // MQTT 5 client to nowhere.
            if reference.trim().is_empty() {
                return invalid(
                    "mqtt.server_reference",
                    "must not be empty (leave it unset)",
                );
            }
            if reference.len() > usize::from(u16::MAX) || reference.contains('\0') {
                return invalid(
                    "mqtt.server_reference",
                    "must be at most 65535 bytes, without U+0000",
                );
            }
        }
        if let Some(problem) = log_filter_problem(&self.log.level) {
            return invalid("log.level", &problem);
        }
        let st = &self.storage;
        if st.data_dir.as_os_str().is_empty() {
            return invalid("storage.data_dir", "must not be empty");
        }
        if st.sync_interval_ms == 0 {
            return invalid("storage.sync_interval_ms", "must be at least 1");
        }
        if st.sync_interval_ms > MAX_SYNC_INTERVAL_MS {
            return invalid("storage.sync_interval_ms", "must be at most 60000");
        }
        if self.mqtt.sys_interval_secs > MAX_SYS_INTERVAL_SECS {
            return invalid("mqtt.sys_interval_secs", "must be at most 86400 (a day)");
        }
        if st.batch_max_ops == 0 {
            return invalid("storage.batch_max_ops", "must be at least 1");
        }
        if st.batch_max_delay_us > 1_000_000 {
            return invalid(
                "storage.batch_max_delay_us",
                "must be at most 1000000 (one second)",
            );
        }
        let ls = &self.listeners;
        let secure = !ls.tls.is_empty() || !ls.wss.is_empty();
        if secure && ls.tls_cert.is_none() {
            return invalid(
                "listeners.tls_cert",
                "must be set when listeners.tls or listeners.wss has an address",
            );
        }
        if secure && ls.tls_key.is_none() {
            return invalid(
                "listeners.tls_key",
                "must be set when listeners.tls or listeners.wss has an address",
            );
        }
        if ls.tls_client_identity != CertificateIdentity::None && ls.tls_client_ca.is_none() {
            return invalid(
                "listeners.tls_client_identity",
                "needs listeners.tls_client_ca (no client certificates without it)",
            );
        }
        if ls.tls_client_crl.is_some() && ls.tls_client_ca.is_none() {
            return invalid(
                "listeners.tls_client_crl",
                "needs listeners.tls_client_ca (no client certificates without it)",
            );
        }
        if self.admin.bind.is_some_and(|a| !a.ip().is_loopback()) {
            return invalid(
                "admin.bind",
                "must be a loopback address (the admin endpoint has no authentication)",
            );
        }
        let mut names = std::collections::HashSet::with_capacity(self.auth.users.len());
        for user in &self.auth.users {
            if user.name.is_empty() {
                return invalid("auth.users.name", "must not be empty");
            }
            // Two entries would both let the user in: a password replaced
            // by adding an entry would go on working unseen.
            if !names.insert(user.name.as_str()) {
                return invalid(
                    "auth.users.name",
                    &format!("user {:?} is listed more than once", user.name),
                );
            }
        }
        for rule in &self.auth.acl {
            if let Some(problem) = rule.problem() {
                return invalid("auth.acl.topic", &problem);
            }
        }
        Ok(())
    }

    /// The connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.connect_timeout_secs)
    }
}

/// The `tracing` directives for `[log] level` (validated by
/// [`log_filter_problem`]). rustls logs at `warn` what a TLS peer does
/// wrong: an IP address sent as the server name, which mosquitto clients
/// send on every connection by address, or a warning alert. That is a
/// line per connection that the limit on client-caused lines never sees,
/// and Tern logs a failed handshake itself (limited): rustls is held to
/// `error` unless the filter names it, or switches everything off.
pub fn log_directives(filter: &str) -> String {
    let off = filter
        .split(',')
        .any(|d| d.trim().eq_ignore_ascii_case("off"));
    if off || filter.contains("rustls") {
        filter.to_owned()
    } else {
        format!("{filter},rustls=error")
    }
}

/// Why `filter` is not a log filter Tern accepts, if it is not: a level
/// (`error`, `warn`, `info`, `debug`, `trace`, `off`) or `tracing`
/// directives of the form `target=level`, comma-separated. `tracing` reads a
/// bare word as a target to log at every level, so a mistyped level
/// (`"wran"`) would switch every other log line off, errors included: a
/// bare word must be a level.
fn log_filter_problem(filter: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    for directive in filter.split(',').map(str::trim) {
        if directive.is_empty() {
            return Some("an empty directive (try `info` or `tern=debug,info`)".to_owned());
        }
        if !directive.contains('=') && !LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l)) {
            return Some(format!(
                "`{directive}` is not a level: one of error, warn, info, debug, trace, off, \
                 or a directive such as `tern=debug`"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .err()
        .map(|e| format!("not a valid log filter ({e}); try `info` or `tern=debug,info`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_level_must_be_a_level_or_a_directive() {
        for good in ["info", "WARN", "off", "tern=debug,info", "tern=trace, warn"] {
            assert_eq!(log_filter_problem(good), None, "{good}");
        }
        for bad in [
            "loud",
            "wran",
            "errror",
            "warnings",
            "",
            "info,",
            "tern=bogus",
        ] {
            let problem = log_filter_problem(bad);
            assert!(problem.is_some(), "{bad:?} accepted");
        }
        let e = Config::from_toml("[log]\nlevel = \"wran\"\n").unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
        assert!(e.to_string().contains("`wran` is not a level"), "{e}");
    }

    #[test]
    fn rustls_is_held_to_errors_unless_named() {
        assert_eq!(log_directives("info"), "info,rustls=error");
        assert_eq!(
            log_directives("tern=debug,warn"),
            "tern=debug,warn,rustls=error"
        );
        assert_eq!(log_directives("debug,rustls=warn"), "debug,rustls=warn");
        assert_eq!(log_directives("off"), "off");
        for filter in ["info", "trace", "tern=debug,warn"] {
            assert_eq!(log_filter_problem(&log_directives(filter)), None);
        }
    }

    #[test]
    fn a_user_listed_twice_is_refused() {
        let users = "[[auth.users]]\nname = \"x\"\npassword = \"first\"\n\
                     [[auth.users]]\nname = \"y\"\npassword = \"other\"\n\
                     [[auth.users]]\nname = \"x\"\npassword = \"second\"\n";
        let e = Config::from_toml(users).unwrap_err().to_string();
        assert!(e.contains("auth.users.name"), "{e}");
        assert!(e.contains("\"x\" is listed more than once"), "{e}");
        let distinct = users.replace(
            "name = \"x\"\npassword = \"second\"",
            "name = \"z\"\npassword = \"second\"",
        );
        assert_eq!(Config::from_toml(&distinct).unwrap().auth.users.len(), 3);
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    /// docs/configuration.md's "Full example with every default" is what
    /// it says: a change of a default or a new key shows up there.
    #[test]
    fn the_documented_full_example_is_the_embedded_default() {
        let doc = include_str!("../../docs/configuration.md");
        let section = &doc[doc.find("## Full example with every default").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + section[start..].find("```").unwrap();
        let documented = Config::from_toml(&section[start..end]).unwrap();
        assert_eq!(documented, Config::default());
    }

    #[test]
    fn keys_override_defaults() {
        let c = Config::from_toml(
            "[listeners]\ntcp = [\"127.0.0.1:0\"]\n[limits]\nmax_queued_messages = 5\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_queued_messages, 5);
        assert_eq!(c.listeners.tcp[0].port(), 0);
        assert_eq!(c.limits.max_inflight, LimitsConfig::default().max_inflight);
    }

    #[test]
    fn websocket_listener_keys() {
        let c = Config::default();
        assert_eq!(c.listeners.ws, vec!["127.0.0.1:8083".parse().unwrap()]);
        assert_eq!(c.listeners.ws_path, "/mqtt");
        assert!(!c.listeners.ws_trust_forwarded_for);
        let c = Config::from_toml(
            "[listeners]\nws = []\nws_path = \"/ws\"\nws_trust_forwarded_for = true\n",
        )
        .unwrap();
        assert!(c.listeners.ws.is_empty());
        assert_eq!(c.listeners.ws_path, "/ws");
        assert!(c.listeners.ws_trust_forwarded_for);
        let e = Config::from_toml("[listeners]\nws_path = \"mqtt\"\n").unwrap_err();
        assert!(e.to_string().contains("listeners.ws_path"), "{e}");
    }

    #[test]
    fn storage_and_admin_keys() {
        let c = Config::default();
        assert_eq!(c.storage.data_dir, PathBuf::from("data"));
        assert_eq!(c.storage.durability, DurabilityMode::Fsync);
        let c = Config::from_toml(
            "[storage]\ndata_dir = \"/var/lib/tern\"\ndurability = \"interval\"\nsync_interval_ms = 20\n",
        )
        .unwrap();
        assert_eq!(
            c.storage.writer_config().unwrap().mode,
            tern_storage::Durability::Interval(Duration::from_millis(20))
        );
        let c = Config::from_toml("[storage]\ndurability = \"memory\"\n").unwrap();
        assert!(c.storage.writer_config().is_none());
        let e = Config::from_toml("[storage]\ndurability = \"sometimes\"\n").unwrap_err();
        assert!(e.to_string().contains("durability"), "{e}");
        let e = Config::from_toml("[admin]\nbind = \"0.0.0.0:8090\"\n").unwrap_err();
        assert!(e.to_string().contains("admin.bind"), "{e}");
        let e = Config::from_toml("[listeners]\ntls = [\"127.0.0.1:8883\"]\n").unwrap_err();
        assert!(e.to_string().contains("listeners.tls_cert"), "{e}");
        let e =
            Config::from_toml("[listeners]\ntls = [\"127.0.0.1:8883\"]\ntls_cert = \"c.pem\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("listeners.tls_key"), "{e}");
        let e =
            Config::from_toml("[listeners]\ntls_client_identity = \"common_name\"\n").unwrap_err();
        assert!(e.to_string().contains("tls_client_ca"), "{e}");
        let e = Config::from_toml("[listeners]\ntls_client_crl = \"crl.pem\"\n").unwrap_err();
        assert!(e.to_string().contains("listeners.tls_client_crl"), "{e}");
        let c = Config::from_toml(
            "[listeners]\ntls_client_ca = \"ca.pem\"\ntls_client_identity = \"common_name\"\n",
        )
        .unwrap();
        assert_eq!(
            c.listeners.tls_client_identity,
            CertificateIdentity::CommonName
        );
        let e = Config::from_toml("[listeners]\ntls_client_identity = \"subject\"\n").unwrap_err();
        assert!(e.to_string().contains("tls_client_identity"), "{e}");
        let c = Config::from_toml(
            "[[auth.acl]]\nuser = \"ops\"\ntopic = \"devices/#\"\naccess = \"subscribe\"\n\
             [[auth.acl]]\ntopic = \"devices/%c/#\"\naccess = \"publish\"\n",
        )
        .unwrap();
        assert_eq!(c.auth.acl.len(), 2);
        assert_eq!(c.auth.acl[0].access, crate::acl::Access::Subscribe);
        assert_eq!(c.auth.acl[0].permission, crate::acl::Permission::Allow);
        let c = Config::from_toml(
            "[[auth.acl]]\ntopic = \"secret/#\"\naccess = \"all\"\npermission = \"deny\"\n",
        )
        .unwrap();
        assert_eq!(c.auth.acl[0].permission, crate::acl::Permission::Deny);
        let e = Config::from_toml(
            "[[auth.acl]]\ntopic = \"a\"\naccess = \"all\"\npermission = \"refuse\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("permission"), "{e}");
        let e =
            Config::from_toml("[[auth.acl]]\ntopic = \"a/#/b\"\naccess = \"all\"\n").unwrap_err();
        assert!(e.to_string().contains("auth.acl.topic"), "{e}");
        let e = Config::from_toml("[[auth.acl]]\ntopic = \"a\"\naccess = \"read\"\n").unwrap_err();
        assert!(e.to_string().contains("access"), "{e}");
        // Counts and liveness only: any address.
        let c = Config::from_toml("[admin]\nmetrics_bind = \"0.0.0.0:9100\"\n").unwrap();
        assert_eq!(c.admin.metrics_bind, Some("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(c.admin.bind, AdminConfig::default().bind);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("[limits]\nmax_conections = 5\n").unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = Config::from_toml("[limits]\nmax_connections = \"many\"\n").unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
    }

    #[test]
    fn out_of_range_value_is_named() {
        let e = Config::from_toml("[limits]\nmax_packet_size = 10\n").unwrap_err();
        assert!(e.to_string().contains("limits.max_packet_size"), "{e}");
    }

    #[test]
    fn timing_keys_have_an_upper_bound() {
        for (file, key, largest) in [
            (
                "[limits]\nconnect_timeout_secs = {}\n",
                "limits.connect_timeout_secs",
                3600,
            ),
            (
                "[limits]\nincomplete_packet_timeout_secs = {}\n",
                "limits.incomplete_packet_timeout_secs",
                98_303,
            ),
            (
                "[storage]\nsync_interval_ms = {}\n",
                "storage.sync_interval_ms",
                60_000,
            ),
            (
                "[mqtt]\nsys_interval_secs = {}\n",
                "mqtt.sys_interval_secs",
                86_400,
            ),
        ] {
            let with = |v: u64| file.replace("{}", &v.to_string());
            assert!(
                Config::from_toml(&with(largest)).is_ok(),
                "{key} = {largest}"
            );
            for too_large in [largest + 1, i64::MAX as u64] {
                let e = Config::from_toml(&with(too_large)).unwrap_err().to_string();
                assert!(e.contains(key) && e.contains("at most"), "{e}");
            }
        }
    }

    #[test]
    fn a_server_reference_must_be_one() {
        // `v` as a TOML basic string: its escapes are `\uXXXX`, not Rust's.
        let with = |v: &str| Config::from_toml(&format!("[mqtt]\nserver_reference = \"{v}\"\n"));
        assert!(with("other-node:1883").is_ok());
        for bad in ["", "  ", "a\\u0000b"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("mqtt.server_reference"), "{bad:?}: {e}");
        }
        let e = with(&"x".repeat(65_536)).unwrap_err().to_string();
        assert!(e.contains("at most 65535 bytes"), "{e}");
    }

    #[test]
    fn the_incomplete_bound_must_hold_one_largest_packet() {
        let e = Config::from_toml(
            "[limits]\nmax_packet_size = 2000000\nmax_incomplete_bytes = 1999999\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("limits.max_incomplete_bytes"), "{e}");
        let c = Config::from_toml(
            "[limits]\nmax_packet_size = 2000000\nmax_incomplete_bytes = 2000000\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_incomplete_bytes, 2_000_000);
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tern-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[limits]\nmax_inflight = 0\n").unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("bad.toml") && e.contains("limits.max_inflight"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
