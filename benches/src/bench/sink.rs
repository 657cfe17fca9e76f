//! `sink`: a stand-in broker that accepts every connection, answers CONNECT,
//! SUBSCRIBE and QoS 1/2 PUBLISH, and delivers nothing. Pointing tern-bench
//! at it measures the generator's own ceiling: how fast it can publish when
//! the other side costs almost nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::args::Args;
use crate::wire;

#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub scenario: String,
    pub port: u16,
    pub duration_s: f64,
    pub connections: u64,
    pub publishes: u64,
    pub publishes_per_s: f64,
    pub bytes: u64,
    pub cpu_s: f64,
}

impl SinkReport {
    pub fn text(&self) -> String {
        format!(
            "sink on port {}: {} connection(s), {} PUBLISH in {:.2} s = {:.0}/s ({:.1} MiB/s), {:.2} CPU-s\n",
            self.port,
            self.connections,
            self.publishes,
            self.duration_s,
            self.publishes_per_s,
            self.bytes as f64 / self.duration_s / 1048576.0,
            self.cpu_s
        )
    }
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    publishes: AtomicU64,
    bytes: AtomicU64,
}

/// Serves on --host:--port (port 0: any; the port is printed on stderr)
/// for --duration seconds.
pub async fn serve(args: &Args) -> Result<SinkReport, String> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("sink: bind {}:{}: {e}", args.host, args.port))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    eprintln!("tern-bench sink listening on {}:{port}", args.host);
    let counts = Arc::new(Counts::default());
    let cpu_before = crate::procfs::self_cpu_seconds();
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(args.duration);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    counts.connections.fetch_add(1, Relaxed);
                    tokio::spawn(connection(stream, counts.clone()));
                }
            }
            _ = tokio::time::sleep_until(until) => break,
        }
    }
    let duration_s = start.elapsed().as_secs_f64();
    let publishes = counts.publishes.load(Relaxed);
    Ok(SinkReport {
        scenario: "sink".into(),
        port,
        duration_s,
        connections: counts.connections.load(Relaxed),
        publishes,
        publishes_per_s: publishes as f64 / duration_s,
        bytes: counts.bytes.load(Relaxed),
        cpu_s: crate::procfs::self_cpu_seconds() - cpu_before,
    })
}

async fn connection(mut stream: TcpStream, counts: Arc<Counts>) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0;
    let mut v5 = false;
    let mut out = Vec::new();
    loop {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => {
                len += k;
                counts.bytes.fetch_add(k as u64, Relaxed);
            }
        }
        let mut at = 0;
        let mut n = 0;
        while let Ok(Some(f)) = wire::next_frame(&buf[at..len]) {
            let body = &buf[at + f.body_start..at + f.len];
            if f.packet_type() == 3 {
                n += 1;
            }
            if !wire::stand_in_reply(&f, body, &mut v5, &mut out) {
                return;
            }
            at += f.len;
        }
        len = wire::compact(&mut buf, at, len);
        if n > 0 {
            counts.publishes.fetch_add(n, Relaxed);
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}
