//! Runner configuration (TOML), validated at start-up; every problem reported at once.
//! `config/runner.toml` in the repository is a complete, commented example.

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
    /// Largest accepted request body.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How each run is isolated.
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

/// The `[sandbox]` table: limits and what a run may see of the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The bubblewrap binary (`bwrap`), looked up on PATH unless a path is given.
    pub bwrap: PathBuf,
    /// Extra host paths mounted read-only at the same place in every run (e.g. a toolchain under
    /// `/opt`). Never list the runner's own config, key or certificate directories.
    pub read_only_paths: Vec<PathBuf>,
    /// Size of each run's private work directory and of its `/tmp` (tmpfs, in memory).
    pub tmpfs_bytes: u64,
    /// Processes (and threads) one run may have at once.
    pub processes: u64,
    /// Address space of each process of a run.
    pub memory_bytes: u64,
    /// When the runner is root, each run gets its own unprivileged host uid (and gid) counted from
    /// here, so that concurrent runs never share a uid; ignored when the runner is not root.
    pub uid_base: u32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            bwrap: PathBuf::from("bwrap"),
            read_only_paths: Vec::new(),
            tmpfs_bytes: 256 << 20,
            processes: 256,
            memory_bytes: 2 << 30,
            uid_base: 200_000,
        }
    }
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
        let sandbox = &config.sandbox;
        for path in &sandbox.read_only_paths {
            if !path.is_absolute() {
                problems.push(format!(
                    "sandbox.read_only_paths: {} is not an absolute path",
                    path.display()
                ));
            }
        }
        if sandbox.tmpfs_bytes < 1 << 20 {
            problems.push("sandbox.tmpfs_bytes: must be at least 1048576 (1 MiB)".to_owned());
        }
        if sandbox.processes < 8 {
            problems.push("sandbox.processes: must be at least 8".to_owned());
        }
        if sandbox.memory_bytes < 64 << 20 {
            problems.push("sandbox.memory_bytes: must be at least 67108864 (64 MiB)".to_owned());
        }
        if sandbox.uid_base < 1000 || sandbox.uid_base > u32::MAX - 70_000 {
            problems.push("sandbox.uid_base: must be between 1000 and 4294897295".to_owned());
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
