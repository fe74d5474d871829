//! TLS for NBD (`NBD_OPT_STARTTLS`, proto.md "TLS support"), with rustls: the same
//! upgrade in the middle of the handshake that qemu-nbd and nbdkit do, so qemu's
//! `tls-creds` and `nbdinfo nbds://` connect to tern.
//!
//! Keys and certificates are PEM files as qemu's `tls-creds-x509` folder holds them;
//! with a CA, clients must present a certificate it signed (mutual TLS).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConnection, StreamOwned};

use crate::error::{Error, Result};
use crate::handshake::HandshakeStream;
use crate::socket::Socket;

/// Build a server TLS configuration from PEM files: the server's certificate chain and
/// private key, and optionally a CA whose certificates clients must present.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::Tls(format!("read certificates from {}: {e}", cert.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Tls(format!("read certificates from {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{} holds no certificate", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Tls(format!("read the private key from {}: {e}", key.display())))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| Error::Tls(format!("read CA certificates from {}: {e}", ca.display())))?
            {
                let c =
                    c.map_err(|e| Error::Tls(format!("read CA certificates from {}: {e}", ca.display())))?;
                roots.add(c).map_err(|e| Error::Tls(format!("CA certificate in {}: {e}", ca.display())))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| Error::Tls(format!("client verification: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config =
        builder.with_single_cert(certs, key).map_err(|e| Error::Tls(format!("certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// A connection during the handshake: plain, or upgraded to TLS.
pub(crate) enum Stream {
    Plain(Socket),
    Tls(Box<StreamOwned<ServerConnection, Socket>>),
}

impl Stream {
    pub(crate) fn socket(&self) -> &Socket {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

impl HandshakeStream for Stream {
    fn start_tls(&mut self, config: &Arc<rustls::ServerConfig>) -> io::Result<()> {
        let Stream::Plain(s) = self else {
            return Err(io::Error::other("TLS is already running"));
        };
        let mut sock = s.try_clone()?;
        let mut conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        *self = Stream::Tls(Box::new(StreamOwned::new(conn, sock)));
        Ok(())
    }

    fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

/// One TLS stream shared by the read and write sides of the transmission phase (used
/// with one request thread, so the lock is never contended).
pub(crate) struct Locked(pub(crate) Arc<Mutex<StreamOwned<ServerConnection, Socket>>>);

impl Read for Locked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match t.read(buf) {
            // A client that closes without close_notify is just gone.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            r => r,
        }
    }
}

impl Write for Locked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.write(buf)?;
        t.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}
