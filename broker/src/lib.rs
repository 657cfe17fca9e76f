//! Tern, an MQTT broker: the session layer and the server.
//!
//! This crate ties the others together. It owns the sockets and the tasks;
//! the wire format belongs to `tern-codec`, topic matching and retained
//! messages to `tern-router`, durable records to `tern-storage`.
//!
//! ```text
//! server      open the store, recover, accept loop per listener, shutdown
//!   handshake    CONNECT, admission, enhanced authentication (AUTH)
//!   connection   one task per client: read loop, keep alive, protocol
//!   writer       drains the session's outbound queue with vectored writes
//!   wake_batch   one writer wake-up per subscriber per read, not per message
//!   websocket    MQTT over WebSocket: the upgrade, then the same connection code
//!   proxy_protocol  PROXY protocol v1/v2 header, when a listener is behind a proxy
//!   tls          MQTT over TLS: certificate loading, the handshake, then the same connection code
//! broker      shared state; publish = retained store + router match + fan-out
//! registry    sessions by client id; the only count of connections
//! session     per-client state: QoS 1/2 flows, in-flight window, queues
//! overflow    a full queue: whether its client is outpaced (publishers wait) or slow
//! incoming_qos2  a client's open QoS 2 flows, and which count against Receive Maximum
//! topic_alias MQTT 5 topic aliases, inbound and outbound
//! message     one Arc'd message per publish, shared by every delivery
//! subscription_ids  the MQTT 5 subscription identifiers of one delivery (16 bytes)
//! persistence the store, its group-commit writer, journals of durable changes
//! recovery    the store back into memory before the listeners open
//! admin       `tern admin` and the read-only admin HTTP endpoint
//! prometheus  counters and gauges in the Prometheus text format (/metrics)
//! budget      broker-wide bound on queued outbound bytes (back-pressure)
//! pool        bounded pool of read buffers; idle connections hold none
//! transport   what a byte stream must offer (readiness without a buffer)
//! auth        MQTT 5 enhanced authentication (AUTH), SCRAM-SHA-256
//! auth_rules  the [auth] rules in force, swapped whole on reload; how each client got in
//! acl         topic permissions: who may publish and subscribe where
//! config      embedded defaults, TOML file, validation
//! runtime     the binary's tokio runtime: the LIFO slot off, so clients are served in arrival order
//! sys_topics  $SYS/broker/... figures, retained in memory, every sys_interval_secs
//! metrics     monotonic counters (every refusal and drop is counted here)
//! log_throttle  lines a client can cause: at most 20 a second per call site
//! ```
//!
//! # Invariants
//!
//! - No lock is held across an `.await`. Locks are `parking_lot` mutexes and
//!   the router's `RwLock`, held for bookkeeping only. Lock order: registry,
//!   then router or a session; a session lock is innermost.
//! - A message's topic and payload are read once into the publisher's buffer
//!   and shared by every delivery; a delivery adds only QoS, packet id and
//!   flags.
//! - Connection and session counts come from the [`registry`], released by
//!   `Drop` on every exit path.
//! - Nothing on the hot path waits for the disk: durable changes go to a
//!   journal committed to the store writer's thread; acknowledgements that
//!   promise durability are sent from its completions.
//! - Bad input from a client never panics and never affects other clients: it
//!   closes that connection with the reason code the specification names.

pub mod acl;
pub mod admin;
pub mod auth;
pub mod auth_rules;
pub mod broker;
pub mod budget;
pub mod clock;
pub mod config;
pub mod connection;
mod handshake;
mod incoming_qos2;
pub mod incomplete;
mod inflight;
pub mod keep_alive;
mod log_throttle;
pub mod message;
pub mod message_batch;
pub mod metrics;
mod overflow;
pub mod persistence;
pub mod pool;
pub mod prometheus;
pub mod proxy_protocol;
pub mod recovery;
pub mod registry;
pub mod retained_order;
pub mod runtime;
pub mod server;
pub mod session;
pub mod signal;
mod stall;
mod subscription_ids;
pub mod sys_topics;
pub mod tls;
pub mod topic_alias;
pub mod transport;
pub mod wake_batch;
pub mod websocket;
mod writer;

pub use broker::Broker;
pub use config::{Config, ConfigError};
pub use server::{Server, StartError};
