//! All of the gateway's TLS towards runners: TLS 1.3, the gateway's client certificate, the
//! runner's chain verified against the configured CA, and — before any request byte is sent — the
//! runner's certificate must carry exactly the SPIFFE identity registered for it.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Installs the process-wide crypto provider (aws-lc-rs) once.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

fn key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())?
        .ok_or_else(|| anyhow::anyhow!("{} holds no private key", path.display()))
}

/// The gateway's material for talking to runners.
pub struct ClientMaterial {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientMaterial(..)")
    }
}

impl ClientMaterial {
    pub fn load(ca: &Path, cert: &Path, key_file: &Path) -> anyhow::Result<Self> {
        install_provider();
        let mut roots = RootCertStore::empty();
        for cert in certs(ca)? {
            roots.add(cert)?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            chain: certs(cert)?,
            key: key(key_file)?,
        })
    }

    /// A client configuration that only completes a handshake with a runner proving `identity`.
    pub fn config_for(&self, identity: &str) -> anyhow::Result<ClientConfig> {
        let verifier = Arc::new(IdentityVerifier {
            inner: WebPkiServerVerifier::builder(self.roots.clone()).build()?,
            identity: identity.to_owned(),
        });
        Ok(
            ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?,
        )
    }
}

/// Standard WebPKI verification (chain, validity, host name), then the SPIFFE identity.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<WebPkiServerVerifier>,
    identity: String,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let names: Vec<String> = webpki::EndEntityCert::try_from(end_entity)
            .map(|ee| ee.valid_uri_names().map(str::to_owned).collect())
            .unwrap_or_default();
        if names.contains(&self.identity) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "runner certificate identity {names:?} is not the registered {}",
                self.identity
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
