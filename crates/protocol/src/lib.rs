//! Wire types between the Custodian gateway and its runners, and the naming of their mTLS
//! identities. Serde types only: nothing here needs a server.

use std::fmt;

/// The mTLS identity of a party, carried as a URI SAN in its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// `spiffe://<trust-domain>/gateway`
    Gateway { trust_domain: String },
    /// `spiffe://<trust-domain>/tenant/<tenant>/runner/<name>`
    Runner {
        trust_domain: String,
        tenant: String,
        name: String,
    },
}

/// A URI that is not a Custodian identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidIdentity(pub String);

impl fmt::Display for InvalidIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not spiffe://<trust-domain>/gateway or spiffe://<trust-domain>/tenant/<t>/runner/<name>",
            self.0
        )
    }
}

impl std::error::Error for InvalidIdentity {}

fn is_segment(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl Identity {
    /// Parses a URI SAN.
    pub fn parse(uri: &str) -> Result<Self, InvalidIdentity> {
        let invalid = || InvalidIdentity(uri.chars().take(200).collect());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "gateway"] if is_segment(td) => Ok(Identity::Gateway {
                trust_domain: (*td).to_owned(),
            }),
            [td, "tenant", tenant, "runner", name]
                if is_segment(td) && is_segment(tenant) && is_segment(name) =>
            {
                Ok(Identity::Runner {
                    trust_domain: (*td).to_owned(),
                    tenant: (*tenant).to_owned(),
                    name: (*name).to_owned(),
                })
            }
            _ => Err(invalid()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Gateway { trust_domain } => write!(f, "spiffe://{trust_domain}/gateway"),
            Identity::Runner {
                trust_domain,
                tenant,
                name,
            } => write!(f, "spiffe://{trust_domain}/tenant/{tenant}/runner/{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip() {
        for uri in [
            "spiffe://custodian.local/gateway",
            "spiffe://custodian.local/tenant/acme/runner/pool-a-0",
        ] {
            let id = Identity::parse(uri).expect("valid identity");
            assert_eq!(id.to_string(), uri);
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for uri in [
            "https://custodian.local/gateway",
            "spiffe://custodian.local/gateway/extra",
            "spiffe://custodian.local/tenant/acme/runner",
            "spiffe://custodian.local/tenant/ACME/runner/a",
            "spiffe:///gateway",
            "spiffe://td/tenant/../runner/a",
        ] {
            assert!(Identity::parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn credential_file_names_and_variables() {
        for good in ["tls.crt", "kubeconfig", "sa-key_1.json", "id_ed25519"] {
            assert_eq!(check_filename(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(check_filename(bad).is_err(), "{bad}");
        }
        for good in ["KUBECONFIG", "TLS_CERT", "_X1"] {
            assert_eq!(check_variable(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1X",
            "lower",
            "A-B",
            "PATH",
            "LD_PRELOAD",
            "HTTPS_PROXY",
        ] {
            assert!(check_variable(bad).is_err(), "{bad}");
        }
    }
}

/// Path of the runner's exec endpoint.
pub const EXEC_PATH: &str = "/v1/exec";
/// Path of the runner's cancel endpoint (body: [`CancelRequest`]).
pub const CANCEL_PATH: &str = "/v1/cancel";

/// One command to run with secrets, sent by the gateway over mTLS.
///
/// `secrets` carries values: receivers move each into zeroizing memory at once and never log,
/// echo or store this type (its `Debug` prints names only).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct ExecRequest {
    /// Names this exec in both parties' logs and in the audit log; [`CancelRequest`] refers to it.
    pub exec_id: String,
    /// For logs and traces on the runner.
    pub grant_id: String,
    pub tenant: String,
    /// The program and its arguments (`["/bin/sh", "-c", cmd]` for shell commands).
    pub argv: Vec<String>,
    /// Written to the child's stdin, then closed.
    pub stdin: Option<String>,
    pub timeout_ms: u64,
    /// Output kept per stream, after redaction.
    pub max_output_bytes: usize,
    pub secrets: Vec<SecretEnv>,
    /// W3C trace context of the gateway's span.
    pub traceparent: Option<String>,
    /// Where the run may connect (default: nowhere). Injected credentials travel inside these
    /// rules and never enter the run.
    #[serde(default)]
    pub egress: Vec<EgressRule>,
    /// Credential files, written into the run's private tmpfs (mode 0400) with their path in a
    /// variable; gone when the run ends.
    #[serde(default)]
    pub files: Vec<SecretFile>,
    /// Variables that are not secret (e.g. `PGHOST` of a database credential): set in the run
    /// before `secrets` (which win on a clash) and never redacted.
    #[serde(default)]
    pub env: Vec<PlainEnv>,
}

/// One destination a run may reach through the runner.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EgressRule {
    /// `https`, `http` (through the proxy) or `tcp` (a forward on 127.0.0.1:`port` in the run).
    pub scheme: String,
    /// A DNS name or an IP literal, lowercase.
    pub host: String,
    pub port: u16,
    /// Private, loopback, link-local and metadata addresses are refused unless this is set.
    #[serde(default)]
    pub allow_private: bool,
    /// A header the proxy adds to every request to this destination (HTTP(S) only).
    #[serde(default)]
    pub inject: Option<InjectHeader>,
}

impl EgressRule {
    /// `https://host:port`, `http://host:port` or `tcp:host:port`.
    pub fn destination(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.scheme.as_str() {
            "tcp" => format!("tcp:{host}:{}", self.port),
            scheme => format!("{scheme}://{host}:{}", self.port),
        }
    }
}

impl fmt::Debug for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressRule")
            .field("destination", &self.destination())
            .field("allow_private", &self.allow_private)
            .field("inject", &self.inject)
            .finish()
    }
}

/// A credential the runner's proxy adds as a header; `value` is secret material (its `Debug`
/// prints the secret's name only).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InjectHeader {
    /// The secret's name (for logs and redaction markers).
    pub secret: String,
    /// The secret's value.
    pub value: String,
    /// The header's name, e.g. `Authorization`.
    pub header: String,
    /// The header's value with `{value}` where the secret goes, e.g. `Bearer {value}`; ignored
    /// when `basic_user` is set.
    pub template: String,
    /// Basic auth: `Basic base64(user:value)`.
    #[serde(default)]
    pub basic_user: Option<String>,
}

impl fmt::Debug for InjectHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InjectHeader")
            .field("secret", &self.secret)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Egress of one run towards one destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EgressCount {
    pub allowed: u64,
    pub refused: u64,
}

impl fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecRequest")
            .field("exec_id", &self.exec_id)
            .field("grant_id", &self.grant_id)
            .field("tenant", &self.tenant)
            .field("argv0", &self.argv.first())
            .field(
                "secrets",
                &self.secrets.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A credential file of one run. Its `Debug` prints the variable and file name only.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SecretFile {
    /// The environment variable that holds the file's path.
    pub variable: String,
    /// The file's name inside the run's credential directory (no `/`).
    pub filename: String,
    /// The content, base64 (standard alphabet, padded): files may be binary.
    pub content: String,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("variable", &self.variable)
            .field("filename", &self.filename)
            .finish_non_exhaustive()
    }
}

/// Where credential files appear inside an isolated run.
pub const CREDENTIALS_DIR: &str = "/run/credentials";

/// Variables a credential cannot take: the run's own (`PATH`, `HOME`, ...), the loader's and
/// the egress proxy's.
const RESERVED_VARIABLES: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// Whether `name` has the shape of a credential's name or variable: `[A-Z_][A-Z0-9_]*`, at most
/// 128 bytes.
pub fn is_variable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.as_bytes()[0].is_ascii_digit()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Whether `name` can be the variable of a credential: `[A-Z_][A-Z0-9_]*`, at most 128 bytes, not
/// one the run needs for itself ([`RESERVED_VARIABLES`]).
pub fn check_variable(name: &str) -> Result<(), String> {
    if !is_variable_name(name) {
        return Err(format!(
            "variable `{}` must be 1 to 128 of A-Z, 0-9 and _, not starting with a digit",
            name.chars().take(130).collect::<String>()
        ));
    }
    if RESERVED_VARIABLES.contains(&name) {
        return Err(format!(
            "variable `{name}` is the run's own and cannot be set"
        ));
    }
    Ok(())
}

/// Whether `name` can name a credential file: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with
/// `.` (so neither `.` nor `..`, nor a hidden file), no `/`.
pub fn check_filename(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "file name `{}` must be 1 to 64 of A-Z, a-z, 0-9, `.`, `_`, `-`, not starting with `.`",
            name.chars().take(66).collect::<String>()
        ))
    }
}

impl SecretFile {
    /// Checks the variable and the file name (never the content).
    pub fn check(&self) -> Result<(), String> {
        check_variable(&self.variable)?;
        check_filename(&self.filename)
    }
}

/// An environment variable of the child that is not secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlainEnv {
    pub name: String,
    pub value: String,
}

/// A secret as an environment variable of the child.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SecretEnv {
    pub name: String,
    pub value: String,
}

/// What came of an [`ExecRequest`]; output is already redacted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecResponse {
    /// The exit code, or `None` when the child was killed by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Replacements per secret name.
    pub redactions: std::collections::BTreeMap<String, u64>,
    /// Whether output beyond `max_output_bytes` was dropped.
    pub truncated: bool,
    pub timed_out: bool,
    /// Whether the run was stopped by a [`CancelRequest`] (its grant ended) or a runner shutdown.
    #[serde(default)]
    pub cancelled: bool,
    pub duration_ms: u64,
    /// Egress requests and connections per destination host (`host:port`), allowed and refused.
    #[serde(default)]
    pub egress: std::collections::BTreeMap<String, EgressCount>,
}

/// The body of a `200` answer to an exec: the runner streams whitespace while the command runs (so
/// that it notices at once when the gateway is gone, and kills the run), then one of these.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecReply {
    /// The command ran (whatever its exit status).
    Finished(ExecResponse),
    /// The sandbox could not start the command: nothing ran.
    NotStarted(ExecError),
}

/// Asks the runner to stop the exec `exec_id` (its grant was revoked or expired).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CancelRequest {
    pub exec_id: String,
    pub tenant: String,
}

/// A refusal by the runner (wrong request, sandbox failure); never contains secret material.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecError {
    pub error: String,
}
