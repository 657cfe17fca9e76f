//! Retained messages: storing, replacing and clearing them (in memory and,
//! with a store, durably), their limits, and their expiry (a sweep that
//! runs when the earliest is due, [`expire_retained_when_due`]).

use super::*;

/// Least time between two sweeps of expired retained messages (see
/// `Broker::expire_retained`): a sweep visits every retained message (up to
/// `max_retained_messages`, under the store's read lock), so it runs only
/// when one is due, or when the store is at its limits.
pub const RETAINED_SWEEP_EVERY_MS: u64 = 1000;

/// Retained messages a periodic sweep may visit per second, on average: the
/// least time between two sweeps grows with the store (1M retained
/// messages, one sweep per 10 s at most), so that messages expiring at
/// every moment cannot keep a core busy scanning. An expired message is
/// never delivered; the sweep only frees its place.
const RETAINED_SWEEP_VISITS_PER_S: u64 = 100_000;

/// Wildcard SUBSCRIBEs over a large retained store that may walk it at
/// once, for each two cores (at least one): each walk takes a thread for
/// its ~23 ms per 100,000 messages (`connection/subscribe.rs`), and a
/// hundred at once on two cores took the workers' CPU from every other
/// client for over a second (docs/performance.md). A SUBSCRIBE beyond it
/// waits for another's walk to end, its connection reading nothing
/// meanwhile; the others' clients are served.
const CORES_PER_RETAINED_WALK: usize = 2;

/// How many walks [`CORES_PER_RETAINED_WALK`] allows on this machine.
pub(super) fn retained_walks_at_once() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / CORES_PER_RETAINED_WALK).max(1)
}

/// Removes expired retained messages as they fall due (see
/// [`Broker::expire_retained`]), until the task is aborted (at shutdown).
/// The sweep visits every retained message: it runs on the blocking pool,
/// not on a worker that connections need.
pub async fn expire_retained_when_due(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(RETAINED_SWEEP_EVERY_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if broker.retained_expiry_due() {
            let broker = Arc::clone(&broker);
            // A sweep that panicked is logged by the runtime; the next tick
            // tries again.
            let _ = tokio::task::spawn_blocking(move || broker.expire_retained()).await;
        }
    }
}

impl Broker {
    /// Counts a received message and, if it has the RETAIN flag, stores it
    /// as (or removes) the topic's retained message. Topics beginning with
    /// `$` are the broker's own (`retain_system`): never retained here (no
    /// client or will may publish there; this keeps the `$SYS` accounting
    /// out of reach whatever calls it).
    pub(super) fn retain(&self, message: &Arc<Message>, journal: &mut Journal) {
        Metrics::inc(&self.metrics.messages_received);
        if !message.retain {
            return;
        }
        let topic = message.topic_str();
        if topic.starts_with('$') {
            return;
        }
        let fits = message.payload.is_empty()
            || self.retained_fits(topic, message)
            || (self.sweep_expired_retained(journal) && self.retained_fits(topic, message));
        let over_limit = !fits;
        if over_limit {
            Metrics::inc(&self.metrics.retained_refused);
            tracing::debug!(
                topic,
                "not retained: limits.max_retained_messages or max_retained_bytes reached"
            );
        }
        // The change in memory and in the store, in one step per topic
        // (retained_order.rs); `journal`, the publisher's, reports a failure
        // to store it.
        let _in_order = self.retained_order.lock(topic);
        let mut change = Journal::new();
        if message.payload.is_empty() || over_limit {
            // Cleared, or (over a limit) not replaced by a newer value it
            // could not store: an older value must not be served as current.
            if let Some(old) = self.retained.remove(topic) {
                old.supersede();
                self.retained_bytes
                    .fetch_sub(retained_cost(&old), Ordering::Relaxed);
            }
            if self.persistence.is_some() {
                change.push(tern_storage::Op::DeleteRetained {
                    topic: topic.to_owned(),
                });
            }
        } else {
            if let Some(p) = &self.persistence {
                let message_id = change.reference(p, message);
                change.push(tern_storage::Op::PutRetained(
                    tern_storage::RetainedRecord {
                        topic: topic.to_owned(),
                        message_id,
                    },
                ));
            }
            // Compacted (after `reference`, so the copy keeps the store id):
            // the retained message outlives the read buffer it arrived in.
            self.insert_retained(topic, message.compacted());
        }
        if let Some(p) = &self.persistence {
            journal.depend_on(p.commit_tracked(change));
        }
    }

    /// Stores `message` as the retained message of `topic`, keeping the
    /// byte total (recovery uses it too, without the limits: a store holds
    /// what an earlier configuration allowed).
    pub fn insert_retained(&self, topic: &str, message: Arc<Message>) {
        let expires_at = message.expires_at;
        self.retained_bytes
            .fetch_add(retained_cost(&message), Ordering::Relaxed);
        if let Some(old) = self.retained.insert(topic, message) {
            old.supersede();
            self.retained_bytes
                .fetch_sub(retained_cost(&old), Ordering::Relaxed);
        }
        // After the insert: a sweep that began before it either sees the
        // message or reset the due time before this note.
        if let Some(at) = expires_at {
            self.note_retained_expiry(at);
        }
    }

    /// Removes the expired retained messages if one is due to expire (they
    /// are never delivered, but hold their place under the limits and in
    /// the store until removed). Called every [`RETAINED_SWEEP_EVERY_MS`];
    /// sweeps at most once per that, or per [`RETAINED_SWEEP_VISITS_PER_S`]
    /// of retained messages if longer. Returns how many it removed.
    pub fn expire_retained(&self) -> usize {
        if !self.retained_expiry_due() {
            return 0;
        }
        let count = self.retained.len() as u64;
        let period_ms = RETAINED_SWEEP_EVERY_MS.max(count * 1000 / RETAINED_SWEEP_VISITS_PER_S);
        if !claim_turn(
            &self.last_retained_sweep_ms,
            self.keep_alive.now_ms(),
            period_ms,
        ) {
            return 0;
        }
        let mut journal = Journal::new();
        let removed = self.remove_expired_retained(&mut journal);
        self.commit(journal);
        if removed > 0 {
            tracing::debug!(removed, "expired retained messages removed");
        }
        removed
    }

    /// Removes the expired retained messages for a retained message that
    /// finds the store at its limits, at most once per
    /// [`RETAINED_SWEEP_EVERY_MS`]. Returns whether it removed any.
    fn sweep_expired_retained(&self, journal: &mut Journal) -> bool {
        let now_ms = self.keep_alive.now_ms();
        if !claim_turn(
            &self.last_retained_sweep_ms,
            now_ms,
            RETAINED_SWEEP_EVERY_MS,
        ) {
            return false;
        }
        self.remove_expired_retained(journal) > 0
    }

    /// The sweep: removes every expired retained message (and, with a
    /// store, its record), and notes when the next one expires.
    fn remove_expired_retained(&self, journal: &mut Journal) -> usize {
        let now = Instant::now();
        // Taken before the scan: a message retained during it either is
        // seen by it or notes its own expiry after this.
        self.retained_expiry.lock().take();
        let mut next: Option<Instant> = None;
        let removed = self.retained.retain(|_, m| match m.expires_at {
            Some(at) if now >= at => false,
            Some(at) => {
                next = Some(next.map_or(at, |n| n.min(at)));
                true
            }
            None => true,
        });
        if let Some(at) = next {
            self.note_retained_expiry(at);
        }
        let freed: usize = removed.iter().map(|(_, m)| retained_cost(m)).sum();
        self.retained_bytes.fetch_sub(freed, Ordering::Relaxed);
        if self.persistence.is_some() {
            for (topic, m) in &removed {
                // Only the record of this message: a newer one the topic's
                // publisher submitted before this journal must stay.
                if let Some(&message_id) = m.store_id.get() {
                    journal.push(tern_storage::Op::ExpireRetained {
                        topic: topic.to_string(),
                        message_id,
                    });
                }
            }
        }
        removed.len()
    }

    /// Whether a retained message has expired since the last sweep.
    pub fn retained_expiry_due(&self) -> bool {
        self.retained_expiry
            .lock()
            .is_some_and(|at| Instant::now() >= at)
    }

    /// A retained message expires at `at`: the next sweep is due by then.
    fn note_retained_expiry(&self, at: Instant) {
        let mut due = self.retained_expiry.lock();
        *due = Some(due.map_or(at, |d| d.min(at)));
    }

    /// Whether `message` may become `topic`'s retained message within
    /// `limits.max_retained_messages` and `max_retained_bytes` (checked
    /// without a lock: concurrent publishers may pass them by a few).
    fn retained_fits(&self, topic: &str, message: &Message) -> bool {
        let limits = &self.config.limits;
        let old = self.retained.get(topic);
        let others = self
            .retained_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(old.as_deref().map_or(0, retained_cost));
        let count_ok = old.is_some() || self.retained_count() < limits.max_retained_messages;
        count_ok && others + retained_cost(message) <= limits.max_retained_bytes
    }
}

/// What a retained message counts against `limits.max_retained_bytes`:
/// what it holds in memory, at most. Its bytes (topic, payload and
/// properties), the shared message, and the store's entry and nodes for its
/// topic (`RetainedStore::entry_cost`), so that a limit in bytes bounds the
/// memory of deep topics too: a 128-level topic costs the store some 6 KB
/// beside its bytes.
fn retained_cost(message: &Message) -> usize {
    message.weight()
        + crate::message::MESSAGE_COST
        + RetainedStore::<Arc<Message>>::entry_cost(message.topic_str())
}
