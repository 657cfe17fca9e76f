//! The in-flight states the store refused, written again until it takes
//! them ([`StoreRetries`]).

use super::*;

/// How often an in-flight state the store refused is written again (see
/// [`StoreRetries`]): a full disk is not freed in milliseconds, and each
/// try writes the message again.
pub const STORE_RETRY: Duration = Duration::from_secs(1);

/// Sessions with an in-flight state the store refused: a QoS 2 PUBLISH
/// whose packet id, or a PUBREL whose PUBREC, is not durable. Sending
/// either before it is would let a crash bring back an earlier state, and
/// the client would get the message twice. The broker's maintenance task
/// calls [`retry`](Self::retry) every [`STORE_RETRY`].
///
/// Keyed by the session's address, which its `Weak` keeps from being
/// reused while it waits here.
#[derive(Debug, Default)]
pub struct StoreRetries(Mutex<HashMap<usize, Weak<Session>>>);

impl StoreRetries {
    pub(super) fn add(&self, session: &Arc<Session>) {
        let key = Arc::as_ptr(session) as usize;
        self.0
            .lock()
            .entry(key)
            .or_insert_with(|| Arc::downgrade(session));
    }

    /// Writes the refused states again; each session whose write fails
    /// again is put back by its completion.
    pub fn retry(&self) {
        let waiting = std::mem::take(&mut *self.0.lock());
        for session in waiting.values().filter_map(Weak::upgrade) {
            session.store_inflight_again();
        }
    }
}
