//! `tern admin`: inspect the broker's durable store, and the read-only admin
//! endpoint a running broker serves it through.
//!
//! The store ([`tern_storage::Store`]) belongs to one process at a time:
//! while a broker runs, its directory is locked. So there are two ways in,
//! with the same views and the same output:
//!
//! ```text
//! tern admin --data-dir DIR ...   stopped broker: open the store directly
//!                                 (read and write: delete-session, compact)
//! tern admin --url URL ...        running broker: GET its admin endpoint
//!                                 (read only)
//! ```
//!
//! ```text
//! model    the views as JSON-serialisable types, and how each is read
//!          from a Store (sessions, session, queue, retained, stats, export)
//! render   tables for people, JSON for scripts and for response bodies
//! cli      AdminArgs, execute (offline or online backend), run
//! client   blocking HTTP/1.1 GET client used by --url
//! http     serve_admin: the endpoint, GET only, JSON, store calls on
//!          blocking threads, long lists streamed
//! error    AdminError: exit codes and HTTP statuses
//! ```
//!
//! # Invariants
//!
//! - Both modes print from the same model values through the same renderer:
//!   offline builds them from the store, online deserialises what the
//!   endpoint built from the store with the same code.
//! - The endpoint never writes to the store; write commands refuse `--url`.
//! - No store call runs on an async task: the endpoint runs each on
//!   `spawn_blocking`.
//! - An offline command never creates a store: the directory must exist and
//!   hold one. A locked store (running broker) is reported with a pointer to
//!   `--url`.
//! - Bad input to the endpoint (oversized or malformed heads, bad
//!   percent-encoding, non-UTF-8) is answered 400, never a panic.
//! - Lists that grow with the store are read lazily: sessions, retained and
//!   export stream from the store's iterators; a queue view is bounded by
//!   its limit (at most 10000 entries).
//!
//! See docs/admin.md for the commands, routes and examples.

mod cli;
mod client;
mod error;
mod http;
pub mod model;
mod render;

pub use cli::{execute, run, AdminArgs, AdminCommand};
pub use error::AdminError;
pub use http::{serve_admin, AdminSources};
