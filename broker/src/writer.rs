//! The write half of a connection: drains the session's outbound queue,
//! encodes it, and writes it with as few system calls as possible.
//!
//! Everything queued when the writer wakes is encoded into one batch and sent
//! with vectored writes. PUBLISH headers are encoded on their own and the
//! payload is written straight from the shared message, so a large payload is
//! never copied into the socket buffer; payloads up to
//! [`INLINE_PAYLOAD_MAX`] bytes are appended to the header instead, because
//! one small copy is cheaper than one more I/O vector.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tern_codec::forward::{
    encode_forwarded_header, forwarded_packet_len, ForwardedHeader, MessageProperties,
    EXPIRY_AT_END,
};
use tern_codec::{
    encode_packet, encode_publish_header_of, EncodeError, Packet, ProtocolVersion, PubAck,
    PublishHeader, QoS,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::log_throttle::throttled;
use crate::message::Message;
use crate::message_batch::{BatchDelivery, Frames, MessageBatch};
use crate::metrics::Metrics;
use crate::session::{AckKind, ConnectionControl, Outbound, Session, SubscriptionIds};
use crate::topic_alias::OutboundAliases;
use crate::transport::TransportWrite;

/// Payloads up to this size are copied next to their header rather than
/// given their own I/O vector.
pub const INLINE_PAYLOAD_MAX: usize = 512;

/// Queue items whose room a writer keeps between batches (48 KiB): more was
/// a backlog's, and is given back once written.
const ITEMS_KEPT: usize = 1024;

/// I/O vectors passed to one `writev` (well under the usual IOV_MAX of 1024).
const MAX_IOVECS: usize = 64;

/// Bytes a writer encodes before it writes them (see [`encode_slice`]).
/// Small payloads are copied next to their headers, so without a bound a
/// writer with a backlog of a million small deliveries would encode all of
/// them before writing any, and keep that much memory: 1,000 subscribers of
/// a fast fan-out held 0.5 GB this way. 64 KiB still spreads a `writev`'s
/// fixed cost over hundreds of small messages.
const WRITE_SLICE_BYTES: usize = 64 * 1024;

/// Encoding room a writer keeps between batches: more was grown by one
/// slice's overshoot or a large header, and is given back once written.
const SCRATCH_KEPT: usize = 2 * WRITE_SLICE_BYTES;

/// How long in all a closing writer waits for the acknowledgements still
/// waiting for the store before it writes the DISCONNECT anyway. A store
/// answers in milliseconds; one that lags longer must not cost an MQTT 5
/// client its DISCONNECT reason, which the connection's close grace
/// (`connection::CLOSE_GRACE`, 2 s) would.
const CLOSING_ACK_WAIT: Duration = Duration::from_secs(1);

/// What the writer needs to know about its connection.
pub struct WriterContext {
    pub session: Arc<Session>,
    pub connection_id: u64,
    pub control: Arc<ConnectionControl>,
    pub protocol: ProtocolVersion,
    /// The client's Maximum Packet Size (MQTT 5), if it set one.
    pub client_max_packet: Option<u32>,
    /// The client's Topic Alias Maximum (MQTT 5; 0 when it allows none).
    pub client_topic_alias_max: u16,
    pub metrics: Arc<Metrics>,
}

/// Runs until the connection closes: returns after the final flush, or at
/// the first write error (after telling the reader to stop).
///
/// An async block, not an async fn, so that `ctx` and `socket` are kept
/// once in the connection's task rather than twice (see
/// `connection::serve_tcp`).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
pub fn write_loop<W: TransportWrite>(
    ctx: WriterContext,
    mut socket: W,
) -> impl Future<Output = ()> {
    async move {
        let mut buffers: Option<Box<WriteBuffers>> = None;
        loop {
            if ctx.control.is_withholding() {
                break;
            }
            // Read before the queue is taken: an acknowledgement released
            // after this was queued before it, so the drain below finds it
            // (or its wake-up is still pending).
            let acks_waiting = ctx.control.acks_awaiting_store();
            let attached = match buffers.as_deref_mut() {
                Some(b) => ctx.session.drain_outbound(ctx.connection_id, &mut b.items),
                None => {
                    let mut items = VecDeque::new();
                    let attached = ctx.session.drain_outbound(ctx.connection_id, &mut items);
                    if !items.is_empty() {
                        let mut made = WriteBuffers::new(&ctx);
                        made.items = items;
                        buffers = Some(Box::new(made));
                    }
                    attached
                }
            };
            let Some(batch) = buffers.as_deref_mut().filter(|b| !b.items.is_empty()) else {
                if !attached {
                    break;
                }
                if ctx.control.is_closing() {
                    // A closing connection still writes the acknowledgements
                    // that wait for the store (what they acknowledge is
                    // done), those of its reader's last packets included:
                    // their count is final once the reader has stopped.
                    if ctx.control.is_reader_finished() && acks_waiting == 0 {
                        break;
                    }
                    // One deadline for the whole wait, however often
                    // deliveries wake the writer meanwhile; kept in the
                    // boxed buffers and the wait boxed: inline, either
                    // would be part of every connection's task.
                    let deadline = *buffers
                        .get_or_insert_with(|| Box::new(WriteBuffers::new(&ctx)))
                        .closing_deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + CLOSING_ACK_WAIT);
                    let wait = tokio::time::timeout_at(deadline, ctx.control.wake_writer.wait());
                    if Box::pin(wait).await.is_err() {
                        break;
                    }
                    continue;
                }
                ctx.control.wake_writer.wait().await;
                continue;
            };
            if let Err(e) = write_batch(&mut socket, &ctx, batch).await {
                tracing::debug!(client_id = %ctx.session.client_id, error = %e, "write failed");
                if let Some(b) = buffers.as_deref_mut() {
                    b.chunks.clear();
                }
                ctx.control.close(None);
                return;
            }
        }
        if ctx.protocol.is_v5() {
            if let Some(reason) = ctx.control.close_reason() {
                // The packet lives in its own scope, which ends before the
                // await: held across it (even moved out), its 264 bytes would
                // be part of every connection's task.
                let WriteBuffers {
                    scratch, chunks, ..
                } = buffers
                    .get_or_insert_with(|| Box::new(WriteBuffers::new(&ctx)))
                    .as_mut();
                let encoded = {
                    let disconnect = Packet::Disconnect(tern_codec::Disconnect::new(reason));
                    encode_packet(&disconnect, ctx.protocol, scratch).is_ok()
                };
                if encoded {
                    chunks.push_back(scratch.split().freeze());
                    let _ = write_chunks(&mut socket, chunks, &ctx.metrics).await;
                    if W::CLOSES_AFTER_LINGER {
                        return;
                    }
                }
            }
        }
        let _ = socket.shutdown().await;
    }
}

/// What the writer keeps between wake-ups: the items it took from the
/// queue, the bytes it encoded and the chunks not yet written. Boxed, and
/// made at the first delivery: a connection that is sent nothing (most idle
/// ones) does not carry it in its task.
struct WriteBuffers {
    items: VecDeque<Outbound>,
    scratch: BytesMut,
    chunks: VecDeque<Bytes>,
    /// The topic aliases this connection's client was told (boxed: most
    /// clients allow none). Kept here rather than in the task, where it
    /// would be part of every connection's, those sent nothing included.
    aliases: Option<Box<OutboundAliases>>,
    /// Once the connection is closing with acknowledgements still waiting
    /// for the store: when the writer stops waiting for them.
    closing_deadline: Option<tokio::time::Instant>,
}

impl WriteBuffers {
    fn new(ctx: &WriterContext) -> WriteBuffers {
        WriteBuffers {
            items: VecDeque::new(),
            scratch: BytesMut::new(),
            chunks: VecDeque::new(),
            aliases: OutboundAliases::new(ctx.client_topic_alias_max).map(Box::new),
            closing_deadline: None,
        }
    }
}

/// Encodes and writes the items the writer took, a slice at a time
/// ([`encode_slice`]), so that what a writer holds encoded stays bounded
/// however long its backlog; then gives back what a backlog grew.
///
/// One `poll_fn` holding three references, like [`write_chunks`]: its
/// state is part of every connection's task.
fn write_batch<'a, W: AsyncWrite + Unpin>(
    socket: &'a mut W,
    ctx: &'a WriterContext,
    batch: &'a mut WriteBuffers,
) -> impl Future<Output = std::io::Result<()>> + 'a {
    std::future::poll_fn(move |cx| {
        loop {
            if batch.chunks.is_empty() {
                if batch.items.is_empty() {
                    break;
                }
                encode_slice(ctx, batch);
                continue;
            }
            std::task::ready!(poll_write_chunks(
                socket,
                &mut batch.chunks,
                &ctx.metrics,
                cx
            ))?;
        }
        if batch.items.capacity() > ITEMS_KEPT {
            // A backlog grew the allocation (it takes turns with the
            // session's queue, see `Session::drain_outbound`): give it back
            // rather than keep it for the connection's life.
            batch.items = VecDeque::new();
        }
        if batch.scratch.capacity() > SCRATCH_KEPT {
            // Written, so nothing shares it: what a slice's overshoot or a
            // large header grew it to is not kept either.
            batch.scratch = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    })
}

/// Encodes items from the front of the batch until [`WRITE_SLICE_BYTES`]
/// are encoded, [`MAX_IOVECS`] chunks are waiting, or none is left, and
/// closes the encoded bytes off into the chunks to write.
fn encode_slice(ctx: &WriterContext, batch: &mut WriteBuffers) {
    let WriteBuffers {
        items,
        scratch,
        chunks,
        aliases,
        ..
    } = batch;
    let now = Instant::now();
    let mut packets = 0u64;
    while scratch.len() < WRITE_SLICE_BYTES && chunks.len() < MAX_IOVECS {
        let Some(item) = items.pop_front() else {
            break;
        };
        packets += encode_item(ctx, aliases, item, now, scratch, chunks);
    }
    Metrics::add(&ctx.metrics.packets_sent, packets);
    if !scratch.is_empty() {
        chunks.push_back(scratch.split().freeze());
    }
}

/// Encodes one queued item, appending to `scratch` and, for large payloads,
/// closing off `scratch` into a chunk followed by the payload chunk.
/// Returns the number of packets produced.
fn encode_item(
    ctx: &WriterContext,
    aliases: &mut Option<Box<OutboundAliases>>,
    item: Outbound,
    now: Instant,
    scratch: &mut BytesMut,
    chunks: &mut VecDeque<Bytes>,
) -> u64 {
    match item {
        Outbound::Ack(kind, packet_id, code) => {
            let ack = PubAck {
                packet_id,
                code,
                ..PubAck::default()
            };
            let packet = match kind {
                AckKind::PubAck => Packet::PubAck(ack),
                AckKind::PubRec => Packet::PubRec(ack),
                AckKind::PubRel => Packet::PubRel(ack),
                AckKind::PubComp => Packet::PubComp(ack),
            };
            encode_control(ctx, &packet, scratch)
        }
        Outbound::PingResp => encode_control(ctx, &Packet::PingResp, scratch),
        Outbound::Control(packet) => encode_control(ctx, &packet, scratch),
        Outbound::Publish(delivery) => {
            let outgoing = Outgoing {
                message: &delivery.message,
                qos: delivery.qos,
                dup: delivery.dup,
                retain: delivery.retain,
                packet_id: delivery.packet_id,
                subscription_ids: &delivery.subscription_ids,
                // A QoS 1/2 delivery's in-flight entry holds the message
                // too. Should the other reference be someone else's, this
                // delivery merely encodes its header in place, and theirs
                // caches one.
                sole: Arc::strong_count(&delivery.message)
                    <= 1 + usize::from(delivery.packet_id.is_some()),
            };
            u64::from(encode_publish(
                ctx, aliases, &outgoing, now, scratch, chunks,
            ))
        }
        Outbound::Batch(delivery) => {
            // The batch's messages are held by the batch alone, and the
            // batch by every subscriber it went to.
            let sole_batch = Arc::strong_count(&delivery.batch) == 1;
            if !sole_batch {
                if let Some(frames) = shared_frames(ctx, aliases, &delivery) {
                    if !scratch.is_empty() {
                        chunks.push_back(scratch.split().freeze());
                    }
                    chunks.push_back(frames.bytes.clone());
                    return delivery.batch.len() as u64;
                }
            }
            let mut packets = 0;
            for message in delivery.batch.messages() {
                let outgoing = Outgoing {
                    message,
                    qos: QoS::AtMostOnce,
                    dup: false,
                    retain: delivery.retain(message),
                    packet_id: None,
                    subscription_ids: &delivery.subscription_ids,
                    sole: sole_batch && Arc::strong_count(message) == 1,
                };
                packets += u64::from(encode_publish(
                    ctx, aliases, &outgoing, now, scratch, chunks,
                ));
            }
            packets
        }
    }
}

/// The packets of a batch as every subscriber of this shape gets them
/// (`MessageBatch::frames`), encoded by the first writer that asks; `None`
/// when this delivery needs packets of its own: MQTT 5 subscription
/// identifiers or topic aliases, a message with an expiry interval (its
/// remaining time is stated per delivery), a payload large enough to be
/// written from the message rather than copied, a packet larger than the
/// client takes (dropped one by one, and counted, by the other path).
fn shared_frames<'a>(
    ctx: &WriterContext,
    aliases: &Option<Box<OutboundAliases>>,
    delivery: &'a BatchDelivery,
) -> Option<&'a Frames> {
    let batch = &delivery.batch;
    let v5 = ctx.protocol.is_v5();
    if (v5 && (!delivery.subscription_ids.is_empty() || aliases.is_some()))
        || batch.any_expiry()
        || batch.largest_payload() > INLINE_PAYLOAD_MAX
    {
        return None;
    }
    let retain = batch.keeps_retain(delivery);
    let frames = batch.frames(v5, retain, || encode_frames(ctx, batch, retain))?;
    match ctx.client_max_packet {
        Some(max) if frames.largest > max as usize => None,
        _ => Some(frames),
    }
}

/// The packets of `batch` for this connection's protocol, one after the
/// other, RETAIN kept as published if `retain`.
fn encode_frames(ctx: &WriterContext, batch: &MessageBatch, retain: bool) -> Option<Frames> {
    let mut out = BytesMut::with_capacity(batch.weight());
    let mut largest = 0;
    for message in batch.messages() {
        let start = out.len();
        let header = header_of(message, QoS::AtMostOnce, retain && message.retain, None);
        if let Err(e) = encode_publish_header_of(&header, ctx.protocol, &mut out) {
            tracing::warn!(client_id = %ctx.session.client_id, error = %e, "cannot encode publish");
            return None;
        }
        out.extend_from_slice(&message.payload);
        largest = largest.max(out.len() - start);
    }
    Some(Frames {
        bytes: out.freeze(),
        largest,
    })
}

/// The header of a PUBLISH of `message`, borrowed from it (DUP clear).
fn header_of(
    message: &Message,
    qos: QoS,
    retain: bool,
    packet_id: Option<u16>,
) -> PublishHeader<'_> {
    PublishHeader {
        dup: false,
        qos,
        retain,
        topic: &message.topic,
        packet_id,
        properties: message.properties(),
        payload_len: message.payload.len(),
    }
}

/// One PUBLISH to encode: a queued delivery, or one message of a batch.
struct Outgoing<'a> {
    message: &'a Message,
    qos: QoS,
    dup: bool,
    retain: bool,
    packet_id: Option<u16>,
    subscription_ids: &'a SubscriptionIds,
    /// Nothing but this delivery (and, for QoS 1/2, its in-flight entry)
    /// holds the message, so no other delivery can reuse its encoded
    /// header.
    sole: bool,
}

/// Encodes one PUBLISH; returns whether it was (it may have expired, or be
/// too large for the client).
fn encode_publish(
    ctx: &WriterContext,
    aliases: &mut Option<Box<OutboundAliases>>,
    outgoing: &Outgoing<'_>,
    now: Instant,
    scratch: &mut BytesMut,
    chunks: &mut VecDeque<Bytes>,
) -> bool {
    let message = outgoing.message;
    // A QoS 0 copy that outlived its message in this queue is not sent. One
    // that had no lifetime at all was handed over as the message arrived:
    // its delivery started then.
    if outgoing.qos == QoS::AtMostOnce && message.is_expired(now) && !message.expires_on_arrival() {
        Metrics::inc(&ctx.metrics.messages_expired);
        return false;
    }
    // Most deliveries share the message's encoded header (an expiry, the
    // same size for every delivery, written over it); MQTT 5 deliveries
    // with subscription identifiers or a topic alias are encoded on their
    // own.
    let shared =
        !ctx.protocol.is_v5() || (outgoing.subscription_ids.is_empty() && aliases.is_none());
    if shared {
        encode_shared(ctx, outgoing, now, scratch, chunks)
    } else {
        encode_own(ctx, aliases, outgoing, now, scratch, chunks)
    }
}

/// Encodes a delivery from the message's shared header: a copy of a few
/// bytes and up to three patches (flags, packet id, an MQTT 5 message's
/// remaining expiry) instead of a full encode. A delivery that holds the
/// message's last reference, with its in-flight entry for QoS 1/2 (its only
/// subscriber, as in a fan-in or pairs), encodes the header in place
/// instead: no other delivery would reuse it, and caching it would cost a
/// once-cell and an allocation per message.
fn encode_shared(
    ctx: &WriterContext,
    delivery: &Outgoing<'_>,
    now: Instant,
    scratch: &mut BytesMut,
    chunks: &mut VecDeque<Bytes>,
) -> bool {
    let message = delivery.message;
    let v5 = ctx.protocol.is_v5();
    let with_packet_id = delivery.packet_id.is_some();
    // MQTT 5 states the expiry left per delivery: the header ends with it
    // (`tern_codec::forward::EXPIRY_AT_END`), written over below. 3.x has
    // no properties.
    let remaining_expiry = message.remaining_expiry(now).filter(|_| v5);
    // With a placeholder packet id, flags and expiry, patched below per
    // delivery; borrowed, so the message's topic and payload (slices of
    // the buffer they were read into, one reference count for both) are
    // not cloned and dropped again for it.
    let encode_header = |out: &mut BytesMut| {
        let qos = if with_packet_id {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let template = header_of(message, qos, false, with_packet_id.then_some(1));
        if remaining_expiry.is_none() {
            return encode_publish_header_of(&template, ctx.protocol, out).is_ok();
        }
        let template = ForwardedHeader {
            dup: false,
            qos,
            retain: false,
            topic: template.topic,
            packet_id: template.packet_id,
            message: MessageProperties::Decoded(template.properties),
            message_expiry_interval: Some(0),
            topic_alias: None,
            subscription_identifiers: &[],
            payload_len: template.payload_len,
        };
        encode_forwarded_header(&template, out).is_ok()
    };
    let start = scratch.len();
    // Nobody else holds the message, so nobody can start to share it.
    if delivery.sole {
        if !encode_header(scratch) {
            tracing::warn!(client_id = %ctx.session.client_id, "cannot encode publish");
            return false;
        }
        if too_large(
            ctx,
            delivery.packet_id,
            scratch.len() - start + message.payload.len(),
        ) {
            scratch.truncate(start);
            return false;
        }
    } else {
        let header = message.shared_header(v5, with_packet_id, || {
            let mut out = BytesMut::new();
            encode_header(&mut out).then(|| out.freeze())
        });
        let Some(header) = header else {
            tracing::warn!(client_id = %ctx.session.client_id, "cannot encode publish");
            return false;
        };
        if too_large(
            ctx,
            delivery.packet_id,
            header.len() + message.payload.len(),
        ) {
            return false;
        }
        scratch.extend_from_slice(header);
    }
    scratch[start] = 0x30
        | (u8::from(delivery.dup) << 3)
        | ((delivery.qos as u8) << 1)
        | u8::from(delivery.retain);
    if let Some(packet_id) = delivery.packet_id {
        let at = start + packet_id_offset(&scratch[start..], message.topic.len());
        scratch[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
    }
    if let Some(expiry) = remaining_expiry {
        let at = scratch.len() - EXPIRY_AT_END;
        debug_assert_eq!(
            scratch[at - 1],
            tern_codec::properties::id::MESSAGE_EXPIRY_INTERVAL,
            "a header with an expiry ends with it"
        );
        scratch[at..].copy_from_slice(&expiry.to_be_bytes());
    }
    push_payload(&message.payload, scratch, chunks);
    true
}

/// Encodes a delivery whose header is its own (MQTT 5 per-delivery
/// properties or a topic alias), from borrowed parts: the message's
/// properties as encoded once for all its deliveries
/// ([`Message::forwarded_properties`]), the delivery's own beside them.
/// Nothing is allocated or cloned per delivery. The only delivery of a
/// message encodes its properties in place instead: caching them would
/// cost an allocation and save nothing.
fn encode_own(
    ctx: &WriterContext,
    aliases: &mut Option<Box<OutboundAliases>>,
    delivery: &Outgoing<'_>,
    now: Instant,
    scratch: &mut BytesMut,
    chunks: &mut VecDeque<Bytes>,
) -> bool {
    debug_assert!(
        ctx.protocol.is_v5(),
        "only MQTT 5 has per-delivery properties"
    );
    let message = delivery.message;
    let properties = if delivery.sole {
        MessageProperties::Decoded(message.properties())
    } else if let Some(encoded) = message.forwarded_properties() {
        MessageProperties::Encoded(encoded)
    } else {
        tracing::warn!(client_id = %ctx.session.client_id, "cannot encode publish properties");
        return false;
    };
    let mut header = ForwardedHeader {
        dup: delivery.dup,
        qos: delivery.qos,
        retain: delivery.retain,
        topic: &message.topic,
        packet_id: delivery.packet_id,
        message: properties,
        message_expiry_interval: message.remaining_expiry(now),
        topic_alias: None,
        subscription_identifiers: delivery.subscription_ids.as_slice(),
        payload_len: message.payload.len(),
    };
    if let Some(aliases) = aliases {
        // Assigned only once the size is known to fit (below), so that a
        // dropped delivery never defines an alias the client does not
        // learn; an alias takes the same 3 bytes whatever its value.
        header.topic_alias = Some(1);
        if aliases.is_known(&message.topic) {
            header.topic = b"";
        }
    }
    if ctx.client_max_packet.is_some() {
        let size = match forwarded_packet_len(&header) {
            Ok(size) => size,
            Err(e) => return cannot_encode(ctx, &e),
        };
        if too_large(ctx, delivery.packet_id, size) {
            return false;
        }
    }
    if let Some(aliases) = aliases {
        let (alias, known) = aliases.assign(&message.topic);
        header.topic_alias = Some(alias);
        header.topic = if known { b"" } else { &message.topic };
    }
    if let Err(e) = encode_forwarded_header(&header, scratch) {
        return cannot_encode(ctx, &e);
    }
    push_payload(&message.payload, scratch, chunks);
    true
}

/// Logs a PUBLISH that cannot be encoded; false.
fn cannot_encode(ctx: &WriterContext, error: &EncodeError) -> bool {
    throttled!(WARN, client_id = %ctx.session.client_id, %error, "cannot encode publish");
    false
}

/// Appends a payload: copied next to its header when small, otherwise
/// shared as its own chunk (no copy).
fn push_payload(payload: &Bytes, scratch: &mut BytesMut, chunks: &mut VecDeque<Bytes>) {
    if payload.len() <= INLINE_PAYLOAD_MAX {
        scratch.extend_from_slice(payload);
    } else {
        chunks.push_back(scratch.split().freeze());
        chunks.push_back(payload.clone());
    }
}

/// MQTT-3.1.2-25: a packet larger than the client's Maximum Packet Size is
/// not sent; a QoS 1/2 one is treated as delivered.
fn too_large(ctx: &WriterContext, packet_id: Option<u16>, size: usize) -> bool {
    match ctx.client_max_packet {
        Some(max) if size > max as usize => {
            ctx.session.discard_inflight(packet_id);
            Metrics::inc(&ctx.metrics.messages_dropped_oversized);
            true
        }
        _ => false,
    }
}

/// Where the packet identifier sits in an encoded PUBLISH header: after the
/// first byte, the Remaining Length (1-4 bytes) and the topic (2 + length).
fn packet_id_offset(header: &[u8], topic_len: usize) -> usize {
    let length_bytes = header[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1);
    1 + length_bytes + 2 + topic_len
}

/// Encodes an acknowledgement or other control packet, unless it is larger
/// than the client's Maximum Packet Size: then it is not sent
/// (MQTT-3.1.2-24, -25), logged and counted. Only a SUBACK or UNSUBACK of
/// many filters, or a client that allows only a few bytes, comes to that:
/// these packets carry no reason string or user property to leave out.
/// Returns the number of packets written: 1, or 0 when not sent.
fn encode_control(ctx: &WriterContext, packet: &Packet, scratch: &mut BytesMut) -> u64 {
    if let Some(max) = ctx.client_max_packet {
        let size = tern_codec::encoded_len(packet, ctx.protocol).unwrap_or(0);
        if size > max as usize {
            Metrics::inc(&ctx.metrics.acks_dropped_oversized);
            throttled!(
                INFO,
                client_id = %ctx.session.client_id,
                size,
                maximum = max,
                "acknowledgement not sent: larger than the client's Maximum Packet Size"
            );
            return 0;
        }
    }
    match encode_packet(packet, ctx.protocol, scratch) {
        Ok(()) => 1,
        Err(e) => {
            tracing::warn!(client_id = %ctx.session.client_id, error = %e, "cannot encode packet");
            0
        }
    }
}

/// Writes every chunk, using vectored writes, advancing past partial writes,
/// then flushes.
///
/// One `poll_fn` whose only state is its three references: the I/O vectors
/// are built inside each poll, on the poll's stack, because held across an
/// await they (and an async fn's own copies of its arguments) would be part
/// of every connection's task.
fn write_chunks<'a, W: AsyncWrite + Unpin>(
    socket: &'a mut W,
    chunks: &'a mut VecDeque<Bytes>,
    metrics: &'a Metrics,
) -> impl Future<Output = std::io::Result<()>> + 'a {
    std::future::poll_fn(move |cx| poll_write_chunks(socket, chunks, metrics, cx))
}

/// One poll of [`write_chunks`].
fn poll_write_chunks<W: AsyncWrite + Unpin>(
    socket: &mut W,
    chunks: &mut VecDeque<Bytes>,
    metrics: &Metrics,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    while !chunks.is_empty() {
        let written = {
            let slices: smallvec::SmallVec<[IoSlice<'_>; MAX_IOVECS]> = chunks
                .iter()
                .take(MAX_IOVECS)
                .map(|c| IoSlice::new(c))
                .collect();
            std::task::ready!(Pin::new(&mut *socket).poll_write_vectored(cx, &slices))?
        };
        if written == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        Metrics::add(&metrics.bytes_sent, written as u64);
        let mut left = written;
        while left > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                chunks.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
    }
    // A no-op on TCP; TLS (and WebSocket control frames) may hold bytes
    // until flushed.
    Pin::new(&mut *socket).poll_flush(cx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Delivery;
    use crate::{Broker, Config};
    use tern_codec::properties::PublishProperties;

    /// A socket that takes everything at once and keeps what each write
    /// carried.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes.push(buf.len());
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let len = bufs.iter().map(|b| b.len()).sum();
            self.writes.push(len);
            for b in bufs {
                self.bytes.extend_from_slice(b);
            }
            Poll::Ready(Ok(len))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer for a fresh session of `protocol`.
    fn writer_context(broker: &Broker, protocol: ProtocolVersion) -> WriterContext {
        let opened = broker
            .registry
            .open("writer", true, None, |_| true, |_| {})
            .unwrap();
        WriterContext {
            session: opened.session,
            connection_id: 1,
            control: Arc::new(ConnectionControl::default()),
            protocol,
            client_max_packet: None,
            client_topic_alias_max: 0,
            metrics: Arc::clone(&broker.metrics),
        }
    }

    /// A batch of messages to topic `b` with these payloads, the second
    /// one retained.
    fn batch_of(payloads: &[&[u8]]) -> Arc<MessageBatch> {
        let messages = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| {
                Message::new(
                    Bytes::from_static(b"b"),
                    Bytes::copy_from_slice(payload),
                    QoS::AtMostOnce,
                    i == 1,
                    Default::default(),
                    0,
                )
            })
            .collect();
        MessageBatch::new(messages)
    }

    /// What the writer of `ctx` writes for `items`.
    async fn written(ctx: &WriterContext, items: Vec<Outbound>) -> Vec<u8> {
        let mut buffers = WriteBuffers::new(ctx);
        buffers.items.extend(items);
        let mut socket = Recorder::default();
        write_batch(&mut socket, ctx, &mut buffers).await.unwrap();
        socket.bytes
    }

    /// A batch is written as its messages, in order, each with its own
    /// RETAIN flag as published, and counted as that many packets: alike
    /// from the frames its subscribers share and, for its only subscriber,
    /// encoded message by message.
    #[tokio::test]
    async fn a_batch_is_written_as_its_messages() {
        let packet = |flags: u8, payload: u8| [0x30 | flags, 4, 0, 1, b'b', payload];
        let kept: Vec<u8> = [packet(0, b'0'), packet(1, b'1'), packet(0, b'2')].concat();
        let cleared: Vec<u8> = [packet(0, b'0'), packet(0, b'1'), packet(0, b'2')].concat();
        for shared in [true, false] {
            let broker = Broker::new(Config::default());
            let ctx = writer_context(&broker, ProtocolVersion::V311);
            let batch = batch_of(&[b"0", b"1", b"2"]);
            let delivery = |rap| BatchDelivery::new(Arc::clone(&batch), rap, Default::default());
            let mut items = vec![Outbound::Batch(delivery(true))];
            if shared {
                // The same batch to another subscriber, in the other shape.
                items.push(Outbound::Batch(delivery(false)));
            }
            drop(batch);
            let expected = if shared {
                [kept.clone(), cleared.clone()].concat()
            } else {
                kept.clone()
            };
            assert_eq!(written(&ctx, items).await, expected, "shared: {shared}");
            let packets = if shared { 6 } else { 3 };
            assert_eq!(broker.metrics.packets_sent.get(), packets);
        }
    }

    /// A packet larger than the client's Maximum Packet Size is left out of
    /// a batch shared with others, and counted; the others are sent.
    #[tokio::test]
    async fn a_batch_leaves_out_what_the_client_cannot_take() {
        let broker = Broker::new(Config::default());
        let mut ctx = writer_context(&broker, ProtocolVersion::V5);
        ctx.client_max_packet = Some(7);
        let batch = batch_of(&[b"0", b"too large", b"2"]);
        let _other_subscriber = BatchDelivery::new(Arc::clone(&batch), false, Default::default());
        let delivery = BatchDelivery::new(batch, false, Default::default());
        let bytes = written(&ctx, vec![Outbound::Batch(delivery)]).await;
        // MQTT 5: an empty property length after the topic.
        let packet = |payload: u8| [0x30, 5, 0, 1, b'b', 0, payload];
        assert_eq!(bytes, [packet(b'0'), packet(b'2')].concat());
        assert_eq!(broker.metrics.packets_sent.get(), 2);
        assert_eq!(broker.metrics.messages_dropped_oversized.get(), 1);
    }

    /// A subscriber far behind a fan-out: 20,000 small deliveries of one
    /// message. They are written in slices, not encoded all at once (which
    /// held 1.5 MB here, and as much again for every such subscriber), and
    /// the writer keeps no more encoding room than a slice's afterwards.
    #[tokio::test]
    async fn a_backlog_is_encoded_and_written_a_slice_at_a_time() {
        let broker = Broker::new(Config::default());
        let ctx = writer_context(&broker, ProtocolVersion::V311);
        let message = Message::new(
            Bytes::from_static(b"fan/out"),
            Bytes::from(vec![7u8; 64]),
            QoS::AtMostOnce,
            false,
            Default::default(),
            0,
        );
        let mut batch = WriteBuffers::new(&ctx);
        const BACKLOG: usize = 20_000;
        for _ in 0..BACKLOG {
            let delivery =
                Delivery::new(&message, QoS::AtMostOnce, false, SubscriptionIds::default());
            batch.items.push_back(Outbound::Publish(delivery));
        }
        let mut socket = Recorder::default();
        write_batch(&mut socket, &ctx, &mut batch).await.unwrap();

        // 2 + 2 + 7 topic + 64 payload bytes each, all of them, in order.
        let packet = 75;
        assert_eq!(socket.bytes.len(), BACKLOG * packet);
        assert!(socket
            .bytes
            .chunks(packet)
            .all(|p| p[..4] == [0x30, 73, 0, 7]));
        let largest = socket.writes.iter().max().copied().unwrap();
        assert!(
            largest <= WRITE_SLICE_BYTES + packet,
            "one write of {largest} bytes"
        );
        assert!(socket.writes.len() >= BACKLOG * packet / (WRITE_SLICE_BYTES + packet));
        assert!(batch.items.is_empty() && batch.chunks.is_empty());
        assert!(batch.scratch.capacity() <= SCRATCH_KEPT);
        assert_eq!(broker.metrics.packets_sent.get(), BACKLOG as u64);
    }

    /// Counts the allocations of the thread that asks, and only while it
    /// asks ([`allocations_in`]): the lib's tests run in parallel.
    struct ThreadCounting;

    thread_local! {
        static COUNTED: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    fn count_one() {
        let _ = COUNTED.try_with(|c| c.set(c.get().map(|n| n + 1)));
    }

    unsafe impl std::alloc::GlobalAlloc for ThreadCounting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            count_one();
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(
            &self,
            ptr: *mut u8,
            layout: std::alloc::Layout,
            new_size: usize,
        ) -> *mut u8 {
            count_one();
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: ThreadCounting = ThreadCounting;

    /// The allocations `f` makes on this thread.
    fn allocations_in(f: impl FnOnce()) -> usize {
        COUNTED.with(|c| c.set(Some(0)));
        f();
        COUNTED.with(|c| c.take()).unwrap_or(0)
    }

    /// MQTT 5 deliveries of a message with user properties and an expiry,
    /// with a Subscription Identifier (a header of their own) or without
    /// (the message's shared header, the expiry written over it): the
    /// message's properties are encoded once, by the first delivery, and the
    /// others allocate nothing; the only delivery of a message allocates
    /// nothing at all. Each carries all of them.
    #[test]
    fn deliveries_with_their_own_properties_allocate_nothing() {
        let broker = Broker::new(Config::default());
        let ctx = writer_context(&broker, ProtocolVersion::V5);
        let properties = PublishProperties {
            message_expiry_interval: Some(600),
            content_type: Some(Bytes::from_static(b"text/plain")),
            user_properties: (0..8)
                .map(|i| (Bytes::from(format!("k{i}")), Bytes::from_static(b"v")))
                .collect(),
            ..PublishProperties::default()
        };
        const DELIVERIES: usize = 1000;
        let cases = [(false, vec![7, 300]), (true, vec![7, 300]), (false, vec![])];
        for (sole, ids) in cases {
            let ids: SubscriptionIds = ids.into_iter().collect();
            let message = Message::new(
                Bytes::from_static(b"fan/out"),
                Bytes::from(vec![7u8; 64]),
                QoS::AtMostOnce,
                false,
                Some(Box::new(properties.clone())),
                0,
            );
            let outgoing = Outgoing {
                message: &message,
                qos: QoS::AtMostOnce,
                dup: false,
                retain: false,
                packet_id: None,
                subscription_ids: &ids,
                sole,
            };
            let mut scratch = BytesMut::with_capacity(1 << 20);
            let mut chunks = VecDeque::new();
            let now = Instant::now();
            let mut encode = || {
                assert!(encode_publish(
                    &ctx,
                    &mut None,
                    &outgoing,
                    now,
                    &mut scratch,
                    &mut chunks
                ));
            };
            let first = allocations_in(&mut encode);
            let others = allocations_in(|| (1..DELIVERIES).for_each(|_| encode()));
            assert_eq!(others, 0, "sole: {sole}, ids: {ids:?}");
            assert!(first <= if sole { 0 } else { 2 }, "sole: {sole}: {first}");

            assert!(chunks.is_empty(), "small payloads are copied");
            let packet = scratch.len() / DELIVERIES;
            assert_eq!(scratch.len(), packet * DELIVERIES);
            let mut one = BytesMut::from(&scratch[..packet]);
            let Ok(Some(Packet::Publish(p))) =
                tern_codec::decode_packet(&mut one, ProtocolVersion::V5, usize::MAX)
            else {
                panic!("not a PUBLISH");
            };
            assert_eq!(
                p.properties(),
                &PublishProperties {
                    subscription_identifiers: ids.to_vec(),
                    ..properties.clone()
                }
            );
            assert_eq!(&scratch[..packet], &scratch[scratch.len() - packet..]);
        }
    }

    /// Deliveries that share an MQTT 5 message's header each state the
    /// expiry left at their own time, in 3.x none; QoS 1 ones their own
    /// packet id.
    #[test]
    fn a_shared_header_states_each_delivery_s_remaining_expiry() {
        let broker = Broker::new(Config::default());
        let message = Message::new(
            Bytes::from_static(b"t/x"),
            Bytes::from_static(b"payload"),
            QoS::AtLeastOnce,
            false,
            Some(Box::new(PublishProperties {
                message_expiry_interval: Some(600),
                correlation_data: Some(Bytes::from_static(b"c")),
                ..PublishProperties::default()
            })),
            0,
        );
        let created = Instant::now();
        let ids = SubscriptionIds::default();
        for protocol in [ProtocolVersion::V5, ProtocolVersion::V311] {
            let ctx = writer_context(&broker, protocol);
            let mut received = Vec::new();
            for (after, packet_id) in [(0, 1), (100, 2), (599, 3)] {
                let outgoing = Outgoing {
                    message: &message,
                    qos: QoS::AtLeastOnce,
                    dup: after == 100,
                    retain: false,
                    packet_id: Some(packet_id),
                    subscription_ids: &ids,
                    sole: false,
                };
                let now = created + Duration::from_secs(after);
                let mut scratch = BytesMut::new();
                let mut chunks = VecDeque::new();
                assert!(encode_publish(
                    &ctx,
                    &mut None,
                    &outgoing,
                    now,
                    &mut scratch,
                    &mut chunks
                ));
                let Ok(Some(Packet::Publish(p))) =
                    tern_codec::decode_packet(&mut scratch, protocol, usize::MAX)
                else {
                    panic!("not a PUBLISH");
                };
                assert!(scratch.is_empty());
                assert_eq!(&p.payload[..], b"payload");
                received.push((
                    p.packet_id,
                    p.dup,
                    p.properties().message_expiry_interval,
                    p.properties().correlation_data.clone(),
                ));
            }
            let c = || Some(Bytes::from_static(b"c"));
            let expected = if protocol.is_v5() {
                vec![
                    (Some(1), false, Some(600), c()),
                    (Some(2), true, Some(500), c()),
                    (Some(3), false, Some(1), c()),
                ]
            } else {
                vec![
                    (Some(1), false, None, None),
                    (Some(2), true, None, None),
                    (Some(3), false, None, None),
                ]
            };
            assert_eq!(received, expected, "{protocol:?}");
        }
    }
}
