//! Reference counting against a model: random operation sequences, cut
//! into random windows (`Store::apply_all`), applied to both stores; after
//! every window the stored messages, their counts and the count keys must
//! be what the model says.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use common::{entry, raw_sled, retained};
use tern_storage::{Batch, MemoryStore, MessageRecord, Op, SledStore, Store};

const IDS: u64 = 8;
const CLIENTS: [&str; 3] = ["a", "b", "c"];
const SEQS: u64 = 4;
const TOPICS: u8 = 3;

/// A record whose bytes depend on `variant`: a put of a stored id with
/// other bytes must leave the stored record as it is.
fn record(id: u64, variant: u8) -> MessageRecord {
    MessageRecord {
        id,
        topic: Bytes::from(format!("m/{id}")),
        payload: Bytes::from(vec![variant; 1 + usize::from(variant)]),
        qos: 1,
        retain: false,
        properties: Bytes::new(),
        expires_at: None,
    }
}

#[derive(Clone, Default, Debug)]
struct Model {
    messages: BTreeMap<u64, MessageRecord>,
    queue: BTreeMap<(usize, u64), u64>,
    retained: BTreeMap<u8, u64>,
    /// Messages with a count key of 1 a version 5 store left (untouched).
    legacy: BTreeSet<u64>,
    committed: bool,
}

impl Model {
    fn refs(&self, id: u64) -> u32 {
        (self.queue.values().filter(|&&m| m == id).count()
            + self.retained.values().filter(|&&m| m == id).count()) as u32
    }

    /// Applies one window; `None` when the store must refuse it (a
    /// reference to a message neither stored nor put earlier).
    fn window(&self, ops: &[Op]) -> Option<Model> {
        let mut m = self.clone();
        let mut put: BTreeMap<u64, MessageRecord> = BTreeMap::new();
        let mut touched = BTreeSet::new();
        let available = |put: &BTreeMap<u64, MessageRecord>, id: u64| {
            self.messages.contains_key(&id) || put.contains_key(&id)
        };
        for op in ops {
            match op {
                Op::PutMessage(r) => {
                    if !self.messages.contains_key(&r.id) {
                        put.entry(r.id).or_insert_with(|| r.clone());
                    }
                }
                Op::PutQueueEntry(e) | Op::InsertQueueEntry(e) => {
                    let c = CLIENTS.iter().position(|c| **c == *e.client_id).unwrap();
                    let old = m.queue.get(&(c, e.seq)).copied();
                    if old != Some(e.message_id) {
                        if !available(&put, e.message_id) {
                            return None;
                        }
                        touched.insert(e.message_id);
                        touched.extend(old);
                    }
                    m.queue.insert((c, e.seq), e.message_id);
                }
                Op::DeleteQueueEntry { client_id, seq } => {
                    let c = CLIENTS.iter().position(|c| **c == **client_id).unwrap();
                    touched.extend(m.queue.remove(&(c, *seq)));
                }
                Op::DeleteSession { client_id } => {
                    let c = CLIENTS.iter().position(|c| **c == **client_id).unwrap();
                    m.queue.retain(|&(qc, _), id| {
                        if qc == c {
                            touched.insert(*id);
                        }
                        qc != c
                    });
                }
                Op::PutRetained(r) => {
                    let t: u8 = r.topic[2..].parse().unwrap();
                    let old = m.retained.get(&t).copied();
                    if old != Some(r.message_id) {
                        if !available(&put, r.message_id) {
                            return None;
                        }
                        touched.insert(r.message_id);
                        touched.extend(old);
                    }
                    m.retained.insert(t, r.message_id);
                }
                Op::DeleteRetained { topic } => {
                    let t: u8 = topic[2..].parse().unwrap();
                    touched.extend(m.retained.remove(&t));
                }
                Op::ExpireRetained { topic, message_id } => {
                    let t: u8 = topic[2..].parse().unwrap();
                    if m.retained.get(&t) == Some(message_id) {
                        touched.insert(*message_id);
                        m.retained.remove(&t);
                    }
                }
                _ => unreachable!(),
            }
        }
        for (id, r) in put {
            m.messages.insert(id, r);
        }
        let live: BTreeSet<u64> = m
            .queue
            .values()
            .chain(m.retained.values())
            .copied()
            .collect();
        m.messages.retain(|id, _| live.contains(id));
        m.legacy.retain(|id| !touched.contains(id));
        if !ops.is_empty() {
            m.committed = true;
        }
        Some(m)
    }

    fn check(&self, s: &dyn Store, ctx: &str) {
        for id in 1..=IDS {
            assert_eq!(
                s.message(id).unwrap(),
                self.messages.get(&id).cloned(),
                "{ctx}: message {id}"
            );
            assert_eq!(
                s.message_refs(id).unwrap(),
                self.refs(id),
                "{ctx}: refs of {id}"
            );
        }
        let st = s.stats().unwrap();
        assert_eq!(st.messages, self.messages.len() as u64, "{ctx}: messages");
        assert_eq!(st.queue_entries, self.queue.len() as u64, "{ctx}: entries");
        assert_eq!(st.retained, self.retained.len() as u64, "{ctx}: retained");
        let count_keys = self
            .messages
            .keys()
            .filter(|&&id| self.refs(id) >= 2)
            .count()
            + self.legacy.len();
        let expected = 1 // schema
            + u64::from(self.committed)
            + st.messages
            + st.queue_entries
            + st.retained
            + count_keys as u64;
        assert_eq!(
            st.keys, expected,
            "{ctx}: keys (a count key too many or missing) {self:?}"
        );
    }
}

/// Random operations, mostly as the broker writes them (a message put in
/// the batch that references it), but also references without a put to a
/// message the store or the window holds, puts of stored ids with other
/// bytes, puts nothing references, and (rarely) a reference to a message
/// that is not there, which must fail the whole window.
fn random_ops(rng: &mut fastrand::Rng, model: &Model, invalid: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut put_here: BTreeSet<u64> = BTreeSet::new();
    let n = rng.usize(1..16);
    for _ in 0..n {
        let id = rng.u64(1..=IDS);
        let mut reference = |rng: &mut fastrand::Rng, ops: &mut Vec<Op>| {
            let known = model.messages.contains_key(&id) || put_here.contains(&id);
            let put = !known || rng.u8(0..3) != 0;
            if put && (known || !invalid || rng.u8(0..8) != 0) {
                ops.push(Op::PutMessage(record(id, rng.u8(0..3))));
                put_here.insert(id);
            }
        };
        match rng.u8(0..12) {
            0..=3 => {
                reference(rng, &mut ops);
                let mut e = entry(CLIENTS[rng.usize(0..CLIENTS.len())], rng.u64(1..=SEQS), id);
                e.state = tern_storage::DeliveryState::AwaitingAck;
                if rng.bool() {
                    ops.push(Op::InsertQueueEntry(e));
                } else {
                    ops.push(Op::PutQueueEntry(e));
                }
            }
            4..=5 => ops.push(Op::DeleteQueueEntry {
                client_id: CLIENTS[rng.usize(0..CLIENTS.len())].into(),
                seq: rng.u64(1..=SEQS),
            }),
            6 => ops.push(Op::DeleteSession {
                client_id: CLIENTS[rng.usize(0..CLIENTS.len())].into(),
            }),
            7 => {
                reference(rng, &mut ops);
                ops.push(Op::PutRetained(retained(
                    &format!("r/{}", rng.u8(0..TOPICS)),
                    id,
                )));
            }
            8 => ops.push(Op::DeleteRetained {
                topic: format!("r/{}", rng.u8(0..TOPICS)),
            }),
            9 => ops.push(Op::ExpireRetained {
                topic: format!("r/{}", rng.u8(0..TOPICS)),
                message_id: id,
            }),
            10 => {
                // A put nothing in the window references (yet).
                ops.push(Op::PutMessage(record(id, rng.u8(0..3))));
                put_here.insert(id);
            }
            _ => {
                // A stored message's entry state changes (same message).
                if let Some((&(c, seq), &mid)) = model
                    .queue
                    .iter()
                    .nth(rng.usize(0..model.queue.len().max(1)))
                {
                    ops.push(Op::PutMessage(record(mid, rng.u8(0..3))));
                    let mut e = entry(CLIENTS[c], seq, mid);
                    e.dup = true;
                    ops.push(Op::PutQueueEntry(e));
                }
            }
        }
    }
    ops
}

/// Cuts `ops` into batches at random points and applies them as one window.
fn apply_window(s: &dyn Store, rng: &mut fastrand::Rng, ops: &[Op]) -> bool {
    let mut batches = Vec::new();
    let mut rest = ops;
    while !rest.is_empty() {
        let k = rng.usize(1..=rest.len());
        let mut b = Batch::new();
        for op in &rest[..k] {
            b.push(op.clone());
        }
        batches.push(b);
        rest = &rest[k..];
    }
    let refs: Vec<&Batch> = batches.iter().collect();
    s.apply_all(&refs).is_ok()
}

fn run(s: &dyn Store, rng: &mut fastrand::Rng, windows: usize, model: &mut Model, ctx: &str) {
    for w in 0..windows {
        let invalid = rng.u8(0..10) == 0;
        let ops = random_ops(rng, model, invalid);
        let expected = model.window(&ops);
        let applied = apply_window(s, rng, &ops);
        let ctx = format!("{ctx} window {w}: {ops:#?}");
        assert_eq!(applied, expected.is_some(), "{ctx}: accepted");
        if let Some(next) = expected {
            *model = next;
        }
        model.check(s, &ctx);
    }
}

#[test]
fn counts_follow_the_references_in_the_memory_store() {
    for round in 0..2000u64 {
        let mut rng = fastrand::Rng::with_seed(round);
        let s = MemoryStore::new();
        let mut model = Model::default();
        run(&s, &mut rng, 30, &mut model, &format!("round {round}"));
    }
}

#[test]
fn counts_follow_the_references_in_the_sled_store() {
    for round in 0..100u64 {
        let mut rng = fastrand::Rng::with_seed(1_000_000 + round);
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::default();
        {
            let s = SledStore::open(dir.path()).unwrap();
            run(&s, &mut rng, 20, &mut model, &format!("round {round}"));
        }
        let s = SledStore::open(dir.path()).unwrap();
        model.check(&s, &format!("round {round} reopened"));
        run(
            &s,
            &mut rng,
            10,
            &mut model,
            &format!("round {round} after reopening"),
        );
    }
}

/// A version 5 store holds a count key for every stored message, 1
/// included: upgraded, it must go on as if written by this version.
#[test]
fn counts_follow_the_references_after_an_upgrade_from_version_5() {
    for round in 0..60u64 {
        let mut rng = fastrand::Rng::with_seed(2_000_000 + round);
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::default();
        {
            let s = SledStore::open(dir.path()).unwrap();
            run(&s, &mut rng, 15, &mut model, &format!("round {round}"));
        }
        {
            let db = raw_sled(dir.path());
            for &id in model.messages.keys() {
                if model.refs(id) == 1 {
                    let key = [b"R".as_slice(), &id.to_be_bytes()].concat();
                    db.insert(key, &1u32.to_be_bytes()).unwrap();
                    model.legacy.insert(id);
                }
            }
            db.insert(b"\x00schema", &5u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        model.check(&s, &format!("round {round} upgraded"));
        run(
            &s,
            &mut rng,
            15,
            &mut model,
            &format!("round {round} after upgrade"),
        );
    }
}
