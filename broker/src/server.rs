//! Listeners and the server's lifetime: open the store, recover, bind,
//! accept, shut down gracefully.
//!
//! [`Server::start`] opens the durable store (unless in memory mode) and
//! restores its sessions, subscriptions, queues and retained messages
//! **before** any listener opens; then it binds every configured listener
//! (so a caller, a test for instance, can read the real addresses when it
//! asked for port 0), spawns one accept loop per listener, the keep alive
//! sweep (keep_alive.rs) and the read-only admin endpoint (the store's
//! views, `/metrics`, `/health`); a start that fails part-way stops what it
//! had started and releases the store (`StartedTasks`).
//! [`Server::shutdown`] stops accepting, tells every
//! connection to close (MQTT 5 clients receive DISCONNECT 0x8B "server
//! shutting down"), waits until the registry counts no connection, bounded
//! by [`SHUTDOWN_GRACE`], and syncs the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tern_storage::OnDamage;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::config::Config;
use crate::connection;
use crate::metrics::Metrics;
use crate::persistence::Persistence;
use crate::recovery;
use crate::websocket;

/// Longest a graceful shutdown waits for connections to flush and close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Pause after an accept error (for example, out of file descriptors) so a
/// persistent error does not spin the accept loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Connections the kernel holds for a listener until its accept loop takes
/// them. `TcpListener::bind` asks for 1024, and a burst of connections
/// (the clients of a restarted broker all coming back, a load generator
/// opening thousands at once) overflows that: each dropped SYN costs its
/// client a retransmit 1 s later. The kernel caps the request at
/// `net.core.somaxconn` (4096 by default on Linux since 5.4), so this asks
/// for the most it allows.
const LISTEN_BACKLOG: u32 = 65_535;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store in {}: {source}", dir.display())]
    Store {
        dir: std::path::PathBuf,
        source: tern_storage::StoreError,
    },
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot restore the durable state from {}: {source}", dir.display())]
    Recovery {
        dir: std::path::PathBuf,
        source: tern_storage::StoreError,
    },
}

impl StartError {
    /// What whoever runs the broker can do about the error, where the
    /// error itself does not say: a store refused as damaged or unreadable.
    pub fn hint(&self) -> Option<&'static str> {
        use tern_storage::StoreError;
        match self {
            StartError::Store {
                source: StoreError::Damaged { .. },
                ..
            } => Some(
                "the storage engine's recovery has already cut its log at the damage (a copy of \
                 the directory made now no longer holds what followed it): restore the directory \
                 from a backup, or start once with --accept-store-damage to serve what the store \
                 still holds (the lost writes stay lost)",
            ),
            StartError::Store {
                source: StoreError::Unreadable { .. },
                ..
            } => Some(
                "restore the directory from a backup; --accept-store-damage cannot open a store \
                 its engine cannot read",
            ),
            _ => None,
        }
    }
}

/// Sessions that expired while the broker was down, handing their shared
/// messages over at start, at once: each mostly waits for the store's
/// syncs, which the writer's group commit shares among them, and the
/// listeners open only once all are done.
const EXPIRED_AT_START_AT_ONCE: usize = 64;

/// A running broker.
pub struct Server {
    broker: Arc<Broker>,
    tcp_addrs: Vec<SocketAddr>,
    ws_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    wss_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    /// Accept loops, the keep alive sweep, the admin endpoint.
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds the listeners and starts accepting connections. Must be called
    /// inside a tokio runtime. A store found damaged is refused
    /// ([`StartError::Store`] with `StoreError::Damaged`).
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_on_damage(config, OnDamage::Refuse).await
    }

    /// [`start`](Self::start), saying what to do with a store found damaged
    /// (it holds fewer writes than were synced before): `OnDamage::Accept`
    /// serves what it still holds (`tern serve --accept-store-damage`, a
    /// decision for one start, which is why the configuration file has no
    /// such setting).
    pub async fn start_on_damage(
        config: Config,
        on_damage: OnDamage,
    ) -> Result<Server, StartError> {
        // Certificates first: a bad file stops the start before the store
        // is opened and recovered (which may expire sessions).
        let tls = crate::tls::load_configured(&config.listeners)?;
        let metrics = Arc::new(Metrics::default());
        let dir = config.storage.data_dir.clone();
        let persistence = match config.storage.writer_config() {
            None => None,
            Some(writer) => {
                let d = dir.clone();
                let opened =
                    tokio::task::spawn_blocking(move || Persistence::open(&d, writer, on_damage))
                        .await
                        .unwrap_or_else(|e| Err(tern_storage::StoreError::Engine(e.to_string())));
                Some(opened.map_err(|source| StartError::Store {
                    dir: dir.clone(),
                    source,
                })?)
            }
        };
        Server::start_with(config, metrics, persistence, tls).await
    }

    /// Like [`start`](Self::start), over a store the caller opened (tests
    /// inject `MemoryStore` and `FailingStore`); in memory mode the
    /// configuration's writer settings default to fsync.
    pub async fn start_with_store(
        config: Config,
        store: Arc<dyn tern_storage::Store>,
    ) -> Result<Server, StartError> {
        let tls = crate::tls::load_configured(&config.listeners)?;
        let metrics = Arc::new(Metrics::default());
        let writer = config.storage.writer_config().unwrap_or_default();
        let persistence =
            Persistence::with_store(store, writer).map_err(|source| StartError::Store {
                dir: config.storage.data_dir.clone(),
                source,
            })?;
        Server::start_with(config, metrics, Some(persistence), tls).await
    }

    async fn start_with(
        config: Config,
        metrics: Arc<Metrics>,
        persistence: Option<Arc<Persistence>>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Server, StartError> {
        let dir = config.storage.data_dir.clone();
        let broker = Broker::with_store(config, metrics, persistence);
        if broker.persistence.is_some() {
            let b = Arc::clone(&broker);
            let recovery = tokio::task::spawn_blocking(move || recovery::recover(&b))
                .await
                .unwrap_or_else(|e| Err(tern_storage::StoreError::Engine(e.to_string())))
                .map_err(|source| StartError::Recovery {
                    dir: dir.clone(),
                    source,
                })?;
            futures_util::stream::iter(recovery.expired)
                .for_each_concurrent(EXPIRED_AT_START_AT_ONCE, |session| {
                    let broker = Arc::clone(&broker);
                    async move { broker.expire_session(&session, session.generation()).await }
                })
                .await;
            let report = recovery.report;
            tracing::info!(
                data_dir = %dir.display(),
                durability = ?broker.config.storage.durability,
                sessions = report.sessions,
                subscriptions = report.subscriptions,
                queued = report.queued,
                backlog = report.backlog,
                retained = report.retained,
                purged = report.purged,
                "durable state restored"
            );
        }
        let mut started = StartedTasks::new(&broker);
        let tasks = &mut started.tasks;
        tasks.push(tokio::spawn(crate::keep_alive::run(Arc::clone(&broker))));
        tasks.push(tokio::spawn(crate::sys_topics::run(Arc::clone(&broker))));
        if broker.persistence.is_some() {
            tasks.push(tokio::spawn(crate::broker::store_refused_states_again(
                Arc::clone(&broker),
            )));
        }
        tasks.push(tokio::spawn(crate::broker::expire_retained_when_due(
            Arc::clone(&broker),
        )));
        let listeners = &broker.config.listeners;
        *broker.tls.write() = tls;
        let tcp_addrs = listen_all(&broker, &listeners.tcp, Transport::Tcp, tasks).await?;
        let tls_addrs = listen_all(&broker, &listeners.tls, Transport::Tls, tasks).await?;
        let ws_addrs = listen_all(&broker, &listeners.ws, Transport::WebSocket, tasks).await?;
        let wss_addrs =
            listen_all(&broker, &listeners.wss, Transport::SecureWebSocket, tasks).await?;
        let mut admin_addr = None;
        if let Some(addr) = broker.config.admin.bind {
            let listener = bind(addr).map_err(|source| StartError::Bind { addr, source })?;
            let local = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %local, "admin endpoint ready (read-only)");
            admin_addr = Some(local);
            tasks.push(tokio::spawn(crate::admin::serve_admin(
                listener,
                crate::admin::AdminSources::of_broker(&broker),
                broker.shutdown_signal(),
            )));
        }
        let mut metrics_addr = None;
        if let Some(addr) = broker.config.admin.metrics_bind {
            let listener = bind(addr).map_err(|source| StartError::Bind { addr, source })?;
            let local = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %local, "metrics endpoint ready (/metrics, /health)");
            metrics_addr = Some(local);
            tasks.push(tokio::spawn(crate::admin::serve_admin(
                listener,
                crate::admin::AdminSources::of_broker_metrics(&broker),
                broker.shutdown_signal(),
            )));
        }
        Ok(Server {
            broker,
            tcp_addrs,
            ws_addrs,
            tls_addrs,
            wss_addrs,
            admin_addr,
            metrics_addr,
            tasks: started.keep(),
        })
    }

    /// Reads the TLS certificate, key and client CA files again and serves
    /// new TLS connections with them (`tern serve` does this on SIGHUP).
    /// On an error the files in use stay in use.
    pub fn reload_tls(&self) -> Result<(), crate::tls::TlsError> {
        crate::tls::reload(&self.broker)
    }

    /// Puts `auth` in force (users, anonymous, ACL; `tern serve` does this
    /// on SIGHUP): new connections use it, and connected clients it would
    /// not let in or would give other permissions are disconnected (see
    /// auth_rules.rs). Returns how many were.
    pub fn reload_auth(&self, auth: &crate::config::AuthConfig) -> usize {
        self.broker.reload_auth(auth)
    }

    /// The bound admin endpoint address, when one runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound metrics listener address, when one runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound MQTT/TCP addresses, in configuration order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// The bound MQTT/TLS addresses, in configuration order.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// The bound MQTT/WebSocket-over-TLS addresses, in configuration order.
    pub fn wss_addrs(&self) -> &[SocketAddr] {
        &self.wss_addrs
    }

    /// The bound MQTT/WebSocket addresses, in configuration order.
    pub fn ws_addrs(&self) -> &[SocketAddr] {
        &self.ws_addrs
    }

    /// The shared broker state (for inspection and tests).
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Stops accepting, closes every connection, and waits for them to go.
    pub async fn shutdown(self) {
        self.broker.begin_shutdown();
        for task in &self.tasks {
            task.abort();
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while self.broker.registry.connection_count() > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.broker.registry.connection_count();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "shutdown grace period over; closing anyway"
            );
        }
        // Session timers would otherwise outlive the server, holding the
        // broker and its store, and later end sessions or publish wills in
        // a store that a restart may own by then.
        for session in self.broker.registry.all() {
            session.stop_timers();
        }
        if let Some(persistence) = &self.broker.persistence {
            if let Err(e) = persistence.sync().await {
                tracing::error!(error = %e, "final store sync failed");
            }
            let w = persistence.writer_stats();
            tracing::info!(
                submitted = w.submitted,
                windows = w.windows,
                syncs = w.syncs,
                netted = w.netted,
                late_inserts = w.late_inserts,
                failed = w.failed,
                "store writer totals"
            );
        }
        tracing::info!("broker stopped");
    }
}

/// The tasks a start has spawned so far. If the start fails part-way (a
/// listener's address is taken, a certificate cannot be read), dropping
/// this stops them all and begins the broker's shutdown: nothing keeps
/// accepting on a listener bound before the failure, and with the last task
/// holding it the broker, and so its store, is released, so that the caller
/// can start again on the same data directory.
struct StartedTasks {
    broker: Arc<Broker>,
    tasks: Vec<JoinHandle<()>>,
}

impl StartedTasks {
    fn new(broker: &Arc<Broker>) -> Self {
        StartedTasks {
            broker: Arc::clone(broker),
            tasks: Vec::new(),
        }
    }

    /// The start succeeded: the tasks are the server's to stop.
    fn keep(mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.tasks)
    }
}

impl Drop for StartedTasks {
    fn drop(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        self.broker.begin_shutdown();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What a listener speaks.
#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    /// TLS (with `Broker::tls`), then MQTT.
    Tls,
    WebSocket,
    /// TLS, then WebSocket.
    SecureWebSocket,
}

impl Transport {
    /// How its listeners are announced in the log (scripts read these
    /// lines for the ports: keep them stable).
    fn ready_line(self) -> &'static str {
        match self {
            Transport::Tcp => "MQTT/TCP listener ready",
            Transport::Tls => "MQTT/TLS listener ready",
            Transport::WebSocket => "MQTT/WebSocket listener ready",
            Transport::SecureWebSocket => "MQTT/WSS listener ready",
        }
    }
}

/// A listening socket on `addr` with a [`LISTEN_BACKLOG`] queue; like
/// `TcpListener::bind`, with `SO_REUSEADDR`, so that a restarted broker can
/// bind while its old connections are in `TIME_WAIT`.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds every address of one kind of listener and spawns its accept loop;
/// returns the bound addresses (a port 0 resolved), in order.
async fn listen_all(
    broker: &Arc<Broker>,
    addrs: &[SocketAddr],
    transport: Transport,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Vec<SocketAddr>, StartError> {
    let mut bound = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let listener = bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        match transport {
            Transport::WebSocket | Transport::SecureWebSocket => tracing::info!(
                addr = %local,
                path = %broker.config.listeners.ws_path,
                "{}",
                transport.ready_line()
            ),
            Transport::Tcp | Transport::Tls => {
                tracing::info!(addr = %local, "{}", transport.ready_line())
            }
        }
        bound.push(local);
        tasks.push(tokio::spawn(accept_loop(
            Arc::clone(broker),
            listener,
            transport,
        )));
    }
    Ok(bound)
}

async fn accept_loop(broker: Arc<Broker>, listener: TcpListener, transport: Transport) {
    let mut shutdown = broker.shutdown_signal();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let broker = Arc::clone(&broker);
                    match transport {
                        Transport::Tcp => tokio::spawn(connection::serve_tcp(broker, stream, peer)),
                        Transport::Tls => tokio::spawn(crate::tls::serve_tls(broker, stream, peer)),
                        Transport::WebSocket => tokio::spawn(websocket::serve_ws(broker, stream, peer)),
                        Transport::SecureWebSocket => tokio::spawn(websocket::serve_wss(broker, stream, peer)),
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            () = shutdown_requested(&mut shutdown) => return,
        }
    }
}

/// Resolves once the broker's shutdown signal is raised (or its sender is gone).
pub(crate) async fn shutdown_requested(signal: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *signal.borrow_and_update() {
            return;
        }
        if signal.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener holds a burst of connections beyond tokio's default
    /// backlog (1024) until it accepts them: none of them has to retransmit
    /// its SYN. Nothing is accepted here, so every connection must fit in
    /// the queue (up to what `net.core.somaxconn` allows).
    #[tokio::test]
    async fn a_listener_queues_a_burst_of_connections_beyond_1024() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let burst = somaxconn.min(2000);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..burst {
            connects.spawn(tokio::net::TcpStream::connect(addr));
        }
        // A connection the queue dropped would wait 1 s, then 3 s, for its
        // SYN to be sent again, and never complete: nothing accepts.
        let all = tokio::time::timeout(Duration::from_secs(10), async {
            let mut open = Vec::with_capacity(burst);
            while let Some(connected) = connects.join_next().await {
                open.push(connected.unwrap().unwrap());
            }
            open
        })
        .await;
        let open = all.unwrap_or_else(|_| panic!("a burst of {burst} connections overflowed"));
        assert_eq!(open.len(), burst);
    }
}
