//! OIDC device-flow client (RFC 8628) for approver sign-in, on `openidconnect`.
//!
//! Guarantees:
//! - Discovery and JWKS come from the tenant's issuer (cached; refreshed once on an unknown `kid`).
//! - ID tokens are verified for signature (asymmetric algorithms only), `iss`, `aud`, `exp`, and an
//!   `iat` that is neither in the future nor stale; everything the policy needs is extracted into
//!   [`Approver`] and the tokens themselves are dropped before this module returns.
//! - Device codes and tokens are held in [`SecretString`]s and appear in no log line or error text.
//! - HTTP follows no redirects (SSRF) and every request has a timeout.

pub mod dev_idp;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreDeviceAuthorizationResponse, CoreGenderClaim, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AdditionalProviderMetadata, AuthType, ClaimsVerificationError, ClientId,
    ClientSecret, DeviceAuthorizationUrl, EmptyExtraTokenFields, HttpRequest, HttpResponse,
    IdTokenFields, IssuerUrl, ProviderMetadata, Scope, SignatureVerificationError,
    StandardTokenResponse,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::clock::UnixSeconds;
use crate::tenants::IdpSettings;

/// How long discovery documents and keys are reused before being fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(600);
/// Timeout of each request to an IdP.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Tolerated clock difference with the IdP.
const CLOCK_SKEW_SECONDS: i64 = 60;
/// An ID token issued longer ago than this is not accepted as a fresh approval.
const MAX_TOKEN_AGE_SECONDS: i64 = 600;

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

/// Every claim beyond the standard ones, so that the approver and groups claims are configurable.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct OtherClaims(HashMap<String, serde_json::Value>);
impl AdditionalClaims for OtherClaims {}

type TokenResponse = StandardTokenResponse<
    IdTokenFields<
        OtherClaims,
        EmptyExtraTokenFields,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >,
    CoreTokenType,
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

/// Who approved, as verified from the ID token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approver {
    pub subject: String,
    /// The value of the tenant's approver claim (`email` by default).
    pub name: Option<String>,
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

/// Failures before a device authorization exists.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider at {issuer} is unavailable: {reason}")]
    Unavailable { issuer: String, reason: String },
    #[error("the identity provider at {issuer} refused the device authorization: {reason}")]
    Refused { issuer: String, reason: String },
    #[error("the tenant's IdP client secret is not available: {0}")]
    ClientSecret(String),
}

struct Discovered {
    metadata: Metadata,
    fetched: Instant,
}

/// The device-flow client, shared by all tenants.
pub struct Oidc {
    http: reqwest::Client,
    discovered: Mutex<HashMap<String, std::sync::Arc<Discovered>>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl Default for Oidc {
    fn default() -> Self {
        Self::new()
    }
}

impl Oidc {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .user_agent(concat!("custodian/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with static settings");
        Self {
            http,
            discovered: Mutex::new(HashMap::new()),
        }
    }

    async fn metadata(
        &self,
        issuer: &str,
        refresh: bool,
    ) -> Result<std::sync::Arc<Discovered>, String> {
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
        let issuer_url = IssuerUrl::new(issuer.to_owned()).map_err(|e| e.to_string())?;
        let metadata = Metadata::discover_async(issuer_url, &HttpClient(self.http.clone()))
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let found = std::sync::Arc::new(Discovered {
            metadata,
            fetched: Instant::now(),
        });
        self.discovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(issuer.to_owned(), found.clone());
        Ok(found)
    }

    /// Starts a device authorization at the tenant's IdP.
    pub async fn start(&self, idp: &IdpSettings) -> Result<DeviceAuthorization, OidcError> {
        let unavailable = |reason: String| OidcError::Unavailable {
            issuer: idp.issuer.clone(),
            reason,
        };
        let discovered = self
            .metadata(&idp.issuer, false)
            .await
            .map_err(unavailable)?;
        let secret = client_secret(idp)?;
        let device_url = discovered
            .metadata
            .additional_metadata()
            .device_authorization_endpoint
            .clone();
        let client = CoreClient::from_provider_metadata(
            discovered.metadata.clone(),
            ClientId::new(idp.client_id.clone()),
            secret.map(|s| ClientSecret::new(s.expose_secret().to_owned())),
        )
        .set_device_authorization_url(device_url)
        .set_auth_type(AuthType::RequestBody);
        let http = HttpClient(self.http.clone());
        let details: CoreDeviceAuthorizationResponse = client
            .exchange_device_code()
            .add_scopes(
                idp.scopes
                    .split_whitespace()
                    .filter(|s| *s != "openid")
                    .map(|s| Scope::new(s.to_owned())),
            )
            .request_async(&http)
            .await
            .map_err(|e| OidcError::Refused {
                issuer: idp.issuer.clone(),
                reason: crate::error_chain(&e),
            })?;
        Ok(DeviceAuthorization {
            device_code: SecretString::from(details.device_code().secret().to_owned()),
            user_code: details.user_code().secret().to_owned(),
            verification_uri: details.verification_uri().to_string(),
            verification_uri_complete: details
                .verification_uri_complete()
                .map(|u| u.secret().to_owned()),
            expires_in: details.expires_in(),
            interval: details.interval(),
        })
    }

    /// Polls the token endpoint once for `device_code`.
    pub async fn poll(
        &self,
        idp: &IdpSettings,
        device_code: &SecretString,
        now: UnixSeconds,
    ) -> PollOutcome {
        let discovered = match self.metadata(&idp.issuer, false).await {
            Ok(d) => d,
            Err(reason) => return PollOutcome::Unavailable(format!("discovery failed: {reason}")),
        };
        let secret = match client_secret(idp) {
            Ok(secret) => secret,
            Err(e) => return PollOutcome::Unavailable(e.to_string()),
        };
        let Some(token_url) = discovered.metadata.token_endpoint() else {
            return PollOutcome::Rejected("the IdP announces no token endpoint".to_owned());
        };
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code.expose_secret()),
            ("client_id", idp.client_id.as_str()),
        ];
        if let Some(secret) = &secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let response = match self
            .http
            .post(token_url.url().as_str())
            .form(&form)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return PollOutcome::Unavailable(format!(
                    "token endpoint unreachable: {}",
                    without_url(e)
                ));
            }
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return PollOutcome::Unavailable(format!(
                    "token response unreadable: {}",
                    without_url(e)
                ));
            }
        };
        if status.is_server_error() {
            return PollOutcome::Unavailable(format!("token endpoint answered {status}"));
        }
        if !status.is_success() {
            return match serde_json::from_slice::<ErrorBody>(&body).map(|b| b.error) {
                Ok(code) if code == "authorization_pending" => PollOutcome::Pending,
                Ok(code) if code == "slow_down" => PollOutcome::SlowDown,
                Ok(code) if code == "access_denied" => PollOutcome::Denied,
                Ok(code) if code == "expired_token" => PollOutcome::Expired,
                Ok(code) => PollOutcome::Rejected(format!(
                    "the identity provider refused the device code ({})",
                    code.chars().take(64).collect::<String>()
                )),
                Err(_) => PollOutcome::Unavailable(format!(
                    "token endpoint answered {status} without an OAuth error"
                )),
            };
        }
        // From here the body holds tokens: it is parsed and dropped, never logged.
        let tokens: TokenResponse = match serde_json::from_slice(&body) {
            Ok(t) => t,
            Err(_) => {
                return PollOutcome::Unavailable(
                    "token endpoint answered 200 with a malformed body".to_owned(),
                );
            }
        };
        drop(body);
        match self.verify(idp, &tokens, now).await {
            Ok(approver) => PollOutcome::Approved(approver),
            Err(reason) => PollOutcome::Rejected(reason),
        }
    }

    async fn verify(
        &self,
        idp: &IdpSettings,
        tokens: &TokenResponse,
        now: UnixSeconds,
    ) -> Result<Approver, String> {
        let Some(id_token) = tokens.extra_fields().id_token() else {
            return Err("the identity provider returned no ID token".to_owned());
        };
        let mut refreshed = false;
        loop {
            let discovered = self.metadata(&idp.issuer, refreshed).await?;
            let verifier = openidconnect::core::CoreIdTokenVerifier::new_public_client(
                ClientId::new(idp.client_id.clone()),
                discovered.metadata.issuer().clone(),
                discovered.metadata.jwks().clone(),
            )
            .set_allowed_algs([
                CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
                CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
                CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
                CoreJwsSigningAlgorithm::RsaSsaPssSha256,
                CoreJwsSigningAlgorithm::EcdsaP256Sha256,
                CoreJwsSigningAlgorithm::EcdsaP384Sha384,
                CoreJwsSigningAlgorithm::EdDsa,
            ]);
            // The device flow carries no nonce.
            match id_token.claims(&verifier, |_: Option<&openidconnect::Nonce>| Ok(())) {
                Ok(claims) => return approver_from(idp, claims, now),
                Err(ClaimsVerificationError::SignatureVerification(
                    SignatureVerificationError::NoMatchingKey,
                )) if !refreshed => refreshed = true,
                Err(e) => return Err(format!("the ID token does not verify: {e}")),
            }
        }
    }
}

/// openidconnect's HTTP client: the gateway's reqwest client (no redirects, timeouts).
struct HttpClient(reqwest::Client);

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

fn approver_from(
    idp: &IdpSettings,
    claims: &openidconnect::IdTokenClaims<OtherClaims, CoreGenderClaim>,
    now: UnixSeconds,
) -> Result<Approver, String> {
    let issued = claims.issue_time().timestamp();
    if issued > now + CLOCK_SKEW_SECONDS {
        return Err("the ID token was issued in the future (iat)".to_owned());
    }
    if issued < now - MAX_TOKEN_AGE_SECONDS {
        return Err("the ID token is too old to approve with (iat)".to_owned());
    }
    let other = &claims.additional_claims().0;
    let subject = claims.subject().to_string();
    let email = claims.email().map(|e| e.to_string());
    let name = match idp.approver_claim.as_str() {
        "sub" => Some(subject.clone()),
        "email" => email.clone(),
        claim => other.get(claim).and_then(|v| v.as_str()).map(str::to_owned),
    };
    let groups = match other.get(&idp.groups_claim) {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    };
    Ok(Approver {
        subject,
        name,
        email,
        groups,
        auth_time: claims.auth_time().map(|t| t.timestamp()),
        acr: claims.auth_context_ref().map(|a| a.to_string()),
        amr: claims
            .auth_method_refs()
            .map(|list| list.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default(),
    })
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
