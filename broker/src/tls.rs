//! MQTT over TLS: the listeners' certificate and key, and the handshake in
//! front of the ordinary connection code.
//!
//! [`load_acceptor`] reads `listeners.tls_cert` and `listeners.tls_key`
//! once, at start (a bad file stops the start with its path and the reason).
//! The acceptor is kept in `Broker::tls`. [`serve_tls`] runs the TLS
//! handshake, bounded by the connect timeout, and then hands the decrypted
//! stream to `connection::serve`, which does not know it is encrypted:
//! everything MQTT is identical on every transport. WebSocket over TLS
//! (`websocket::serve_wss`) runs the same `handshake` before its upgrade.
//!
//! TLS is rustls with the `ring` provider, TLS 1.2 and 1.3, the provider's
//! safe defaults; client certificates are required, and stand in for a
//! user name and password, when `listeners.tls_client_ca` is set (their
//! subject's common name is the user with `listeners.tls_client_identity`:
//! [`client_certificate`]; revocation lists: `listeners.tls_client_crl`).
//! A broker at `limits.max_connections` closes a new TLS connection before
//! its handshake. Unlike TCP, a TLS connection cannot tell that bytes are
//! waiting without reading them (rustls must decrypt a record first):
//! [`TlsRead`] remembers that its last read found nothing until the socket
//! wakes it, so an idle connection holds no read buffer and takes none from
//! the pool when its task wakes for its writer; rustls keeps its own
//! buffers for the connection's life.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, ReadBuf, ReadHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::broker::Broker;
use crate::config::{CertificateIdentity, ListenersConfig};
use crate::connection;
use crate::log_throttle::throttled;
use crate::metrics::Metrics;
use crate::signal::Signal;
use crate::transport::ClientCertificate;

/// Why the TLS listeners could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0} must be set when listeners.tls or listeners.wss has an address")]
    Unset(&'static str),
    #[error("cannot read the TLS certificate {}: {reason}", path.display())]
    Certificate { path: PathBuf, reason: String },
    #[error("no certificate in {} (expected PEM \"BEGIN CERTIFICATE\" blocks)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("cannot read the TLS private key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("cannot use the client CA file {}: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("cannot use the client revocation list file {}: {reason}", path.display())]
    ClientCrl { path: PathBuf, reason: String },
    #[error("the TLS certificate and key do not make a valid configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Every certificate in a PEM file (none is an error naming the file).
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Which client certificates a TLS listener accepts: those chained to a CA
/// in `ca` that no revocation list in `crl` revokes.
#[derive(Debug, Clone, Copy)]
pub struct ClientCaFiles<'a> {
    pub ca: &'a Path,
    pub crl: Option<&'a Path>,
}

/// Reads the certificate chain and key (and, with `clients`, the CAs that
/// sign client certificates, which then become required, and their
/// revocation lists) and makes the acceptor every TLS listener shares.
pub fn load_acceptor(
    cert: &Path,
    key: &Path,
    clients: Option<ClientCaFiles<'_>>,
) -> Result<TlsAcceptor, TlsError> {
    let chain = read_certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    // The provider is named, not taken from the process default: a build
    // that links another provider too (a test client's) must not change
    // what the broker serves.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let config = match clients {
        None => builder.with_no_client_auth(),
        Some(clients) => builder.with_client_cert_verifier(client_verifier(clients, provider)?),
    }
    .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The verifier of client certificates: chained to a CA of `clients.ca`,
/// and, with `clients.crl`, not revoked. Only the client's own certificate
/// is checked against the lists (as OpenSSL's CRL check does), and a
/// certificate whose issuer has no list there is refused: a list that
/// silently covered only some CAs would let a revoked certificate in.
fn client_verifier(
    clients: ClientCaFiles<'_>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let ca_error = |reason: String| TlsError::ClientCa {
        path: clients.ca.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certificates(clients.ca)? {
        roots.add(ca).map_err(|e| ca_error(e.to_string()))?;
    }
    let mut verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if let Some(path) = clients.crl {
        let crl_error = |reason: String| TlsError::ClientCrl {
            path: path.to_owned(),
            reason,
        };
        let crls = CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|crls| crls.collect::<Result<Vec<_>, _>>())
            .map_err(|e| crl_error(e.to_string()))?;
        if crls.is_empty() {
            return Err(crl_error(
                "no revocation list in it (expected PEM \"BEGIN X509 CRL\" blocks)".into(),
            ));
        }
        // The verifier uses the first list of a certificate's issuer: with
        // an old list before the current one, what only the current one
        // revokes would get in.
        let mut issuers = std::collections::HashSet::new();
        for crl in &crls {
            let (_, list) = x509_parser::parse_x509_crl(crl)
                .map_err(|e| crl_error(format!("a revocation list does not parse: {e}")))?;
            if !issuers.insert(list.issuer().as_raw().to_vec()) {
                return Err(crl_error(format!(
                    "two revocation lists from the same CA ({}): keep only the current one",
                    list.issuer()
                )));
            }
        }
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    // A list that does not parse is refused here; its signature is checked
    // against the CAs at each handshake.
    verifier.build().map_err(|e| match clients.crl {
        Some(path) if matches!(e, rustls::server::VerifierBuilderError::InvalidCrl(_)) => {
            TlsError::ClientCrl {
                path: path.to_owned(),
                reason: e.to_string(),
            }
        }
        _ => ca_error(e.to_string()),
    })
}

/// The acceptor for the configured TLS listeners, or `None` when there are
/// none.
pub fn load_configured(listeners: &ListenersConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    if listeners.tls.is_empty() && listeners.wss.is_empty() {
        return Ok(None);
    }
    let cert = listeners
        .tls_cert
        .as_deref()
        .ok_or(TlsError::Unset("listeners.tls_cert"))?;
    let key = listeners
        .tls_key
        .as_deref()
        .ok_or(TlsError::Unset("listeners.tls_key"))?;
    let clients = listeners.tls_client_ca.as_deref().map(|ca| ClientCaFiles {
        ca,
        crl: listeners.tls_client_crl.as_deref(),
    });
    load_acceptor(cert, key, clients).map(Some)
}

/// Reads the certificate files again and installs them for the handshakes
/// that start from now on (connections already open keep their session).
/// Certificates are renewed while a broker runs; this lets it pick up the
/// new ones without a restart. On an error the broker keeps the files it
/// had, and says why.
pub fn reload(broker: &Broker) -> Result<(), TlsError> {
    match load_configured(&broker.config.listeners) {
        Ok(None) => Ok(()),
        Ok(Some(acceptor)) => {
            *broker.tls.write() = Some(acceptor);
            tracing::info!("TLS certificate reloaded");
            Ok(())
        }
        Err(e) => {
            tracing::error!("TLS certificate not reloaded, the previous one stays: {e}");
            Err(e)
        }
    }
}

/// The certificate the client of a completed handshake presented (it was
/// verified, or the handshake would have failed), with the identity
/// `listeners.tls_client_identity` asks for.
pub(crate) fn client_certificate(
    stream: &TlsStream<TcpStream>,
    identity: CertificateIdentity,
) -> Option<ClientCertificate> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    let identity = match identity {
        CertificateIdentity::None => None,
        CertificateIdentity::CommonName => common_name(leaf),
    };
    Some(ClientCertificate { identity })
}

/// The subject's common name of a DER certificate: `None` unless there is
/// exactly one, non-empty and UTF-8 (two would make the identity a guess).
fn common_name(der: &[u8]) -> Option<Box<str>> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = certificate.subject().iter_common_name();
    let name = names.next()?.as_str().ok()?;
    if names.next().is_some() || name.is_empty() {
        return None;
    }
    Some(name.into())
}

/// The read half of a TLS connection (MQTT/TLS, and under `wss://`).
///
/// Whether bytes wait cannot be asked of TLS without reading (rustls must
/// decrypt a record), yet a connection must not take a read buffer from the
/// pool each time its task wakes for another reason (its writer's queue): a
/// fan-out to TLS subscribers would then lock the pool twice per delivery.
/// So a read that finds nothing registers `ReadWake` with the socket
/// instead of the task's waker: until the socket wakes it, the half is known
/// to be idle and [`poll_readable`](TransportRead::poll_readable) says
/// `Pending` without a read.
pub struct TlsRead {
    half: ReadHalf<TlsStream<TcpStream>>,
    wake: Arc<ReadWake>,
    /// The last read found nothing and `wake` has not been raised since.
    idle: bool,
    certificate: Option<ClientCertificate>,
}

/// The waker a TLS read registers with the socket: it raises a [`Signal`]
/// that wakes the connection's task.
#[derive(Default)]
struct ReadWake(Signal);

impl std::task::Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.0.raise();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.raise();
    }
}

impl TlsRead {
    pub(crate) fn new(
        half: ReadHalf<TlsStream<TcpStream>>,
        certificate: Option<ClientCertificate>,
    ) -> TlsRead {
        TlsRead {
            half,
            wake: Arc::default(),
            idle: false,
            certificate,
        }
    }

    /// Ready unless the last read found nothing and the socket has not
    /// woken since.
    pub(crate) fn poll_idle_over(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.idle {
            std::task::ready!(std::pin::pin!(self.wake.0.wait()).poll(cx));
            self.idle = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let waker = Waker::from(Arc::clone(&this.wake));
        for _ in 0..2 {
            let read = Pin::new(&mut this.half).poll_read(&mut Context::from_waker(&waker), buf);
            if read.is_ready() {
                this.idle = false;
                return read;
            }
            this.idle = true;
            // The task waits on the signal from now on; a raise since the
            // read (the socket woke in between) means: read again, once.
            if std::pin::pin!(this.wake.0.wait()).poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        // Raised again at once (an inner read that wakes before it returns
        // Pending, as a cooperative-scheduling budget does): come back on
        // the next turn of the scheduler rather than spin here.
        this.idle = false;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl crate::transport::TransportRead for TlsRead {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_idle_over(cx)
    }

    fn client_certificate(&self) -> Option<&ClientCertificate> {
        self.certificate.as_ref()
    }
}

/// Shuts down with its `close_notify` (`poll_shutdown`), at once.
impl crate::transport::TransportWrite for tokio::io::WriteHalf<TlsStream<TcpStream>> {}

/// Serves one MQTT/TLS connection: the handshake, then MQTT.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
pub fn serve_tls(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    async move {
        // Boxed: the handshake is needed once, and inline its state would be
        // part of the connection's task for its whole life.
        let deadline = Instant::now() + broker.config.connect_timeout();
        let Some(stream) = Box::pin(handshake(&broker, stream, peer, deadline)).await else {
            return;
        };
        let certificate = client_certificate(&stream, broker.config.listeners.tls_client_identity);
        let (half, writer) = tokio::io::split(stream);
        let mut reader = TlsRead::new(half, certificate);
        // Boxed, as in `connection::serve_tcp`.
        let lingering = connection::serve(broker, &mut reader, writer, &peer)
            .await
            .map(|permit| Box::pin(connection::linger_counted(&mut reader, permit)));
        if let Some(lingering) = lingering {
            lingering.await;
        }
    }
}

/// The TLS handshake with the broker's certificate, by `deadline` (the
/// connect timeout). `None` (logged and counted) when it fails, takes too
/// long, or the broker has no certificate.
pub(crate) async fn handshake(
    broker: &Broker,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<TlsStream<TcpStream>> {
    // Refused before any cryptography: a broker at `limits.max_connections`
    // does not pay for handshakes it would refuse after them.
    if broker.registry.connection_count() >= broker.config.limits.max_connections {
        Metrics::inc(&broker.metrics.connections_refused);
        tracing::debug!(%peer, "TLS connection closed: limits.max_connections reached");
        return None;
    }
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = broker.tls.read().clone() else {
        tracing::error!(%peer, "a TLS connection, but no TLS certificate is loaded");
        return None;
    };
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            Metrics::inc(&broker.metrics.tls_handshakes_failed);
            throttled!(INFO, %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            Metrics::inc(&broker.metrics.tls_handshakes_failed);
            throttled!(INFO, %peer, "TLS handshake not completed within the connect timeout");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/certs")
    }

    #[test]
    fn the_test_certificate_loads() {
        let dir = certs();
        load_acceptor(&dir.join("server.pem"), &dir.join("server.key"), None).unwrap();
        let clients = ClientCaFiles {
            ca: &dir.join("ca.pem"),
            crl: Some(&dir.join("crl.pem")),
        };
        load_acceptor(
            &dir.join("server.pem"),
            &dir.join("server.key"),
            Some(clients),
        )
        .unwrap();
    }

    fn load_err(cert: &Path, key: &Path) -> TlsError {
        match load_acceptor(cert, key, None) {
            Ok(_) => panic!("{} and {} were accepted", cert.display(), key.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn bad_files_name_their_path() {
        let dir = certs();
        let e = load_err(&dir.join("missing.pem"), &dir.join("server.key"));
        assert!(matches!(e, TlsError::Certificate { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        // A key where the certificate should be: no certificate in it.
        let e = load_err(&dir.join("server.key"), &dir.join("server.key"));
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        // A certificate where the key should be.
        let e = load_err(&dir.join("server.pem"), &dir.join("ca.pem"));
        assert!(matches!(e, TlsError::Key { .. }), "{e}");
        assert!(e.to_string().contains("ca.pem"), "{e}");
        // A key that is not the certificate's.
        let e = load_err(&dir.join("server.pem"), &dir.join("other.key"));
        assert!(matches!(e, TlsError::Config(_)), "{e}");
        // A client CA file without a certificate.
        let clients_err = |ca: &str, crl: Option<&str>| {
            let crl = crl.map(|crl| dir.join(crl));
            let clients = ClientCaFiles {
                ca: &dir.join(ca),
                crl: crl.as_deref(),
            };
            match load_acceptor(
                &dir.join("server.pem"),
                &dir.join("server.key"),
                Some(clients),
            ) {
                Ok(_) => panic!("client CA {ca} with revocation list {crl:?} was accepted"),
                Err(e) => e,
            }
        };
        let e = clients_err("server.key", None);
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        // A revocation list file without one, or missing.
        let e = clients_err("ca.pem", Some("ca.pem"));
        assert!(matches!(e, TlsError::ClientCrl { .. }), "{e}");
        assert!(e.to_string().contains("ca.pem"), "{e}");
        // Two lists of one CA: the verifier would use the first, old one.
        let dir2 = tempfile::tempdir().unwrap();
        let both = dir2.path().join("both.pem");
        let mut lists = std::fs::read(dir.join("crl-none.pem")).unwrap();
        lists.extend(std::fs::read(dir.join("crl.pem")).unwrap());
        std::fs::write(&both, lists).unwrap();
        let e = clients_err("ca.pem", Some(both.to_str().unwrap()));
        assert!(e.to_string().contains("same CA"), "{e}");
        let e = clients_err("ca.pem", Some("missing-crl.pem"));
        assert!(matches!(e, TlsError::ClientCrl { .. }), "{e}");
        assert!(e.to_string().contains("missing-crl.pem"), "{e}");
    }

    #[test]
    fn a_certificate_names_a_user_only_with_exactly_one_common_name() {
        let name_of = |file: &str| {
            let der = CertificateDer::from_pem_file(certs().join(file)).unwrap();
            common_name(&der)
        };
        assert_eq!(name_of("client.pem").as_deref(), Some("sensor-1"));
        assert_eq!(name_of("ca.pem").as_deref(), Some("Tern test CA"));
        assert_eq!(name_of("nameless.pem"), None);
        assert_eq!(name_of("twonames.pem"), None);
        assert_eq!(common_name(b"not a certificate"), None);
    }
}
