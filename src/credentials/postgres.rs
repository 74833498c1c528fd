//! `postgres` credentials. SKELETON: to be implemented (issue #12); every entry point refuses.

use serde_json::Value;

use super::{CredentialError, ForRun, Kind};

fn unsupported() -> String {
    "this credential kind is not implemented yet".to_owned()
}

pub fn validate(_settings: &Value) -> Result<(), String> {
    Err(unsupported())
}

pub fn check_value(_settings: &Value, _value: &[u8]) -> Result<(), String> {
    Err(unsupported())
}

pub fn usage(name: &str, _settings: &Value) -> (Vec<String>, String) {
    (Vec::new(), format!("{name}: {}", unsupported()))
}

pub async fn for_run(
    _app: &crate::app::App,
    _grant: &crate::grants::Grant,
    name: &str,
    _settings: &Value,
    _value: &[u8],
    _run: &mut ForRun,
) -> Result<(), CredentialError> {
    Err(CredentialError::Issue {
        kind: Kind::Postgres,
        name: name.to_owned(),
        reason: unsupported(),
    })
}
