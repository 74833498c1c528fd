//! A small PKI for development and tests (`custodian admin pki init|issue`): an ECDSA P-256 CA and
//! leaf certificates carrying SPIFFE identities as URI SANs. Production deployments take their
//! certificates from files (e.g. cert-manager) instead.
//!
//! The CA records its trust domain as the URI SAN `spiffe://<trust-domain>` (SPIFFE's form for a
//! trust domain); [`issue`] refuses an identity of any other trust domain before writing anything,
//! so a runner never starts with a certificate no gateway of that trust domain accepts.

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
    params
        .subject_alt_names
        .push(SanType::URI(format!("spiffe://{trust_domain}").try_into()?));
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

/// The trust domain the CA in `dir` was created for: its `spiffe://<trust-domain>` URI SAN, or, for
/// CAs made before that SAN was written, the one named in its common name.
pub fn trust_domain(dir: &Path) -> anyhow::Result<String> {
    let (cert_path, _) = ca_paths(dir);
    let pem = std::fs::read_to_string(&cert_path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the CA certificate {}: {e}",
            cert_path.display()
        )
    })?;
    trust_domain_of(&pem)
        .ok_or_else(|| anyhow::anyhow!("the CA in {} does not record a trust domain (it was not made by `custodian admin pki init`)", dir.display()))
}

fn trust_domain_of(ca_pem: &str) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::URI(uri) => uri
                    .strip_prefix("spiffe://")
                    .filter(|td| !td.is_empty() && !td.contains('/'))
                    .map(str::to_owned),
                _ => None,
            })
        });
    from_san.or_else(|| {
        cert.subject().iter_common_name().find_map(|cn| {
            cn.as_str()
                .ok()?
                .strip_prefix("Custodian CA (")?
                .strip_suffix(')')
                .map(str::to_owned)
        })
    })
}

/// Issues a certificate for `identity` signed by the CA in `dir`, valid for `days` from now
/// (negative: already expired, for tests), with extra DNS names / IPs for servers. Writes
/// `OUT.pem` and `OUT.key`. Refuses, writing nothing, an identity outside the CA's trust domain.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    hosts: &[String],
    days: i64,
    out: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca_domain = trust_domain(dir)?;
    let wanted = match identity {
        Identity::Gateway { trust_domain } | Identity::Runner { trust_domain, .. } => trust_domain,
    };
    anyhow::ensure!(
        *wanted == ca_domain,
        "{identity} is in trust domain `{wanted}`, but the CA in {} is for `{ca_domain}`; issue it with --trust-domain {ca_domain} (or use a CA of `{wanted}`)",
        dir.display()
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(trust_domain: &str) -> Identity {
        Identity::Runner {
            trust_domain: trust_domain.to_owned(),
            tenant: "acme".to_owned(),
            name: "r1".to_owned(),
        }
    }

    #[test]
    fn issue_refuses_another_trust_domain_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "prod.example").unwrap();
        assert_eq!(trust_domain(dir.path()).unwrap(), "prod.example");
        let out = dir.path().join("r1");
        let refused = issue(dir.path(), &runner("custodian.local"), &[], 1, &out).unwrap_err();
        assert!(refused.to_string().contains("prod.example"), "{refused}");
        assert!(!out.with_extension("pem").exists() && !out.with_extension("key").exists());
        let (cert, key) = issue(dir.path(), &runner("prod.example"), &[], 1, &out).unwrap();
        assert!(cert.exists() && key.exists());
    }

    #[test]
    fn a_ca_without_the_san_is_read_from_its_common_name() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Custodian CA (legacy.example)");
        params.distinguished_name = name;
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = ca_paths(dir.path());
        std::fs::write(cert_path, cert.pem()).unwrap();
        std::fs::write(key_path, key.serialize_pem()).unwrap();
        assert_eq!(trust_domain(dir.path()).unwrap(), "legacy.example");
        let out = dir.path().join("gw");
        let gateway = Identity::Gateway {
            trust_domain: "custodian.local".to_owned(),
        };
        assert!(issue(dir.path(), &gateway, &[], 1, &out).is_err());
        assert!(!out.with_extension("pem").exists());
    }
}
