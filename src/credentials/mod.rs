//! Credential kinds: what a run receives for each credential of its environment, and when it dies.
//!
//! | kind       | stored (sealed)                         | the run sees                                | dies            |
//! |------------|-----------------------------------------|---------------------------------------------|-----------------|
//! | `env`      | the value                               | an environment variable named after it      | never (static)  |
//! | `file`     | the file's content                      | a 0400 file on the run's tmpfs, its path in a variable | with the run |
//! | `postgres` | an admin connection URL                 | `PG*` variables and `DATABASE_URL` of a role made for the grant | with the grant |
//! | `oauth`    | a client secret or a refresh token      | a short-lived access token                   | at its expiry   |
//!
//! The kind and its settings are not secret: they are stored on the environment
//! ([`crate::environments::Environment::credentials`]) in the same transaction as the value, and
//! `list_environments` shows agents how to use each credential ([`Usage`]), never a value.

pub mod file;
pub mod lease;
pub mod oauth;
pub mod postgres;

use std::collections::{BTreeMap, BTreeSet};

use custodian_protocol::{PlainEnv, SecretEnv, SecretFile};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::app::App;
use crate::grants::Grant;
use crate::secrets::OpenedSecret;

/// How a credential is handed to runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An environment variable holding the value.
    #[default]
    Env,
    /// A file written into the run's private tmpfs (mode 0400); a variable holds its path.
    File,
    /// A PostgreSQL login role created for the grant and dropped when the grant ends.
    Postgres,
    /// A short-lived OAuth access token minted from a client the gateway holds.
    Oauth,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Env, Kind::File, Kind::Postgres, Kind::Oauth];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Env => "env",
            Kind::File => "file",
            Kind::Postgres => "postgres",
            Kind::Oauth => "oauth",
        }
    }

    pub fn parse(text: &str) -> Result<Kind, CredentialError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| CredentialError::UnknownKind(text.chars().take(64).collect()))
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A credential's kind and its settings (never secret; validated when set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub settings: serde_json::Value,
}

impl Spec {
    /// Validates `settings` (a JSON object, or nothing for the kind's defaults) for `kind`.
    pub fn new(kind: Kind, settings: Option<&str>) -> Result<Spec, CredentialError> {
        let settings = match settings {
            None => serde_json::Value::Null,
            Some(text) => serde_json::from_str(text)
                .map_err(|e| CredentialError::Settings(kind, format!("not JSON: {e}")))?,
        };
        let spec = Spec { kind, settings };
        let checked = match kind {
            Kind::Env if spec.settings.is_null() => Ok(()),
            Kind::Env => Err("environment variables take no settings".to_owned()),
            Kind::File => file::validate(&spec.settings),
            Kind::Postgres => postgres::validate(&spec.settings),
            Kind::Oauth => oauth::validate(&spec.settings),
        };
        checked.map_err(|e| CredentialError::Settings(kind, e))?;
        Ok(spec)
    }

    /// Whether `value` can be stored for this kind (lengths are checked by the secret store).
    pub fn check_value(&self, value: &[u8]) -> Result<(), CredentialError> {
        let checked = match self.kind {
            Kind::Env => text_without_nul(value),
            Kind::File => file::check_value(&self.settings, value),
            Kind::Postgres => postgres::check_value(&self.settings, value),
            Kind::Oauth => oauth::check_value(&self.settings, value),
        };
        checked.map_err(|e| CredentialError::Value(self.kind, e))
    }

    /// How an agent uses the credential called `name` (never its value).
    pub fn usage(&self, name: &str) -> Usage {
        let (variables, how) = match self.kind {
            Kind::Env => (
                vec![name.to_owned()],
                format!("the value is in the environment variable {name}"),
            ),
            Kind::File => file::usage(name, &self.settings),
            Kind::Postgres => postgres::usage(name, &self.settings),
            Kind::Oauth => oauth::usage(name, &self.settings),
        };
        Usage {
            name: name.to_owned(),
            kind: self.kind,
            variables,
            how,
        }
    }
}

/// The value of an `env` credential becomes an environment variable: UTF-8 without NUL.
pub fn text_without_nul(value: &[u8]) -> Result<(), String> {
    if std::str::from_utf8(value).is_err() || value.contains(&0) {
        Err(
            "the value must be UTF-8 text without NUL bytes (it becomes an environment variable)"
                .to_owned(),
        )
    } else {
        Ok(())
    }
}

/// What `list_environments` says about one credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    /// The credential's name.
    pub name: String,
    pub kind: Kind,
    /// Environment variables a run receives for it.
    pub variables: Vec<String>,
    /// How a command uses it, and when it stops working.
    pub how: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("unknown credential kind `{0}`; use one of env, file, postgres, oauth")]
    UnknownKind(String),
    #[error("settings of a {0} credential: {1}")]
    Settings(Kind, String),
    #[error("value of a {0} credential: {1}")]
    Value(Kind, String),
    /// A credential could not be issued for a run; the message names no secret.
    #[error("the {kind} credential `{name}` could not be issued: {reason}")]
    Issue {
        kind: Kind,
        name: String,
        reason: String,
    },
}

/// What one run receives: variables, files, and every value the redactors must replace.
#[derive(Default)]
pub struct ForRun {
    pub env: Vec<SecretEnv>,
    pub files: Vec<SecretFile>,
    /// Variables that are not secret (never redacted), e.g. `PGHOST`.
    pub plain: Vec<PlainEnv>,
    /// (name shown in `[REDACTED:name]`, value): everything above plus what never reaches the
    /// run but must never come back either (admin URLs, client secrets, refresh tokens).
    pub redact: Vec<(String, Zeroizing<Vec<u8>>)>,
}

impl ForRun {
    /// Adds an environment variable with a secret value (also redacted).
    pub fn variable(&mut self, name: &str, value: &str) {
        self.env.push(SecretEnv {
            name: name.to_owned(),
            value: value.to_owned(),
        });
        self.redact(name, value.as_bytes());
    }

    /// Adds an environment variable that is not secret.
    pub fn plain(&mut self, name: &str, value: &str) {
        self.plain.push(PlainEnv {
            name: name.to_owned(),
            value: value.to_owned(),
        });
    }

    /// Adds a value the redactors replace by `[REDACTED:name]`.
    pub fn redact(&mut self, name: &str, value: &[u8]) {
        self.redact
            .push((name.to_owned(), Zeroizing::new(value.to_vec())));
    }
}

impl Drop for ForRun {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for secret in &mut self.env {
            secret.value.zeroize();
        }
        for file in &mut self.files {
            file.content.zeroize();
        }
    }
}

/// Turns the opened credentials of `grant`'s environment into what its run receives. Credentials
/// in `injected` go to the runner's egress proxy instead (see `crate::egress`) and are only
/// redacted here.
pub async fn for_run(
    app: &App,
    grant: &Grant,
    specs: &BTreeMap<String, Spec>,
    opened: &[OpenedSecret],
    injected: &BTreeSet<&str>,
) -> Result<ForRun, CredentialError> {
    let mut run = ForRun::default();
    for secret in opened {
        let spec = specs.get(&secret.name);
        let kind = spec.map_or(Kind::Env, |s| s.kind);
        if injected.contains(secret.name.as_str()) {
            run.redact(&secret.name, &secret.value);
            continue;
        }
        let settings = spec.map_or(&serde_json::Value::Null, |s| &s.settings);
        match kind {
            Kind::Env => run.variable(&secret.name, &String::from_utf8_lossy(&secret.value)),
            Kind::File => file::for_run(&secret.name, settings, &secret.value, &mut run)?,
            Kind::Postgres => {
                postgres::for_run(app, grant, &secret.name, settings, &secret.value, &mut run)
                    .await?;
            }
            Kind::Oauth => {
                oauth::for_run(app, grant, secret, settings, &mut run).await?;
            }
        }
    }
    Ok(run)
}
