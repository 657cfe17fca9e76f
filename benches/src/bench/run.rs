//! Running a scenario against a broker.
//!
//! Throughput scenarios (p2p, fan-out, fan-in, latency) go through four
//! phases: every subscriber connects and has its SUBACK; every publisher
//! connects; the publishers run for `--duration` (the deliveries counted at
//! that instant are the "while running" figures); then the drain waits for
//! stragglers. `conn` ramps idle connections instead.
//!
//! Speed: a publisher copies its pre-encoded PUBLISH into one batch buffer
//! of about `--batch-bytes` and then only patches packet ids and the send
//! timestamp per message, one `write` per batch; subscribers read into a
//! 256 KiB buffer and frame it in place without allocating. Shared counters
//! are updated once per batch or read, not per message.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tern_codec::{ProtocolVersion, QoS};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::args::{Args, Plan, Scenario, Transport};
use crate::client::{self, Conn, OpenError, WsConn};
use crate::procfs;
use crate::report::{self, ConnBroker, ConnReport, GeneratorFigures, Percentiles, RunCounts};
use crate::wire;

const READ_BUF: usize = 256 * 1024;
/// Subscribers record latencies when there are at most this many of them
/// (one histogram each), or always in the latency scenario.
const HISTOGRAM_SUBSCRIBERS: usize = 1000;
/// Connections opened at the same time while setting up.
const SETUP_PARALLEL: usize = 64;

/// Counters every task updates.
struct Shared {
    epoch: Instant,
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    /// Nanoseconds since `epoch` of the latest delivery.
    last_rx_ns: AtomicU64,
    publishers_done: AtomicUsize,
    connections_lost: AtomicUsize,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

fn version_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V31 => "3.1",
        ProtocolVersion::V311 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

pub enum Outcome {
    Throughput(report::ThroughputReport),
    Conn(ConnReport),
    Sink(crate::sink::SinkReport),
    Relay(crate::relay::RelayReport),
}

pub async fn run(args: Args, plan: Plan, threads: usize) -> Result<Outcome, String> {
    let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("{}:{}: {e}", args.host, args.port))?
        .next()
        .ok_or_else(|| format!("{}:{}: no address", args.host, args.port))?;
    if plan.scenario == Scenario::Sink {
        return crate::sink::serve(&args).await.map(Outcome::Sink);
    }
    if plan.scenario == Scenario::Relay {
        // Threads of its own: this one only waits for --duration.
        return tokio::task::block_in_place(|| crate::relay::serve(&args)).map(Outcome::Relay);
    }
    if plan.scenario == Scenario::Conn {
        run_conn(&args, &plan, addr, threads)
            .await
            .map(Outcome::Conn)
    } else {
        run_throughput(&args, &plan, addr, threads)
            .await
            .map(Outcome::Throughput)
    }
}

/// Opens `ids.len()` connections, `SETUP_PARALLEL` at a time, subscribing
/// each to its filter when one is given.
async fn open_all(
    args: &Args,
    plan: &Plan,
    addr: SocketAddr,
    role: &str,
    filters: Option<&[String]>,
    count: usize,
) -> Result<Vec<Conn>, String> {
    let sem = Arc::new(Semaphore::new(SETUP_PARALLEL));
    let tls = tls_client(args)?;
    let mut handles = Vec::with_capacity(count);
    let pid = std::process::id();
    let wait = Duration::from_secs_f64(args.connect_timeout);
    // Subscribers and publishers take different source addresses.
    let offset = if role == "s" { 0 } else { args.source_ips / 2 };
    for i in 0..count {
        let source = client::source_for(addr, i + offset, args.source_ips);
        let sem = sem.clone();
        let id = format!("tb{pid}-{role}{i}");
        let filter = filters.map(|f| f[i].clone());
        let (version, qos, keep_alive) = (plan.version, plan.qos, args.keep_alive);
        let subscription_id = plan.subscription_id;
        let persistent = args.persistent && filter.is_some();
        let sndbuf = if filter.is_none() {
            args.publisher_sndbuf
        } else {
            0
        };
        let tls = tls.clone();
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let opened = match tls {
                Some(tls) => {
                    client::open_tls(
                        addr, source, tls, version, &id, keep_alive, persistent, wait,
                    )
                    .await
                }
                None => {
                    client::open(addr, source, version, &id, keep_alive, persistent, wait).await
                }
            };
            let mut conn = opened.map_err(|e| format!("{id}: {e}"))?;
            if sndbuf > 0 {
                conn.set_send_buffer(sndbuf)
                    .map_err(|e| format!("{id}: SO_SNDBUF {sndbuf}: {e}"))?;
            }
            if let Some(filter) = filter {
                conn.subscribe(version, &filter, qos, subscription_id, wait)
                    .await
                    .map_err(|e| format!("{id}: subscribe {filter}: {e}"))?;
            }
            Ok::<_, String>(conn)
        }));
    }
    let mut conns = Vec::with_capacity(count);
    for h in handles {
        conns.push(h.await.map_err(|e| e.to_string())??);
    }
    Ok(conns)
}

/// The TLS client of `--transport tls`, or `None` for plain TCP.
fn tls_client(args: &Args) -> Result<Option<client::TlsClient>, String> {
    match (args.transport, &args.ca_file) {
        (Transport::Tls, Some(ca)) => {
            let name = rustls::pki_types::ServerName::try_from(args.tls_name.clone())
                .map_err(|e| format!("--tls-name {}: {e}", args.tls_name))?;
            Ok(Some(client::TlsClient {
                connector: client::tls_connector(ca)?,
                name,
            }))
        }
        _ => Ok(None),
    }
}

async fn run_throughput(
    args: &Args,
    plan: &Plan,
    addr: SocketAddr,
    threads: usize,
) -> Result<report::ThroughputReport, String> {
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        received: AtomicU64::new(0),
        last_rx_ns: AtomicU64::new(0),
        publishers_done: AtomicUsize::new(0),
        connections_lost: AtomicUsize::new(0),
    });
    let progress = !args.quiet && std::io::stderr().is_terminal();
    if progress {
        eprint!(
            "connecting {} subscriber(s) and {} publisher(s)...",
            plan.subscribers, plan.publishers
        );
    }
    // Subscribers first: every SUBACK is in before anything is published.
    let subs = open_all(
        args,
        plan,
        addr,
        "s",
        Some(&plan.sub_filters),
        plan.subscribers,
    )
    .await?;
    let pubs = open_all(args, plan, addr, "p", None, plan.publishers).await?;
    if progress {
        eprintln!(" done");
    }

    let (quit_tx, quit_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(None::<(Instant, Instant)>);
    let record = plan.scenario == Scenario::Latency || plan.subscribers <= HISTOGRAM_SUBSCRIBERS;
    let mut sub_tasks = Vec::with_capacity(subs.len());
    for conn in subs {
        let hist = record.then(report::new_histogram);
        sub_tasks.push(tokio::spawn(subscriber(
            conn,
            plan.version,
            args.keep_alive,
            shared.clone(),
            hist,
            quit_rx.clone(),
        )));
    }
    let template_len = wire::PublishTemplate::new(
        plan.version,
        &plan.pub_topics[0],
        plan.qos,
        args.payload,
        &plan.publish_properties,
    )
    .len();
    let per_batch = (args.batch_bytes / template_len).max(1);
    let rate_pp = plan.rate / plan.publishers as f64;
    let drain = Duration::from_secs_f64(args.drain);
    let mut window_used = plan.inflight;
    let mut pub_tasks = Vec::with_capacity(pubs.len());
    for (i, conn) in pubs.into_iter().enumerate() {
        let mut window = plan.inflight;
        if let Some(rm) = conn.receive_maximum {
            window = window.min(usize::from(rm));
        }
        window_used = window_used.min(window);
        let template = wire::PublishTemplate::new(
            plan.version,
            &plan.pub_topics[i],
            plan.qos,
            args.payload,
            &plan.publish_properties,
        );
        let batch = if plan.qos == QoS::AtMostOnce {
            per_batch
        } else {
            per_batch.min(window)
        };
        pub_tasks.push(tokio::spawn(publisher(
            conn,
            PubParams {
                template,
                batch,
                qos: plan.qos,
                window: window as u64,
                rate: rate_pp,
                tail_timeout: drain + Duration::from_secs(1),
            },
            shared.clone(),
            start_rx.clone(),
            quit_rx.clone(),
        )));
    }

    // Run.
    let broker_before = procfs::sample(args.broker_pid);
    if args.broker_pid.is_some() && broker_before.is_none() {
        return Err(format!(
            "--broker-pid {}: cannot read /proc",
            args.broker_pid.unwrap_or(0)
        ));
    }
    let cpu_before = procfs::self_cpu_seconds();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(args.duration);
    let _ = start_tx.send(Some((t0, deadline)));
    let show = |phase: &str| {
        let secs = t0.elapsed().as_secs_f64();
        let sent = shared.sent.load(Relaxed);
        let recv = shared.received.load(Relaxed);
        eprint!(
            "\r{phase} {secs:6.1} s  sent {sent:>12} ({:>10.0}/s)  delivered {recv:>12} ({:>10.0}/s)   ",
            sent as f64 / secs,
            recv as f64 / secs
        );
    };
    {
        let mut tick =
            tokio::time::interval_at(t0 + Duration::from_secs(1), Duration::from_secs(1));
        let mut until = pin!(sleep_until(deadline));
        loop {
            tokio::select! {
                _ = &mut until => break,
                _ = tick.tick() => if progress { show("run  ") },
            }
        }
    }
    let received_running = shared.received.load(Relaxed);
    let t_stop = Instant::now();
    let run_s = (t_stop - t0).as_secs_f64();
    let stop_ns = (t_stop - shared.epoch).as_nanos() as u64;

    // Drain.
    let drain_idle = Duration::from_secs_f64(args.drain_idle);
    let mut drain_complete = false;
    let mut next_show = t_stop + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        let publishers_done = shared.publishers_done.load(Relaxed) == plan.publishers;
        let expected = shared.sent.load(Relaxed) * plan.fanout;
        if publishers_done && shared.received.load(Relaxed) >= expected {
            drain_complete = true;
            break;
        }
        if now - t_stop >= drain {
            break;
        }
        let last = shared.last_rx_ns.load(Relaxed).max(stop_ns);
        if publishers_done
            && !drain_idle.is_zero()
            && shared.now_ns().saturating_sub(last) >= drain_idle.as_nanos() as u64
        {
            break;
        }
        if progress && now >= next_show {
            show("drain");
            next_show += Duration::from_secs(1);
        }
        sleep(Duration::from_millis(2)).await;
    }
    let t_end = Instant::now();
    let broker_after = procfs::sample(args.broker_pid);
    let generator_cpu_s = procfs::self_cpu_seconds() - cpu_before;
    let window_s = (t_end - t0).as_secs_f64();
    if progress {
        show("done ");
        eprintln!();
    }
    let drain_s = if drain_complete {
        (shared.last_rx_ns.load(Relaxed).saturating_sub(stop_ns)) as f64 / 1e9
    } else {
        (t_end - t_stop).as_secs_f64()
    };

    // Stop everything and collect.
    let _ = quit_tx.send(true);
    let mut latency: Option<Histogram<u64>> = None;
    for t in sub_tasks {
        if let Ok(Some(h)) = t.await {
            match latency.as_mut() {
                Some(all) => {
                    let _ = all.add(&h);
                }
                None => latency = Some(h),
            }
        }
    }
    for t in pub_tasks {
        let _ = t.await;
    }
    let counts = RunCounts {
        sent: shared.sent.load(Relaxed),
        acked: shared.acked.load(Relaxed),
        received_running,
        received_total: shared.received.load(Relaxed),
        fanout: plan.fanout,
        run_s,
        drain_s,
        drain_complete,
        window_s,
        broker_pid: args.broker_pid,
        broker_before,
        broker_after,
        generator_cpu_s,
    };
    let setup = report::Setup {
        scenario: plan.scenario.name().into(),
        mqtt_version: version_name(plan.version).into(),
        qos: plan.qos as u8,
        payload: args.payload,
        properties: report::MessageProperties {
            user_properties: args.user_properties,
            message_expiry_s: args.message_expiry,
            subscription_id: args.subscription_id,
        },
        publishers: plan.publishers,
        subscribers: plan.subscribers,
        shared: args.shared,
        rate_target: plan.rate,
        inflight: window_used,
        drain_limit_s: args.drain,
        threads,
    };
    let mut r = report::throughput_report(&setup, &counts, latency.as_ref());
    r.connections_lost = shared.connections_lost.load(Relaxed);
    Ok(r)
}

/// Reads deliveries until told to quit; acknowledges QoS 1 and 2.
async fn subscriber(
    conn: Conn,
    version: ProtocolVersion,
    keep_alive: u16,
    shared: Arc<Shared>,
    mut hist: Option<Histogram<u64>>,
    mut quit: watch::Receiver<bool>,
) -> Option<Histogram<u64>> {
    let mut stream = conn.stream;
    let mut buf = vec![0u8; READ_BUF.max(conn.leftover.len() * 2)];
    let mut len = conn.leftover.len();
    buf[..len].copy_from_slice(&conn.leftover);
    let mut acks = Vec::new();
    let mut lost = false;
    // Keep alive: a subscriber only reads, so it pings to stay connected.
    let ping_every = if keep_alive > 0 {
        Duration::from_millis(u64::from(keep_alive) * 500)
    } else {
        Duration::from_secs(86_400 * 365)
    };
    let mut ping = pin!(sleep(ping_every));
    'read: loop {
        let now_ns = shared.now_ns();
        let mut at = 0;
        let mut n = 0u64;
        loop {
            let f = match wire::next_frame(&buf[at..len]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    lost = true;
                    break 'read;
                }
            };
            let body = &buf[at + f.body_start..at + f.len];
            match f.packet_type() {
                3 => {
                    let Ok((qos, id, payload)) = wire::publish_payload(f.first, body, version)
                    else {
                        lost = true;
                        break 'read;
                    };
                    n += 1;
                    if let (Some(h), Some(stamp)) = (hist.as_mut(), wire::read_stamp(payload)) {
                        h.saturating_record(now_ns.saturating_sub(stamp));
                    }
                    match qos {
                        1 => wire::put_ack(&mut acks, wire::PUBACK, id),
                        2 => wire::put_ack(&mut acks, wire::PUBREC, id),
                        _ => {}
                    }
                }
                6 => {
                    if let Ok(id) = wire::ack_packet_id(body) {
                        wire::put_ack(&mut acks, wire::PUBCOMP, id);
                    }
                }
                _ => {}
            }
            at += f.len;
        }
        len = wire::compact(&mut buf, at, len);
        if n > 0 {
            shared.received.fetch_add(n, Relaxed);
            shared.last_rx_ns.fetch_max(now_ns, Relaxed);
        }
        if !acks.is_empty() {
            if write_flushed(&mut stream, &acks).await.is_err() {
                lost = true;
                break;
            }
            acks.clear();
        }
        tokio::select! {
            biased;
            r = stream.read(&mut buf[len..]) => match r {
                Ok(0) | Err(_) => {
                    lost = !*quit.borrow();
                    break;
                }
                Ok(k) => len += k,
            },
            _ = quit.changed() => break,
            _ = &mut ping => {
                if write_flushed(&mut stream, &wire::PINGREQ).await.is_err() {
                    lost = true;
                    break;
                }
                ping.as_mut().reset(Instant::now() + ping_every);
            }
        }
    }
    if lost {
        shared.connections_lost.fetch_add(1, Relaxed);
    }
    let _ = timeout(
        Duration::from_millis(200),
        write_flushed(&mut stream, &wire::DISCONNECT),
    )
    .await;
    hist
}

/// Writes all of `bytes` and flushes them (a no-op on TCP; TLS may hold the
/// last record until flushed).
async fn write_flushed<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

struct PubParams {
    template: wire::PublishTemplate,
    /// Packets per write at most.
    batch: usize,
    qos: QoS,
    window: u64,
    /// Messages per second for this publisher; 0 = unlimited.
    rate: f64,
    /// How long to wait to finish the packet cut by the deadline.
    tail_timeout: Duration,
}

/// What the acknowledgement reader tells the writer.
struct AckState {
    acked: AtomicU64,
    /// PUBRELs to send (QoS 2).
    pubrel: Mutex<Vec<u8>>,
    notify: Notify,
}

/// Publishes from the start signal to the deadline, then keeps answering
/// PUBRECs until told to quit.
async fn publisher(
    conn: Conn,
    p: PubParams,
    shared: Arc<Shared>,
    mut start: watch::Receiver<Option<(Instant, Instant)>>,
    quit: watch::Receiver<bool>,
) {
    let (rd, mut wr) = conn.stream.into_split();
    let acks = Arc::new(AckState {
        acked: AtomicU64::new(0),
        pubrel: Mutex::new(Vec::new()),
        notify: Notify::new(),
    });
    let reader = tokio::spawn(ack_reader(rd, acks.clone(), shared.clone(), quit.clone()));
    let (t0, deadline) = match start.wait_for(Option::is_some).await {
        Ok(times) => times.expect("checked by wait_for"),
        Err(_) => return,
    };
    let len = p.template.len();
    let mut batch: Vec<u8> = p.template.bytes.repeat(p.batch);
    let mut next_id: u16 = 1;
    let mut sent: u64 = 0;
    let mut time_up = pin!(sleep_until(deadline));
    'run: loop {
        if Instant::now() >= deadline {
            break;
        }
        if !send_pubrels(&mut wr, &acks).await {
            break;
        }
        let mut n = p.batch as u64;
        if p.rate > 0.0 {
            let due = (p.rate * (Instant::now() - t0).as_secs_f64()) as u64 + 1;
            if due <= sent {
                let next_at = t0 + Duration::from_secs_f64(sent as f64 / p.rate);
                tokio::select! {
                    _ = sleep_until(next_at) => {}
                    _ = &mut time_up => break 'run,
                }
                continue;
            }
            n = n.min(due - sent);
        }
        if p.qos != QoS::AtMostOnce {
            let room = p.window.saturating_sub(sent - acks.acked.load(Relaxed));
            // Refill the window in steps of at least an eighth of it (or a
            // whole batch), not one packet per write as acks trickle in.
            let outstanding = p.window - room;
            if room == 0 || (outstanding > 0 && room < (p.window / 8).min(p.batch as u64)) {
                tokio::select! {
                    _ = acks.notify.notified() => {}
                    _ = &mut time_up => break 'run,
                }
                continue;
            }
            n = n.min(room);
        }
        let n = n as usize;
        let stamp = shared.now_ns();
        if p.template.stamped || p.template.id_offset.is_some() {
            for packet in batch[..n * len].chunks_exact_mut(len) {
                p.template.patch(packet, next_id, stamp);
                next_id = wire::next_packet_id(next_id);
            }
        }
        let total = n * len;
        let mut pos = 0;
        while pos < total {
            tokio::select! {
                biased;
                r = wr.write(&batch[pos..total]) => match r {
                    Ok(0) | Err(_) => {
                        shared.connections_lost.fetch_add(1, Relaxed);
                        shared.sent.fetch_add((pos / len) as u64, Relaxed);
                        break 'run;
                    }
                    Ok(k) => pos += k,
                },
                _ = &mut time_up => {
                    // Time is up in the middle of a batch: finish the packet
                    // being written so the stream stays well-formed.
                    let end = pos.div_ceil(len) * len;
                    let _ = timeout(p.tail_timeout, write_flushed(&mut wr, &batch[pos..end])).await;
                    shared.sent.fetch_add((end / len) as u64, Relaxed);
                    break 'run;
                }
            }
        }
        if wr.flush().await.is_err() {
            shared.connections_lost.fetch_add(1, Relaxed);
            shared.sent.fetch_add(n as u64, Relaxed);
            break;
        }
        sent += n as u64;
        shared.sent.fetch_add(n as u64, Relaxed);
    }
    shared.publishers_done.fetch_add(1, Relaxed);
    // Keep the QoS 2 handshakes going through the drain.
    if p.qos == QoS::ExactlyOnce {
        let mut quit = quit.clone();
        loop {
            tokio::select! {
                _ = acks.notify.notified() => {
                    if !send_pubrels(&mut wr, &acks).await {
                        break;
                    }
                }
                _ = quit.changed() => break,
            }
        }
    } else {
        let mut quit = quit.clone();
        let _ = quit.wait_for(|q| *q).await;
    }
    let _ = timeout(
        Duration::from_millis(200),
        write_flushed(&mut wr, &wire::DISCONNECT),
    )
    .await;
    let _ = reader.await;
}

async fn send_pubrels(wr: &mut client::WriteHalf, acks: &AckState) -> bool {
    let pending = std::mem::take(&mut *acks.pubrel.lock().expect("not poisoned"));
    pending.is_empty() || write_flushed(wr, &pending).await.is_ok()
}

/// Counts PUBACKs / PUBCOMPs and queues PUBRELs for PUBRECs.
async fn ack_reader(
    mut rd: client::ReadHalf,
    acks: Arc<AckState>,
    shared: Arc<Shared>,
    mut quit: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0;
    let mut rel = Vec::new();
    loop {
        tokio::select! {
            biased;
            r = rd.read(&mut buf[len..]) => match r {
                Ok(0) | Err(_) => return,
                Ok(k) => len += k,
            },
            _ = quit.changed() => return,
        }
        let mut at = 0;
        let mut n = 0u64;
        while let Ok(Some(f)) = wire::next_frame(&buf[at..len]) {
            let body = &buf[at + f.body_start..at + f.len];
            match f.packet_type() {
                4 | 7 => n += 1,
                5 => {
                    if let Ok(id) = wire::ack_packet_id(body) {
                        wire::put_ack(&mut rel, wire::PUBREL, id);
                    }
                }
                _ => {}
            }
            at += f.len;
        }
        len = wire::compact(&mut buf, at, len);
        if !rel.is_empty() {
            acks.pubrel
                .lock()
                .expect("not poisoned")
                .extend_from_slice(&rel);
            rel.clear();
        }
        if n > 0 {
            acks.acked.fetch_add(n, Relaxed);
            shared.acked.fetch_add(n, Relaxed);
        }
        acks.notify.notify_one();
    }
}

/// `conn`: open connections at the target rate, hold them, read the
/// broker's RSS growth.
async fn run_conn(
    args: &Args,
    plan: &Plan,
    addr: SocketAddr,
    threads: usize,
) -> Result<ConnReport, String> {
    // Boxed: tungstenite's stream is ten times the size of a TCP one, and
    // every held connection is one of these.
    enum Held {
        Mqtt(Conn),
        Ws(Box<WsConn>),
    }
    enum Answer {
        Connected(Duration, Held),
        Refused,
        Failed(String),
    }
    let progress = !args.quiet && std::io::stderr().is_terminal();
    let broker_before = procfs::sample(args.broker_pid);
    if args.broker_pid.is_some() && broker_before.is_none() {
        return Err("--broker-pid: cannot read /proc".into());
    }
    let cpu_before = procfs::self_cpu_seconds();
    let n = plan.connections;
    let wait = Duration::from_secs_f64(args.connect_timeout);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Unlimited rate still keeps the number of handshakes in flight bounded.
    let in_flight = Arc::new(Semaphore::new(if plan.rate > 0.0 {
        n.max(1)
    } else {
        1024
    }));
    let tls = tls_client(args)?;
    let pid = std::process::id();
    let start = Instant::now();
    let mut spawned = 0;
    let mut held = Vec::with_capacity(n);
    let (mut connected, mut refused, mut failed) = (0usize, 0usize, 0usize);
    let mut first_failure: Option<String> = None;
    let mut hist = report::new_histogram();
    let mut last_answer = start;
    let mut next_show = start + Duration::from_secs(1);
    let mut answered = 0;
    while answered < n {
        let due = if plan.rate > 0.0 {
            ((plan.rate * start.elapsed().as_secs_f64()) as usize + 1).min(n)
        } else {
            n
        };
        while spawned < due {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                break;
            };
            let tx = tx.clone();
            let id = format!("tb{pid}-c{spawned}");
            let (version, keep_alive) = (plan.version, args.keep_alive);
            let source = client::source_for(addr, spawned, args.source_ips);
            let ws_path = (args.transport == Transport::Ws).then(|| args.ws_path.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let opened = match (ws_path, tls) {
                    (Some(path), _) => {
                        client::open_ws(addr, source, &path, version, &id, keep_alive, wait)
                            .await
                            .map(|c| Held::Ws(Box::new(c)))
                    }
                    (None, Some(tls)) => {
                        client::open_tls(addr, source, tls, version, &id, keep_alive, false, wait)
                            .await
                            .map(Held::Mqtt)
                    }
                    (None, None) => {
                        client::open(addr, source, version, &id, keep_alive, false, wait)
                            .await
                            .map(Held::Mqtt)
                    }
                };
                let answer = match opened {
                    Ok(held) => Answer::Connected(t.elapsed(), held),
                    Err(OpenError::Refused(_)) => Answer::Refused,
                    Err(OpenError::Failed(e)) => Answer::Failed(e),
                };
                drop(permit);
                let _ = tx.send(answer);
            });
            spawned += 1;
        }
        // Collect answers until the next connection is due.
        let tick = sleep(Duration::from_millis(1));
        tokio::select! {
            a = rx.recv() => {
                let Some(a) = a else { break };
                answered += 1;
                last_answer = Instant::now();
                match a {
                    Answer::Connected(d, conn) => {
                        connected += 1;
                        hist.saturating_record(d.as_nanos() as u64);
                        held.push(conn);
                    }
                    Answer::Refused => refused += 1,
                    Answer::Failed(e) => {
                        failed += 1;
                        first_failure.get_or_insert(e);
                    }
                }
            }
            _ = tick => {}
        }
        if progress && Instant::now() >= next_show {
            eprint!(
                "\rconn {:6.1} s  connected {connected:>7}  refused {refused:>6}  failed {failed:>6}   ",
                start.elapsed().as_secs_f64()
            );
            next_show += Duration::from_secs(1);
        }
    }
    if progress {
        eprintln!();
    }
    if let Some(e) = &first_failure {
        if !args.quiet {
            eprintln!("tern-bench: first connect failure: {e}");
        }
    }
    let ramp_s = (last_answer - start).as_secs_f64();
    sleep(Duration::from_secs_f64(args.hold)).await;
    let broker_after = procfs::sample(args.broker_pid);
    let generator_cpu_s = procfs::self_cpu_seconds() - cpu_before;
    let window_s = start.elapsed().as_secs_f64();
    for c in held {
        match c {
            Held::Mqtt(mut c) => c.try_disconnect(),
            Held::Ws(mut c) => c.try_disconnect(),
        }
    }
    let broker = match (args.broker_pid, broker_before, broker_after) {
        (Some(pid), Some(b), Some(a)) => Some(ConnBroker {
            pid,
            rss_kib_before: b.rss_kib,
            rss_kib_after: a.rss_kib,
            rss_kib_per_connection: report::rss_per_connection(b.rss_kib, a.rss_kib, connected),
            cpu_s: (a.cpu_s - b.cpu_s).max(0.0),
        }),
        _ => None,
    };
    Ok(ConnReport {
        scenario: "conn".into(),
        mqtt_version: version_name(plan.version).into(),
        transport: match args.transport {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Tls => "tls",
        }
        .into(),
        connections_target: n,
        rate_target: plan.rate,
        attempted: spawned,
        connected,
        refused,
        failed,
        ramp_s,
        connects_per_s: if ramp_s > 0.0 {
            connected as f64 / ramp_s
        } else {
            0.0
        },
        connect_us: Percentiles::of(&hist),
        broker,
        generator: GeneratorFigures {
            cpu_s: generator_cpu_s,
            cpu_cores: generator_cpu_s / window_s.max(1e-9),
            threads,
        },
    })
}
