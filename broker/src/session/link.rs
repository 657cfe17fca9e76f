//! The attachment of a live connection to its session: the signals its
//! reader and writer share ([`ConnectionControl`]), the outbound queue the
//! writer drains (`Link`, with what it counts against the connection's
//! bound and the broker's budget), and the session side of a drain.

use super::*;

/// Signals shared by a connection's reader, its writer and whoever needs to
/// close it (a takeover, shutdown).
#[derive(Debug, Default)]
pub struct ConnectionControl {
    /// Woken when the outbound queue has something new.
    pub wake_writer: Signal,
    /// Woken when the connection must close.
    pub wake_reader: Signal,
    /// Woken each time the writer takes the queue.
    pub drained: Signal,
    /// Set once the connection is closing; the reason goes in the final
    /// DISCONNECT for MQTT 5 clients.
    closing: AtomicBool,
    close_reason: Mutex<Option<ReasonCode>>,
    /// Set with `closing` when the client is sent nothing more but its
    /// DISCONNECT (see [`close_withholding`](Self::close_withholding)).
    withholding: AtomicBool,
    /// Set once the reader has stopped: everything it received has been
    /// handled (a takeover waits for this, see `SessionRegistry::take_over`).
    reader_finished: AtomicBool,
    /// When a read last decoded a packet, on the keep alive clock (see
    /// keep_alive.rs).
    last_packet_ms: AtomicU64,
    /// The reader holds an incomplete packet (see keep_alive.rs).
    incomplete: AtomicBool,
    /// Acknowledgements the reader has decided that wait for the store
    /// (`Connection::acknowledge_then`). A closing writer waits for them
    /// (within the close grace): a PUBACK or PUBCOMP whose effect is
    /// durable must reach the client, or after a restart it is told 0x92
    /// for a flow the broker completed.
    acks_awaiting_store: AtomicUsize,
}

impl ConnectionControl {
    /// An acknowledgement now waits for the store.
    pub fn ack_awaits_store(&self) {
        self.acks_awaiting_store.fetch_add(1, Ordering::AcqRel);
    }

    /// An acknowledgement that waited for the store was queued (or its
    /// refusal was): after the last, a closing writer may finish.
    pub fn ack_released(&self) {
        if self.acks_awaiting_store.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_writer.raise();
        }
    }

    /// Acknowledgements waiting for the store now.
    pub fn acks_awaiting_store(&self) -> usize {
        self.acks_awaiting_store.load(Ordering::Acquire)
    }

    /// Asks the connection to close; the first reason given wins. True for
    /// that first call.
    pub fn close(&self, reason: Option<ReasonCode>) -> bool {
        let first = {
            let mut r = self.close_reason.lock();
            let first = !self.closing.swap(true, Ordering::AcqRel);
            if first {
                *r = reason;
            }
            first
        };
        self.wake_reader.raise();
        self.wake_writer.raise();
        first
    }

    /// Closes the connection of a client whose credentials are no longer
    /// accepted: its writer stops taking what is queued for it and sends
    /// only the DISCONNECT (MQTT 5). What was queued stays with the session
    /// (QoS 1 and 2 go out again if its user resumes it; QoS 0 is dropped
    /// with the connection). A batch the writer is in the middle of writing
    /// is finished. Takes effect whatever reason a close gave before.
    pub fn close_withholding(&self, reason: ReasonCode) {
        self.withholding.store(true, Ordering::Release);
        self.close(Some(reason));
    }

    /// True once [`close_withholding`](Self::close_withholding) was called.
    pub fn is_withholding(&self) -> bool {
        self.withholding.load(Ordering::Acquire)
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The reason given to [`close`](Self::close).
    pub fn close_reason(&self) -> Option<ReasonCode> {
        *self.close_reason.lock()
    }

    /// Stamps the arrival of a packet (keep alive).
    pub fn packet_received(&self, now_ms: u64) {
        self.last_packet_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Records whether what the reader has read ends in an incomplete
    /// packet. A stretch of incomplete reads is timed from its start at the
    /// latest, not from a packet the client sent long before.
    pub fn set_incomplete(&self, incomplete: bool, now_ms: u64) {
        if incomplete {
            self.packet_received(now_ms);
        }
        self.incomplete.store(incomplete, Ordering::Relaxed);
    }

    /// See [`set_incomplete`](Self::set_incomplete).
    pub fn is_incomplete(&self) -> bool {
        self.incomplete.load(Ordering::Relaxed)
    }

    /// The last stamp of [`packet_received`](Self::packet_received).
    pub fn last_packet_ms(&self) -> u64 {
        self.last_packet_ms.load(Ordering::Relaxed)
    }

    /// Records that the reader has stopped (see `SessionRegistry::reader_finished`,
    /// which also wakes whoever waits for it).
    pub fn mark_reader_finished(&self) {
        // SeqCst: see `SessionRegistry::reader_finished`.
        self.reader_finished.store(true, Ordering::SeqCst);
    }

    /// True once [`mark_reader_finished`](Self::mark_reader_finished) was called.
    pub fn is_reader_finished(&self) -> bool {
        self.reader_finished.load(Ordering::SeqCst)
    }
}

/// The attachment of a live connection to a session.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) connection_id: u64,
    pub(super) control: Arc<ConnectionControl>,
    pub(super) outbound: VecDeque<Outbound>,
    /// Bytes of PUBLISHes in `outbound` (the connection's bound applies to
    /// them), charged to the broker's budget unless `exempt`: the sum of
    /// their [`queued_cost`], as `push_publish` added it.
    pub(super) charged: usize,
    /// Set once `charged` reached the connection's bound: its bytes no
    /// longer count against the broker-wide budget, since the bound limits
    /// them already. Otherwise a few subscribers that stop reading would
    /// fill the budget with queues that never drain, and the broker would
    /// stop reading from every client for as long as they stay connected.
    /// Cleared when the writer takes from the queue (what is left then
    /// counts again).
    pub(super) exempt: bool,
    /// Budget bytes of the batch the writer took last: it may still be
    /// writing them. Released when it comes back for the next batch (having
    /// written this one) or with the link; exempted from the budget, like
    /// the queue, when a sweep finds it stalled (`writing_exempt`).
    pub(super) writing: usize,
    /// `writing` no longer counts against the budget but among the exempt
    /// bytes: a sweep found the writer stuck with it.
    pub(super) writing_exempt: bool,
    /// Items of `outbound` that are not PUBLISH (acks, PINGRESP ...).
    pub(super) controls: usize,
    /// Whether the writer still takes the PUBLISHes queued (stall.rs), and
    /// since when it took nothing (see [`Session::exempt_if_stalled`]).
    pub(super) stall: StallWatch,
    pub(super) budget: Arc<OutboundBudget>,
    /// How its client was let in (`AttachParams::login`).
    pub(super) login: Login,
}

impl Link {
    /// Queues a PUBLISH; `bound` is the connection's outbound bound
    /// (`max_client_outbound_bytes`).
    pub(super) fn push_publish(&mut self, mut delivery: Delivery, bound: usize) {
        delivery.carries_message_cost = delivery.message.claim_cost();
        let size = queued_cost(&delivery);
        self.push_charged(Outbound::Publish(delivery), size, bound);
    }

    /// [`push_publish`](Self::push_publish) for a batch.
    pub(super) fn push_batch(&mut self, mut delivery: BatchDelivery, bound: usize) {
        delivery.carries_cost = delivery.batch.claim_cost();
        let size = queued_batch_cost(&delivery);
        self.push_charged(Outbound::Batch(delivery), size, bound);
    }

    /// Queues a PUBLISH or a batch that counts `size` bytes against the
    /// connection's `bound` and the broker's budget.
    fn push_charged(&mut self, item: Outbound, size: usize, bound: usize) {
        self.charge(size, bound);
        self.push(item);
    }

    /// Counts `size` more bytes of what the queue holds against the
    /// connection's `bound` and the broker's budget.
    pub(super) fn charge(&mut self, size: usize, bound: usize) {
        self.charged += size;
        if self.exempt {
            self.budget.add_exempt(size);
        } else {
            crate::wake_batch::charge(&self.budget, size);
            if self.charged >= bound {
                // Charges deferred to the end of the read are released here
                // too: the budget is signed, the two cancel out.
                self.exempt = true;
                self.budget.release(self.charged);
                self.budget.add_exempt(self.charged);
            }
        }
    }

    /// Releases the batch the writer took last (see `writing`): written, or
    /// gone with the link.
    fn release_writing(&mut self) {
        release(&self.budget, &mut self.writing, &mut self.writing_exempt);
    }

    /// Releases what `charged` holds of the broker's budget.
    fn release_charged(&mut self) {
        release(&self.budget, &mut self.charged, &mut self.exempt);
    }

    /// What a PUBLISH queued now waits behind (stall.rs): acks and
    /// PINGRESPs pin no read buffer, so only PUBLISHes count.
    #[inline]
    pub(super) fn publish_waits(&mut self, clock: &CoarseClock) -> Waiting {
        let ahead = self.outbound.len() - self.controls;
        self.stall.queued(ahead, || clock.now_ms())
    }

    /// Queues an item, waking the writer only when the queue was empty: the
    /// writer takes the whole queue each time it runs, so one wake-up per
    /// batch is enough (and a wake-up costs more than the push). Inside a
    /// [`WakeBatch`](crate::wake_batch::WakeBatch) the wake-up waits for
    /// the end of the publisher's read.
    pub(super) fn push(&mut self, item: Outbound) {
        if !matches!(item, Outbound::Publish(_) | Outbound::Batch(_)) {
            self.controls += 1;
        }
        let was_empty = self.outbound.is_empty();
        self.outbound.push_back(item);
        crate::wake_batch::queued(&self.control, was_empty);
    }

    /// Hands the queue to the writer, at most [`WRITE_BATCH_BYTES`] of
    /// PUBLISHes at a time: by swapping it with the writer's empty one when
    /// it all fits (no copying; the two allocations take turns), else item
    /// by item. What the writer took stops counting against the
    /// connection's bound but stays charged to the broker's budget, as
    /// `writing`, until the writer comes back for more (it has written the
    /// batch then) or the link ends. What it left still counts.
    /// Returns the bytes of PUBLISHes it took.
    fn drain_into(&mut self, out: &mut VecDeque<Outbound>, now_ms: u64) -> usize {
        self.stall.taken(now_ms);
        self.release_writing();
        let taken = if self.charged <= WRITE_BATCH_BYTES {
            if out.is_empty() {
                std::mem::swap(&mut self.outbound, out);
            } else {
                out.extend(self.outbound.drain(..));
            }
            self.controls = 0;
            self.charged
        } else {
            let mut taken = 0;
            while taken < WRITE_BATCH_BYTES {
                let Some(item) = self.outbound.pop_front() else {
                    break;
                };
                match item.publish_cost() {
                    Some(cost) => taken += cost,
                    None => self.controls -= 1,
                }
                out.push_back(item);
            }
            taken
        };
        self.charged -= taken;
        self.writing = taken;
        if self.exempt {
            self.budget.remove_exempt(self.charged);
            // The writer takes from it again: not stalled, and what is left
            // counts again (a queue back at its bound is exempted by its
            // next push). What it took was released from the budget when it
            // was exempted: it stays among the exempt bytes until written.
            self.exempt = false;
            self.writing_exempt = true;
            self.budget.charge(self.charged);
        }
        self.control.drained.raise();
        taken
    }
}

/// Takes `bytes` out of the broker's budget, or out of its exempt bytes if
/// `exempt`, and clears both.
pub(super) fn release(budget: &OutboundBudget, bytes: &mut usize, exempt: &mut bool) {
    let bytes = std::mem::take(bytes);
    if std::mem::take(exempt) {
        budget.remove_exempt(bytes);
    } else {
        budget.release(bytes);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // A detached or replaced connection's queue is dropped with it. Its
        // writer's batch stops counting now, though the writer may hold it
        // until its last write ends (at most the close grace).
        self.release_charged();
        self.release_writing();
    }
}

/// Bytes of PUBLISHes (as `Link::charged` counts them) a writer takes from
/// its queue at a time. What it took no longer counts against the
/// connection's bound or the broker's budget while it is encoded and
/// written, so one batch is what a connection may hold beyond them: a
/// quarter of the 4 MiB default bound. (Taking everything let a slow TLS
/// subscriber hold its bound twice over; 256 KiB measured slower in the
/// 1 -> 100 fan-out, where subscribers' queues often hold more.)
pub const WRITE_BATCH_BYTES: usize = 1024 * 1024;

impl Session {
    /// Moves what is queued for `connection_id` into `out`, a batch of at
    /// most [`WRITE_BATCH_BYTES`] of PUBLISHes, which count against the
    /// broker's budget until the writer calls again (see `Link::writing`).
    /// Returns false when that connection is no longer attached (taken over
    /// or detached).
    pub fn drain_outbound(
        self: &Arc<Self>,
        connection_id: u64,
        out: &mut VecDeque<Outbound>,
    ) -> bool {
        let mut journal = Journal::new();
        let attached = {
            let mut st = self.state.lock();
            match &mut st.link {
                Some(link) if link.connection_id == connection_id => {
                    let mut now = LazyInstant::default();
                    if link.drain_into(out, self.context.clock.now_ms()) > 0
                        && st.overflow.is_some()
                    {
                        // The writer wrote its last batch and came back for
                        // PUBLISHes: the client is reading.
                        self.note_progress(&mut st, now.get());
                    }
                    // The queue has room again: messages that waited for
                    // it may go now.
                    self.fill_window(&mut st, &mut now, &mut journal);
                    true
                }
                _ => false,
            }
        };
        self.commit(journal);
        attached
    }

    /// Moves a batch queued for whichever connection is attached into
    /// `out`, as if written at once (for inspection and tests; the writer
    /// uses [`drain_outbound`](Self::drain_outbound)).
    pub fn drain_outbound_any(&self, out: &mut VecDeque<Outbound>) {
        let mut st = self.state.lock();
        if let Some(link) = &mut st.link {
            link.drain_into(out, self.context.clock.now_ms());
            link.release_writing();
        }
    }

    /// Replies queued for `connection_id` and not yet taken by its writer.
    pub fn control_backlog(&self, connection_id: u64) -> usize {
        match &self.state.lock().link {
            Some(link) if link.connection_id == connection_id => link.controls,
            _ => 0,
        }
    }

    /// Replies queued for whichever connection is attached (for inspection).
    pub fn attached_control_backlog(&self) -> usize {
        self.state.lock().link.as_ref().map_or(0, |l| l.controls)
    }

    /// Number of messages waiting in this session: (queued, in flight).
    /// Queued counts a stored backlog not read yet.
    pub fn queued_len(&self) -> (usize, usize) {
        let st = self.state.lock();
        let backlog = st.backlog.as_ref().map_or(0, |b| b.count);
        (st.pending.len() + backlog, st.inflight.len())
    }

    /// Queued deliveries still only in the store after a restart (for
    /// inspection; see [`Backlog`]).
    pub fn stored_backlog(&self) -> usize {
        self.state.lock().backlog.as_ref().map_or(0, |b| b.count)
    }
}
