//! The session registry: the single source of truth for which sessions exist
//! and how many connections are open.
//!
//! Two facts live here and nowhere else:
//!
//! - **Connections.** A connection exists exactly as long as its
//!   [`ConnectionPermit`]. The permit is taken before the first byte is read
//!   and released by `Drop`, so every exit path (error, panic in the task,
//!   takeover, timeout, refusal, shutdown) gives it back. Nothing else counts
//!   connections, so the count cannot drift.
//! - **Sessions.** `client_id -> Arc<Session>`. Opening a session with a known
//!   client id either resumes it (clean start 0) or ends it and starts a fresh
//!   one; either way the connection attached to the old one is told to close
//!   (MQTT 5: DISCONNECT 0x8E, session taken over).
//!
//! Lock order: the registry lock is taken first; the router lock and session
//! locks may be taken while it is held, never the other way round. It is never
//! held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tern_codec::ReasonCode;
use tokio::sync::Notify;

use crate::acl::DeniedTopics;
use crate::metrics::Metrics;
use crate::session::{ConnectionControl, PendingWill, Session, SessionContext};

/// How long a new connection waits for the reader of the connection it takes
/// over to finish (see [`SessionRegistry::take_over`]). A reader that is told
/// to close stops after the read it is in, within microseconds; the bound
/// only matters for one that is stuck, and delays that takeover's CONNACK.
pub const TAKEOVER_WAIT: Duration = Duration::from_millis(500);

/// Sessions by client identifier, and the live connection count.
#[derive(Debug)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    connections: Arc<AtomicUsize>,
    max_connections: usize,
    /// `limits.max_sessions`: a client id without a session gets none once
    /// the registry holds this many.
    max_sessions: usize,
    next_id: AtomicU64,
    context: Arc<SessionContext>,
    metrics: Arc<Metrics>,
    /// Woken each time a connection's reader finishes (takeovers wait on it).
    readers_finished: Notify,
    /// Takeovers waiting on `readers_finished`: a reader that finishes while
    /// none waits (nearly always) does not touch the `Notify`'s lock.
    takeovers_waiting: AtomicUsize,
}

/// [`SessionRegistry::open`] found `limits.max_sessions` sessions and none
/// for the client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limits.max_sessions reached")]
pub struct SessionLimitReached;

/// Proof that a connection is counted. Dropping it uncounts the connection.
#[derive(Debug)]
pub struct ConnectionPermit {
    connections: Arc<AtomicUsize>,
    /// Unique id of this connection.
    pub id: u64,
    /// False when the broker was already at `max_connections`: the connection
    /// is counted while it is being refused, then dropped.
    pub admitted: bool,
    /// Set when the broker ended the connection because it shuts down: its
    /// client gets longer to read what was flushed and close (see
    /// `connection::linger_counted`).
    pub shutting_down: bool,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`SessionRegistry::open`] did.
#[derive(Debug)]
pub struct Opened {
    pub session: Arc<Session>,
    /// True when an existing session was resumed (CONNACK session present).
    pub session_present: bool,
    /// A session that was ended to make room for this one (clean start with a
    /// known client id): the caller removes its subscriptions and publishes its
    /// pending will.
    pub replaced: Option<(Arc<Session>, Option<PendingWill>)>,
}

impl SessionRegistry {
    /// An empty registry.
    pub fn new(max_connections: usize, max_sessions: usize, context: SessionContext) -> Self {
        SessionRegistry {
            sessions: Mutex::new(HashMap::new()),
            connections: Arc::new(AtomicUsize::new(0)),
            max_connections,
            max_sessions,
            next_id: AtomicU64::new(1),
            metrics: Arc::clone(&context.metrics),
            context: Arc::new(context),
            readers_finished: Notify::new(),
            takeovers_waiting: AtomicUsize::new(0),
        }
    }

    /// What the sessions share (limits, counters, the outbound budget).
    pub fn context(&self) -> &SessionContext {
        &self.context
    }

    /// Counts a new connection. The permit says whether it is admitted.
    pub fn admit(&self) -> ConnectionPermit {
        let before = self.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionPermit {
            connections: Arc::clone(&self.connections),
            id: self.next_id(),
            admitted: before < self.max_connections,
            shutting_down: false,
        }
    }

    /// Open connections, refused ones still closing included.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Sessions that exist, online or not.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// The session of a client id, if any.
    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(client_id).cloned()
    }

    /// All sessions (for shutdown and inspection).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
    }

    /// A fresh unique id (for sessions and connections).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Closes the connection attached to `client_id`'s session, if any, and
    /// waits until its reader has handled what it had already received (at
    /// most [`TAKEOVER_WAIT`]), before [`open`](Self::open) decides what the
    /// new connection finds. A client that sends DISCONNECT and reconnects at
    /// once has its DISCONNECT honoured: no will after reason 0x00
    /// (MQTT-3.14.4-3), and a session expiry of 0 ends the session instead of
    /// being resumed (MQTT 5 3.14.2.2.2), however the two connections' tasks
    /// are scheduled.
    pub async fn take_over(&self, client_id: &str) {
        let finished = async {
            loop {
                let notified = self.readers_finished.notified();
                let mut notified = std::pin::pin!(notified);
                // Registered before the check, so a finish in between wakes it.
                notified.as_mut().enable();
                // Looked up each time: a connection that attached meanwhile
                // (another takeover of the same client id) is waited for too.
                let Some(control) = self.get(client_id).and_then(|s| s.attached_control()) else {
                    return;
                };
                if control.close(Some(ReasonCode::SessionTakenOver)) {
                    Metrics::inc(&self.metrics.session_takeovers);
                }
                if control.is_reader_finished() {
                    return;
                }
                notified.await;
            }
        };
        self.takeovers_waiting.fetch_add(1, Ordering::SeqCst);
        let waited = tokio::time::timeout(TAKEOVER_WAIT, finished).await;
        self.takeovers_waiting.fetch_sub(1, Ordering::SeqCst);
        if waited.is_err() {
            tracing::debug!(%client_id, "taking over without waiting for the previous reader");
        }
    }

    /// Records that the reader of `control`'s connection has stopped, and
    /// wakes the takeovers waiting for one.
    pub fn reader_finished(&self, control: &ConnectionControl) {
        control.mark_reader_finished();
        // SeqCst with the waiter's increment and its own flag check: either
        // it sees the flag set, or this sees it counted.
        if self.takeovers_waiting.load(Ordering::SeqCst) > 0 {
            self.readers_finished.notify_waiters();
        }
    }

    /// Finds or creates the session for `client_id`, closing any connection
    /// attached to an existing one. An existing session is resumed unless
    /// `clean_start`, or `resumable` (asked under the registry lock, only
    /// for a session that could be resumed) says no. `on_replace` runs
    /// under the registry lock for a session that is ended (so that removing
    /// its subscriptions cannot race with a new session subscribing under
    /// the same id). `denied` is what a new session's client may not
    /// receive (a resumed one has it already: it is resumed only by the
    /// user it was made for). Fails when the client id has no session and
    /// the registry holds `limits.max_sessions` already.
    pub fn open(
        &self,
        client_id: &str,
        clean_start: bool,
        denied: Option<Box<DeniedTopics>>,
        resumable: impl FnOnce(&Arc<Session>) -> bool,
        on_replace: impl FnOnce(&Arc<Session>),
    ) -> Result<Opened, SessionLimitReached> {
        let mut sessions = self.sessions.lock();
        let Some(existing) = sessions.get(client_id) else {
            if sessions.len() >= self.max_sessions {
                return Err(SessionLimitReached);
            }
            return Ok(self.insert_new(&mut sessions, client_id, denied, on_replace));
        };
        // Closed by `take_over` already, unless it stopped waiting; counted
        // by whichever closed it first.
        if existing.kick(ReasonCode::SessionTakenOver) {
            Metrics::inc(&self.metrics.session_takeovers);
        }
        // A session with expiry 0 lasts only as long as its connection
        // (MQTT-3.1.2-6; MQTT 5 3.1.4): a takeover ends it, even when the
        // new connection asks to resume.
        if !clean_start
            && !existing.is_ended()
            && existing.expiry_interval() != 0
            && resumable(existing)
        {
            existing.reserve();
            return Ok(Opened {
                session: Arc::clone(existing),
                session_present: true,
                replaced: None,
            });
        }
        Ok(self.insert_new(&mut sessions, client_id, denied, on_replace))
    }

    /// A new session for `client_id`, replacing (and ending) the one it had.
    fn insert_new(
        &self,
        sessions: &mut HashMap<Arc<str>, Arc<Session>>,
        client_id: &str,
        denied: Option<Box<DeniedTopics>>,
        on_replace: impl FnOnce(&Arc<Session>),
    ) -> Opened {
        let client_id: Arc<str> = Arc::from(client_id);
        let session = Arc::new(Session::new(
            self.next_id(),
            Arc::clone(&client_id),
            denied,
            &self.context,
        ));
        let replaced = sessions.insert(client_id, Arc::clone(&session)).map(|old| {
            let will = old.end();
            on_replace(&old);
            (old, will)
        });
        Opened {
            session,
            session_present: false,
            replaced,
        }
    }

    /// Creates the offline session of `client_id` that recovery found in the
    /// store (before any connection exists); `denied` as for
    /// [`open`](Self::open), from the rules of this start.
    pub fn restore(&self, client_id: &str, denied: Option<Box<DeniedTopics>>) -> Arc<Session> {
        let client_id: Arc<str> = Arc::from(client_id);
        let session = Arc::new(Session::new(
            self.next_id(),
            Arc::clone(&client_id),
            denied,
            &self.context,
        ));
        self.sessions.lock().insert(client_id, Arc::clone(&session));
        session
    }

    /// Ends `session` if it is still the registered one for its client id and
    /// `still_valid` agrees (checked under the registry lock, so a reconnect
    /// cannot slip in between). `on_end` runs under the lock for cleanup.
    /// Returns the pending will to publish, if the session was ended.
    pub fn end_if(
        &self,
        session: &Arc<Session>,
        still_valid: impl FnOnce(&Session) -> bool,
        on_end: impl FnOnce(&Arc<Session>),
    ) -> Option<Option<PendingWill>> {
        let mut sessions = self.sessions.lock();
        match sessions.get(&session.client_id) {
            Some(current) if Arc::ptr_eq(current, session) && still_valid(session) => {
                sessions.remove(&session.client_id);
                let will = session.end();
                on_end(session);
                Some(will)
            }
            _ => None,
        }
    }
}
