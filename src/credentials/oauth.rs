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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use oauth2::basic::{BasicClient, BasicErrorResponse, BasicRequestTokenError};
use oauth2::{AuthType, ClientId, ClientSecret, RefreshToken, Scope, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

use super::{CredentialError, ForRun, Kind, Spec};
use crate::app::App;
use crate::grants::Grant;
use crate::oidc::{HttpClient, printable};
use crate::secrets::OpenedSecret;
use crate::tenants::TenantId;

/// How long a replica holds a credential's refresh lease at most (longer than a token request).
const LEASE_MS: i64 = 30_000;
/// How long a run waits for another replica's refresh of the same credential.
const LEASE_WAIT: Duration = Duration::from_secs(20);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

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
enum ClientAuth {
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

/// Identifies a cached access token: never shared between grants. A client secret's version is
/// part of it (a new secret mints new tokens); a refresh token's is not, because every refresh
/// that the IdP rotates stores a new version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tenant: String,
    grant: String,
    name: String,
    version: Option<i64>,
}

struct Cached {
    token: SecretString,
    until_ms: i64,
}

/// Access tokens minted by this replica, per grant, and the HTTP client that mints them.
pub struct Tokens {
    http: HttpClient,
    cache: Mutex<HashMap<Key, Cached>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokens {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .user_agent(concat!("custodian/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with static settings");
        Self {
            http: HttpClient(http),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How many tokens are cached (expired ones excluded): for tests and metrics.
    pub fn cached(&self, now_ms: i64) -> usize {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.until_ms > now_ms);
        cache.len()
    }

    fn get(&self, key: &Key, now_ms: i64) -> Option<SecretString> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.until_ms > now_ms);
        cache.get(key).map(|c| c.token.clone())
    }

    fn put(&self, key: Key, token: SecretString, until_ms: i64, now_ms: i64) {
        if until_ms <= now_ms {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.until_ms > now_ms);
        cache.insert(key, Cached { token, until_ms });
    }
}

/// A token the endpoint answered with.
struct Minted {
    access_token: SecretString,
    expires_in: Option<Duration>,
    refresh_token: Option<SecretString>,
}

/// Until when a token may be reused: its expiry minus a margin (a run must not start with a
/// token about to expire), never past the grant's end; `None`: not at all.
fn reusable_until(minted: &Minted, now_ms: i64, grant_end_ms: i64) -> i64 {
    let Some(lifetime) = minted.expires_in else {
        return now_ms;
    };
    let lifetime = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 2);
    let margin = (lifetime / 2).min(60_000);
    (now_ms + lifetime - margin).min(grant_end_ms)
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
            let holder = lock(app, grant, name).await.map_err(issue)?;
            let refreshed = refresh_locked(app, grant, (&settings, raw), key, run).await;
            unlock(app, grant, name, &holder).await;
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

/// One request to the token endpoint.
async fn request(tokens: &Tokens, settings: &Settings, stored: &Stored) -> Result<Minted, String> {
    let token_url = TokenUrl::new(settings.token_url.clone()).map_err(|e| e.to_string())?;
    let mut client = BasicClient::new(ClientId::new(settings.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(match settings.client_auth {
            ClientAuth::Basic => AuthType::BasicAuth,
            ClientAuth::Post => AuthType::RequestBody,
        });
    if let Some(secret) = &stored.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
    }
    let scopes: Vec<Scope> = settings
        .scope
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(|s| Scope::new(s.to_owned()))
        .collect();
    let extra: Vec<(&str, &String)> = [
        ("audience", settings.audience.as_ref()),
        ("resource", settings.resource.as_ref()),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect();
    let answer = match &stored.refresh_token {
        None => {
            let mut request = client.exchange_client_credentials().add_scopes(scopes);
            for (name, value) in &extra {
                request = request.add_extra_param(*name, (*value).clone());
            }
            request.request_async(&tokens.http).await
        }
        Some(refresh) => {
            let refresh = RefreshToken::new(refresh.expose_secret().to_owned());
            let mut request = client.exchange_refresh_token(&refresh).add_scopes(scopes);
            for (name, value) in &extra {
                request = request.add_extra_param(*name, (*value).clone());
            }
            request.request_async(&tokens.http).await
        }
    };
    let answer = answer.map_err(describe)?;
    Ok(Minted {
        access_token: SecretString::from(answer.access_token().secret().as_str()),
        expires_in: answer.expires_in(),
        refresh_token: answer
            .refresh_token()
            .map(|t| SecretString::from(t.secret().as_str())),
    })
}

/// What went wrong at the token endpoint, without anything it or we sent.
fn describe(error: BasicRequestTokenError<reqwest::Error>) -> String {
    use oauth2::RequestTokenError;
    match error {
        RequestTokenError::ServerResponse(answer) => describe_refusal(&answer),
        RequestTokenError::Request(e) => format!(
            "the token endpoint could not be reached: {}",
            printable(&crate::error_chain(&e.without_url()), 300)
        ),
        RequestTokenError::Parse(..) => {
            "the token endpoint's answer is not a token response".to_owned()
        }
        RequestTokenError::Other(text) => {
            format!(
                "the token endpoint answered unexpectedly: {}",
                printable(&text, 200)
            )
        }
    }
}

fn describe_refusal(answer: &BasicErrorResponse) -> String {
    let code = printable(answer.error().as_ref(), 64);
    match answer.error_description() {
        Some(d) if !d.trim().is_empty() => {
            format!("the token endpoint refused: {code} ({})", printable(d, 200))
        }
        _ => format!("the token endpoint refused: {code}"),
    }
}

/// Takes the credential's refresh lease, waiting for another holder; returns the holder id.
async fn lock(app: &App, grant: &Grant, name: &str) -> Result<String, String> {
    let holder = uuid::Uuid::new_v4().simple().to_string();
    let started = std::time::Instant::now();
    loop {
        let now = app.clock.now_ms();
        let taken = sqlx::query(
            "INSERT INTO credential_refresh_locks (tenant_id, environment, name, holder, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, environment, name) DO UPDATE \
             SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
             WHERE credential_refresh_locks.expires_at_ms < $6",
        )
        .bind(&grant.tenant_id)
        .bind(&grant.environment)
        .bind(name)
        .bind(&holder)
        .bind(now + LEASE_MS)
        .bind(now)
        .execute(app.db.pool())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "taking an oauth refresh lease failed");
            "the credential's refresh lease cannot be taken".to_owned()
        })?;
        if taken.rows_affected() == 1 {
            return Ok(holder);
        }
        if started.elapsed() > LEASE_WAIT {
            return Err("another refresh of this credential did not finish in time".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn unlock(app: &App, grant: &Grant, name: &str, holder: &str) {
    let released = sqlx::query(
        "DELETE FROM credential_refresh_locks WHERE tenant_id = $1 AND environment = $2 AND name = $3 AND holder = $4",
    )
    .bind(&grant.tenant_id)
    .bind(&grant.environment)
    .bind(name)
    .bind(holder)
    .execute(app.db.pool())
    .await;
    if let Err(e) = released {
        // It expires on its own.
        tracing::warn!(error = %e, "releasing an oauth refresh lease failed");
    }
}
