//! The `tern` command: `tern serve` runs the broker; `tern admin` inspects
//! its durable store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tern::config::DurabilityMode;
use tern::{Config, Server};
use tern_storage::OnDamage;
use tracing_subscriber::EnvFilter;

/// The broker's allocator: jemalloc. Every publish allocates its shared
/// message on the publisher's thread, and the last subscriber's writer (or
/// the store writer) frees it on another: glibc's malloc serialises such
/// frees on the allocating thread's arena lock, which took about a fifth of
/// the broker's CPU in the fan-in profile and made throughput bimodal from
/// one start to the next. jemalloc gives each thread a cache and locks per
/// size class; it also packs idle connections tighter. Figures in
/// docs/performance.md ("The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (the `malloc_conf` string, under
/// the prefix tikv-jemalloc-sys gives its symbols). `background_thread`:
/// memory freed after a burst goes back to the system after the dirty-page
/// decay time (10 s) from a background thread; without it jemalloc only
/// purges while allocating, so an idle broker kept the burst's peak as RSS
/// (108 MB an idle minute after a 1 -> 100 fan-out over TLS, 16 MB with it;
/// docs/performance.md).
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: Option<&std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static, NUL-terminated string.
    Some(unsafe { &*c"background_thread:true".as_ptr() });

#[derive(Parser)]
#[command(name = "tern", version, about = "Tern, an MQTT broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only move it"
)]
enum Command {
    /// Run the broker. Without --config it uses the embedded defaults:
    /// MQTT/TCP on 127.0.0.1:1883, MQTT/WebSocket on ws://127.0.0.1:8083/mqtt,
    /// anonymous clients allowed, durable state in ./data (fsync mode), the
    /// admin endpoint on http://127.0.0.1:8090.
    Serve(ServeArgs),
    /// Inspect the durable store: of a stopped broker (--data-dir) or of a
    /// running one through its read-only admin endpoint (--url).
    Admin(tern::admin::AdminArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// MQTT/TCP listen address; replaces the configured listeners. Repeatable.
    #[arg(long = "bind")]
    bind: Vec<SocketAddr>,
    /// MQTT/WebSocket listen address; replaces the configured WebSocket
    /// listeners. Repeatable.
    #[arg(long = "ws-bind")]
    ws_bind: Vec<SocketAddr>,
    /// MQTT/TLS listen address (with --tls-cert and --tls-key); replaces the
    /// configured TLS listeners. Repeatable.
    #[arg(long = "tls-bind")]
    tls_bind: Vec<SocketAddr>,
    /// MQTT/WebSocket-over-TLS (wss://) listen address (with --tls-cert and
    /// --tls-key); replaces the configured ones. Repeatable.
    #[arg(long = "wss-bind")]
    wss_bind: Vec<SocketAddr>,
    /// PEM certificate chain of the TLS listeners.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listeners.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates that sign client certificates: TLS and WSS clients
    /// must then present one, which authenticates them.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// PEM revocation lists (CRLs) of the client CAs: a revoked client
    /// certificate is refused (needs --tls-client-ca).
    #[arg(long)]
    tls_client_crl: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace (or a tracing directive).
    #[arg(long)]
    log_level: Option<String>,
    /// Directory of the durable store (created if missing).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// When acknowledgements are sent: after the state is synced to
    /// disk (fsync), at once with a sync every few ms (interval), or
    /// without any store (memory).
    #[arg(long, value_parser = parse_durability)]
    durability: Option<DurabilityMode>,
    /// Start even though the store is damaged (it holds fewer writes than
    /// were synced before): serve what it still holds, log what was lost,
    /// and take the store as it is from now on. For this start only.
    #[arg(long)]
    accept_store_damage: bool,
    /// Address of the read-only admin endpoint (loopback only).
    #[arg(long)]
    admin_bind: Option<SocketAddr>,
    /// Address of a listener serving only /metrics and /health (any address).
    #[arg(long)]
    metrics_bind: Option<SocketAddr>,
}

fn parse_durability(s: &str) -> Result<DurabilityMode, String> {
    match s {
        "fsync" => Ok(DurabilityMode::Fsync),
        "interval" => Ok(DurabilityMode::Interval),
        "memory" => Ok(DurabilityMode::Memory),
        other => Err(format!("`{other}` is not one of fsync, interval, memory")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Admin(args) => tern::admin::run(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let ServeArgs {
        config: path,
        bind,
        ws_bind,
        tls_bind,
        wss_bind,
        tls_cert,
        tls_key,
        tls_client_ca,
        tls_client_crl,
        log_level,
        data_dir,
        durability,
        accept_store_damage,
        admin_bind,
        metrics_bind,
    } = args;
    let mut config = match &path {
        Some(path) => match Config::from_file(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("tern: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    // What SIGHUP reloads from, and the file as it was read (before the
    // command line's overrides), to tell which changes need a restart.
    let reload = path.clone().map(|path| ConfigFile {
        path,
        at_start: config.clone(),
    });
    if !bind.is_empty() {
        config.listeners.tcp = bind;
    }
    if !ws_bind.is_empty() {
        config.listeners.ws = ws_bind;
    }
    if !tls_bind.is_empty() {
        config.listeners.tls = tls_bind;
    }
    if !wss_bind.is_empty() {
        config.listeners.wss = wss_bind;
    }
    if tls_cert.is_some() {
        config.listeners.tls_cert = tls_cert;
    }
    if tls_key.is_some() {
        config.listeners.tls_key = tls_key;
    }
    if tls_client_ca.is_some() {
        config.listeners.tls_client_ca = tls_client_ca;
    }
    if tls_client_crl.is_some() {
        config.listeners.tls_client_crl = tls_client_crl;
    }
    if let Some(level) = log_level {
        config.log.level = level;
    }
    if let Some(dir) = data_dir {
        config.storage.data_dir = dir;
    }
    if let Some(mode) = durability {
        config.storage.durability = mode;
    }
    if let Some(addr) = admin_bind {
        config.admin.bind = Some(addr);
    }
    if let Some(addr) = metrics_bind {
        config.admin.metrics_bind = Some(addr);
    }
    if let Err(e) = config.validate() {
        eprintln!("tern: {e}");
        return ExitCode::from(2);
    }
    let directives = tern::config::log_directives(&config.log.level);
    let filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log destination that goes away (a closed terminal, a pipe whose
        // reader exited) must not take the broker down: by default the
        // subscriber reports a failed write with `eprintln!`, which panics
        // when stderr itself is the broken pipe.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    log_panics();

    let runtime = match tern::runtime::builder().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match &path {
            Some(p) => tracing::info!(config = %p.display(), "starting Tern"),
            None => tracing::info!(
                "starting Tern with the embedded default configuration (no config file): anonymous clients allowed"
            ),
        }
        // Listened to before the listeners open: a SIGTERM that comes as
        // soon as a client could connect still shuts down cleanly.
        let mut signals = Signals::listen();
        let on_damage = if accept_store_damage {
            OnDamage::Accept
        } else {
            OnDamage::Refuse
        };
        let server = match Server::start_on_damage(config, on_damage).await {
            Ok(server) => server,
            Err(e) => {
                tracing::error!("{e}");
                if let Some(hint) = e.hint() {
                    tracing::error!("{hint}");
                }
                return ExitCode::FAILURE;
            }
        };
        signals.wait(&server, reload.as_ref()).await;
        tracing::info!("shutdown requested; disconnecting clients");
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Reports a panic as one error line of the log, where the rest of the
/// broker's lines go, instead of the default hook's raw text on stderr.
/// Some panics are caught and turned into errors (sled's, on damaged
/// files: see `SledStore::open` and the backlog reads); the line still
/// says where it came from. A backtrace follows when `RUST_BACKTRACE` asks
/// for one.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let backtrace = std::backtrace::Backtrace::capture();
        tracing::error!(thread = thread.name().unwrap_or("unnamed"), "panic: {info}");
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!("panic backtrace:\n{backtrace}");
        }
    }));
}

/// The configuration file `tern serve` was started with, for SIGHUP.
struct ConfigFile {
    path: PathBuf,
    at_start: Config,
}

impl ConfigFile {
    /// Reads the file again and puts its `[auth]` in force; an unreadable
    /// or invalid file changes nothing. Changes elsewhere in it are only
    /// reported: they take effect at the next start.
    fn reload_auth(&self, server: &Server) {
        let path = self.path.display();
        let now = match Config::from_file(&self.path) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!("SIGHUP: [auth] not reloaded, the rules in force stay: {e}");
                return;
            }
        };
        let disconnected = server.reload_auth(&now.auth);
        tracing::info!(config = %path, disconnected, "SIGHUP: [auth] reloaded");
        let mut unchanged = self.at_start.clone();
        unchanged.auth = now.auth.clone();
        if unchanged != now {
            tracing::warn!(
                config = %path,
                "SIGHUP: only [auth] and the TLS files are reloaded; the file's other changes take effect at the next start"
            );
        }
    }
}

/// The signals the broker answers: SIGINT and SIGTERM stop it, SIGHUP
/// reloads `[auth]` from the configuration file (if one was given) and the
/// TLS certificate files. Streams made once, before the server
/// starts: a signal that arrives before [`wait`](Signals::wait) or between
/// two turns of its loop is kept for it.
struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts listening. One that cannot be listened to (it never happens on
    /// Linux) is only left out, never the others.
    fn listen() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind| match signal(kind) {
                Ok(stream) => Some(stream),
                Err(e) => {
                    tracing::warn!(error = %e, ?kind, "cannot listen to a signal");
                    None
                }
            };
            Signals {
                int: listen(SignalKind::interrupt()),
                term: listen(SignalKind::terminate()),
                hup: listen(SignalKind::hangup()),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves on SIGINT or SIGTERM; on SIGHUP, reloads `[auth]` and the
    /// TLS certificate files and goes on waiting.
    async fn wait(&mut self, server: &Server, config: Option<&ConfigFile>) {
        #[cfg(unix)]
        {
            async fn next(stream: &mut Option<tokio::signal::unix::Signal>) {
                match stream {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.int.is_none() && self.term.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            loop {
                tokio::select! {
                    () = next(&mut self.int) => return,
                    () = next(&mut self.term) => return,
                    () = next(&mut self.hup) => {
                        if let Some(config) = config {
                            config.reload_auth(server);
                        }
                        tracing::info!("SIGHUP: reloading the TLS certificate files");
                        // Logged by reload_tls either way.
                        let _ = server.reload_tls();
                    }
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (server, config);
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
