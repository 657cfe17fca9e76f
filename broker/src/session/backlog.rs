//! A restored session's queue that stays in the store until its in-flight
//! window reaches it (`Backlog`), read [`BACKLOG_CHUNK`] deliveries at a
//! time; and the restore of a session at recovery.

use super::*;

/// Deliveries of a restored session that were queued but not sent: they
/// stay in the store (pending entries with a seq in `after..end`) and are
/// read [`BACKLOG_CHUNK`] at a time when the in-flight window drains to
/// them, so a restart never loads every queued payload at once. Deliveries
/// queued since the restart have seqs from `end` on and wait behind it.
#[derive(Debug)]
pub(super) struct Backlog {
    /// Every entry up to this seq was read.
    pub(super) after: u64,
    pub(super) end: u64,
    /// Entries left in the store.
    pub(super) count: usize,
    /// What they count against `max_queued_bytes` (their stored weights).
    pub(super) bytes: usize,
    /// A read is under way.
    pub(super) reading: bool,
    /// Reads failed in a row (the retry waits longer after each).
    pub(super) failures: u32,
}

/// Backlog deliveries read from the store at a time: enough to refill an
/// in-flight window several times over, small enough that a connected
/// client with a large stored queue holds little of it in memory.
pub const BACKLOG_CHUNK: usize = 256;

/// Wait before reading a backlog chunk again after a failed read: the store
/// is failing, so retry slowly rather than spin on the blocking pool. The
/// wait doubles with each failure in a row, up to [`BACKLOG_RETRY_MAX`]: a
/// damaged record fails every time, and a session retrying it every second
/// for hours would fill the log and the blocking pool's time for nothing.
const BACKLOG_RETRY: Duration = Duration::from_secs(1);
const BACKLOG_RETRY_MAX: Duration = Duration::from_secs(60);

/// The wait before the next read after `failures` failed reads in a row.
fn backlog_retry_wait(failures: u32) -> Duration {
    BACKLOG_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(BACKLOG_RETRY_MAX)
}

impl Session {
    /// Sets what a restart restores of an offline durable session: its
    /// protocol level, expiry interval, creation time, the next free queue
    /// key and its owner. Deliveries follow with [`restore_delivery`](Self::restore_delivery).
    pub fn restore(
        &self,
        protocol: ProtocolVersion,
        expiry_interval: u32,
        created_at: u64,
        offline_since: u64,
        next_seq: u64,
        owner: Option<Arc<str>>,
    ) {
        let mut st = self.state.lock();
        st.protocol = protocol;
        st.expiry_interval = expiry_interval;
        st.created_at = created_at;
        st.owner = owner;
        st.offline_since = offline_since;
        st.next_seq = next_seq.max(1);
        st.durable = self.context.persistence.is_some();
    }

    /// Puts back a stored delivery, in queue order: not yet sent ones wait
    /// in `pending`; sent ones are sent again with DUP when the client is
    /// back; those whose PUBREL was sent get their PUBREL again.
    pub fn restore_delivery(&self, mut delivery: Delivery, state: DeliveryState) {
        let mut st = self.state.lock();
        let (packet_id, inflight_state) = match (state, delivery.packet_id) {
            (DeliveryState::AwaitingAck, Some(id)) => (id, InflightState::Resend),
            (DeliveryState::AwaitingComp, Some(id)) => (id, InflightState::Released),
            _ => {
                delivery.packet_id = None;
                push_pending(&mut st, delivery);
                return;
            }
        };
        if st.inflight.position(packet_id).is_some() {
            // Two stored entries with one packet id: send the later one anew.
            delivery.packet_id = None;
            push_pending(&mut st, delivery);
            return;
        }
        delivery.dup = true;
        st.inflight.restore(packet_id, delivery, inflight_state);
    }

    /// Puts back an incoming QoS 2 packet id awaiting PUBREL.
    pub fn restore_incoming_qos2(&self, packet_id: u16) {
        self.state
            .lock()
            .incoming_qos2
            .get_or_insert_with(Box::default)
            .restore(packet_id);
    }

    /// Notes `count` queued, unsent deliveries left in the store, all with
    /// seqs below `end` (see [`Backlog`]).
    pub fn restore_backlog(&self, count: usize, bytes: usize, end: u64) {
        self.state.lock().backlog = Some(Box::new(Backlog {
            after: 0,
            end,
            count,
            bytes,
            reading: false,
            failures: 0,
        }));
    }

    /// Starts reading the next chunk of the backlog off the async threads,
    /// after `delay` (a retry after a failed read).
    pub(super) fn read_backlog(self: &Arc<Self>, after: u64, end: u64, delay: Duration) {
        let Some(p) = &self.context.persistence else {
            return;
        };
        let (session, store) = (Arc::clone(self), Arc::clone(p.store()));
        p.spawn_read(delay, move || {
            // sled panics on some damaged records: a read that panics fails
            // like one that returns an error, so that it is logged and
            // retried instead of leaving the backlog waiting for ever.
            let chunk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::recovery::read_backlog(store.as_ref(), &session, after, end, BACKLOG_CHUNK)
            }))
            .unwrap_or_else(|_| Err(StoreError::Engine("the store panicked reading it".into())));
            session.backlog_read(chunk);
        });
    }

    /// Marks the stored backlog as being read by the caller, who hands the
    /// chunk to [`backlog_read`](Self::backlog_read), and returns the seqs
    /// it spans (after, end). `None` without a backlog, or while a read is
    /// under way already.
    pub(crate) fn begin_backlog_read(&self) -> Option<(u64, u64)> {
        let mut st = self.state.lock();
        let backlog = st.backlog.as_mut().filter(|b| !b.reading)?;
        backlog.reading = true;
        Some((backlog.after, backlog.end))
    }

    /// Puts a chunk read from the backlog at the head of the queue and
    /// fills the window from it.
    pub(crate) fn backlog_read(
        self: &Arc<Self>,
        chunk: Result<crate::recovery::BacklogChunk, StoreError>,
    ) {
        let mut journal = Journal::new();
        {
            let mut st = self.state.lock();
            if st.ended {
                return;
            }
            let Some(backlog) = st.backlog.as_mut() else {
                return;
            };
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    // Still reading: the same chunk again, a moment later
                    // (nothing else would wake a client whose window is
                    // empty). Logged at the 1st, 2nd, 4th, 8th... failure.
                    backlog.failures += 1;
                    let failures = backlog.failures;
                    if failures.is_power_of_two() {
                        tracing::warn!(client_id = %self.client_id, error = %e, failures, "reading a stored queue failed; retrying");
                    }
                    let (after, end) = (backlog.after, backlog.end);
                    self.read_backlog(after, end, backlog_retry_wait(failures));
                    return;
                }
            };
            if std::mem::take(&mut backlog.failures) > 0 {
                tracing::info!(client_id = %self.client_id, "reading a stored queue works again");
            }
            backlog.reading = false;
            backlog.after = backlog.after.max(chunk.last_seq);
            backlog.count = backlog
                .count
                .saturating_sub(chunk.deliveries.len() + chunk.gone.len());
            backlog.bytes = backlog.bytes.saturating_sub(chunk.bytes);
            if chunk.exhausted || backlog.count == 0 {
                st.backlog = None;
            }
            for seq in chunk.gone {
                Metrics::inc(&self.context.metrics.messages_expired);
                journal.push(Op::DeleteQueueEntry {
                    client_id: Arc::clone(&self.client_id),
                    seq,
                });
            }
            for delivery in chunk.deliveries.into_iter().rev() {
                st.pending_bytes += queued_size(&delivery);
                st.pending.push_front(delivery);
            }
            self.fill_window(&mut st, &mut LazyInstant::default(), &mut journal);
        }
        self.commit(journal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_backlog_read_is_retried_ever_more_slowly_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backlog_retry_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backlog_retry_wait(u32::MAX), BACKLOG_RETRY_MAX);
    }
}
