//! `file` credentials: a TLS client certificate or key, a kubeconfig, a cloud service-account
//! JSON, an SSH key; any file a tool reads from a path.
//!
//! Guarantees:
//! - The stored value is the file's exact content (binary allowed, at most
//!   [`crate::secrets::MAX_VALUE_LEN`] bytes), sealed like every secret.
//! - A run receives the file read-only, mode 0400, owned by the run's user, at
//!   `/run/credentials/<filename>` in its private in-memory root, and the variable holds that path
//!   (the runner places it: see `custodian-runner`'s `sandbox::files`). The file is gone when the
//!   run ends; nothing is written to the runner's disk.
//! - Its content is redacted from output under the variable's name: the whole file, each line, and
//!   the pieces a command prints alone ([`custodian_redact::file_fragments`]: key material inside
//!   JSON or YAML, base64 that decodes to a key, a binary file's base64 as PEM or `base64` wraps it).
//! - Settings are checked here and again on the runner: a variable of `A-Z 0-9 _` that is not one
//!   the run needs for itself, a file name without `/` that does not start with `.`.

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::{CredentialError, ForRun, Kind};
use custodian_protocol::{CREDENTIALS_DIR, SecretFile, check_filename, check_variable};

/// Settings of a `file` credential; both default from the credential's name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The variable that holds the file's path (default: the credential's name).
    variable: Option<String>,
    /// The file's name in the run's credential directory (default: the credential's name in
    /// lowercase).
    filename: Option<String>,
}

impl Settings {
    fn parse(settings: &Value) -> Result<Settings, String> {
        if settings.is_null() {
            return Ok(Settings::default());
        }
        serde_json::from_value(settings.clone()).map_err(|e| {
            format!(
                "{e}; expected {{\"variable\": \"KUBECONFIG\", \"filename\": \"kubeconfig\"}} (both optional)"
            )
        })
    }

    fn variable(&self, name: &str) -> String {
        self.variable.clone().unwrap_or_else(|| name.to_owned())
    }

    fn filename(&self, name: &str) -> String {
        self.filename
            .clone()
            .unwrap_or_else(|| name.to_ascii_lowercase())
    }
}

pub fn validate(settings: &Value) -> Result<(), String> {
    let settings = Settings::parse(settings)?;
    if let Some(variable) = &settings.variable {
        check_variable(variable)?;
    }
    if let Some(filename) = &settings.filename {
        check_filename(filename)?;
    }
    Ok(())
}

/// Any content is a file (binary included); its length is checked by the secret store.
pub fn check_value(_settings: &Value, _value: &[u8]) -> Result<(), String> {
    Ok(())
}

pub fn usage(name: &str, settings: &Value) -> (Vec<String>, String) {
    let settings = Settings::parse(settings).unwrap_or_default();
    let variable = settings.variable(name);
    let filename = settings.filename(name);
    let how = format!(
        "a read-only file (mode 0400) at ${variable} ({CREDENTIALS_DIR}/{filename} in an isolated run), \
         e.g. `--cert \"${variable}\"` or `KUBECONFIG=\"${variable}\"`; it exists only while the run \
         does, and its content is redacted from output"
    );
    (vec![variable], how)
}

pub fn for_run(
    name: &str,
    settings: &Value,
    value: &[u8],
    run: &mut ForRun,
) -> Result<(), CredentialError> {
    let issue = |reason: String| CredentialError::Issue {
        kind: Kind::File,
        name: name.to_owned(),
        reason,
    };
    let settings = Settings::parse(settings).map_err(issue)?;
    let file = SecretFile {
        variable: settings.variable(name),
        filename: settings.filename(name),
        content: base64::engine::general_purpose::STANDARD.encode(value),
    };
    file.check().map_err(issue)?;
    if run.files.iter().any(|f| f.filename == file.filename) {
        return Err(issue(format!(
            "another file credential of this environment is also named `{}`",
            file.filename
        )));
    }
    if run.files.iter().any(|f| f.variable == file.variable)
        || run.env.iter().any(|e| e.name == file.variable)
    {
        return Err(issue(format!(
            "the variable `{}` is also another credential's",
            file.variable
        )));
    }
    run.redact(&file.variable, value);
    for piece in custodian_redact::file_fragments(value) {
        run.redact(&file.variable, &piece);
    }
    run.files.push(file);
    Ok(())
}
