//! The authorization server's steps: registration, authorization (handing the engineer to the
//! tenant's IdP), the IdP's return, code redemption and refresh.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::store::{self, Claimed, Client, Code, Family, SignIn};
use super::{
    ACCESS_PREFIX, ACCESS_TTL_SECONDS, CODE_TTL_SECONDS, OAuthError, REFRESH_PREFIX,
    REFRESH_TTL_SECONDS, SCOPES, SIGN_IN_LIFETIME_SECONDS, SIGN_IN_TTL_SECONDS,
};
use crate::agent_tokens::{hash_secret, mint, split_prefixed};
use crate::clock::UnixSeconds;
use crate::keys::{MasterKey, Purpose};
use crate::oidc::{Oidc, SignInRequest};
use crate::store::Db;
use crate::tenants::{IdpSettings, TenantId};

/// Registrations of a tenant that may exist at once without a completed sign-in (registration is
/// open to anyone who can reach the endpoint): beyond, the oldest of them are dropped.
const MAX_PENDING_CLIENTS: i64 = 200;
/// A registration without a completed sign-in is dropped after this long.
const PENDING_CLIENT_SECONDS: i64 = 3600;
/// Sign-ins one client may have in progress at once (beyond, its oldest is dropped).
const MAX_SIGN_INS_PER_CLIENT: i64 = 10;
/// Sign-ins a tenant may have in progress at once (beyond, new ones are refused until some
/// complete or expire).
const MAX_SIGN_INS_PER_TENANT: i64 = 1000;
/// Longest client `state` accepted (it is stored while the engineer signs in).
const MAX_STATE_BYTES: usize = 512;
/// Redirect URIs one client may register.
const MAX_REDIRECT_URIS: usize = 5;

/// The handles the authorization server uses.
pub struct Server<'a> {
    pub db: &'a Db,
    pub oidc: &'a Oidc,
    pub master_key: &'a MasterKey,
    pub public_url: &'a url::Url,
}

impl Server<'_> {
    fn issuer(&self, tenant: &TenantId) -> String {
        super::issuer(self.public_url, tenant.as_str())
    }

    fn callback(&self, tenant: &TenantId) -> String {
        format!("{}/oauth/callback", self.issuer(tenant))
    }

    /// The tenant's IdP; unknown tenants and tenants without one answer alike.
    async fn idp(&self, tenant: &TenantId) -> Result<IdpSettings, OAuthError> {
        crate::tenants::get(self.db, tenant.as_str())
            .await?
            .and_then(|t| t.idp())
            .ok_or_else(|| {
                OAuthError::InvalidRequest(
                    "sign-in is not available at this endpoint (the tenant has no identity provider); ask an admin for an agent token"
                        .to_owned(),
                )
            })
    }
}

/// An RFC 7591 registration request (the fields Custodian looks at).
#[derive(Debug, Deserialize)]
pub struct RegistrationRequest {
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    pub client_name: Option<String>,
    pub token_endpoint_auth_method: Option<String>,
    pub grant_types: Option<Vec<String>>,
    pub response_types: Option<Vec<String>>,
}

/// The registered client, as answered.
#[derive(Debug, Serialize)]
pub struct Registration {
    pub client_id: String,
    pub client_id_issued_at: UnixSeconds,
    pub client_name: Option<String>,
    pub redirect_uris: Vec<String>,
    pub grant_types: [&'static str; 2],
    pub response_types: [&'static str; 1],
    pub token_endpoint_auth_method: &'static str,
}

/// Whether `uri` is a redirect URI a native client may register: `http` on a loopback IP
/// literal or `localhost` (RFC 8252 §7.3), with a port, without fragment or credentials.
fn is_loopback_redirect(uri: &str) -> bool {
    url::Url::parse(uri).is_ok_and(|u| {
        u.scheme() == "http"
            && crate::oidc::is_loopback(&u)
            && u.port().is_some()
            && u.fragment().is_none()
            && u.username().is_empty()
            && u.password().is_none()
    })
}

/// Registers a public native client (RFC 7591), loopback redirect URIs only.
pub async fn register(
    server: &Server<'_>,
    tenant: &TenantId,
    request: RegistrationRequest,
    now: UnixSeconds,
) -> Result<Registration, OAuthError> {
    server.idp(tenant).await?;
    let invalid = |m: &str| OAuthError::InvalidClientMetadata(m.to_owned());
    if request
        .token_endpoint_auth_method
        .as_deref()
        .unwrap_or("none")
        != "none"
    {
        return Err(invalid(
            "only public clients register here: token_endpoint_auth_method must be \"none\"",
        ));
    }
    let grants_ok = request.grant_types.as_ref().is_none_or(|g| {
        g.iter()
            .all(|g| g == "authorization_code" || g == "refresh_token")
    });
    if !grants_ok {
        return Err(invalid(
            "grant_types may only list authorization_code and refresh_token",
        ));
    }
    if !request
        .response_types
        .as_ref()
        .is_none_or(|r| r.iter().all(|r| r == "code"))
    {
        return Err(invalid("response_types may only list code"));
    }
    if request.redirect_uris.is_empty() || request.redirect_uris.len() > MAX_REDIRECT_URIS {
        return Err(OAuthError::InvalidRedirectUri(format!(
            "register 1 to {MAX_REDIRECT_URIS} redirect_uris"
        )));
    }
    if let Some(bad) = request
        .redirect_uris
        .iter()
        .find(|u| !is_loopback_redirect(u))
    {
        return Err(OAuthError::InvalidRedirectUri(format!(
            "redirect URI `{}` is not allowed: only http://127.0.0.1:PORT/…, http://[::1]:PORT/… or http://localhost:PORT/… (native clients) register here",
            printable(bad, 200)
        )));
    }
    let client_name = request.client_name.map(|n| printable(&n, 100));
    let client = Client {
        id: format!("ocl_{}", hex::encode(random::<16>())),
        client_name: client_name.clone(),
        redirect_uris: serde_json::to_string(&request.redirect_uris)
            .map_err(|e| invalid(&e.to_string()))?,
    };
    let dropped = store::insert_client(
        server.db,
        tenant,
        &client,
        now,
        now - PENDING_CLIENT_SECONDS,
        MAX_PENDING_CLIENTS,
    )
    .await?;
    tracing::info!(tenant.id = %tenant, oauth.client = %client.id, oauth.dropped_pending = dropped, "OAuth client registered");
    Ok(Registration {
        client_id: client.id,
        client_id_issued_at: now,
        client_name,
        redirect_uris: request.redirect_uris,
        grant_types: ["authorization_code", "refresh_token"],
        response_types: ["code"],
        token_endpoint_auth_method: "none",
    })
}

/// The query of an authorization request.
#[derive(Debug, Default, Deserialize)]
pub struct AuthorizationRequest {
    pub response_type: Option<String>,
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub state: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
}

/// Where the engineer's browser goes next.
#[derive(Debug)]
pub enum Next {
    /// The consent page: which client asks, for which tenant, and where the result goes.
    Consent(Consent),
    /// To the tenant's IdP to sign in, binding this browser to the sign-in with a cookie holding
    /// `browser` (its return is accepted only from the same browser).
    SignIn {
        url: url::Url,
        browser: SecretString,
    },
    /// Back to the client, with a code or an OAuth error.
    Client(url::Url),
}

/// What the consent page shows, and the token its form and a cookie both carry (double submit:
/// a page of another site can make the browser post a form, not set this site's cookie).
#[derive(Debug)]
pub struct Consent {
    pub token: SecretString,
    /// The tenant's display name and id.
    pub tenant_name: String,
    /// The name the client registered with (not verified).
    pub client_name: Option<String>,
    /// Where the client receives the result: the redirect URI's `host:port`.
    pub redirect_to: String,
}

/// The client's redirect URI with `params`, the client's `state` and this server's `iss`.
fn back_to_client(
    redirect_uri: &str,
    params: &[(&str, &str)],
    state: Option<&str>,
    issuer: &str,
) -> Result<url::Url, OAuthError> {
    let mut url = url::Url::parse(redirect_uri)
        .map_err(|_| OAuthError::InvalidRequest("the redirect URI is not a URL".to_owned()))?;
    {
        let mut query = url.query_pairs_mut();
        for (k, v) in params {
            query.append_pair(k, v);
        }
        if let Some(state) = state {
            query.append_pair("state", state);
        }
        query.append_pair("iss", issuer);
    }
    Ok(url)
}

fn error_to_client(
    redirect_uri: &str,
    error: &OAuthError,
    state: Option<&str>,
    issuer: &str,
) -> Result<Next, OAuthError> {
    let description = error.to_string();
    back_to_client(
        redirect_uri,
        &[("error", error.code()), ("error_description", &description)],
        state,
        issuer,
    )
    .map(Next::Client)
}

/// The requested scope, checked against [`SCOPES`]; `mcp` when none is asked for.
fn checked_scope(scope: Option<&str>) -> Result<String, OAuthError> {
    let asked: Vec<&str> = scope.unwrap_or("").split_whitespace().collect();
    if let Some(unknown) = asked.iter().find(|s| !SCOPES.contains(s)) {
        return Err(OAuthError::InvalidScope(format!(
            "unknown scope `{}`; this server knows: {}",
            printable(unknown, 64),
            SCOPES.join(" ")
        )));
    }
    let mut granted = vec!["mcp"];
    granted.extend(asked.into_iter().filter(|s| *s != "mcp"));
    granted.dedup();
    Ok(granted.join(" "))
}

fn check_resource(
    server: &Server<'_>,
    tenant: &TenantId,
    resource: Option<&str>,
) -> Result<(), OAuthError> {
    let expected = super::resource(server.public_url, tenant.as_str());
    match resource {
        Some(r) if r == expected => Ok(()),
        Some(_) => Err(OAuthError::InvalidTarget(format!(
            "resource must be this tenant's MCP URL, {expected}"
        ))),
        None => Err(OAuthError::InvalidTarget(format!(
            "resource is required (RFC 8707): send resource={expected}"
        ))),
    }
}

/// Whether `challenge` has the shape of an S256 challenge (43 base64url characters).
fn is_s256_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What is sealed while the engineer signs in at the IdP.
#[derive(Serialize, Deserialize)]
struct Upstream {
    verifier: String,
    nonce: String,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.verifier.zeroize();
        self.nonce.zeroize();
    }
}

/// Validates an authorization request, stores it (bounded per client and per tenant) and asks the
/// engineer to consent. Errors that cannot go back to the client (unknown client, unregistered
/// redirect URI, an oversized `state`) are returned as `Err` and shown on a page; the rest go back
/// to the client.
pub async fn authorize(
    server: &Server<'_>,
    tenant: &TenantId,
    request: AuthorizationRequest,
    now: UnixSeconds,
) -> Result<Next, OAuthError> {
    let Some(client_id) = request.client_id.as_deref() else {
        return Err(OAuthError::InvalidRequest(
            "client_id is required".to_owned(),
        ));
    };
    let Some(client) = store::client(server.db, tenant, client_id).await? else {
        return Err(OAuthError::InvalidClient(
            "unknown client_id; register the client first".to_owned(),
        ));
    };
    let registered: Vec<String> = serde_json::from_str(&client.redirect_uris).unwrap_or_default();
    let Some(redirect_uri) = request
        .redirect_uri
        .as_deref()
        .filter(|r| registered.iter().any(|u| u == r))
    else {
        return Err(OAuthError::InvalidRequest(
            "redirect_uri is missing or differs from every registered one (exact match)".to_owned(),
        ));
    };
    if request
        .state
        .as_ref()
        .is_some_and(|s| s.len() > MAX_STATE_BYTES)
    {
        // Shown on the page, never echoed or stored.
        return Err(OAuthError::InvalidRequest(format!(
            "state is longer than {MAX_STATE_BYTES} bytes"
        )));
    }
    let issuer = server.issuer(tenant);
    let state = request.state.as_deref();
    let fail = |e: OAuthError| error_to_client(redirect_uri, &e, state, &issuer);
    if request.response_type.as_deref() != Some("code") {
        return fail(OAuthError::InvalidRequest(
            "response_type must be code".to_owned(),
        ));
    }
    if request.code_challenge_method.as_deref() != Some("S256") {
        return fail(OAuthError::InvalidRequest(
            "PKCE is required with code_challenge_method=S256".to_owned(),
        ));
    }
    let Some(challenge) = request
        .code_challenge
        .as_deref()
        .filter(|c| is_s256_challenge(c))
    else {
        return fail(OAuthError::InvalidRequest(
            "code_challenge must be 43 base64url characters (S256)".to_owned(),
        ));
    };
    if let Err(e) = check_resource(server, tenant, request.resource.as_deref()) {
        return fail(e);
    }
    let scope = match checked_scope(request.scope.as_deref()) {
        Ok(scope) => scope,
        Err(e) => return fail(e),
    };
    if let Err(e) = server.idp(tenant).await {
        return fail(e);
    }
    let token = secret_text();
    let stored = store::insert_sign_in(
        server.db,
        tenant,
        &hash_secret(token.expose_secret().as_bytes()),
        &SignIn {
            client_id: client.id,
            redirect_uri: redirect_uri.to_owned(),
            code_challenge: challenge.to_owned(),
            client_state: request.state.clone(),
            scope,
            upstream_sealed: String::new(),
            browser_hash: None,
            expires_at: now + SIGN_IN_TTL_SECONDS,
        },
        now,
        (MAX_SIGN_INS_PER_CLIENT, MAX_SIGN_INS_PER_TENANT),
    )
    .await?;
    if !stored {
        tracing::warn!(tenant.id = %tenant, "sign-in refused: too many in progress at this tenant");
        return fail(OAuthError::TemporarilyUnavailable(
            "too many sign-ins are in progress at this tenant; try again in a few minutes"
                .to_owned(),
        ));
    }
    let tenant_name = crate::tenants::get(server.db, tenant.as_str())
        .await?
        .map_or_else(
            || tenant.to_string(),
            |t| format!("{} ({tenant})", t.display_name),
        );
    let redirect_to = url::Url::parse(redirect_uri)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port()?)))
        .unwrap_or_default();
    Ok(Next::Consent(Consent {
        token,
        tenant_name,
        client_name: client.client_name,
        redirect_to,
    }))
}

fn unknown_sign_in() -> OAuthError {
    OAuthError::InvalidRequest(
        "this sign-in is unknown, was already answered or completed, or expired; start again from your client"
            .to_owned(),
    )
}

/// The engineer's answer on the consent page. `form` and `cookie` are the consent token the page's
/// form and this browser's cookie carry: both must be present and equal, else nothing changes.
/// Allowed: the engineer goes to the tenant's IdP, and the browser is bound to the sign-in.
/// Denied: back to the client with `access_denied`.
pub async fn answer_consent(
    server: &Server<'_>,
    tenant: &TenantId,
    (form, cookie): (Option<&str>, Option<&str>),
    allow: bool,
    now: UnixSeconds,
) -> Result<Next, OAuthError> {
    let (Some(form), Some(cookie)) = (form, cookie) else {
        return Err(not_this_browser());
    };
    let same: bool = form.as_bytes().ct_eq(cookie.as_bytes()).into();
    if !same || form.is_empty() {
        return Err(not_this_browser());
    }
    let consent_hash = hash_secret(form.as_bytes());
    let issuer = server.issuer(tenant);
    if !allow {
        let Some(sign_in) = store::deny_sign_in(server.db, tenant, &consent_hash, now).await?
        else {
            return Err(unknown_sign_in());
        };
        tracing::info!(tenant.id = %tenant, oauth.client = %sign_in.client_id, "sign-in denied on the consent page");
        return error_to_client(
            &sign_in.redirect_uri,
            &OAuthError::AccessDenied("the engineer denied the sign-in".to_owned()),
            sign_in.client_state.as_deref(),
            &issuer,
        );
    }
    let idp = server.idp(tenant).await?;
    let upstream_state = secret_text();
    let state_hash = hash_secret(upstream_state.expose_secret().as_bytes());
    let upstream = Upstream {
        verifier: secret_text().expose_secret().to_owned(),
        nonce: secret_text().expose_secret().to_owned(),
    };
    let sealed = server.master_key.seal(
        Purpose::SignIn,
        &sign_in_aad(tenant, &state_hash),
        &Zeroizing::new(serde_json::to_vec(&upstream).unwrap_or_default()),
    );
    let browser = secret_text();
    let browser_hash = hash_secret(browser.expose_secret().as_bytes());
    let Some(sign_in) = store::allow_sign_in(
        server.db,
        tenant,
        &consent_hash,
        (&state_hash, &sealed, &browser_hash),
        now,
    )
    .await?
    else {
        return Err(unknown_sign_in());
    };
    let callback = server.callback(tenant);
    let (verifier, nonce) = (
        SecretString::from(upstream.verifier.clone()),
        SecretString::from(upstream.nonce.clone()),
    );
    drop(upstream);
    let url = server
        .oidc
        .authorization_url(
            &idp,
            &SignInRequest {
                redirect_uri: &callback,
                state: &upstream_state,
                verifier: &verifier,
                nonce: &nonce,
            },
        )
        .await;
    match url {
        Ok(url) => Ok(Next::SignIn { url, browser }),
        Err(e) => {
            tracing::warn!(tenant.id = %tenant, error = %e, "sign-in cannot start: the IdP is not usable");
            store::take_sign_in(server.db, tenant, &state_hash).await?;
            error_to_client(
                &sign_in.redirect_uri,
                &OAuthError::TemporarilyUnavailable(e.to_string()),
                sign_in.client_state.as_deref(),
                &issuer,
            )
        }
    }
}

fn not_this_browser() -> OAuthError {
    OAuthError::AccessDenied(
        "this answer did not come from the consent page shown in this browser; start the sign-in again from your client"
            .to_owned(),
    )
}

fn sign_in_aad(tenant: &TenantId, state_hash: &str) -> String {
    format!("{tenant}/oauth-sign-in/{state_hash}")
}

/// The query of the IdP's redirect to Custodian's callback.
#[derive(Debug, Default, Deserialize)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
}

/// Completes a sign-in that the IdP sent back to the browser holding the binding cookie
/// `browser`: redeems the IdP's code, records who signed in, and sends the browser back to the
/// client with a Custodian authorization code. From another browser (one that did not allow this
/// sign-in) the sign-in ends with nothing issued.
pub async fn finish_sign_in(
    server: &Server<'_>,
    tenant: &TenantId,
    query: CallbackQuery,
    browser: Option<&str>,
    now: UnixSeconds,
) -> Result<Next, OAuthError> {
    let unknown = unknown_sign_in;
    let state = SecretString::from(query.state.unwrap_or_default());
    let state_hash = hash_secret(state.expose_secret().as_bytes());
    let Some(sign_in) = store::take_sign_in(server.db, tenant, &state_hash).await? else {
        return Err(unknown());
    };
    if sign_in.expires_at < now {
        return Err(unknown());
    }
    let presented = hash_secret(browser.unwrap_or_default().as_bytes());
    let bound = sign_in.browser_hash.as_deref().unwrap_or_default();
    let same_browser: bool = presented.as_bytes().ct_eq(bound.as_bytes()).into();
    if !same_browser || browser.is_none_or(str::is_empty) {
        tracing::warn!(tenant.id = %tenant, oauth.client = %sign_in.client_id, "sign-in returned to a browser that did not allow it; nothing issued");
        return Err(OAuthError::AccessDenied(
            "this sign-in was allowed in another browser; nothing was issued. Start again from your client"
                .to_owned(),
        ));
    }
    let issuer = server.issuer(tenant);
    let client_state = sign_in.client_state.as_deref();
    let fail = |e: OAuthError| error_to_client(&sign_in.redirect_uri, &e, client_state, &issuer);
    let code = match (query.error, query.code) {
        (None, Some(code)) => SecretString::from(code),
        (error, _) => {
            let error = error.map_or_else(|| "no code".to_owned(), |e| printable(&e, 64));
            return fail(OAuthError::AccessDenied(format!(
                "the sign-in at the identity provider did not complete ({error})"
            )));
        }
    };
    let upstream: Upstream = match server
        .master_key
        .open(
            Purpose::SignIn,
            &sign_in_aad(tenant, &state_hash),
            &sign_in.upstream_sealed,
        )
        .ok()
        .and_then(|plain| serde_json::from_slice(&plain).ok())
    {
        Some(u) => u,
        None => return Err(unknown()),
    };
    let idp = match server.idp(tenant).await {
        Ok(idp) => idp,
        Err(e) => return fail(e),
    };
    let callback = server.callback(tenant);
    let (verifier, nonce) = (
        SecretString::from(upstream.verifier.clone()),
        SecretString::from(upstream.nonce.clone()),
    );
    drop(upstream);
    let engineer = server
        .oidc
        .redeem_code(
            &idp,
            &code,
            query.iss.as_deref(),
            &SignInRequest {
                redirect_uri: &callback,
                state: &state,
                verifier: &verifier,
                nonce: &nonce,
            },
            now,
        )
        .await;
    drop(code);
    let engineer = match engineer {
        Ok(engineer) => engineer,
        Err(reason) => {
            tracing::warn!(tenant.id = %tenant, reason = %reason, "sign-in refused");
            return fail(OAuthError::AccessDenied(format!(
                "the sign-in could not be verified: {reason}"
            )));
        }
    };
    let client = store::client(server.db, tenant, &sign_in.client_id).await?;
    let family = Family {
        id: format!("ofa_{}", hex::encode(random::<8>())),
        client_id: sign_in.client_id.clone(),
        client_name: client.and_then(|c| c.client_name),
        subject: engineer.subject,
        name: engineer.name,
        email: engineer.email,
        scope: sign_in.scope.clone(),
        resource: super::resource(server.public_url, tenant.as_str()),
        created_at: now,
        expires_at: now + SIGN_IN_LIFETIME_SECONDS,
        last_used_at: now,
        revoked_at: None,
        revoke_reason: None,
    };
    let our_code = secret_text();
    store::insert_family_and_code(
        server.db,
        tenant,
        &family,
        &hash_secret(our_code.expose_secret().as_bytes()),
        &Code {
            family_id: family.id.clone(),
            client_id: sign_in.client_id.clone(),
            redirect_uri: sign_in.redirect_uri.clone(),
            code_challenge: sign_in.code_challenge.clone(),
            expires_at: now + CODE_TTL_SECONDS,
        },
    )
    .await?;
    tracing::info!(tenant.id = %tenant, oauth.session = %family.id, engineer = %family.subject, "engineer signed in");
    back_to_client(
        &sign_in.redirect_uri,
        &[("code", our_code.expose_secret())],
        client_state,
        &issuer,
    )
    .map(Next::Client)
}

/// A token request (RFC 6749 §4.1.3 and §6), form fields as sent.
#[derive(Default, Deserialize)]
pub struct TokenRequest {
    pub grant_type: Option<String>,
    pub code: Option<String>,
    pub redirect_uri: Option<String>,
    pub client_id: Option<String>,
    pub code_verifier: Option<String>,
    pub refresh_token: Option<String>,
    pub resource: Option<String>,
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("grant_type", &self.grant_type)
            .finish_non_exhaustive()
    }
}

impl Drop for TokenRequest {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for value in [
            &mut self.code,
            &mut self.code_verifier,
            &mut self.refresh_token,
        ]
        .into_iter()
        .flatten()
        {
            value.zeroize();
        }
    }
}

/// Tokens issued by the token endpoint.
pub struct Issued {
    pub access_token: SecretString,
    pub refresh_token: SecretString,
    pub expires_in: i64,
    pub scope: String,
}

/// Redeems an authorization code (grant_type `authorization_code`).
pub async fn redeem_code(
    server: &Server<'_>,
    tenant: &TenantId,
    request: &TokenRequest,
    now: UnixSeconds,
) -> Result<Issued, OAuthError> {
    let client_id = request.client_id.as_deref().unwrap_or_default();
    let code = request.code.as_deref().unwrap_or_default();
    let invalid = |m: &str| OAuthError::InvalidGrant(m.to_owned());
    // A malformed request leaves the code usable; a wrong client, redirect or verifier spends it.
    check_resource(server, tenant, request.resource.as_deref())?;
    let claimed = store::claim_code(server.db, tenant, &hash_secret(code.as_bytes()), now).await?;
    let code = match claimed {
        Claimed::First(code) => code,
        Claimed::Replayed(family) => {
            store::revoke_families(
                server.db,
                tenant,
                &family,
                "authorization code replayed",
                now,
            )
            .await?;
            tracing::warn!(tenant.id = %tenant, oauth.session = %family, "authorization code presented twice; its sign-in is revoked");
            return Err(invalid("the authorization code was already used"));
        }
        Claimed::Unknown => return Err(invalid("unknown authorization code")),
    };
    if code.expires_at < now {
        return Err(invalid("the authorization code expired"));
    }
    if code.client_id != client_id {
        return Err(invalid(
            "the authorization code was issued to another client",
        ));
    }
    if request.redirect_uri.as_deref() != Some(code.redirect_uri.as_str()) {
        return Err(invalid(
            "redirect_uri differs from the authorization request's",
        ));
    }
    let verifier = request.code_verifier.as_deref().unwrap_or_default();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let pkce_ok: bool = challenge
        .as_bytes()
        .ct_eq(code.code_challenge.as_bytes())
        .into();
    if !(43..=128).contains(&verifier.len()) || !pkce_ok {
        return Err(invalid(
            "code_verifier does not match the code_challenge (PKCE S256)",
        ));
    }
    let Some(family) = store::family(server.db, tenant, &code.family_id).await? else {
        return Err(invalid("unknown authorization code"));
    };
    issue(server, tenant, &family, now).await
}

/// Rotates a refresh token (grant_type `refresh_token`). A rotated token presented again revokes
/// its whole family.
pub async fn refresh(
    server: &Server<'_>,
    tenant: &TenantId,
    request: &TokenRequest,
    now: UnixSeconds,
) -> Result<Issued, OAuthError> {
    let invalid = |m: &str| OAuthError::InvalidGrant(m.to_owned());
    let presented = request.refresh_token.as_deref().unwrap_or_default();
    let Some((id, secret)) = split_prefixed(presented, REFRESH_PREFIX) else {
        return Err(invalid("unknown refresh token"));
    };
    let Some((family_id, stored_hash, expires_at, used_at)) =
        store::refresh_token(server.db, tenant, id).await?
    else {
        return Err(invalid("unknown refresh token"));
    };
    let matches: bool = hash_secret(secret.as_bytes())
        .as_bytes()
        .ct_eq(stored_hash.as_bytes())
        .into();
    if !matches {
        return Err(invalid("unknown refresh token"));
    }
    let Some(family) = store::family(server.db, tenant, &family_id).await? else {
        return Err(invalid("unknown refresh token"));
    };
    if request.client_id.as_deref() != Some(family.client_id.as_str()) {
        return Err(invalid("the refresh token was issued to another client"));
    }
    // Malformed requests change nothing: checked before the token is spent.
    check_resource(server, tenant, request.resource.as_deref())?;
    if let Some(asked) = request.scope.as_deref() {
        let granted: Vec<&str> = family.scope.split_whitespace().collect();
        if let Some(extra) = asked
            .split_whitespace()
            .find(|s| !granted.contains(s) && *s != "offline_access")
        {
            return Err(OAuthError::InvalidScope(format!(
                "scope `{}` was not granted at sign-in",
                printable(extra, 64)
            )));
        }
    }
    if used_at.is_some() || !store::rotate(server.db, tenant, id, now).await? {
        store::revoke_families(server.db, tenant, &family.id, "refresh token reused", now).await?;
        tracing::warn!(tenant.id = %tenant, oauth.session = %family.id, "a rotated refresh token was presented again; its sign-in is revoked");
        return Err(invalid(
            "the refresh token was already used; every token of this sign-in is revoked",
        ));
    }
    if family.revoked_at.is_some() {
        return Err(invalid("this sign-in was revoked; sign in again"));
    }
    if expires_at < now || family.expires_at < now {
        return Err(invalid("the refresh token expired; sign in again"));
    }
    issue(server, tenant, &family, now).await
}

/// Issues a new access and refresh token for a live family.
async fn issue(
    server: &Server<'_>,
    tenant: &TenantId,
    family: &Family,
    now: UnixSeconds,
) -> Result<Issued, OAuthError> {
    if family.revoked_at.is_some() {
        return Err(OAuthError::InvalidGrant(
            "this sign-in was revoked; sign in again".to_owned(),
        ));
    }
    let (access_id, access_secret) = mint();
    let (refresh_id, refresh_secret) = mint();
    let access_hash = hash_secret(access_secret.as_bytes());
    let refresh_hash = hash_secret(refresh_secret.as_bytes());
    let access_expires = now + ACCESS_TTL_SECONDS;
    let refresh_expires = (now + REFRESH_TTL_SECONDS).min(family.expires_at);
    let stored = store::insert_tokens(
        server.db,
        tenant,
        &family.id,
        [
            ("access", &access_id, &access_hash, access_expires),
            ("refresh", &refresh_id, &refresh_hash, refresh_expires),
        ],
        now,
    )
    .await?;
    if !stored {
        return Err(OAuthError::InvalidGrant(
            "this sign-in was revoked; sign in again".to_owned(),
        ));
    }
    Ok(Issued {
        access_token: SecretString::from(format!(
            "{ACCESS_PREFIX}{access_id}_{}",
            access_secret.as_str()
        )),
        refresh_token: SecretString::from(format!(
            "{REFRESH_PREFIX}{refresh_id}_{}",
            refresh_secret.as_str()
        )),
        expires_in: ACCESS_TTL_SECONDS,
        scope: family.scope.clone(),
    })
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// 256 random bits as 43 base64url characters (states, codes, PKCE verifiers, nonces).
fn secret_text() -> SecretString {
    let bytes = Zeroizing::new(random::<32>());
    SecretString::from(URL_SAFE_NO_PAD.encode(bytes.as_slice()))
}

/// At most `max` characters of client-supplied text, without control characters.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_http_redirects_with_a_port_register() {
        for ok in [
            "http://127.0.0.1:5555/callback/abc",
            "http://[::1]:8080/cb",
            "http://localhost:1234/",
        ] {
            assert!(is_loopback_redirect(ok), "{ok}");
        }
        for bad in [
            "https://evil.example.com/cb",
            "http://evil.example.com:80/cb",
            "http://127.0.0.1/cb",
            "http://127.0.0.1:5555/cb#frag",
            "http://user:pw@127.0.0.1:5555/cb",
            "com.example.app:/cb",
            "javascript:alert(1)",
            "http://127.0.0.1.evil.example.com:80/cb",
        ] {
            assert!(!is_loopback_redirect(bad), "{bad}");
        }
    }

    #[test]
    fn scopes_are_checked_and_mcp_is_always_granted() {
        assert_eq!(checked_scope(None).unwrap(), "mcp");
        assert_eq!(
            checked_scope(Some("offline_access")).unwrap(),
            "mcp offline_access"
        );
        assert!(matches!(
            checked_scope(Some("admin")),
            Err(OAuthError::InvalidScope(_))
        ));
    }
}
