//! Starting a device authorization (RFC 8628 §3.1–3.2) and vetting what the provider answers.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{
    DeviceAuthorization, ErrorBody, Fault, Oidc, OidcError, client_secret, is_acceptable_endpoint,
    is_loopback, printable, read_capped, without_url,
};
use crate::tenants::IdpSettings;

/// Longest verification link accepted (it is stored and shown).
const MAX_LINK_CHARS: usize = 2048;
/// Longest user code accepted (people type it).
const MAX_USER_CODE_CHARS: usize = 64;
/// RFC 8628 §3.2: the interval when the provider names none.
const DEFAULT_INTERVAL_SECONDS: u64 = 5;

/// The provider's answer as sent; the device code moves straight into a secret.
#[derive(Deserialize)]
struct Answer {
    device_code: String,
    user_code: String,
    verification_uri: Option<String>,
    /// Google's name for `verification_uri`.
    verification_url: Option<String>,
    verification_uri_complete: Option<String>,
    expires_in: u64,
    interval: Option<u64>,
}

/// Whether a verification link may be shown to a person and linked from the approval page: an
/// https URL, or plain http to a loopback host (development and tests). Never `javascript:`,
/// `data:` or any other scheme.
pub fn link_is_safe(link: &str) -> bool {
    link.chars().count() <= MAX_LINK_CHARS && is_acceptable_endpoint(link)
}

/// [`link_is_safe`], and plain http only when the issuer itself is plain http on loopback.
fn check_link(issuer: &str, field: &str, link: &str) -> Result<(), Fault> {
    let issuer_is_loopback_http =
        url::Url::parse(issuer).is_ok_and(|url| url.scheme() == "http" && is_loopback(&url));
    let scheme_ok =
        url::Url::parse(link).is_ok_and(|url| url.scheme() == "https" || issuer_is_loopback_http);
    if link_is_safe(link) && scheme_ok {
        return Ok(());
    }
    // The link itself is not repeated: it is the provider's text, possibly hostile.
    Err(Fault::Config(format!(
        "its {field} is not an https link; Custodian shows approvers only https links (plain http only for a loopback issuer)"
    )))
}

impl Oidc {
    /// Starts a device authorization at the tenant's IdP. With `max_age` (seconds), the provider is
    /// asked to re-authenticate an approver whose sign-in is older, and to state `auth_time`.
    pub async fn start(
        &self,
        idp: &IdpSettings,
        max_age: Option<i64>,
    ) -> Result<DeviceAuthorization, OidcError> {
        self.authorize(idp, max_age, false)
            .await
            .map_err(|f| f.into_error(&idp.issuer))
    }

    /// Discovery (fresh when `refresh`), the client secret, then the device authorization.
    pub(super) async fn authorize(
        &self,
        idp: &IdpSettings,
        max_age: Option<i64>,
        refresh: bool,
    ) -> Result<DeviceAuthorization, Fault> {
        let discovered = self.metadata(&idp.issuer, refresh).await?;
        let secret = client_secret(idp).map_err(|e| Fault::Config(e.to_string()))?;
        let endpoint = discovered
            .metadata
            .additional_metadata()
            .device_authorization_endpoint
            .url()
            .clone();
        self.device_authorization(idp, endpoint.as_str(), secret.as_ref(), max_age)
            .await
    }

    async fn device_authorization(
        &self,
        idp: &IdpSettings,
        endpoint: &str,
        secret: Option<&SecretString>,
        max_age: Option<i64>,
    ) -> Result<DeviceAuthorization, Fault> {
        let max_age = max_age.map(|seconds| seconds.max(0).to_string());
        let mut form = vec![
            ("client_id", idp.client_id.as_str()),
            ("scope", idp.scopes.as_str()),
        ];
        if let Some(max_age) = &max_age {
            form.push(("max_age", max_age));
        }
        if let Some(secret) = secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let response = self
            .http
            .post(endpoint)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                Fault::Transient(format!(
                    "its device authorization endpoint is unreachable: {}",
                    without_url(e)
                ))
            })?;
        let status = response.status();
        let body = read_capped(response).await?;
        if !status.is_success() {
            let what = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(error)
                    if matches!(
                        error.error.as_str(),
                        "invalid_client" | "unauthorized_client"
                    ) =>
                {
                    format!(
                        "it does not accept client id `{}` for the device flow: {}",
                        printable(&idp.client_id, 128),
                        error.describe()
                    )
                }
                Ok(error) if error.error == "invalid_scope" => format!(
                    "it refuses the scopes `{}`: {}",
                    printable(&idp.scopes, 200),
                    error.describe()
                ),
                Ok(error) => format!("it refused the device authorization: {}", error.describe()),
                Err(_) => format!("its device authorization endpoint answered {status}"),
            };
            return Err(Fault::of_status(status, what));
        }
        // The body holds the device code: parsed, then dropped, never logged.
        let answer: Answer = serde_json::from_slice(&body).map_err(|_| {
            Fault::Config(
                "its device authorization endpoint answered 200 with something that is not a device authorization".to_owned(),
            )
        })?;
        drop(body);
        let device_code = SecretString::from(answer.device_code);
        let Some(verification_uri) = answer.verification_uri.or(answer.verification_url) else {
            return Err(Fault::Config(
                "its device authorization has no verification_uri".to_owned(),
            ));
        };
        check_link(&idp.issuer, "verification_uri", &verification_uri)?;
        if let Some(complete) = &answer.verification_uri_complete {
            check_link(&idp.issuer, "verification_uri_complete", complete)?;
        }
        let user_code = answer.user_code;
        if user_code.trim().is_empty()
            || user_code.chars().count() > MAX_USER_CODE_CHARS
            || user_code.chars().any(char::is_control)
        {
            return Err(Fault::Config(
                "its device authorization has an empty or unusable user_code".to_owned(),
            ));
        }
        if answer.expires_in == 0 {
            return Err(Fault::Config(
                "its device authorization expires at once (expires_in 0)".to_owned(),
            ));
        }
        Ok(DeviceAuthorization {
            device_code,
            user_code,
            verification_uri,
            verification_uri_complete: answer.verification_uri_complete,
            expires_in: Duration::from_secs(answer.expires_in),
            interval: Duration::from_secs(answer.interval.unwrap_or(DEFAULT_INTERVAL_SECONDS)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_links_or_loopback_http_for_loopback_issuers() {
        let prod = "https://login.example.com";
        let dev = "http://127.0.0.1:8081";
        assert!(check_link(prod, "v", "https://login.example.com/device").is_ok());
        assert!(check_link(dev, "v", "http://127.0.0.1:8081/device?user_code=AB").is_ok());
        assert!(check_link(dev, "v", "http://[::1]:8081/device").is_ok());
        for (issuer, link) in [
            (prod, "http://login.example.com/device"),
            (prod, "http://127.0.0.1/device"),
            (dev, "http://idp.example.com/device"),
            (dev, "javascript:alert(1)"),
            (prod, "JavaScript:alert(1)"),
            (prod, "data:text/html,<script>alert(1)</script>"),
            (prod, "//login.example.com/device"),
            (prod, ""),
        ] {
            let refused = check_link(issuer, "verification_uri", link).unwrap_err();
            assert!(
                refused.reason().contains("not an https link"),
                "{link}: {refused:?}"
            );
            assert!(
                !refused.reason().contains("alert"),
                "the link is not echoed"
            );
        }
        assert!(!link_is_safe(&format!(
            "https://a.example/{}",
            "x".repeat(3000)
        )));
    }
}
