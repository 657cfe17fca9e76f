//! Value encoding: a small, explicit binary format (big-endian integers,
//! `u32`-length-prefixed byte strings). The schema version key covers the
//! format: any change here bumps [`SCHEMA_VERSION`](crate::SCHEMA_VERSION).

use bytes::Bytes;

use crate::error::StoreError;
use crate::keys;
use crate::records::{
    DeliveryState, MessageRecord, QueueEntry, SessionRecord, SharedGroupRecord, SubscriptionRecord,
    WillRecord,
};

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Records come from MQTT packets, whose size fits in u32.
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
        self
    }
    fn opt_u32(&mut self, v: Option<u32>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u32(v),
            None => self.u8(0),
        }
    }
}

struct Dec<'a> {
    buf: &'a [u8],
    key: &'a [u8],
}

impl<'a> Dec<'a> {
    fn new(key: &'a [u8], buf: &'a [u8]) -> Self {
        Dec { buf, key }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(StoreError::corrupt(self.key, "value truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, StoreError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StoreError::corrupt(self.key, "bad boolean")),
        }
    }
    fn u16(&mut self) -> Result<u16, StoreError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bytes(&mut self) -> Result<Bytes, StoreError> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
    fn text(&mut self) -> Result<String, StoreError> {
        let n = self.u32()? as usize;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| StoreError::corrupt(self.key, "text is not UTF-8"))
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, StoreError> {
        Ok(if self.bool()? {
            Some(self.u32()?)
        } else {
            None
        })
    }
    fn finish(self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(StoreError::corrupt(self.key, "trailing bytes"))
        }
    }
}

pub(crate) fn encode_session(r: &SessionRecord) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(r.protocol_level)
        .u32(r.expiry_interval)
        .u64(r.created_at)
        .u64(r.last_seen);
    match &r.will {
        None => {
            e.u8(0);
        }
        Some(w) => {
            e.u8(1)
                .bytes(&w.topic)
                .bytes(&w.payload)
                .u8(w.qos)
                .u8(u8::from(w.retain))
                .u32(w.delay_interval)
                .bytes(&w.properties);
        }
    }
    e.u8(u8::from(r.connected));
    match &r.owner {
        None => {
            e.u8(0);
        }
        Some(owner) => {
            e.u8(1).bytes(owner.as_bytes());
        }
    }
    e.0
}

pub(crate) fn decode_session(key: &[u8], v: &[u8]) -> Result<SessionRecord, StoreError> {
    let mut d = Dec::new(key, v);
    let protocol_level = d.u8()?;
    let expiry_interval = d.u32()?;
    let created_at = d.u64()?;
    let last_seen = d.u64()?;
    let will = if d.bool()? {
        Some(WillRecord {
            topic: d.bytes()?,
            payload: d.bytes()?,
            qos: d.u8()?,
            retain: d.bool()?,
            delay_interval: d.u32()?,
            properties: d.bytes()?,
        })
    } else {
        None
    };
    // Added in schema version 2; a version 1 record ends before it.
    let connected = if d.buf.is_empty() { false } else { d.bool()? };
    // Added in schema version 3; older records end before it.
    let owner = if d.buf.is_empty() || !d.bool()? {
        None
    } else {
        let raw = d.bytes()?;
        Some(
            std::str::from_utf8(&raw)
                .map_err(|_| StoreError::Corrupt {
                    key: keys::describe(key),
                    reason: "session owner is not UTF-8",
                })?
                .into(),
        )
    };
    d.finish()?;
    Ok(SessionRecord {
        client_id: keys::text_after(key, 1)?.into(),
        protocol_level,
        expiry_interval,
        will,
        created_at,
        last_seen,
        connected,
        owner,
    })
}

pub(crate) fn encode_subscription(r: &SubscriptionRecord) -> Vec<u8> {
    let flags = u8::from(r.no_local) | (u8::from(r.retain_as_published) << 1);
    let mut e = Enc::default();
    e.u8(r.qos)
        .u8(flags)
        .u8(r.retain_handling)
        .opt_u32(r.subscription_id);
    e.0
}

pub(crate) fn decode_subscription(key: &[u8], v: &[u8]) -> Result<SubscriptionRecord, StoreError> {
    let (client_id, rest) = keys::split_client(key)?;
    let filter = String::from_utf8(rest.to_vec())
        .map_err(|_| StoreError::corrupt(key, "filter is not UTF-8"))?;
    let mut d = Dec::new(key, v);
    let qos = d.u8()?;
    let flags = d.u8()?;
    let retain_handling = d.u8()?;
    let subscription_id = d.opt_u32()?;
    d.finish()?;
    Ok(SubscriptionRecord {
        client_id,
        filter,
        qos,
        no_local: flags & 1 != 0,
        retain_as_published: flags & 2 != 0,
        retain_handling,
        subscription_id,
    })
}

pub(crate) fn encode_message(r: &MessageRecord) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(
        32 + r.topic.len() + r.payload.len() + r.properties.len(),
    ));
    e.u8(r.qos)
        .u8(u8::from(r.retain))
        .bytes(&r.topic)
        .bytes(&r.properties);
    match r.expires_at {
        Some(at) => e.u8(1).u64(at),
        None => e.u8(0),
    };
    e.bytes(&r.payload);
    e.0
}

pub(crate) fn decode_message(key: &[u8], v: &[u8]) -> Result<MessageRecord, StoreError> {
    let mut d = Dec::new(key, v);
    let qos = d.u8()?;
    let retain = d.bool()?;
    let topic = d.bytes()?;
    let properties = d.bytes()?;
    let expires_at = if d.bool()? { Some(d.u64()?) } else { None };
    let payload = d.bytes()?;
    d.finish()?;
    Ok(MessageRecord {
        id: keys::trailing_u64(key)?,
        topic,
        payload,
        qos,
        retain,
        properties,
        expires_at,
    })
}

fn state_byte(s: DeliveryState) -> u8 {
    match s {
        DeliveryState::Pending => 0,
        DeliveryState::AwaitingAck => 1,
        DeliveryState::AwaitingComp => 2,
    }
}

pub(crate) fn encode_queue_entry(r: &QueueEntry) -> Vec<u8> {
    let mut e = Enc::default();
    e.u64(r.message_id).u8(r.qos);
    match r.packet_id {
        Some(p) => e.u8(1).u16(p),
        None => e.u8(0),
    };
    e.u8(state_byte(r.state))
        .u8(u8::from(r.dup) | (u8::from(r.retain) << 1));
    e.u16(u16::try_from(r.subscription_ids.len()).unwrap_or(u16::MAX));
    for id in r.subscription_ids.iter().take(usize::from(u16::MAX)) {
        e.u32(*id);
    }
    // Schema version 5's trailer: which of the optional fields follow.
    e.u8(u8::from(r.weight.is_some()) | (u8::from(r.shared.is_some()) << 1));
    if let Some(weight) = r.weight {
        e.u32(weight);
    }
    if let Some(shared) = &r.shared {
        e.bytes(shared.group.as_bytes())
            .bytes(shared.filter.as_bytes());
    }
    e.0
}

pub(crate) fn decode_queue_entry(key: &[u8], v: &[u8]) -> Result<QueueEntry, StoreError> {
    let (client_id, rest) = keys::split_client(key)?;
    let seq = u64::from_be_bytes(
        rest.try_into()
            .map_err(|_| StoreError::corrupt(key, "bad queue key"))?,
    );
    let mut d = Dec::new(key, v);
    let message_id = d.u64()?;
    let qos = d.u8()?;
    let packet_id = if d.bool()? { Some(d.u16()?) } else { None };
    let state = match d.u8()? {
        0 => DeliveryState::Pending,
        1 => DeliveryState::AwaitingAck,
        2 => DeliveryState::AwaitingComp,
        _ => return Err(StoreError::corrupt(key, "bad delivery state")),
    };
    let flags = d.u8()?;
    if flags > 0b11 {
        return Err(StoreError::corrupt(key, "bad queue entry flags"));
    }
    let (dup, retain) = (flags & 1 != 0, flags & 2 != 0);
    let n = d.u16()?;
    let mut subscription_ids = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        subscription_ids.push(d.u32()?);
    }
    // The trailer is absent in an entry written before schema version 5.
    let present = if d.buf.is_empty() { 0 } else { d.u8()? };
    if present > 0b11 {
        return Err(StoreError::corrupt(key, "bad queue entry trailer"));
    }
    let weight = if present & 1 != 0 {
        Some(d.u32()?)
    } else {
        None
    };
    let shared = if present & 2 != 0 {
        Some(SharedGroupRecord {
            group: d.text()?.into(),
            filter: d.text()?.into(),
        })
    } else {
        None
    };
    d.finish()?;
    Ok(QueueEntry {
        client_id,
        seq,
        message_id,
        qos,
        packet_id,
        state,
        dup,
        retain,
        subscription_ids,
        weight,
        shared,
    })
}

/// The message id a queue entry value references, without decoding the rest.
pub(crate) fn queue_entry_message_id(key: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    Dec::new(key, v).u64()
}

pub(crate) fn encode_u64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

pub(crate) fn decode_u64(key: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    let mut d = Dec::new(key, v);
    let x = d.u64()?;
    d.finish()?;
    Ok(x)
}

pub(crate) fn encode_u32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

pub(crate) fn decode_u32(key: &[u8], v: &[u8]) -> Result<u32, StoreError> {
    let mut d = Dec::new(key, v);
    let x = d.u32()?;
    d.finish()?;
    Ok(x)
}
