//! The PROXY protocol (HAProxy, versions 1 and 2): a header a TCP proxy puts
//! in front of the client's bytes to say who the client really is.
//!
//! Only read when a listener is configured for it (a client could otherwise
//! claim any address): then every connection must start with a valid header,
//! or it is closed. The header is read byte-exactly before anything else, and
//! its size is bounded ([`V1_MAX`], [`V2_MAX_ADDRESS_BLOCK`]) before any
//! buffer is sized from it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest version 1 header the specification allows, CRLF included.
pub const V1_MAX: usize = 107;

/// The largest version 2 address block (addresses and TLVs) accepted; the
/// specification allows 65,535 but proxies send a few dozen bytes.
pub const V2_MAX_ADDRESS_BLOCK: usize = 512;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header. `Ok(Some(addr))` is the client's address; `Ok(None)`
/// means the proxy sent no address (v1 `UNKNOWN`, v2 `LOCAL`, or a family
/// other than TCP over IPv4/IPv6): keep the socket's peer address.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut first = [0u8; 12];
    stream.read_exact(&mut first[..6]).await?;
    if &first[..6] == b"PROXY " {
        return read_v1(stream).await;
    }
    stream.read_exact(&mut first[6..]).await?;
    if first == V2_SIGNATURE {
        return read_v2(stream).await;
    }
    Err(ProxyHeaderError::Missing)
}

async fn read_v1<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // The rest of the line, byte by byte up to the bound: nothing after the
    // header may be consumed.
    let mut line = Vec::with_capacity(V1_MAX);
    loop {
        if line.len() + 6 >= V1_MAX {
            return Err(ProxyHeaderError::Malformed("v1 header too long"));
        }
        let byte = stream.read_u8().await?;
        line.push(byte);
        if line.ends_with(b"\r\n") {
            break;
        }
    }
    let text = std::str::from_utf8(&line[..line.len() - 2])
        .map_err(|_| ProxyHeaderError::Malformed("v1 header is not ASCII"))?;
    parse_v1(text)
}

/// Parses what follows `PROXY ` on a version 1 line.
fn parse_v1(text: &str) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["UNKNOWN", ..] => Ok(None),
        [family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyHeaderError::Malformed("v1 address family"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(ProxyHeaderError::Malformed("v1 fields")),
    }
}

async fn read_v2<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let [version_command, family, len_hi, len_lo] = head;
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if len > V2_MAX_ADDRESS_BLOCK {
        return Err(ProxyHeaderError::Malformed("v2 address block too long"));
    }
    let mut block = vec![0u8; len];
    stream.read_exact(&mut block).await?;
    parse_v2(version_command & 0x0F, family, &block)
}

/// Parses a version 2 address block for `command` (0 LOCAL, 1 PROXY).
fn parse_v2(command: u8, family: u8, block: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    match command {
        0 => return Ok(None),
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("v2 command")),
    }
    match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 if block.len() >= 12 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            let port = u16::from_be_bytes([block[8], block[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        0x21 if block.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            let port = u16::from_be_bytes([block[32], block[33]]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        0x11 | 0x21 => Err(ProxyHeaderError::Malformed("v2 address block too short")),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let result = read_header(&mut cursor).await;
        let at = cursor.position() as usize;
        (result, bytes[at..].to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_and_unknown() {
        let (r, rest) = read(b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 8083\r\nGET /").await;
        assert_eq!(r.unwrap(), Some("192.0.2.7:51234".parse().unwrap()));
        assert_eq!(rest, b"GET /", "nothing after the header is consumed");
        let (r, _) = read(b"PROXY TCP6 2001:db8::1 ::1 4000 8083\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (r, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(r.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_ipv4_ipv6_and_local() {
        let mut v4 = V2_SIGNATURE.to_vec();
        v4.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0x1F, 0x90, 0x1F, 0x93,
        ]);
        v4.extend_from_slice(b"GET");
        let (r, rest) = read(&v4).await;
        assert_eq!(r.unwrap(), Some("198.51.100.9:8080".parse().unwrap()));
        assert_eq!(rest, b"GET");
        let mut v6 = V2_SIGNATURE.to_vec();
        v6.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let mut src = [0u8; 16];
        src[15] = 1;
        v6.extend_from_slice(&src);
        v6.extend_from_slice(&[0u8; 16]);
        v6.extend_from_slice(&[0x00, 0x50, 0x00, 0x51]);
        let (r, _) = read(&v6).await;
        assert_eq!(r.unwrap(), Some("[::1]:80".parse().unwrap()));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n\r\n").await.0,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            read(b"PROXY TCP4 nonsense\r\n").await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            read(b"PROXY TCP4 ::1 ::1 1 2\r\n").await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            read(long.as_bytes()).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert!(matches!(
            read(&huge).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(matches!(
            read(&short).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }
}
