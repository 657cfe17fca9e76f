//! The MQTT data representations (MQTT 5.0 section 1.5, 3.1.1 section 1.5):
//! big-endian integers, the Variable Byte Integer, length-prefixed UTF-8
//! strings and binary data.
//!
//! Decoding goes through [`Reader`], a cursor over a [`Bytes`] that holds
//! exactly one frame's body. Every read checks that the bytes are actually
//! there and fails with [`DecodeError::Malformed`] otherwise, so a length the
//! peer claims can never make the reader run past the frame, and the reader
//! never allocates: strings and binary fields come out as [`Bytes`] slices
//! sharing the frame's memory (`Bytes::split_to` is a pointer adjustment plus
//! a reference count increment).
//!
//! Encoding goes through the [`Sink`] trait, implemented both by `BytesMut`
//! (which writes) and by [`Counter`] (which only adds up lengths). Each packet
//! is written by a single function generic over the sink, so the length that
//! goes in a header is computed by the very code that writes the bytes it
//! measures and the two can never disagree.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};

/// Largest value a Variable Byte Integer can hold (four bytes of 7 bits).
pub(crate) const VARINT_MAX: u32 = 268_435_455;

/// Largest length of a string or binary field (its prefix is a u16).
const FIELD_MAX: usize = u16::MAX as usize;

/// Why a Variable Byte Integer could not be read from a possibly incomplete
/// buffer.
pub(crate) enum VarintError {
    /// More bytes are needed.
    Incomplete,
    /// A fifth byte would be needed: malformed.
    TooLong,
    /// More bytes than the value needs (a last byte of 0 after the first,
    /// e.g. `80 00` for 0): malformed, MQTT-1.5.5-1.
    NotMinimal,
}

/// Reads a Variable Byte Integer from the start of `bytes`, which may be
/// incomplete (used for the fixed header, before the frame is complete).
/// Returns the value and how many bytes it took.
pub(crate) fn peek_varint(bytes: &[u8]) -> Result<(u32, usize), VarintError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = bytes.get(i) else {
            return Err(VarintError::Incomplete);
        };
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(VarintError::NotMinimal);
            }
            return Ok((value, i + 1));
        }
    }
    Err(VarintError::TooLong)
}

/// Number of bytes `value` takes as a Variable Byte Integer (at most
/// [`VARINT_MAX`]).
pub(crate) fn varint_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Checks that `bytes` are valid UTF-8 without U+0000, as MQTT requires of
/// every UTF-8 Encoded String (MQTT 5.0 section 1.5.4).
pub(crate) fn check_utf8(bytes: &[u8]) -> Result<(), DecodeError> {
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
    if s.contains('\0') {
        return Err(DecodeError::Malformed("U+0000 in a UTF-8 string"));
    }
    Ok(())
}

/// A cursor over one frame's body.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next byte, not consumed.
    pub(crate) fn peek_u8(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// Fails unless everything has been consumed.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "trailing bytes after the packet's fields",
            ))
        }
    }

    /// Takes the next `n` bytes (a slice of the frame, not a copy).
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Malformed(
                "field runs past the end of the packet",
            ));
        }
        Ok(self.buf.split_to(n))
    }

    /// Takes everything that is left.
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    // The integers are read in place and skipped with `advance`, which moves
    // a pointer: a slice of the frame (`take`, `slice`) costs an atomic
    // increment of the read buffer's count and its drop a decrement, and
    // the writer dropping the message on another core contends for that
    // same count.

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .buf
            .first()
            .ok_or(DecodeError::Malformed("packet ends too early"))?;
        self.buf.advance(1);
        Ok(b)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// The next `N` bytes, copied out.
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes: [u8; N] =
            self.buf
                .get(..N)
                .and_then(|b| b.try_into().ok())
                .ok_or(DecodeError::Malformed(
                    "field runs past the end of the packet",
                ))?;
        self.buf.advance(N);
        Ok(bytes)
    }

    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match peek_varint(&self.buf) {
            Ok((value, len)) => {
                self.buf.advance(len);
                Ok(value)
            }
            Err(VarintError::Incomplete) => Err(DecodeError::Malformed("packet ends too early")),
            Err(VarintError::TooLong) => Err(DecodeError::Malformed(
                "variable byte integer longer than 4 bytes",
            )),
            Err(VarintError::NotMinimal) => Err(DecodeError::Malformed(
                "variable byte integer not in its shortest form",
            )),
        }
    }

    /// Binary Data: a u16 length and that many bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// UTF-8 Encoded String, checked (valid UTF-8, no U+0000).
    pub(crate) fn string(&mut self) -> Result<Bytes, DecodeError> {
        let s = self.binary()?;
        check_utf8(&s)?;
        Ok(s)
    }
}

/// Where encoded bytes go: a real buffer, or a [`Counter`].
pub(crate) trait Sink {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_slice(&mut self, s: &[u8]);
}

impl Sink for BytesMut {
    fn put_u8(&mut self, v: u8) {
        BufMut::put_u8(self, v);
    }
    fn put_u16(&mut self, v: u16) {
        BufMut::put_u16(self, v);
    }
    fn put_u32(&mut self, v: u32) {
        BufMut::put_u32(self, v);
    }
    fn put_slice(&mut self, s: &[u8]) {
        self.extend_from_slice(s);
    }
}

/// A sink that only counts bytes.
#[derive(Default)]
pub(crate) struct Counter(pub(crate) usize);

impl Sink for Counter {
    fn put_u8(&mut self, _: u8) {
        self.0 += 1;
    }
    fn put_u16(&mut self, _: u16) {
        self.0 += 2;
    }
    fn put_u32(&mut self, _: u32) {
        self.0 += 4;
    }
    fn put_slice(&mut self, s: &[u8]) {
        self.0 += s.len();
    }
}

/// Writes a Variable Byte Integer; `what` names the field in the error.
pub(crate) fn put_varint<W: Sink>(
    w: &mut W,
    value: usize,
    what: &'static str,
) -> Result<(), EncodeError> {
    if value > VARINT_MAX as usize {
        return Err(EncodeError::ValueOutOfRange(what));
    }
    let mut v = value as u32;
    loop {
        let mut byte = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        w.put_u8(byte);
        if v == 0 {
            return Ok(());
        }
    }
}

/// Writes a length-prefixed string or binary field.
pub(crate) fn put_binary<W: Sink>(
    w: &mut W,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), EncodeError> {
    if bytes.len() > FIELD_MAX {
        return Err(EncodeError::FieldTooLong(what));
    }
    w.put_u16(bytes.len() as u16);
    w.put_slice(bytes);
    Ok(())
}

/// Runs `f` against a [`Counter`] and returns the number of bytes it wrote.
pub(crate) fn measure(
    f: impl FnOnce(&mut Counter) -> Result<(), EncodeError>,
) -> Result<usize, EncodeError> {
    let mut c = Counter::default();
    f(&mut c)?;
    Ok(c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries() {
        for (value, bytes) in [
            (0usize, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, value, "v").unwrap();
            assert_eq!(&out[..], bytes, "{value}");
            assert_eq!(varint_len(value as u32), bytes.len());
            let mut r = Reader::new(Bytes::copy_from_slice(bytes));
            assert_eq!(r.varint().unwrap() as usize, value);
            assert!(r.is_empty());
        }
        assert!(put_varint(&mut BytesMut::new(), 268_435_456, "v").is_err());
    }

    #[test]
    fn varint_too_long_or_short() {
        let mut r = Reader::new(Bytes::from_static(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]));
        assert!(r.varint().is_err());
        let mut r = Reader::new(Bytes::from_static(&[0xFF, 0xFF]));
        assert!(r.varint().is_err());
    }

    #[test]
    fn varint_not_in_its_shortest_form_is_malformed() {
        // MQTT-1.5.5-1: 0 as two bytes, 127 as two, 128 as three.
        for bytes in [&[0x80, 0x00][..], &[0xFF, 0x00], &[0x80, 0x81, 0x00]] {
            let mut r = Reader::new(Bytes::copy_from_slice(bytes));
            assert_eq!(
                r.varint(),
                Err(DecodeError::Malformed(
                    "variable byte integer not in its shortest form"
                )),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn strings() {
        let mut r = Reader::new(Bytes::from_static(
            b"\x00\x03abc\x00\x02\xC3\x28\x00\x01\x00",
        ));
        assert_eq!(&r.string().unwrap()[..], b"abc");
        assert_eq!(r.string(), Err(DecodeError::Malformed("invalid UTF-8")));
        assert!(r.string().is_err()); // U+0000
        let mut r = Reader::new(Bytes::from_static(b"\x00\x05ab"));
        assert!(r.string().is_err());
    }

    #[test]
    fn reader_never_overruns() {
        let mut r = Reader::new(Bytes::from_static(&[1]));
        assert!(r.u16().is_err());
        assert!(r.u32().is_err());
        assert_eq!(r.u8().unwrap(), 1);
        assert!(r.u8().is_err());
        assert!(r.take(1).is_err());
        assert!(r.finish().is_ok());
    }
}
