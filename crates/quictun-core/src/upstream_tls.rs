//! TLS to `https://` upstreams (cloudflared's `originRequest`): the certificate is verified
//! against the system's roots, or against a `ca_file` instead; `tls_server_name` names the
//! certificate's host when the target's address does not; `insecure_skip_verify` turns
//! verification off (the agent warns about it when it starts). These options live where the
//! target is written on the agent's side: a relay can push an `https://` target, never switch off
//! the agent's verification.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls::TlsError;

/// How one `https://` target is verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// Trust these CAs (a PEM bundle) instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The name the certificate must carry, when not the target's host.
    pub server_name: Option<String>,
    /// Accept any certificate (for development only).
    pub insecure_skip_verify: bool,
}

impl UpstreamTls {
    /// The rustls client configuration (ALPN left empty: the connector sets it).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = crate::tls::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let config = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.signature_verification_algorithms)))
                .with_no_client_auth()
        } else {
            builder.with_root_certificates(self.roots()?).with_no_client_auth()
        };
        Ok(config)
    }

    /// The `ca_file`'s certificates, else the system's.
    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let Some(path) = &self.ca_file else { return Ok(system_roots()) };
        let mut roots = RootCertStore::empty();
        for cert in crate::tls::load_certs(path)? {
            roots.add(cert).map_err(TlsError::Config)?;
        }
        Ok(Arc::new(roots))
    }

    /// The server name to verify for a target whose host is `host`.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.trim_start_matches('[').trim_end_matches(']').to_owned())
            .map_err(|_| TlsError::ServerName(name.to_owned()))
    }
}

/// The system's trusted roots (`/etc/ssl/certs` and the like), read once; certificates that do
/// not parse are skipped.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for err in &found.errors {
                tracing::warn!(%err, "reading the system's trusted certificates");
            }
            let mut roots = RootCertStore::empty();
            let (added, skipped) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, skipped, "system roots for https upstreams");
            Arc::new(roots)
        })
        .clone()
}

/// Accepts every certificate; handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// True when `err`'s chain ([`crate::causes`]) holds a certificate the TLS handshake refused.
pub fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::causes(err).any(|c| matches!(c.downcast_ref::<rustls::Error>(), Some(rustls::Error::InvalidCertificate(_))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_found_under_nested_io_errors() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let nested = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, refused));
        assert!(is_certificate_error(&nested));
        let other = std::io::Error::other(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_certificate_error(&other));
    }
}
