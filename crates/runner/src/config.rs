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
    /// How runs reach what their environment allows.
    #[serde(default)]
    pub egress: EgressConfig,
}

/// The `[egress] table`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// PEM CA certificates trusted for HTTPS upstreams in addition to the system roots.
    pub ca_file: Option<PathBuf>,
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
    /// Keep one sandbox set up ahead of the next run (its namespaces and mounts, no secret and no
    /// part of any request), so that a run starts in about a millisecond instead of waiting for
    /// bubblewrap. Costs one idle bubblewrap and helper process pair per runner.
    pub spare: bool,
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
            spare: true,
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
            for (key, file) in [
                ("key_file", &config.key_file),
                ("cert_file", &config.cert_file),
                ("ca_file", &config.ca_file),
            ] {
                if file.starts_with(path) {
                    problems.push(format!(
                        "sandbox.read_only_paths: {} would show the runner's {key} to every run",
                        path.display()
                    ));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's example parses and names every key with its default.
    #[test]
    fn the_example_configuration_is_valid_and_complete() {
        let text = include_str!("../../../config/runner.toml");
        let raw: toml::Value = toml::from_str(text).expect("TOML");
        let parsed: RunnerConfig = toml::from_str(text).expect("every key known");
        let defaults = SandboxConfig::default();
        assert_eq!(parsed.sandbox.tmpfs_bytes, defaults.tmpfs_bytes);
        assert_eq!(parsed.sandbox.processes, defaults.processes);
        assert_eq!(parsed.sandbox.memory_bytes, defaults.memory_bytes);
        assert_eq!(parsed.sandbox.uid_base, defaults.uid_base);
        assert_eq!(parsed.sandbox.bwrap, defaults.bwrap);
        assert_eq!(parsed.max_body_bytes, default_max_body());
        for key in [
            "listen",
            "trust_domain",
            "tenant",
            "name",
            "cert_file",
            "key_file",
            "ca_file",
            "max_body_bytes",
        ] {
            assert!(raw.get(key).is_some(), "{key} is documented");
        }
        for key in [
            "bwrap",
            "read_only_paths",
            "tmpfs_bytes",
            "processes",
            "memory_bytes",
            "uid_base",
        ] {
            assert!(
                raw["sandbox"].get(key).is_some(),
                "sandbox.{key} is documented"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "listen = \"127.0.0.1:1\"\ntrust_domain = \"td\"\ntenant = \"Bad Tenant\"\nname = \"r\"\n\
                    cert_file = \"/nonexistent/c\"\nkey_file = \"/nonexistent/k\"\nca_file = \"/nonexistent/ca\"\n\
                    [sandbox]\nread_only_paths = [\"relative\", \"/nonexistent\"]\ntmpfs_bytes = 1\nprocesses = 1\n";
        let error = RunnerConfig::from_toml(text).unwrap_err().to_string();
        for expected in [
            "trust_domain/tenant/name",
            "cert_file",
            "key_file",
            "ca_file",
            "sandbox.read_only_paths: relative is not an absolute path",
            "sandbox.read_only_paths: /nonexistent would show the runner's key_file",
            "sandbox.tmpfs_bytes",
            "sandbox.processes",
        ] {
            assert!(error.contains(expected), "{expected} missing from: {error}");
        }
        assert!(
            RunnerConfig::from_toml("listen = \"127.0.0.1:1\"\nwork_root = \"/tmp\"").is_err(),
            "unknown keys are refused"
        );
    }
}
