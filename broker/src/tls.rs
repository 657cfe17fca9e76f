//! MQTT over TLS: the listeners' certificate and key, and the handshake in
//! front of the ordinary connection code.
//!
//! [`load_acceptor`] reads `listeners.tls_cert` and `listeners.tls_key`
//! once, at start (a bad file stops the start with its path and the reason).
//! The acceptor is kept in `Broker::tls`. [`serve_tls`] runs the TLS
//! handshake, bounded by the connect timeout, and then hands the decrypted
//! stream to `connection::serve`, which does not know it is encrypted:
//! everything MQTT is identical on every transport. WebSocket over TLS
//! (`websocket::serve_wss`) runs the same [`handshake`] before its upgrade.
//!
//! TLS is rustls with the `ring` provider, TLS 1.2 and 1.3, the provider's
//! safe defaults, no client certificates. Unlike TCP, a TLS connection
//! cannot tell that bytes are waiting without reading them (rustls must
//! decrypt a record first), so its reader uses `TransportRead`'s default:
//! the connection takes a pooled buffer to read and gives it back when the
//! read finds nothing, and rustls keeps its own buffers for the
//! connection's life.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::broker::Broker;
use crate::connection;
use crate::metrics::Metrics;

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
    #[error("the TLS certificate and key do not make a valid configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Reads the certificate chain and key and makes the acceptor every TLS
/// listener shares.
pub fn load_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    // The provider is named, not taken from the process default: a build
    // that links another provider too (a test client's) must not change
    // what the broker serves.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The read half of a TLS connection: readiness is only known by reading
/// (see the module docs), so it takes `TransportRead`'s default.
impl crate::transport::TransportRead for tokio::io::ReadHalf<TlsStream<TcpStream>> {}

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
        let (reader, writer) = tokio::io::split(stream);
        connection::serve(broker, reader, writer, &peer).await;
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
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = broker.tls.get() else {
        tracing::error!(%peer, "a TLS connection, but no TLS certificate is loaded");
        return None;
    };
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            Metrics::inc(&broker.metrics.tls_handshakes_failed);
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            Metrics::inc(&broker.metrics.tls_handshakes_failed);
            tracing::info!(%peer, "TLS handshake not completed within the connect timeout");
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
        load_acceptor(&dir.join("server.pem"), &dir.join("server.key")).unwrap();
    }

    fn load_err(cert: &Path, key: &Path) -> TlsError {
        match load_acceptor(cert, key) {
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
        let e = load_acceptor(&dir.join("server.pem"), &dir.join("other.key"));
        assert!(
            e.is_err(),
            "a key that does not match the certificate is refused"
        );
    }
}
