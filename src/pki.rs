//! A small PKI for development and tests (`custodian admin pki init|issue`): an ECDSA P-256 CA and
//! leaf certificates carrying SPIFFE identities as URI SANs. Production deployments take their
//! certificates from files (e.g. cert-manager) instead.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use custodian_protocol::Identity;

/// Paths of a CA in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Writes `contents` to a new file readable only by its owner.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// Creates a CA in `dir` (refuses to overwrite one).
pub fn init(dir: &Path, trust_domain: &str) -> anyhow::Result<()> {
    let (cert_path, key_path) = ca_paths(dir);
    anyhow::ensure!(!key_path.exists(), "{} already exists", key_path.display());
    Identity::parse(&format!("spiffe://{trust_domain}/gateway"))
        .map_err(|_| anyhow::anyhow!("`{trust_domain}` is not a valid trust domain"))?;
    std::fs::create_dir_all(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("Custodian CA ({trust_domain})"));
    params.distinguished_name = name;
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    let cert = params.self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())?;
    Ok(())
}

/// Issues a certificate for `identity` signed by the CA in `dir`, valid for `days` from now
/// (negative: already expired, for tests), with extra DNS names / IPs for servers. Writes
/// `OUT.pem` and `OUT.key`.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    hosts: &[String],
    days: i64,
    out: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (ca_cert, ca_key) = ca_paths(dir);
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(&ca_cert)?, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params
        .subject_alt_names
        .push(SanType::URI(identity.to_string().try_into()?));
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, identity.to_string());
    params.distinguished_name = name;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    if days >= 0 {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days.max(1));
    } else {
        params.not_before = now - time::Duration::days(30);
        params.not_after = now + time::Duration::days(days);
    }
    let cert = params.signed_by(&key, &issuer)?;
    let cert_path = out.with_extension("pem");
    let key_path = out.with_extension("key");
    std::fs::write(&cert_path, cert.pem())?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}
