//! The checks `custodian admin tenant set-idp` runs before storing anything: the provider is
//! reachable, names exactly the configured issuer, offers the device flow, and accepts the client.

use serde_json::Value;

use super::{Fault, Oidc, is_acceptable_endpoint, printable, read_capped, without_url};
use crate::tenants::IdpSettings;

/// What was learned about a provider that passed every check: remarks worth showing the admin.
#[derive(Debug, Default)]
pub struct IdpCheck {
    pub notes: Vec<String>,
}

/// Why a provider cannot be used; every problem found, each a sentence about the provider.
#[derive(Debug, thiserror::Error)]
#[error("the identity provider at {issuer} cannot be used, nothing was stored:\n  - {}", problems.join("\n  - "))]
pub struct IdpCheckFailed {
    pub issuer: String,
    pub problems: Vec<String>,
}

/// The discovery URL of an issuer (OpenID Connect Discovery §4: without a trailing `/`).
fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

impl Oidc {
    /// Checks `idp` against its provider, as the gateway will use it. Makes one device
    /// authorization request with the client (it expires unused at the provider).
    pub async fn check(&self, idp: &IdpSettings) -> Result<IdpCheck, IdpCheckFailed> {
        let failed = |problems: Vec<String>| IdpCheckFailed {
            issuer: idp.issuer.clone(),
            problems,
        };
        let document = self
            .discovery_document(&idp.issuer)
            .await
            .map_err(|p| failed(vec![p]))?;
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        let text = |key: &str| document.get(key).and_then(Value::as_str);
        match text("issuer") {
            None => problems.push("its discovery document names no issuer".to_owned()),
            Some(theirs) if theirs == idp.issuer => {}
            Some(theirs) if theirs.trim_end_matches('/') == idp.issuer.trim_end_matches('/') => {
                problems.push(format!(
                    "its issuer is `{}`, which differs from the configured `{}` by a trailing slash; ID tokens carry the issuer exactly, so configure `--issuer {}`",
                    printable(theirs, 300),
                    idp.issuer,
                    printable(theirs, 300)
                ));
            }
            Some(theirs) => problems.push(format!(
                "its discovery document names issuer `{}`, not `{}`; configure the provider's exact issuer",
                printable(theirs, 300),
                idp.issuer
            )),
        }
        match text("device_authorization_endpoint") {
            None => problems.push(
                "it announces no device_authorization_endpoint: enable the OAuth device authorization grant (RFC 8628) at the provider"
                    .to_owned(),
            ),
            Some(url) if !is_acceptable_endpoint(url) => problems.push(format!(
                "its device_authorization_endpoint `{}` is not an https URL",
                printable(url, 300)
            )),
            Some(_) => {}
        }
        for key in ["token_endpoint", "jwks_uri"] {
            if text(key).is_none() {
                problems.push(format!("its discovery document has no {key}"));
            }
        }
        if text("userinfo_endpoint").is_none() {
            notes.push(
                "the provider announces no userinfo endpoint: email and groups must then be in its ID tokens"
                    .to_owned(),
            );
        }
        if !problems.is_empty() {
            return Err(failed(problems));
        }
        // The client, as the gateway will use it: the secret resolves, discovery and keys load
        // through the same code as at request time, and a device authorization is granted.
        self.authorize(idp, None, true)
            .await
            .map_err(|f| failed(vec![f.reason().to_owned()]))?;
        Ok(IdpCheck { notes })
    }

    /// The issuer's discovery document as JSON, or why it could not be had.
    async fn discovery_document(
        &self,
        issuer: &str,
    ) -> Result<serde_json::Map<String, Value>, String> {
        let url = discovery_url(issuer);
        let response = self.http.get(&url).send().await.map_err(|e| {
            format!(
                "its discovery document {url} cannot be fetched: {}",
                without_url(e)
            )
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("its discovery document {url} answered {status}"));
        }
        let body = read_capped(response).await.map_err(|f| match f {
            Fault::Transient(r) | Fault::Config(r) => format!("its discovery document {url}: {r}"),
        })?;
        match serde_json::from_slice(&body) {
            Ok(Value::Object(document)) => Ok(document),
            _ => Err(format!("its discovery document {url} is not a JSON object")),
        }
    }
}
