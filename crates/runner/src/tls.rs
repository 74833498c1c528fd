//! All of the runner's TLS: TLS 1.3 only, a client certificate from the configured CA required,
//! and the peer's SPIFFE identity read from its URI SANs.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Installs the process-wide crypto provider (aws-lc-rs) once.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())?
        .ok_or_else(|| anyhow::anyhow!("{} holds no private key", path.display()))
}

pub fn roots(ca: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// The runner's server configuration.
pub fn server_config(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<ServerConfig> {
    install_provider();
    let verifier = WebPkiClientVerifier::builder(roots(ca)?).build()?;
    let config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    Ok(config)
}

/// The URI SANs of a (verified) end-entity certificate.
pub fn uri_names(cert: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(cert)
        .map(|ee| ee.valid_uri_names().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Refuses a certificate whose leaf does not carry `identity` (caught at start, not at the first
/// exec after a human approved a grant).
pub fn check_identity(cert: &Path, identity: &str) -> anyhow::Result<()> {
    let certs = load_certs(cert)?;
    let names = certs.first().map(uri_names).unwrap_or_default();
    anyhow::ensure!(
        names.iter().any(|n| n == identity),
        "cert_file {} carries {} but this runner is configured as {identity} (trust_domain, tenant, name); issue a certificate for this identity",
        cert.display(),
        if names.is_empty() {
            "no SPIFFE identity".to_owned()
        } else {
            names.join(", ")
        },
    );
    Ok(())
}
