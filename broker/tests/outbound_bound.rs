//! What an outbound queue counts against its connection's bound
//! (`limits.max_client_outbound_bytes`) and the broker's budget
//! (`limits.max_outbound_bytes`) is what its deliveries hold in memory: the
//! message's bytes, its queue slot, and the shared message itself, counted
//! once per message rather than once per subscriber. Checked in process, on
//! sessions whose writer never runs, through `Broker::route`.

mod common;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::attached_subscriber;
use tern::broker::{StagedFanout, MIN_STALL_WAIT_MS};
use tern::budget::HEADER_ALLOWANCE;
use tern::config::LimitsConfig;
use tern::keep_alive::SWEEP_INTERVAL_MS;
use tern::message::{Message, MESSAGE_COST};
use tern::metrics::Metrics;
use tern::persistence::Journal;
use tern::session::{Outbound, Session, WaitingRetained, RETAINED_REFILL_BYTES, WRITE_BATCH_BYTES};
use tern::{Broker, Config};
use tern_codec::QoS;
use tern_router::SubscriptionOptions;

const BOUND: usize = 64 * 1024;

/// A broker whose connections may hold `BOUND` bytes, dropping QoS 0 at the
/// bound at once, with `subscribers` attached sessions subscribed to `t`.
fn broker_with(subscribers: usize) -> (Arc<Broker>, Vec<Arc<Session>>) {
    broker_bounded(subscribers, BOUND)
}

fn broker_bounded(subscribers: usize, bound: usize) -> (Arc<Broker>, Vec<Arc<Session>>) {
    let (broker, attached) = broker_attached(subscribers, bound);
    (broker, attached.into_iter().map(|(s, _)| s).collect())
}

/// The sessions with the id of the connection attached to each.
fn broker_attached(subscribers: usize, bound: usize) -> (Arc<Broker>, Vec<(Arc<Session>, u64)>) {
    let mut config = Config::default();
    config.limits.max_client_outbound_bytes = bound;
    config.limits.max_outbound_bytes = 4 * bound;
    config.limits.queue_full_wait_ms = 0;
    let broker = Broker::new(config);
    let sessions = (0..subscribers)
        .map(|i| attached_subscriber(&broker, &format!("s{i}"), "t"))
        .collect();
    (broker, sessions)
}

fn small_message() -> Arc<Message> {
    Message::new(
        Bytes::from_static(b"t"),
        Bytes::from_static(&[7; 16]),
        QoS::AtMostOnce,
        false,
        Default::default(),
        0,
    )
}

fn route(broker: &Broker, message: &Arc<Message>) {
    let mut journal = Journal::new();
    let _ = broker.route(message, &mut journal);
}

#[test]
fn a_queue_of_small_messages_holds_about_its_bound_in_memory() {
    let (broker, sessions) = broker_with(1);
    let dropped = || Metrics::get(&broker.metrics.messages_dropped_qos0);
    let mut taken = 0;
    while dropped() == 0 {
        route(&broker, &small_message());
        taken += 1;
        assert!(taken < 10_000, "never dropped");
    }
    taken -= 1;
    // Each queued delivery holds its slot and a message of its own.
    let held = std::mem::size_of::<Outbound>() + MESSAGE_COST;
    assert!(
        taken * held <= BOUND + held,
        "{taken} deliveries of {held} bytes each were queued under a bound of {BOUND}"
    );
    assert!(
        taken * held >= BOUND / 2,
        "{taken} deliveries: the bound is overcounted"
    );
    // All of it is released when the writer takes the queue.
    let mut drained = VecDeque::new();
    sessions[0].drain_outbound_any(&mut drained);
    assert_eq!(drained.len(), taken);
    assert_eq!(broker.registry.context().budget.balance(), 0);
}

#[test]
fn a_message_sent_to_many_counts_its_shared_part_once() {
    let subscribers = 10;
    let (broker, sessions) = broker_with(subscribers);
    let message = small_message();
    route(&broker, &message);
    let per_delivery = message.weight() + std::mem::size_of::<Outbound>();
    let queued = broker.registry.context().budget.queued();
    // Each delivery: its bytes and slot (plus a small header allowance);
    // the message itself once.
    assert!(
        queued >= subscribers * per_delivery + MESSAGE_COST,
        "{queued} bytes counted"
    );
    assert!(
        queued < subscribers * (per_delivery + 16) + MESSAGE_COST,
        "{queued} bytes counted: the message once per subscriber?"
    );
    let mut drained = VecDeque::new();
    for s in &sessions {
        s.drain_outbound_any(&mut drained);
    }
    assert_eq!(drained.len(), subscribers);
    assert_eq!(broker.registry.context().budget.balance(), 0);
}

/// Publishes `messages` as one read of a client's connection does: staged,
/// then delivered together.
fn publish_one_read(broker: &Broker, messages: &[Arc<Message>]) {
    let mut journal = Journal::new();
    let mut recent = None;
    let mut staged = StagedFanout::default();
    for m in messages {
        let _ = broker.publish_from_client(m, &mut journal, &mut recent, &mut staged);
    }
    let _ = broker.deliver_staged(&mut staged);
}

#[test]
fn a_read_s_messages_take_one_entry_per_subscriber_and_count_their_shared_part_once() {
    let subscribers = 10;
    let (broker, sessions) = broker_with(subscribers);
    let messages: Vec<_> = (0..8).map(|_| small_message()).collect();
    publish_one_read(&broker, &messages);
    let weight = messages[0].weight() + HEADER_ALLOWANCE;
    let per_subscriber = 8 * weight + std::mem::size_of::<Outbound>();
    let queued = broker.registry.context().budget.queued();
    // Each subscriber: the messages' bytes and headers, one slot; the
    // messages themselves (and the batch that holds them) once.
    assert!(
        queued >= subscribers * per_subscriber + 8 * MESSAGE_COST,
        "{queued} bytes counted"
    );
    assert!(
        queued < subscribers * (per_subscriber + 16) + 8 * (MESSAGE_COST + 16) + 128,
        "{queued} bytes counted: the messages once per subscriber?"
    );
    for s in &sessions {
        let mut drained = VecDeque::new();
        s.drain_outbound_any(&mut drained);
        let [Outbound::Batch(delivery)] = drained.make_contiguous() else {
            panic!("not one batch: {drained:?}");
        };
        let batch = delivery.batch.messages();
        assert_eq!(batch.len(), messages.len());
        assert!(batch.iter().zip(&messages).all(|(a, b)| Arc::ptr_eq(a, b)));
    }
    assert_eq!(broker.registry.context().budget.balance(), 0);
}

#[test]
fn a_read_s_large_messages_go_in_batches_of_at_most_64_kib() {
    let (broker, sessions) = broker_bounded(1, 1 << 20);
    let messages: Vec<_> = (0..8)
        .map(|_| {
            Message::new(
                Bytes::from_static(b"t"),
                Bytes::from(vec![7u8; 20 * 1024]),
                QoS::AtMostOnce,
                false,
                Default::default(),
                0,
            )
        })
        .collect();
    let huge = Message::new(
        Bytes::from_static(b"t"),
        Bytes::from(vec![7u8; StagedFanout::MAX_BATCH_BYTES]),
        QoS::AtMostOnce,
        false,
        Default::default(),
        0,
    );
    let mut read = messages.clone();
    read.push(huge);
    publish_one_read(&broker, &read);
    let mut drained = VecDeque::new();
    sessions[0].drain_outbound_any(&mut drained);
    let sizes: Vec<usize> = drained
        .iter()
        .map(|item| match item {
            Outbound::Batch(d) => d.batch.len(),
            Outbound::Publish(_) => 1,
            other => panic!("{other:?}"),
        })
        .collect();
    // Three messages of 20 KiB fit in a batch, the fourth would not; the
    // last, as large as a batch, goes alone.
    assert_eq!(sizes, [3, 3, 2, 1]);
    let Some(Outbound::Publish(last)) = drained.back() else {
        panic!("the last message is not alone");
    };
    assert!(Arc::ptr_eq(&last.message, &read[8]));
}

#[test]
fn a_full_queue_drops_a_read_s_messages_and_counts_each() {
    let (broker, sessions) = broker_with(1);
    fill_to_the_bound(&broker);
    let dropped = || Metrics::get(&broker.metrics.messages_dropped_qos0);
    let before = dropped();
    let queued = broker.registry.context().budget.queued();
    let messages: Vec<_> = (0..8).map(|_| small_message()).collect();
    publish_one_read(&broker, &messages);
    assert_eq!(dropped(), before + 8);
    assert_eq!(broker.registry.context().budget.queued(), queued);
    let mut drained = VecDeque::new();
    sessions[0].drain_outbound_any(&mut drained);
    assert!(drained.iter().all(|d| matches!(d, Outbound::Publish(_))));
    assert_eq!(broker.registry.context().budget.balance(), 0);
}

/// A queue found stalled replaces what it holds by copies that own their
/// bytes (stall.rs). A batch's copy is that queue's own memory: it counts
/// there, though the original's memory counted in another subscriber's
/// queue. Everything counted is given back once the queues are taken.
#[test]
fn a_stalled_queue_counts_the_copies_of_what_it_holds() {
    let (broker, sessions) = broker_with(2);
    let budget = &broker.registry.context().budget;
    let counted = || budget.queued() + budget.exempt_queued();
    // A batch (whose memory the first subscriber's queue counts), then 15
    // single messages: 16 entries in each queue, where the next one looks
    // at the clock.
    let read: Vec<_> = (0..8).map(|_| small_message()).collect();
    publish_one_read(&broker, &read);
    for _ in 0..15 {
        route(&broker, &small_message());
    }
    // Longer than a queue may hold without being taken from (stall.rs:
    // STALLED_AFTER_MS, 500 ms).
    std::thread::sleep(std::time::Duration::from_millis(700));
    broker.registry.context().clock.advance();
    let before = counted();
    route(&broker, &small_message());
    assert_eq!(Metrics::get(&broker.metrics.queues_stalled), 2);
    let single = read[0].weight() + HEADER_ALLOWANCE + std::mem::size_of::<Outbound>();
    let batch_copy = 8 * (std::mem::size_of::<Arc<Message>>() + MESSAGE_COST);
    let grown = counted() - before;
    assert!(
        grown >= 2 * single + MESSAGE_COST + batch_copy,
        "{grown} bytes more counted: the second queue's copy of the batch is not"
    );
    for s in &sessions {
        let mut drained = VecDeque::new();
        s.drain_outbound_any(&mut drained);
        assert_eq!(drained.len(), 17);
    }
    assert_eq!(budget.exempt_queued(), 0);
    assert_eq!(budget.balance(), 0);
}

#[test]
fn a_writer_takes_at_most_a_batch_and_everything_counts_until_written() {
    let (broker, attached) = broker_attached(1, 4 * WRITE_BATCH_BYTES);
    let (session, connection_id) = &attached[0];
    let budget = &broker.registry.context().budget;
    let message = Message::new(
        Bytes::from_static(b"t"),
        Bytes::from(vec![7u8; 1024]),
        QoS::AtMostOnce,
        false,
        Default::default(),
        0,
    );
    let per_delivery = message.weight() + std::mem::size_of::<Outbound>();
    let count = 3 * WRITE_BATCH_BYTES / per_delivery;
    for _ in 0..count {
        route(&broker, &message);
    }
    let queued = budget.queued();
    assert!(queued >= count * per_delivery, "{queued}");
    // The writer's first batch: at most WRITE_BATCH_BYTES (and the item
    // that crossed it)...
    let mut batch = VecDeque::new();
    assert!(session.drain_outbound(*connection_id, &mut batch));
    let took = batch.len();
    assert!(
        took < count && took * per_delivery <= WRITE_BATCH_BYTES + per_delivery + MESSAGE_COST,
        "took {took} of {count}"
    );
    // ...which, being written, still counts, as does what it left.
    assert_eq!(budget.queued(), queued);
    // Back for more: the first batch was written.
    batch.clear();
    assert!(session.drain_outbound(*connection_id, &mut batch));
    let left = budget.queued();
    assert!(
        left < queued && left >= (count - took) * per_delivery,
        "{left}"
    );
    let mut batches = 2;
    loop {
        batch.clear();
        assert!(session.drain_outbound(*connection_id, &mut batch));
        if batch.is_empty() {
            break;
        }
        batches += 1;
    }
    // Three batches' worth of bytes, and a few header allowances over.
    assert!((3..=4).contains(&batches), "{batches} batches");
    assert_eq!(budget.balance(), 0);
}

/// Fills the queue of `session` to its bound; the budget lets go of it, and
/// `tern_outbound_exempt_bytes` reports it instead.
fn fill_to_the_bound(broker: &Broker) {
    let dropped = || Metrics::get(&broker.metrics.messages_dropped_qos0);
    let before = dropped();
    while dropped() == before {
        route(broker, &small_message());
    }
    let budget = &broker.registry.context().budget;
    assert_eq!(budget.queued(), 0, "an exempt queue counts in the budget");
    let exempt = budget.exempt_queued();
    assert!(
        (BOUND..BOUND + 1024).contains(&exempt),
        "{exempt} bytes reported for a queue at its {BOUND}-byte bound"
    );
}

#[test]
fn a_queue_exempt_from_the_budget_is_still_reported_until_it_is_taken_or_dropped() {
    let (broker, attached) = broker_attached(1, BOUND);
    let (session, connection_id) = &attached[0];
    let budget = &broker.registry.context().budget;

    fill_to_the_bound(&broker);
    // Taken by its writer: counted in the budget again, what is left.
    let mut drained = VecDeque::new();
    session.drain_outbound_any(&mut drained);
    assert_eq!(budget.exempt_queued(), 0);
    assert_eq!(budget.balance(), 0);

    // Dropped with its connection.
    fill_to_the_bound(&broker);
    assert!(session.detach(*connection_id, None));
    assert_eq!(budget.exempt_queued(), 0);
    assert_eq!(budget.balance(), 0);
}

/// A queue a sweep of a broker over its budget finds stalled (its writer
/// took nothing for `queue_full_wait_ms`) stops counting
/// towards the budget with the batch its writer is stuck writing, and both
/// are reported among the exempt bytes until written (the writer comes
/// back for more; what it takes then of the exempt queue stays exempt until
/// written too) or the connection goes.
#[test]
fn a_stalled_writer_s_batch_is_reported_as_exempt_until_written_or_dropped() {
    let (broker, attached) = broker_attached(1, BOUND);
    let (session, connection_id) = &attached[0];
    let budget = &broker.registry.context().budget;
    const WAIT_MS: u64 = 1000;
    let stall = || {
        for _ in 0..10 {
            route(&broker, &small_message());
        }
        let mut batch = VecDeque::new();
        assert!(session.drain_outbound(*connection_id, &mut batch));
        assert!(!batch.is_empty());
        for _ in 0..10 {
            route(&broker, &small_message());
        }
        let held = budget.queued();
        assert!(held > 0);
        // Exempted once the writer has taken nothing for the wait, not
        // before: on the coarse clock, whose steps make a span look up to
        // one step longer than it is, the wait and one step.
        let took_at = broker.registry.context().clock.now_ms();
        let stalled_at = took_at + WAIT_MS + SWEEP_INTERVAL_MS;
        assert!(!session.exempt_if_stalled(stalled_at - 1, WAIT_MS));
        assert_eq!(budget.queued(), held);
        assert!(session.exempt_if_stalled(stalled_at, WAIT_MS));
        assert_eq!(budget.queued(), 0);
        assert_eq!(budget.exempt_queued(), held, "the queue and the batch");
    };

    stall();
    // The writer comes back: it wrote the stuck batch, and takes what was
    // queued behind it, which stays among the exempt bytes while written.
    let mut batch = VecDeque::new();
    assert!(session.drain_outbound(*connection_id, &mut batch));
    assert_eq!(batch.len(), 10, "what was queued behind the batch");
    assert_eq!(budget.queued(), 0);
    let taken = budget.exempt_queued();
    assert!(taken > 0 && taken < 10 * 1024, "{taken}");
    batch.clear();
    assert!(session.drain_outbound(*connection_id, &mut batch));
    assert_eq!(budget.exempt_queued(), 0);
    assert_eq!(budget.balance(), 0);

    stall();
    assert!(session.detach(*connection_id, None));
    assert_eq!(budget.exempt_queued(), 0);
    assert_eq!(budget.balance(), 0);
}

/// The sweep a broker over its budget makes exempts, at its first look,
/// the queue whose writer has taken nothing for the wait, and keeps
/// counting the one whose writer has just taken from it.
#[test]
fn one_sweep_exempts_the_queue_that_took_nothing_for_the_wait() {
    let (broker, attached) = broker_attached(2, BOUND);
    let context = broker.registry.context();
    let budget = &context.budget;
    for _ in 0..10 {
        route(&broker, &small_message());
    }
    // Longer than the wait (`queue_full_wait_ms` 0: the least, 100 ms) and
    // a step of the coarse clock.
    std::thread::sleep(Duration::from_millis(
        MIN_STALL_WAIT_MS + SWEEP_INTERVAL_MS + 100,
    ));
    context.clock.advance();
    // The second subscriber's writer takes its queue, and more comes.
    let (taking, connection_id) = &attached[1];
    let mut batch = VecDeque::new();
    assert!(taking.drain_outbound(*connection_id, &mut batch));
    for _ in 0..10 {
        route(&broker, &small_message());
    }
    assert_eq!(budget.exempt_queued(), 0);
    let counted = budget.queued();

    broker.exempt_stalled_queues();
    let exempt = budget.exempt_queued();
    assert!(exempt > 0, "the stalled queue still counts");
    assert!(
        budget.queued() > 0 && budget.queued() < counted,
        "the queue taken from should still count, alone: {} of {counted}",
        budget.queued()
    );
    assert_eq!(budget.queued() + exempt, counted);
}

/// A retained message waiting for room whose topic gets a newer value: the
/// newer value goes to the subscription live, but a QoS 0 copy that the full
/// queue drops never reaches the client. When room comes, the older value
/// is not sent; the topic's value then is, flagged RETAIN, in its place.
#[test]
fn a_waiting_retained_message_replaced_by_a_dropped_one_is_still_offered() {
    let (broker, attached) = broker_attached(1, BOUND);
    let (session, connection_id) = &attached[0];
    let dropped = || Metrics::get(&broker.metrics.messages_dropped_qos0);
    let retained = |payload: &'static [u8]| {
        Message::new(
            Bytes::from_static(b"t"),
            Bytes::from_static(payload),
            QoS::AtMostOnce,
            true,
            Default::default(),
            0,
        )
    };
    // The queue at its bound.
    let before = dropped();
    while dropped() == before {
        route(&broker, &small_message());
    }
    // A SUBSCRIBE found the old value: it waits for room.
    let old = retained(b"old");
    broker.insert_retained("t", Arc::clone(&old));
    let mut journal = Journal::new();
    let found = WaitingRetained {
        message: Arc::clone(&old),
        options: SubscriptionOptions {
            qos: 1,
            ..Default::default()
        },
    };
    session.offer_retained(vec![found], &mut journal);
    assert_eq!(session.retained_waiting(), 1);
    // The new value, retained, then routed live: the full queue drops it.
    let new = retained(b"new");
    broker.insert_retained("t", Arc::clone(&new));
    let before = dropped();
    route(&broker, &new);
    assert_eq!(dropped(), before + 1, "the live copy is dropped");
    // The writer takes what was queued, and room comes.
    let mut sent = Vec::new();
    loop {
        let mut batch = VecDeque::new();
        assert!(session.drain_outbound(*connection_id, &mut batch));
        if batch.is_empty() {
            break;
        }
        for item in batch {
            if let Outbound::Publish(d) = item {
                sent.push(d);
            }
        }
    }
    let last = sent.last().expect("deliveries were sent");
    assert!(Arc::ptr_eq(&last.message, &new), "the topic's value now");
    assert!(last.retain, "flagged RETAIN");
    assert!(sent.iter().all(|d| !Arc::ptr_eq(&d.message, &old)));
    assert_eq!(session.retained_waiting(), 0);
}

/// However many retained messages its SUBSCRIBEs find, a session keeps at
/// most `max_pending_retained` of them waiting for room: the rest are
/// dropped, and counted.
#[test]
fn a_session_keeps_at_most_max_pending_retained_waiting() {
    let broker = broker_for_retained(|limits| limits.max_pending_retained = 10);
    let (session, _) = attached_subscriber(&broker, "s", "t");
    // The queue at its bound: what is offered waits.
    route_until_each_drops(&broker, 1);
    let full = || Metrics::get(&broker.metrics.messages_dropped_queue_full);
    let before = full();
    let mut journal = Journal::new();
    session.offer_retained(found_retained(6), &mut journal);
    assert_eq!(session.retained_waiting(), 6);
    session.offer_retained(found_retained(6), &mut journal);
    assert_eq!(session.retained_waiting(), 10);
    assert_eq!(full() - before, 2, "the two beyond the bound are counted");
}

/// A broker whose connections may hold `BOUND` bytes, dropping QoS 0 at
/// the bound at once, with `limits` changed further.
fn broker_for_retained(limits: impl FnOnce(&mut LimitsConfig)) -> Arc<Broker> {
    let mut config = Config::default();
    config.limits.max_client_outbound_bytes = BOUND;
    config.limits.queue_full_wait_ms = 0;
    limits(&mut config.limits);
    Broker::new(config)
}

/// Routes small messages to `t` until one is dropped by each of its
/// `subscribers`: their queues are then all at their bound.
fn route_until_each_drops(broker: &Broker, subscribers: u64) {
    let dropped = || Metrics::get(&broker.metrics.messages_dropped_qos0);
    for _ in 0..100_000 {
        let before = dropped();
        route(broker, &small_message());
        if dropped() - before == subscribers {
            return;
        }
    }
    panic!("the queues never reached their bound");
}

/// `n` retained messages as a SUBSCRIBE finds them.
fn found_retained(n: usize) -> Vec<WaitingRetained> {
    (0..n)
        .map(|_| WaitingRetained {
            message: small_message(),
            options: SubscriptionOptions::default(),
        })
        .collect()
}

/// All sessions together keep at most `limits.max_waiting_retained`
/// retained messages waiting: those beyond it are dropped and counted,
/// those a session's queues take at once never count, and a client that
/// leaves gives back what its session held.
#[test]
fn sessions_together_keep_at_most_max_waiting_retained_waiting() {
    let broker = broker_for_retained(|limits| limits.max_waiting_retained = 10);
    let (fresh, _) = attached_subscriber(&broker, "fresh", "elsewhere");
    let (first, first_connection) = attached_subscriber(&broker, "first", "t");
    let (second, _) = attached_subscriber(&broker, "second", "t");
    // Both queues at their bound: what is offered them waits.
    route_until_each_drops(&broker, 2);
    let waiting = || broker.registry.context().waiting_retained.waiting();
    let refused = || Metrics::get(&broker.metrics.retained_waiting_refused);
    let full = || Metrics::get(&broker.metrics.messages_dropped_queue_full);
    let mut journal = Journal::new();
    first.offer_retained(found_retained(6), &mut journal);
    second.offer_retained(found_retained(6), &mut journal);
    assert_eq!(
        (first.retained_waiting(), second.retained_waiting()),
        (6, 4)
    );
    assert_eq!(waiting(), 10);
    assert_eq!((refused(), full()), (2, 2), "the two beyond the bound");
    // A session whose queues have room takes its messages all the same.
    fresh.offer_retained(found_retained(3), &mut journal);
    let mut sent = VecDeque::new();
    fresh.drain_outbound_any(&mut sent);
    let deliveries = sent
        .iter()
        .filter(|o| matches!(o, Outbound::Publish(_)))
        .count();
    assert_eq!((deliveries, fresh.retained_waiting()), (3, 0));
    assert_eq!((refused(), waiting()), (2, 10));
    // The first client leaves: its six go, and make room for six more.
    assert!(first.detach(first_connection, None));
    assert_eq!(waiting(), 4);
    second.offer_retained(found_retained(7), &mut journal);
    assert_eq!((second.retained_waiting(), waiting()), (10, 10));
    assert_eq!(refused(), 3);
}

/// Retained messages that wait for room move into the connection's queue
/// only while it holds less than `RETAINED_REFILL_BYTES`, however large its
/// bound: a client that does not read holds little of the broker's budget.
/// Each time the writer takes from the queue, the next follow, in the
/// order found, until every one has been sent.
#[test]
fn waiting_retained_messages_fill_a_connection_s_queue_only_to_the_refill_mark() {
    let broker = broker_for_retained(|limits| {
        limits.max_client_outbound_bytes = 4 * 1024 * 1024;
        limits.max_outbound_bytes = 64 * 1024 * 1024;
    });
    let (session, connection_id) = attached_subscriber(&broker, "s", "t");
    let budget = &broker.registry.context().budget;
    const FOUND: u32 = 5000;
    let found = (0..FOUND)
        .map(|i| WaitingRetained {
            message: Message::new(
                Bytes::from_static(b"t"),
                Bytes::copy_from_slice(&i.to_be_bytes()),
                QoS::AtMostOnce,
                true,
                Default::default(),
                0,
            ),
            options: SubscriptionOptions::default(),
        })
        .collect();
    let mut journal = Journal::new();
    session.offer_retained(found, &mut journal);
    // One message beyond the mark at most: each counts under 256 bytes.
    let one = 256;
    let staged = budget.queued();
    assert!(
        (RETAINED_REFILL_BYTES..RETAINED_REFILL_BYTES + one).contains(&staged),
        "staged {staged} bytes"
    );
    assert!(session.retained_waiting() > 0);
    let mut sent = Vec::new();
    let mut writes = 0;
    loop {
        let mut out = VecDeque::new();
        assert!(session.drain_outbound(connection_id, &mut out));
        if out.is_empty() {
            break;
        }
        writes += 1;
        for item in out {
            if let Outbound::Publish(delivery) = item {
                sent.push(u32::from_be_bytes(
                    delivery.message.payload[..].try_into().unwrap(),
                ));
            }
        }
        // The batch the writer took (counted until it comes back) and the
        // queue refilled behind it.
        assert!(budget.queued() < 2 * (RETAINED_REFILL_BYTES + one));
    }
    assert_eq!(sent, (0..FOUND).collect::<Vec<_>>());
    assert!(writes > 10, "{writes} batches");
    assert_eq!(session.retained_waiting(), 0);
}

/// Retained messages found for a client that left before its SUBACK went
/// out (a persistent session's SUBACK waits for the store): the QoS 1 one
/// is queued in its session like any delivery to an offline client, the
/// QoS 0 one is not kept.
#[test]
fn retained_messages_found_for_a_client_that_left_are_queued_at_qos_1_only() {
    let (_broker, attached) = broker_attached(1, BOUND);
    let (session, connection_id) = &attached[0];
    assert!(session.detach(*connection_id, None));
    let retained = |qos| WaitingRetained {
        message: Message::new(
            Bytes::from_static(b"t"),
            Bytes::from_static(b"kept"),
            qos,
            true,
            Default::default(),
            0,
        ),
        options: SubscriptionOptions {
            qos: 1,
            ..Default::default()
        },
    };
    let mut journal = Journal::new();
    session.offer_retained(
        vec![retained(QoS::AtMostOnce), retained(QoS::AtLeastOnce)],
        &mut journal,
    );
    assert_eq!(session.queued_len(), (1, 0), "the QoS 1 one waits");
    assert_eq!(session.retained_waiting(), 0);
}
