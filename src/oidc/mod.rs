//! OIDC device-flow client (RFC 8628) for approver sign-in, on `openidconnect`.
//!
//! Guarantees:
//! - Discovery and JWKS come from the tenant's issuer (cached; refreshed once on an unknown `kid`).
//! - When the environment requires a fresh sign-in, the device authorization asks for it with
//!   `max_age`, so standard providers re-authenticate a stale session and return `auth_time`.
//! - ID tokens are verified for signature (asymmetric algorithms only), `iss`, `aud`, `exp`, an
//!   `iat` that is neither in the future nor stale, and an `auth_time` that is not in the future.
//!   Email, groups and the approver's name come from the ID token, or from the userinfo endpoint
//!   (called with the access token, its `sub` checked against the ID token's) when the ID token
//!   lacks them. An email counts for policy only when the provider marks it `email_verified`.
//!   Everything the policy needs is extracted into [`Approver`] and the tokens themselves are
//!   dropped before this module returns.
//! - A verification link that is not https (plain http only on loopback, for development) is
//!   refused before it can reach an agent or a page.
//! - Device codes and tokens are held in secret types and appear in no log line or error text.
//! - HTTP follows no redirects (SSRF), every request has a timeout, and response bodies are capped.
//! - Failures say whether they are transient (network, 5xx: try again) or a misconfiguration
//!   (wrong client, issuer, endpoints: an admin must act).

mod check;
mod code;
pub mod dev_idp;
mod device;
mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClientAuthMethod, CoreGrantType,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::{
    AdditionalProviderMetadata, DeviceAuthorizationUrl, DiscoveryError, HttpRequest, HttpResponse,
    IssuerUrl, ProviderMetadata,
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::clock::UnixSeconds;
use crate::tenants::IdpSettings;

pub use check::{IdpCheck, IdpCheckFailed};
pub use code::SignInRequest;
pub use device::link_is_safe;

/// How long discovery documents and keys are reused before being fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(600);
/// Timeout of each request to an IdP.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest IdP response body read (discovery, device authorization, token, userinfo).
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Tolerated clock difference with the IdP (`iat`, `auth_time`).
pub const CLOCK_SKEW_SECONDS: i64 = 60;

#[derive(Clone, Debug, Deserialize, Serialize)]
struct DeviceEndpoint {
    device_authorization_endpoint: DeviceAuthorizationUrl,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// A started device authorization.
pub struct DeviceAuthorization {
    pub device_code: SecretString,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    pub interval: Duration,
}

/// Who approved, as verified from the ID token (and userinfo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approver {
    pub subject: String,
    /// The value of the tenant's approver claim (`email` by default). An email the provider does
    /// not mark verified is shown as `… (unverified)`.
    pub name: Option<String>,
    /// The approver's email, only when the provider marks it verified (`email_verified: true`).
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub auth_time: Option<UnixSeconds>,
    pub acr: Option<String>,
    pub amr: Vec<String>,
}

/// The answer to one poll of the token endpoint.
#[derive(Debug)]
pub enum PollOutcome {
    /// The human has not finished yet.
    Pending,
    /// Poll less often (RFC 8628: add 5 seconds to the interval).
    SlowDown,
    /// The human declined at the IdP.
    Denied,
    /// The device code expired.
    Expired,
    /// Tokens arrived and the ID token verified.
    Approved(Approver),
    /// The IdP answered with something that ends this authorization (e.g. `invalid_grant`, or an ID
    /// token that does not verify). The reason is safe to show.
    Rejected(String),
    /// The IdP could not be reached or answered nonsense; try again later. Safe to log.
    Unavailable(String),
}

/// Failures before a device authorization exists. Reasons are safe to show (no secrets).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// Transient: the provider could not be reached, timed out or answered 5xx/429.
    #[error("the identity provider at {issuer} is unavailable: {reason}")]
    Unavailable { issuer: String, reason: String },
    /// Not transient: the provider or the tenant's settings are wrong; an admin must act.
    #[error("the identity provider at {issuer} is misconfigured for this tenant: {reason}")]
    Misconfigured { issuer: String, reason: String },
    #[error("the tenant's IdP client secret is not available: {0}")]
    ClientSecret(String),
}

impl OidcError {
    /// Whether trying again later can succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// A failure talking to an IdP, before it is attributed to an issuer.
#[derive(Debug)]
enum Fault {
    Transient(String),
    Config(String),
}

impl Fault {
    fn into_error(self, issuer: &str) -> OidcError {
        let issuer = issuer.to_owned();
        match self {
            Self::Transient(reason) => OidcError::Unavailable { issuer, reason },
            Self::Config(reason) => OidcError::Misconfigured { issuer, reason },
        }
    }

    fn reason(&self) -> &str {
        match self {
            Self::Transient(r) | Self::Config(r) => r,
        }
    }

    /// Network errors are transient; so are 5xx and 429 answers. Everything else needs an admin.
    fn of_status(status: reqwest::StatusCode, what: String) -> Self {
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Self::Transient(what)
        } else {
            Self::Config(what)
        }
    }
}

struct Discovered {
    metadata: Metadata,
    fetched: Instant,
}

/// The device-flow client, shared by all tenants.
pub struct Oidc {
    http: reqwest::Client,
    discovered: Mutex<HashMap<String, Arc<Discovered>>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc").finish_non_exhaustive()
    }
}

impl Default for Oidc {
    fn default() -> Self {
        Self::new()
    }
}

/// The gateway's client for identity providers: no redirects, [`HTTP_TIMEOUT`].
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HTTP_TIMEOUT)
        .user_agent(concat!("custodian/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client with static settings")
}

impl Oidc {
    pub fn new() -> Self {
        Self {
            http: http_client(),
            discovered: Mutex::new(HashMap::new()),
        }
    }

    /// The issuer's discovery document and keys, cached for [`DISCOVERY_TTL`] unless `refresh`.
    async fn metadata(&self, issuer: &str, refresh: bool) -> Result<Arc<Discovered>, Fault> {
        if !refresh {
            let cached = self
                .discovered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(issuer)
                .cloned();
            if let Some(found) = cached
                && found.fetched.elapsed() < DISCOVERY_TTL
            {
                return Ok(found);
            }
        }
        let issuer_url =
            IssuerUrl::new(issuer.to_owned()).map_err(|e| Fault::Config(e.to_string()))?;
        let metadata = Metadata::discover_async(issuer_url, &HttpClient(self.http.clone()))
            .await
            .map_err(|e| {
                let text = format!("discovery failed: {}", crate::error_chain(&e));
                match e {
                    DiscoveryError::Request(_) => Fault::Transient(text),
                    DiscoveryError::Response(status, ..) => Fault::of_status(status, text),
                    _ => Fault::Config(text),
                }
            })?;
        let found = Arc::new(Discovered {
            metadata,
            fetched: Instant::now(),
        });
        self.discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(issuer.to_owned(), found.clone());
        Ok(found)
    }
}

/// openidconnect's HTTP client: the gateway's reqwest client (no redirects, timeouts).
pub(crate) struct HttpClient(pub(crate) reqwest::Client);

impl<'c> openidconnect::AsyncHttpClient<'c> for HttpClient {
    type Error = reqwest::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<HttpResponse, reqwest::Error>> + Send + 'c>,
    >;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request = reqwest::Request::try_from(request)?;
            let response = self.0.execute(request).await?;
            let mut builder = http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let body = response.bytes().await?.to_vec();
            Ok(builder
                .body(body)
                .expect("status and headers came from a response"))
        })
    }
}

/// Reads a response body of at most [`MAX_BODY_BYTES`]; a larger one is an error.
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, Fault> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(Fault::Config(format!(
                        "the response is larger than {MAX_BODY_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Fault::Transient(format!(
                    "the response could not be read: {}",
                    without_url(e)
                )));
            }
        }
    }
}

/// An OAuth error answer (`{"error": …, "error_description": …}`), shortened and made printable.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    error_description: Option<String>,
}

impl ErrorBody {
    fn code(&self) -> String {
        printable(&self.error, 64)
    }

    fn describe(&self) -> String {
        match &self.error_description {
            Some(d) if !d.trim().is_empty() => format!("{} ({})", self.code(), printable(d, 200)),
            _ => self.code(),
        }
    }
}

/// At most `max` characters of `text`, without control characters (text from an IdP, shown to
/// people).
pub(crate) fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

fn client_secret(idp: &IdpSettings) -> Result<Option<SecretString>, OidcError> {
    idp.client_secret
        .as_ref()
        .map(|r| r.resolve().map_err(OidcError::ClientSecret))
        .transpose()
}

/// A reqwest error without the URL (which could carry query parameters).
fn without_url(error: reqwest::Error) -> String {
    crate::error_chain(&error.without_url())
}

/// Whether `url` names a loopback host (`localhost`, 127.0.0.0/8, `::1`).
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Whether `text` is an issuer or endpoint URL Custodian talks to: https, or plain http on a
/// loopback host (development and tests).
pub fn is_acceptable_endpoint(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|url| match url.scheme() {
        "https" => url.host().is_some(),
        "http" => is_loopback(&url),
        _ => false,
    })
}
