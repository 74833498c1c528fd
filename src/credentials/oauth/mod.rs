//! `oauth` credentials: an OAuth client the gateway holds, from which each run receives only a
//! short-lived access token.
//!
//! Guarantees:
//! - The client secret and the refresh token never leave the gateway: they are sealed in the
//!   secret store, sent only to the configured token endpoint (HTTPS, or HTTP on loopback for
//!   development), and only redacted from runs. A run sees the access token, in one variable.
//! - Access tokens are cached per grant (tenant, grant, credential) in this replica's
//!   memory until `expires_in` minus a margin, and never past the grant's end; a second run of the
//!   grant reuses the token, a run of another grant gets its own.
//! - Refresh tokens that the IdP rotates are stored at once as the credential's next version (one
//!   transaction). Refreshes of one credential are serialized across replicas by a lease row
//!   (`credential_refresh_locks`): a rotated-away token is never used twice.
//! - Errors from the token endpoint are reported as the IdP's error code and description,
//!   shortened, never with a request or response body.
//!
//! The `oauth2` crate (already linked through `openidconnect`) builds the requests and parses the
//! answers; the HTTP client is the gateway's (no redirects, timeouts).

mod cache;
mod endpoint;
mod lease;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

use super::{CredentialError, ForRun, Kind, Spec};
use crate::app::App;
use crate::grants::Grant;
use crate::secrets::OpenedSecret;
use crate::tenants::TenantId;
pub use cache::Tokens;
use cache::{Key, reusable_until};
use endpoint::request;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GrantType {
    /// The value is the client secret.
    ClientCredentials,
    /// The value is `{"refresh_token": ..., "client_secret": ...}` (the secret for confidential
    /// clients only).
    RefreshToken,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`, the default of RFC 6749).
    #[default]
    Basic,
    /// In the form body (`client_secret_post`).
    Post,
}

/// Settings of an `oauth` credential (never secret).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    token_url: String,
    client_id: String,
    grant: GrantType,
    scope: Option<String>,
    /// Sent as `audience` (Auth0, Okta and others).
    audience: Option<String>,
    /// Sent as `resource` (RFC 8707).
    resource: Option<String>,
    #[serde(default)]
    client_auth: ClientAuth,
    /// The run's variable (default: the credential's name).
    variable: Option<String>,
}

const EXAMPLE: &str = r#"{"token_url": "https://idp.example/oauth/token", "client_id": "ci", "grant": "client_credentials", "scope": "read"}"#;

impl Settings {
    fn parse(settings: &Value) -> Result<Settings, String> {
        let parsed: Settings = serde_json::from_value(settings.clone())
            .map_err(|e| format!("{e}; expected e.g. {EXAMPLE}"))?;
        let url = url::Url::parse(&parsed.token_url)
            .map_err(|e| format!("token_url is not a URL: {e}"))?;
        let secure =
            url.scheme() == "https" || (url.scheme() == "http" && crate::oidc::is_loopback(&url));
        if !secure || !url.username().is_empty() || url.password().is_some() {
            return Err(
                "token_url must be https:// (http:// only on loopback), without user information"
                    .to_owned(),
            );
        }
        if parsed.client_id.is_empty() || parsed.client_id.len() > 256 {
            return Err("client_id must be 1 to 256 characters".to_owned());
        }
        for (field, text) in [
            ("client_id", Some(&parsed.client_id)),
            ("scope", parsed.scope.as_ref()),
            ("audience", parsed.audience.as_ref()),
            ("resource", parsed.resource.as_ref()),
        ] {
            if text.is_some_and(|t| t.len() > 1024 || t.chars().any(char::is_control)) {
                return Err(format!(
                    "{field} must be at most 1024 characters, without control characters"
                ));
            }
        }
        if let Some(variable) = &parsed.variable {
            custodian_protocol::check_variable(variable)?;
        }
        Ok(parsed)
    }

    fn variable(&self, name: &str) -> String {
        self.variable.clone().unwrap_or_else(|| name.to_owned())
    }
}

/// What is sealed for a `refresh_token` credential.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RefreshValue {
    refresh_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_secret: Option<String>,
}

/// The opened value: what is sent to the token endpoint.
struct Stored {
    client_secret: Option<SecretString>,
    refresh_token: Option<SecretString>,
}

impl Stored {
    fn parse(grant: GrantType, value: &[u8]) -> Result<Stored, String> {
        let text =
            std::str::from_utf8(value).map_err(|_| "the value must be UTF-8 text".to_owned())?;
        let long_enough = |what: &str, v: &str| {
            if v.len() < custodian_redact::MIN_SECRET_LEN || v.chars().any(char::is_control) {
                Err(format!(
                    "the {what} must be at least {} characters, without control characters",
                    custodian_redact::MIN_SECRET_LEN
                ))
            } else {
                Ok(SecretString::from(v))
            }
        };
        match grant {
            GrantType::ClientCredentials => Ok(Stored {
                client_secret: Some(long_enough("client secret", text)?),
                refresh_token: None,
            }),
            GrantType::RefreshToken => {
                let parsed: Zeroizing<String> = Zeroizing::new(text.to_owned());
                let parsed: RefreshValue = serde_json::from_str(&parsed).map_err(|_| {
                    r#"the value of a refresh_token credential is {"refresh_token": "...", "client_secret": "..."} (client_secret for confidential clients only)"#.to_owned()
                })?;
                let stored = Stored {
                    refresh_token: Some(long_enough("refresh token", &parsed.refresh_token)?),
                    client_secret: parsed
                        .client_secret
                        .as_deref()
                        .map(|s| long_enough("client secret", s))
                        .transpose()?,
                };
                zeroize_refresh_value(parsed);
                Ok(stored)
            }
        }
    }

    /// Both values, for the redactors (under the credential's name).
    fn redact(&self, name: &str, run: &mut ForRun) {
        for value in [&self.client_secret, &self.refresh_token]
            .into_iter()
            .flatten()
        {
            run.redact(name, value.expose_secret().as_bytes());
        }
    }
}

fn zeroize_refresh_value(mut value: RefreshValue) {
    use zeroize::Zeroize;
    value.refresh_token.zeroize();
    value.client_secret.zeroize();
}

pub fn validate(settings: &Value) -> Result<(), String> {
    Settings::parse(settings).map(|_| ())
}

pub fn check_value(settings: &Value, value: &[u8]) -> Result<(), String> {
    let settings = Settings::parse(settings)?;
    Stored::parse(settings.grant, value).map(|_| ())
}

pub fn usage(name: &str, settings: &Value) -> (Vec<String>, String) {
    let Ok(settings) = Settings::parse(settings) else {
        return (
            Vec::new(),
            format!("{name}: unusable settings; ask a Custodian admin"),
        );
    };
    let variable = settings.variable(name);
    let scope = settings
        .scope
        .as_deref()
        .map(|s| format!(" (scope `{s}`)"))
        .unwrap_or_default();
    let how = format!(
        "a short-lived OAuth access token{scope} in ${variable}, e.g. `-H \"Authorization: Bearer ${variable}\"`; \
         minted for this grant, it stops working at its own expiry (minutes) and is redacted from output"
    );
    (vec![variable], how)
}

/// Gives the run an access token for the credential `secret`: cached for its grant, or minted.
pub async fn for_run(
    app: &App,
    grant: &Grant,
    secret: &OpenedSecret,
    settings: &Value,
    run: &mut ForRun,
) -> Result<(), CredentialError> {
    let name = secret.name.as_str();
    let issue = |reason: String| CredentialError::Issue {
        kind: Kind::Oauth,
        name: name.to_owned(),
        reason,
    };
    let raw = settings;
    let settings = Settings::parse(raw).map_err(issue)?;
    let stored = Stored::parse(settings.grant, &secret.value).map_err(issue)?;
    stored.redact(name, run);
    let variable = settings.variable(name);
    let key = Key {
        tenant: grant.tenant_id.clone(),
        grant: grant.id.clone(),
        name: name.to_owned(),
        version: (settings.grant == GrantType::ClientCredentials).then_some(secret.version),
    };
    let tokens = &app.oauth_tokens;
    if let Some(token) = tokens.get(&key, app.clock.now_ms()) {
        run.variable(&variable, token.expose_secret());
        return Ok(());
    }
    let token = match settings.grant {
        GrantType::ClientCredentials => {
            let minted = request(tokens, &settings, &stored).await.map_err(issue)?;
            let now = app.clock.now_ms();
            let until = reusable_until(&minted, now, grant.expires_at * 1000);
            tokens.put(key, minted.access_token.clone(), until, now);
            minted.access_token
        }
        GrantType::RefreshToken => {
            let holder = lease::lock(app, grant, name).await.map_err(issue)?;
            let refreshed = refresh_locked(app, grant, (&settings, raw), key, run).await;
            lease::unlock(app, grant, name, &holder).await;
            refreshed.map_err(issue)?
        }
    };
    run.variable(&variable, token.expose_secret());
    Ok(())
}

/// Under the credential's lease: reads its newest version (another replica may have rotated it),
/// uses a token cached for that version or refreshes, and stores a rotated refresh token.
async fn refresh_locked(
    app: &App,
    grant: &Grant,
    (settings, raw): (&Settings, &Value),
    key: Key,
    run: &mut ForRun,
) -> Result<SecretString, String> {
    let tenant = tenant_of(grant)?;
    let unavailable = |e: crate::secrets::SecretError| {
        tracing::error!(error = %e, "reading an oauth credential failed");
        "the credential cannot be read".to_owned()
    };
    let newest =
        crate::secrets::load_for_run(&app.db, &app.master_key, &tenant, &grant.environment)
            .await
            .map_err(unavailable)?
            .into_iter()
            .find(|s| s.name == key.name)
            .ok_or_else(|| "the credential was deleted".to_owned())?;
    let tokens = &app.oauth_tokens;
    if let Some(token) = tokens.get(&key, app.clock.now_ms()) {
        return Ok(token);
    }
    let stored = Stored::parse(settings.grant, &newest.value)?;
    stored.redact(&key.name, run);
    let minted = request(tokens, settings, &stored).await?;
    let rotated = minted.refresh_token.as_ref().filter(|new| {
        stored
            .refresh_token
            .as_ref()
            .is_none_or(|old| old.expose_secret() != new.expose_secret())
    });
    if let Some(rotated) = rotated {
        run.redact(&key.name, rotated.expose_secret().as_bytes());
        let value = RefreshValue {
            refresh_token: rotated.expose_secret().to_owned(),
            client_secret: stored
                .client_secret
                .as_ref()
                .map(|s| s.expose_secret().to_owned()),
        };
        let mut sealed = Zeroizing::new(Vec::with_capacity(
            64 + value.refresh_token.len() + value.client_secret.as_ref().map_or(0, String::len),
        ));
        let written = serde_json::to_writer(&mut *sealed, &value);
        zeroize_refresh_value(value);
        written.map_err(|_| "the rotated refresh token cannot be encoded".to_owned())?;
        let spec = Spec {
            kind: Kind::Oauth,
            settings: raw.clone(),
        };
        crate::secrets::set_credential(
            &app.db,
            &app.master_key,
            &tenant,
            &grant.environment,
            &key.name,
            &spec,
            &sealed,
            app.clock.now(),
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, credential = %key.name, "storing a rotated refresh token failed");
            "the IdP rotated the refresh token but it could not be stored; an admin must set a new one"
                .to_owned()
        })?;
    }
    let now = app.clock.now_ms();
    let until = reusable_until(&minted, now, grant.expires_at * 1000);
    tokens.put(key, minted.access_token.clone(), until, now);
    Ok(minted.access_token)
}

fn tenant_of(grant: &Grant) -> Result<TenantId, String> {
    TenantId::parse(&grant.tenant_id).map_err(|_| "the grant's tenant is unreadable".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(extra: Value) -> Value {
        let mut s = json!({"token_url": "https://idp.example/token", "client_id": "ci", "grant": "client_credentials"});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    }

    #[test]
    fn token_urls_must_be_https_or_loopback_http() {
        assert_eq!(validate(&settings(json!({}))), Ok(()));
        assert_eq!(
            validate(&settings(
                json!({"token_url": "http://127.0.0.1:8080/token"})
            )),
            Ok(())
        );
        assert_eq!(
            validate(&settings(json!({"token_url": "http://localhost/token"}))),
            Ok(())
        );
        for bad in [
            "http://idp.example/token",
            "https://user:pw@idp.example/token",
            "ftp://idp.example/token",
            "not a url",
        ] {
            assert!(
                validate(&settings(json!({"token_url": bad}))).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn settings_are_checked_field_by_field() {
        for bad in [
            json!({"grant": "password"}),
            json!({"client_id": ""}),
            json!({"variable": "PATH"}),
            json!({"variable": "lower"}),
            json!({"scope": "a\nb"}),
            json!({"client_secret": "never in settings"}),
        ] {
            assert!(validate(&settings(bad.clone())).is_err(), "{bad}");
        }
        assert!(validate(&Value::Null).is_err());
        let ok = settings(
            json!({"scope": "a b", "audience": "api", "resource": "https://api.example", "client_auth": "post", "variable": "API_TOKEN"}),
        );
        assert_eq!(validate(&ok), Ok(()));
        let (variables, how) = usage("REPORTS", &ok);
        assert_eq!(variables, ["API_TOKEN"]);
        assert!(
            how.contains("$API_TOKEN") && how.contains("scope `a b`"),
            "{how}"
        );
    }

    #[test]
    fn values_match_their_grant() {
        let cc = settings(json!({}));
        assert_eq!(check_value(&cc, b"client-secret-1"), Ok(()));
        assert!(check_value(&cc, b"short").is_err());
        assert!(check_value(&cc, b"secret-with\nnewline").is_err());
        let rt = settings(json!({"grant": "refresh_token"}));
        assert_eq!(
            check_value(&rt, br#"{"refresh_token": "rt-123456789"}"#),
            Ok(())
        );
        assert_eq!(
            check_value(
                &rt,
                br#"{"refresh_token": "rt-123456789", "client_secret": "cs-123456789"}"#
            ),
            Ok(())
        );
        for bad in [
            &b"rt-123456789"[..],
            br#"{"refresh_token": "short"}"#,
            br#"{"refresh_token": "rt-123456789", "client_secret": "short"}"#,
            br#"{"refresh_token": "rt-123456789", "other": 1}"#,
        ] {
            let err = check_value(&rt, bad).unwrap_err();
            assert!(!err.contains("rt-123456789"), "{err}");
        }
    }

    #[test]
    fn tokens_are_reused_until_shortly_before_expiry_and_never_past_the_grant() {
        let minted = |secs: Option<u64>| endpoint::Minted {
            access_token: SecretString::from("token-value"),
            expires_in: secs.map(std::time::Duration::from_secs),
            refresh_token: None,
        };
        assert_eq!(reusable_until(&minted(Some(600)), 0, i64::MAX), 540_000);
        assert_eq!(reusable_until(&minted(Some(60)), 0, i64::MAX), 30_000);
        assert_eq!(reusable_until(&minted(Some(600)), 0, 100_000), 100_000);
        assert_eq!(reusable_until(&minted(None), 5, i64::MAX), 5);
    }
}
