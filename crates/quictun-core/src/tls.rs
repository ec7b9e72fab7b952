//! TLS for both ends: certificates (generate, load, fingerprint) and rustls configurations.
//!
//! The agent authenticates the relay either by a pinned SHA-256 fingerprint of its DER certificate
//! ([`Pin`], checked by [`PinVerifier`], which still verifies the TLS 1.3 handshake signature so the
//! relay must hold the key) or by a CA bundle. Only TLS 1.3 is offered, with the ring provider.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Errors from certificate files, generation and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A pin string is not `sha256:` followed by 64 hex digits.
    #[error("invalid pin {0:?}: expected sha256:<64 hex digits>")]
    InvalidPin(String),
    /// The name a TLS client verifies the server by is not a DNS name or an address.
    #[error("server name {0:?} is not a DNS name or an IP address")]
    ServerName(String),
}

/// The crypto provider every quictun TLS configuration uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, ready for a server configuration.
#[derive(Debug)]
pub struct CertKey {
    /// The chain, end-entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for CertKey {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl CertKey {
    /// The pin of the end-entity certificate.
    pub fn pin(&self) -> Option<Pin> {
        self.chain.first().map(|c| Pin::of(c))
    }

    /// Loads a PEM certificate chain and a PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TlsError::File { path: key.to_owned(), reason: e.to_string() })?;
        Ok(Self { chain, key })
    }
}

/// Reads every certificate of a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File { path: path.to_owned(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// A freshly generated self-signed certificate, as PEM text.
#[derive(Debug, Clone)]
pub struct GeneratedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate's pin.
    pub pin: Pin,
}

impl GeneratedCert {
    /// Generates a self-signed certificate for the given subject alternative names
    /// (`localhost` and `127.0.0.1` when empty).
    pub fn self_signed(sans: &[String]) -> Result<Self, TlsError> {
        let sans = if sans.is_empty() { vec!["localhost".to_owned(), "127.0.0.1".to_owned()] } else { sans.to_vec() };
        let certified = rcgen::generate_simple_self_signed(sans)?;
        Ok(Self {
            pin: Pin::of(certified.cert.der()),
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
        })
    }

    /// Parses the PEM back into DER for a server configuration.
    pub fn cert_key(&self) -> Result<CertKey, TlsError> {
        let pem_err = |reason: String| TlsError::File { path: "<generated>".into(), reason };
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| pem_err(e.to_string()))?;
        Ok(CertKey { chain, key })
    }

    /// Writes `DIR/NAME.crt` and `DIR/NAME.key` (the key readable by the owner only).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
        let io_err = |path: &Path, e: std::io::Error| TlsError::File { path: path.to_owned(), reason: e.to_string() };
        for path in [cert_path, key_path] {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            }
        }
        std::fs::write(cert_path, &self.cert_pem).map_err(|e| io_err(cert_path, e))?;
        write_private(key_path, self.key_pem.as_bytes()).map_err(|e| io_err(key_path, e))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// The SHA-256 fingerprint of a DER certificate, written `sha256:<64 lower-case hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin([u8; 32]);

impl Pin {
    /// The pin of a DER certificate.
    pub fn of(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }

    /// The pin of the first certificate in a PEM file.
    pub fn of_pem_file(path: &Path) -> Result<Self, TlsError> {
        let certs = load_certs(path)?;
        // load_certs never returns an empty list.
        certs
            .first()
            .map(|c| Self::of(c))
            .ok_or_else(|| TlsError::File { path: path.to_owned(), reason: "no PEM certificate found".into() })
    }
}

impl std::str::FromStr for Pin {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || TlsError::InvalidPin(s.to_owned());
        let hex = s.trim().strip_prefix("sha256:").ok_or_else(invalid)?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
        }
        Ok(Self(bytes))
    }
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The relay presented a certificate whose fingerprint is not the pinned one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("relay certificate does not match the pin: expected {expected}, got {actual}")]
pub struct PinMismatch {
    /// The pin the agent was configured with.
    pub expected: Pin,
    /// The fingerprint of the certificate the relay presented.
    pub actual: Pin,
}

/// A rustls verifier that accepts exactly one certificate, by fingerprint, and verifies the
/// handshake signature with the provider's algorithms.
#[derive(Debug)]
pub struct PinVerifier {
    pin: Pin,
    algorithms: WebPkiSupportedAlgorithms,
    last_mismatch: Mutex<Option<PinMismatch>>,
}

impl PinVerifier {
    /// A verifier for `pin`.
    pub fn new(pin: Pin, provider: &CryptoProvider) -> Self {
        Self { pin, algorithms: provider.signature_verification_algorithms, last_mismatch: Mutex::new(None) }
    }

    /// The most recent mismatch seen, to explain a failed handshake.
    pub fn last_mismatch(&self) -> Option<PinMismatch> {
        self.last_mismatch.lock().map(|m| m.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = Pin::of(end_entity);
        if actual == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = PinMismatch { expected: self.pin, actual };
        match self.last_mismatch.lock() {
            Ok(mut slot) => *slot = Some(mismatch.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(mismatch.clone()),
        }
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(mismatch)))))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is ever negotiated.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// How the agent decides to trust the relay.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly the certificate with this fingerprint.
    Pin(Pin),
    /// Any certificate for the relay's name signed by a CA in this PEM bundle.
    CaFile(PathBuf),
}

/// A rustls server configuration: TLS 1.3 only, ALPN `quictun/1`.
pub fn server_config(cert: CertKey) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with_alpn(cert, quictun_proto::ALPN)
}

/// A rustls server configuration, TLS 1.3 only, with one ALPN protocol (`h2` for gRPC).
pub fn server_config_with_alpn(cert: CertKey, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A rustls server configuration for the public HTTPS ingress: TLS 1.3 and 1.2 (web clients are
/// not all on 1.3), ALPN `h2` then `http/1.1`.
pub fn ingress_server_config(cert: CertKey) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A rustls client configuration for the agent (ALPN `quictun/1`), and the pin verifier when
/// pinning (to explain a failed handshake).
pub fn client_config(trust: &Trust) -> Result<(rustls::ClientConfig, Option<Arc<PinVerifier>>), TlsError> {
    client_config_with_alpn(trust, quictun_proto::ALPN)
}

/// [`client_config`] with another ALPN protocol (`h2` for gRPC).
pub fn client_config_with_alpn(
    trust: &Trust,
    alpn: &[u8],
) -> Result<(rustls::ClientConfig, Option<Arc<PinVerifier>>), TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let (mut config, verifier) = match trust {
        Trust::Pin(pin) => {
            let verifier = Arc::new(PinVerifier::new(*pin, &provider));
            let config = builder.dangerous().with_custom_certificate_verifier(verifier.clone()).with_no_client_auth();
            (config, Some(verifier))
        }
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::File { path: path.clone(), reason: e.to_string() })?;
            }
            (builder.with_root_certificates(roots).with_no_client_auth(), None)
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok((config, verifier))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_parses_and_prints() {
        let pin = Pin::of(b"certificate");
        let text = pin.to_string();
        assert!(text.starts_with("sha256:") && text.len() == 71);
        assert_eq!(text.parse::<Pin>().unwrap(), pin);
        assert!("sha256:zz".parse::<Pin>().is_err());
        assert!("md5:00".parse::<Pin>().is_err());
        assert!(format!("sha256:{}", "é".repeat(32)).parse::<Pin>().is_err());
    }

    #[test]
    fn generated_cert_round_trips_through_pem() {
        let generated = GeneratedCert::self_signed(&[]).unwrap();
        let ck = generated.cert_key().unwrap();
        assert_eq!(ck.pin(), Some(generated.pin));
        server_config(ck).unwrap();
    }
}
