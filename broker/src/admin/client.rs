//! A small blocking HTTP/1.1 client for the admin endpoint: GET only, one
//! request per connection (`Connection: close`), over `std::net::TcpStream`.
//!
//! It understands the three ways the endpoint ends a body: `Content-Length`,
//! `Transfer-Encoding: chunked` (streamed lists; a missing last chunk means
//! the server failed mid-way and is reported, not taken as the end) and,
//! for other servers, the end of the connection.

use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::error::AdminError;
use super::model::ErrorBody;

/// Time allowed to connect to each resolved address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one read (the server may pause while it walks the store).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for one write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line accepted in a chunked body.
const MAX_CHUNK_LINE: u64 = 1024;
/// Most of an error body read for its message.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// Where the admin endpoint is: parsed from `--url http://HOST:PORT[/PATH]`.
#[derive(Debug, Clone)]
pub struct Client {
    /// The URL as given, for messages.
    url: String,
    /// `HOST:PORT` as written (the `Host` header).
    authority: String,
    host: String,
    port: u16,
    /// Path prefix without a trailing `/` (empty for the root).
    base: String,
}

/// An answer with a success status whose body is still to be read.
struct Response {
    body: Box<dyn Read>,
}

impl Client {
    /// Parses `url`: only `http://` URLs, without user info, query or
    /// fragment.
    pub fn new(url: &str) -> Result<Client, AdminError> {
        let bad = |reason| AdminError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => {
                return Err(bad(
                    "only http:// is supported (the admin endpoint speaks plain HTTP)",
                ))
            }
            None => return Err(bad("expected http://HOST:PORT")),
        };
        if rest.contains(['?', '#', '@']) {
            return Err(bad(
                "expected http://HOST:PORT, without user, query or fragment",
            ));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
        Ok(Client {
            url: url.to_owned(),
            authority: authority.to_owned(),
            host,
            port,
            base: path.trim_end_matches('/').to_owned(),
        })
    }

    /// GETs `path` (with its query) and parses the JSON body as `T`.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        let mut body = Vec::new();
        self.get(path)?
            .body
            .read_to_end(&mut body)
            .map_err(|e| self.bad_response(format!("reading the body: {e}")))?;
        serde_json::from_slice(&body).map_err(|e| self.bad_response(format!("invalid JSON: {e}")))
    }

    /// GETs `path` and copies the body to `out` as it arrives.
    pub fn get_to(&self, path: &str, out: &mut dyn Write) -> Result<(), AdminError> {
        let mut body = self.get(path)?.body;
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| self.bad_response(format!("reading the body: {e}")))?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])?;
        }
    }

    /// Sends the request and reads the head; an error status becomes the
    /// matching [`AdminError`].
    fn get(&self, path: &str) -> Result<Response, AdminError> {
        let mut stream = self.connect()?;
        let request = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tern-admin\r\n\
             Accept: application/json\r\nConnection: close\r\n\r\n",
            self.base, self.authority
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| self.unreachable(e))?;
        let mut reader = BufReader::new(stream);
        let (status, framing, rest) = self.read_head(&mut reader)?;
        let raw: Box<dyn BufRead> = Box::new(Cursor::new(rest).chain(reader));
        let body: Box<dyn Read> = match framing {
            Framing::Chunked => Box::new(Chunked::new(raw)),
            Framing::Length(n) => Box::new(Exact {
                inner: raw.take(n),
                left: n,
            }),
            // Boxed again: `Box<dyn BufRead>` to `Box<dyn Read>` needs Rust 1.86.
            Framing::Close => Box::new(raw),
        };
        match status {
            200..=299 => Ok(Response { body }),
            _ => Err(self.status_error(status, body)),
        }
    }

    fn connect(&self) -> Result<TcpStream, AdminError> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| self.unreachable(e))?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    let timeouts = stream
                        .set_read_timeout(Some(READ_TIMEOUT))
                        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
                    timeouts.map_err(|e| self.unreachable(e))?;
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(self.unreachable(last))
    }

    /// Reads the response head; returns the status, how the body ends and
    /// the body bytes already read past the head.
    fn read_head(&self, reader: &mut impl BufRead) -> Result<(u16, Framing, Vec<u8>), AdminError> {
        let mut buf = Vec::new();
        loop {
            let chunk = reader.fill_buf().map_err(|e| self.unreachable(e))?;
            if chunk.is_empty() {
                return Err(self.bad_response("the connection closed before a response".into()));
            }
            let n = chunk.len();
            buf.extend_from_slice(chunk);
            reader.consume(n);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = response.code.unwrap_or(0);
                    let framing = Framing::of(response.headers)
                        .ok_or_else(|| self.bad_response("bad Content-Length".into()))?;
                    return Ok((status, framing, buf.split_off(len)));
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(self.bad_response("response head too large".into()))
                }
                Err(e) => return Err(self.bad_response(format!("not HTTP: {e}"))),
            }
        }
    }

    /// Turns an error answer into an [`AdminError`], taking the message
    /// from the `{"error": ...}` body when there is one.
    fn status_error(&self, status: u16, body: Box<dyn Read>) -> AdminError {
        let mut text = Vec::new();
        // A body that cannot be read still leaves the status to report.
        let _ = body.take(MAX_ERROR_BODY).read_to_end(&mut text);
        let message = match serde_json::from_slice::<ErrorBody>(&text) {
            Ok(b) => b.error,
            Err(_) => String::from_utf8_lossy(&text).trim().to_owned(),
        };
        match status {
            404 => AdminError::NotFound(message),
            400 => AdminError::BadRequest(message),
            _ => AdminError::Http {
                url: self.url.clone(),
                status,
                message,
            },
        }
    }

    fn unreachable(&self, source: io::Error) -> AdminError {
        AdminError::Unreachable {
            url: self.url.clone(),
            source,
        }
    }

    fn bad_response(&self, reason: String) -> AdminError {
        AdminError::BadResponse {
            url: self.url.clone(),
            reason,
        }
    }
}

/// Splits `host:port`, `[v6]:port` or `host` (port 80).
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok().filter(|p| *p != 0)?,
        None => 80,
    };
    Some((host.to_owned(), port))
}

/// Percent-encodes `s` for a URL path segment or query value: everything
/// but the unreserved characters, and `/` too unless `keep_slash`.
pub fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How a response body ends.
enum Framing {
    Chunked,
    Length(u64),
    Close,
}

impl Framing {
    /// `None` for an unreadable `Content-Length`.
    fn of(headers: &[httparse::Header<'_>]) -> Option<Framing> {
        let value = |name: &str| {
            headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
        };
        if value("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
            return Some(Framing::Chunked);
        }
        match value("content-length") {
            Some(n) => n.parse().ok().map(Framing::Length),
            None => Some(Framing::Close),
        }
    }
}

/// A `Content-Length` body: fails if the connection ends early.
struct Exact<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(truncated());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A `Transfer-Encoding: chunked` body.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Chunked {
            inner,
            left: 0,
            done: false,
        }
    }

    /// Reads one line (CRLF or LF ended), failing at EOF or past the limit.
    fn line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        (&mut self.inner)
            .take(MAX_CHUNK_LINE)
            .read_until(b'\n', &mut line)?;
        if line.last() != Some(&b'\n') {
            return Err(truncated());
        }
        Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
    }

    /// Reads the next chunk-size line; at the last chunk, the trailers.
    fn next_chunk(&mut self) -> io::Result<()> {
        let line = self.line()?;
        let size = line.split(';').next().unwrap_or("").trim();
        self.left = u64::from_str_radix(size, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if self.left == 0 {
            while !self.line()?.is_empty() {}
            self.done = true;
        }
        Ok(())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 && !self.done {
            self.next_chunk()?;
        }
        if self.done {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(truncated());
        }
        self.left -= n as u64;
        if self.left == 0 && !self.line()?.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk not followed by CRLF",
            ));
        }
        Ok(n)
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the response ended early (the server failed mid-way?)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_only() {
        let c = Client::new("http://127.0.0.1:8081").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("127.0.0.1", 8081, "")
        );
        let c = Client::new("HTTP://[::1]:9/admin/").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("::1", 9, "/admin")
        );
        assert_eq!(Client::new("http://localhost").unwrap().port, 80);
        for bad in [
            "https://127.0.0.1:1",
            "127.0.0.1:1",
            "http://:1",
            "http://h:x",
            "http://h:0",
            "http://u@h:1",
            "http://h:1/?q",
            "http://[::1",
        ] {
            assert!(Client::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a/+ é", false), "a%2F%2B%20%C3%A9");
        assert_eq!(percent_encode("a/b#", true), "a/b%23");
    }

    #[test]
    fn chunked_bodies_decode_and_detect_truncation() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\n\r\n";
        let mut out = String::new();
        Chunked::new(&body[..]).read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello!");
        let mut out = String::new();
        let err = Chunked::new(&b"5\r\nhello\r\n"[..])
            .read_to_string(&mut out)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(Chunked::new(&b"zz\r\n"[..])
            .read_to_end(&mut Vec::new())
            .is_err());
    }

    #[test]
    fn exact_bodies_detect_truncation() {
        let mut r = Exact {
            inner: (&b"abc"[..]).take(5),
            left: 5,
        };
        assert!(r.read_to_end(&mut Vec::new()).is_err());
        let mut r = Exact {
            inner: (&b"abcdef"[..]).take(3),
            left: 3,
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
    }
}
