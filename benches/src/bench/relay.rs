//! `relay`: the floor under any broker's fan-out latency on a machine.
//!
//! A stand-in broker that forwards every PUBLISH, byte for byte, to every
//! connection that has subscribed to anything, with one blocking `write`
//! per subscriber. It routes nothing, wakes no task and keeps no state
//! beyond the list of subscribers: what a delivery costs here is what the
//! operating system charges for one write and one read on a loopback
//! socket. `tern-bench latency` pointed at it measures what the machine
//! allows for that load, the yardstick for a broker's figure.
//!
//! The writes are shared by `--threads` writer threads (default: one per
//! core), each writing every frame to its own share of the subscribers
//! (the i-th to subscribe goes to thread i mod N). With `--threads 1` the
//! publisher's reading thread writes them all itself, as a single event
//! loop broker does. A write that blocks (a subscriber that stopped
//! reading) holds up its thread's share and any SUBSCRIBE or departure
//! meanwhile: the relay is a yardstick for subscribers that read.
//!
//! Meant for QoS 0 and for a generator whose publishers and subscribers
//! speak one protocol version (frames are forwarded unchanged). QoS 1/2
//! publishes are acknowledged and forwarded with the publisher's packet id;
//! what subscribers send back for them is read and ignored.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::args::Args;
use crate::wire;

/// Read buffer per connection: a publisher's burst of frames fits many
/// times over, and a frame larger than it grows it.
const READ_BUF: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    pub scenario: String,
    pub port: u16,
    pub duration_s: f64,
    pub connections: u64,
    pub publishes: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub cpu_s: f64,
}

impl RelayReport {
    pub fn text(&self) -> String {
        format!(
            "relay on port {}: {} connection(s), {} PUBLISH in {:.2} s forwarded as {} deliveries = {:.0}/s, {:.2} CPU-s\n",
            self.port,
            self.connections,
            self.publishes,
            self.duration_s,
            self.deliveries,
            self.deliveries_per_s,
            self.cpu_s
        )
    }
}

/// The write half of a connection: its own thread (acknowledgements) and
/// every publisher's thread (forwarded frames) write through the lock, so
/// that frames never interleave.
type Writer = Arc<Mutex<TcpStream>>;

struct Subscriber {
    id: u64,
    lane: usize,
    writer: Writer,
}

#[derive(Default)]
struct Relay {
    /// Every connection that has sent SUBSCRIBE, once each, in that order,
    /// with the writer thread it was given then.
    subscribers: RwLock<Vec<Subscriber>>,
    /// Subscriptions so far: the next one's writer thread is this mod the
    /// thread count.
    subscribed: AtomicU64,
    /// The writer threads' inboxes; none: the publisher's thread writes.
    lanes: Vec<Sender<Arc<[u8]>>>,
    connections: AtomicU64,
    publishes: AtomicU64,
    deliveries: AtomicU64,
}

/// Serves on --host:--port (port 0: any; the port is printed on stderr)
/// for --duration seconds, on threads of its own (one per connection).
pub fn serve(args: &Args) -> Result<RelayReport, String> {
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let (port, relay) = start(&args.host, args.port, threads)?;
    eprintln!("tern-bench relay listening on {}:{port}", args.host);
    let cpu_before = crate::procfs::self_cpu_seconds();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    let duration_s = started.elapsed().as_secs_f64();
    let deliveries = relay.deliveries.load(Relaxed);
    // Connections still open close with the process.
    Ok(RelayReport {
        scenario: "relay".into(),
        port,
        duration_s,
        connections: relay.connections.load(Relaxed),
        publishes: relay.publishes.load(Relaxed),
        deliveries,
        deliveries_per_s: deliveries as f64 / duration_s,
        cpu_s: crate::procfs::self_cpu_seconds() - cpu_before,
    })
}

/// Binds, starts the writer threads (none for `threads` 1) and the accept
/// loop; returns the port it listens on.
fn start(host: &str, port: u16, threads: usize) -> Result<(u16, Arc<Relay>), String> {
    let listener =
        TcpListener::bind((host, port)).map_err(|e| format!("relay: bind {host}:{port}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let mut inboxes = Vec::new();
    let mut lanes = Vec::new();
    if threads > 1 {
        for _ in 0..threads {
            let (tx, rx) = channel();
            lanes.push(tx);
            inboxes.push(rx);
        }
    }
    let relay = Arc::new(Relay {
        lanes,
        ..Relay::default()
    });
    for (lane, inbox) in inboxes.into_iter().enumerate() {
        let relay = Arc::clone(&relay);
        std::thread::spawn(move || {
            while let Ok(frame) = inbox.recv() {
                write_share(&relay, &frame, lane);
            }
        });
    }
    let accepting = Arc::clone(&relay);
    std::thread::spawn(move || {
        for (stream, id) in listener.incoming().flatten().zip(0u64..) {
            accepting.connections.fetch_add(1, Relaxed);
            let relay = Arc::clone(&accepting);
            std::thread::spawn(move || connection(id, stream, &relay));
        }
    });
    Ok((port, relay))
}

fn connection(id: u64, mut stream: TcpStream, relay: &Relay) {
    let _ = stream.set_nodelay(true);
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let writer: Writer = Arc::new(Mutex::new(writer));
    let mut buf = vec![0u8; READ_BUF];
    let mut len = 0;
    let mut v5 = false;
    let mut subscribed = false;
    let mut out = Vec::new();
    'read: loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => len += k,
        }
        let mut at = 0;
        loop {
            let f = match wire::next_frame(&buf[at..len]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => break 'read,
            };
            let frame = &buf[at..at + f.len];
            let body = &frame[f.body_start..];
            if !wire::stand_in_reply(&f, body, &mut v5, &mut out) {
                break 'read;
            }
            match f.packet_type() {
                3 => {
                    relay.publishes.fetch_add(1, Relaxed);
                    forward(relay, frame);
                }
                8 if !subscribed => {
                    subscribed = true;
                    let n = relay.subscribed.fetch_add(1, Relaxed);
                    let lane = (n % relay.lanes.len().max(1) as u64) as usize;
                    if let Ok(mut subscribers) = relay.subscribers.write() {
                        subscribers.push(Subscriber {
                            id,
                            lane,
                            writer: Arc::clone(&writer),
                        });
                    }
                }
                _ => {}
            }
            at += f.len;
        }
        len = wire::compact(&mut buf, at, len);
        if !out.is_empty() {
            let sent = writer.lock().map(|mut w| w.write_all(&out));
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
            out.clear();
        }
    }
    if let Ok(mut subscribers) = relay.subscribers.write() {
        subscribers.retain(|s| s.id != id);
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Has one frame written to every subscriber: by this thread, or by each
/// writer thread for its share.
fn forward(relay: &Relay, frame: &[u8]) {
    if relay.lanes.is_empty() {
        write_share(relay, frame, 0);
        return;
    }
    let frame: Arc<[u8]> = Arc::from(frame);
    for lane in &relay.lanes {
        let _ = lane.send(Arc::clone(&frame));
    }
}

/// Writes one frame to the subscribers of writer thread `lane` (all of
/// them without writer threads), one blocking write each; a subscriber
/// whose write fails is skipped (its own thread removes it when its read
/// fails too).
fn write_share(relay: &Relay, frame: &[u8], lane: usize) {
    let Ok(subscribers) = relay.subscribers.read() else {
        return;
    };
    let mut written = 0;
    for subscriber in subscribers.iter().filter(|s| s.lane == lane) {
        if let Ok(mut w) = subscriber.writer.lock() {
            if w.write_all(frame).is_ok() {
                written += 1;
            }
        }
    }
    relay.deliveries.fetch_add(written, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_codec::{ProtocolVersion, QoS};

    /// Reads from `stream` until `want` bytes have come.
    fn read_exactly(stream: &mut TcpStream, want: usize) -> Vec<u8> {
        let mut got = vec![0u8; want];
        stream.read_exact(&mut got).expect("read");
        got
    }

    fn connected(port: u16, id: &str) -> TcpStream {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let connect = wire::connect(ProtocolVersion::V311, id, 0, false);
        stream.write_all(&connect).expect("write CONNECT");
        assert_eq!(read_exactly(&mut stream, 4), [0x20, 0x02, 0x00, 0x00]);
        stream
    }

    /// Every subscriber gets the publisher's frame as it was sent, once,
    /// whether the publisher's thread writes it or the writer threads do.
    #[test]
    fn every_subscriber_gets_the_frame_unchanged() {
        for threads in [1, 2, 3] {
            let (port, relay) = start("127.0.0.1", 0, threads).expect("start");
            let mut subscribers: Vec<TcpStream> = (0..4)
                .map(|i| {
                    let mut s = connected(port, &format!("s{i}"));
                    let subscribe =
                        wire::subscribe(ProtocolVersion::V311, 7, "t/#", QoS::AtMostOnce, None);
                    s.write_all(&subscribe).expect("write SUBSCRIBE");
                    assert_eq!(read_exactly(&mut s, 5), [0x90, 0x03, 0x00, 0x07, 0x00]);
                    s
                })
                .collect();
            let mut publisher = connected(port, "p");
            let frame = [0x30, 0x08, 0x00, 0x03, b't', b'/', b'a', b'h', b'e', b'y'];
            publisher.write_all(&frame).expect("write PUBLISH");
            for s in &mut subscribers {
                assert_eq!(read_exactly(s, frame.len()), frame, "threads {threads}");
            }
            // Once: a second, different frame is the next thing each reads.
            let second = [0x30, 0x08, 0x00, 0x03, b't', b'/', b'b', b'y', b'o', b'u'];
            publisher.write_all(&second).expect("write PUBLISH");
            for s in &mut subscribers {
                assert_eq!(read_exactly(s, second.len()), second, "threads {threads}");
            }
            assert_eq!(relay.publishes.load(Relaxed), 2);
            let deadline = Instant::now() + Duration::from_secs(5);
            while relay.deliveries.load(Relaxed) < 8 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(relay.deliveries.load(Relaxed), 8);
        }
    }
}
