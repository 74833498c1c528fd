//! Runner configuration (TOML), validated at start-up; every problem reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;

use custodian_protocol::Identity;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    /// Address to listen on for the gateway's mTLS connections.
    pub listen: SocketAddr,
    /// SPIFFE trust domain shared with the gateway.
    pub trust_domain: String,
    /// The tenant this runner serves (part of its identity).
    pub tenant: String,
    /// This runner's name (part of its identity).
    pub name: String,
    /// PEM certificate chain whose leaf carries spiffe://<trust_domain>/tenant/<tenant>/runner/<name>.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM CA that issued the gateway's certificate.
    pub ca_file: PathBuf,
    /// Where per-exec work directories are created.
    #[serde(default = "default_work_root")]
    pub work_root: PathBuf,
    /// Largest accepted request body.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

fn default_work_root() -> PathBuf {
    std::env::temp_dir()
}

fn default_max_body() -> usize {
    1024 * 1024
}

impl RunnerConfig {
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        let mut problems = Vec::new();
        if let Err(e) = Identity::parse(&config.identity().to_string()) {
            problems.push(format!("trust_domain/tenant/name: {e}"));
        }
        for (key, path) in [
            ("cert_file", &config.cert_file),
            ("key_file", &config.key_file),
            ("ca_file", &config.ca_file),
        ] {
            if !path.exists() {
                problems.push(format!("{key}: {} does not exist", path.display()));
            }
        }
        if !config.work_root.is_dir() {
            problems.push(format!(
                "work_root: {} is not a directory",
                config.work_root.display()
            ));
        }
        anyhow::ensure!(
            problems.is_empty(),
            "invalid runner configuration:\n  - {}",
            problems.join("\n  - ")
        );
        Ok(config)
    }

    /// The identity this runner's certificate must carry.
    pub fn identity(&self) -> Identity {
        Identity::Runner {
            trust_domain: self.trust_domain.clone(),
            tenant: self.tenant.clone(),
            name: self.name.clone(),
        }
    }

    /// The only identity allowed to call this runner.
    pub fn gateway(&self) -> Identity {
        Identity::Gateway {
            trust_domain: self.trust_domain.clone(),
        }
    }
}
