//! Keep alive (MQTT-3.1.2-24), enforced by one sweep for the whole broker.
//!
//! A server closes a connection that sent no control packet for one and a
//! half times its keep alive. A timer per connection would put a timer entry
//! in every connection's task (112 bytes of its idle memory) and re-arm it
//! on every read. Instead:
//!
//! - [`KeepAlive`] keeps the broker's [`CoarseClock`], which the sweep
//!   advances, so reading it is one relaxed load, and the connections it
//!   watches (those with a keep alive, by connection id).
//! - A connection stamps its [`ConnectionControl`] with that clock whenever
//!   a read decodes a packet.
//! - [`run`] wakes every [`SWEEP_INTERVAL`], advances the clock and closes
//!   every watched connection whose stamp is older than its limit plus one
//!   interval (a stamp can be up to one interval old when it is written),
//!   with reason 0x8D (Keep Alive timeout) for MQTT 5 clients.
//!
//! A silent client is therefore closed between 1.5 x keep alive and that
//! plus two intervals, never before.
//!
//! A client without keep alive is closed the same way only while it holds
//! an incomplete packet, `limits.incomplete_packet_timeout_secs` after its
//! last complete one (or after the incomplete one began, if later; see
//! [`ConnectionControl::set_incomplete`]): otherwise it could hold a read
//! buffer of up to the largest packet size for ever by sending all of a
//! packet but its last byte. A paused reader (back-pressure) reads
//! nothing and so stamps nothing: a client stuck for that long is closed too,
//! which releases what it held.
//!
//! The watch list's lock is held only to insert, remove, or collect the
//! expired connections; connections are closed after it is released.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tern_codec::ReasonCode;

use crate::broker::Broker;
use crate::clock::CoarseClock;
use crate::metrics::Metrics;
use crate::session::ConnectionControl;

/// How often the sweep runs. Short enough that a 1 s keep alive is enforced
/// within half a second of its 1.5 s limit; long enough that a sweep of tens
/// of thousands of connections (a few hundred microseconds) costs nothing.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// [`SWEEP_INTERVAL`] in milliseconds: the coarse clock's step.
pub const SWEEP_INTERVAL_MS: u64 = SWEEP_INTERVAL.as_millis() as u64;

/// The broker's coarse clock and the connections keep alive watches.
#[derive(Debug, Default)]
pub struct KeepAlive {
    /// Advanced by each sweep; shared with the sessions (`SessionContext`).
    clock: Arc<CoarseClock>,
    watched: Mutex<HashMap<u64, Watched>>,
}

#[derive(Debug)]
struct Watched {
    control: Arc<ConnectionControl>,
    /// 1.5 x keep alive, or the incomplete packet timeout, in milliseconds.
    limit_ms: u64,
    /// No keep alive: expired only while it holds an incomplete packet.
    incomplete_only: bool,
}

impl KeepAlive {
    /// The clock as of the last sweep, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The clock the sweep advances.
    pub fn clock(&self) -> &Arc<CoarseClock> {
        &self.clock
    }

    /// Starts watching a connection that asked for `keep_alive`. Its stamp
    /// starts now. Without keep alive, it is watched only for packets it
    /// leaves incomplete for longer than `incomplete_limit` (zero: not at
    /// all; see [`ConnectionControl::set_incomplete`]).
    pub fn watch(
        &self,
        connection_id: u64,
        control: &Arc<ConnectionControl>,
        keep_alive: Duration,
        incomplete_limit: Duration,
    ) {
        control.packet_received(self.now_ms());
        let (limit, incomplete_only) = if !keep_alive.is_zero() {
            (keep_alive * 3 / 2, false)
        } else if !incomplete_limit.is_zero() {
            (incomplete_limit, true)
        } else {
            return;
        };
        let watched = Watched {
            control: Arc::clone(control),
            limit_ms: limit.as_millis() as u64,
            incomplete_only,
        };
        self.watched.lock().insert(connection_id, watched);
    }

    /// Stops watching a connection (it closed).
    pub fn unwatch(&self, connection_id: u64) {
        self.watched.lock().remove(&connection_id);
    }

    /// Connections watched now.
    pub fn watched(&self) -> usize {
        self.watched.lock().len()
    }

    /// Advances the clock and returns the connections that have just run
    /// out of time (not those already closing).
    pub fn expired(&self) -> Vec<Arc<ConnectionControl>> {
        let now = self.clock.advance();
        self.expired_at(now)
    }

    fn expired_at(&self, now_ms: u64) -> Vec<Arc<ConnectionControl>> {
        self.watched
            .lock()
            .values()
            .filter(|w| {
                let silent = now_ms.saturating_sub(w.control.last_packet_ms());
                silent > w.limit_ms + SWEEP_INTERVAL_MS
                    && !w.control.is_closing()
                    && (!w.incomplete_only || w.control.is_incomplete())
            })
            .map(|w| Arc::clone(&w.control))
            .collect()
    }
}

/// Runs the sweep until the task is aborted (at shutdown).
pub async fn run(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for control in broker.keep_alive.expired() {
            Metrics::inc(&broker.metrics.keepalive_timeouts);
            control.close(Some(ReasonCode::KeepAliveTimeout));
        }
        // Readers paused by the outbound budget wait for it; stalled
        // subscribers must not keep it over (`Broker::exempt_stalled_queues`).
        if broker.registry.context().budget.is_over() {
            broker.exempt_stalled_queues();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_expires_only_after_its_limit_and_one_interval() {
        let keep_alive = KeepAlive::default();
        let control = Arc::new(ConnectionControl::default());
        keep_alive.watch(1, &control, Duration::from_secs(2), Duration::ZERO);
        assert_eq!(keep_alive.watched(), 1);
        // Limit: 3,000 ms, plus one sweep interval.
        assert!(keep_alive.expired_at(3_000 + SWEEP_INTERVAL_MS).is_empty());
        let expired = keep_alive.expired_at(3_001 + SWEEP_INTERVAL_MS);
        assert_eq!(expired.len(), 1);
        assert!(Arc::ptr_eq(&expired[0], &control));
    }

    #[test]
    fn a_packet_restarts_the_wait() {
        let keep_alive = KeepAlive::default();
        let control = Arc::new(ConnectionControl::default());
        keep_alive.watch(1, &control, Duration::from_secs(1), Duration::ZERO);
        control.packet_received(10_000);
        assert!(keep_alive.expired_at(11_000).is_empty());
        assert_eq!(keep_alive.expired_at(12_000).len(), 1);
    }

    #[test]
    fn closing_zero_and_unwatched_connections_are_not_expired() {
        let keep_alive = KeepAlive::default();
        let closing = Arc::new(ConnectionControl::default());
        keep_alive.watch(1, &closing, Duration::from_secs(1), Duration::ZERO);
        closing.close(Some(ReasonCode::KeepAliveTimeout));
        let none = Arc::new(ConnectionControl::default());
        keep_alive.watch(2, &none, Duration::ZERO, Duration::ZERO);
        let gone = Arc::new(ConnectionControl::default());
        keep_alive.watch(3, &gone, Duration::from_secs(1), Duration::ZERO);
        keep_alive.unwatch(3);
        assert_eq!(keep_alive.watched(), 1);
        assert!(keep_alive.expired_at(u64::MAX / 2).is_empty());
    }

    #[test]
    fn without_keep_alive_only_an_incomplete_packet_is_timed() {
        let keep_alive = KeepAlive::default();
        let control = Arc::new(ConnectionControl::default());
        keep_alive.watch(1, &control, Duration::ZERO, Duration::from_secs(10));
        assert_eq!(keep_alive.watched(), 1);
        // Idle for ages on a packet boundary: never expired.
        assert!(keep_alive.expired_at(1_000_000).is_empty());
        // An incomplete packet from 1,000,000 ms on: timed from there, not
        // from the CONNECT long before.
        control.set_incomplete(true, 1_000_000);
        assert!(keep_alive
            .expired_at(1_010_000 + SWEEP_INTERVAL_MS)
            .is_empty());
        assert_eq!(
            keep_alive.expired_at(1_010_001 + SWEEP_INTERVAL_MS).len(),
            1
        );
        // Completed meanwhile: not expired.
        control.set_incomplete(false, 1_005_000);
        assert!(keep_alive.expired_at(2_000_000).is_empty());
        // Without a limit, not watched at all.
        let unlimited = Arc::new(ConnectionControl::default());
        keep_alive.watch(2, &unlimited, Duration::ZERO, Duration::ZERO);
        assert_eq!(keep_alive.watched(), 1);
    }
}
