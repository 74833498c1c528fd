//! Team sign-in: each tenant's OAuth 2.1 authorization server, so that engineers run
//! `codex mcp login` and sign in at the company IdP instead of pasting a long-lived agent token.
//!
//! The MCP endpoint is the protected resource (RFC 9728 metadata names this server); the server
//! (RFC 8414 metadata at `/.well-known/oauth-authorization-server/t/{tenant}`) registers native
//! clients (RFC 7591), delegates the sign-in itself to the tenant's IdP (authorization code + PKCE,
//! see `crate::oidc`), and issues short-lived access tokens bound to the tenant's MCP URL
//! (RFC 8707) with rotating refresh tokens.
//!
//! Guarantees:
//! - Only public clients with `http` loopback redirect URIs register; redirect URIs match exactly.
//!   At most 200 registrations without a completed sign-in per tenant: a new one drops the oldest.
//! - The engineer consents on a page naming the tenant, the client and its redirect; the answer
//!   must carry the page's token in both the form and a cookie (double submit), and the IdP's
//!   return is accepted only from the browser that allowed the sign-in (a second cookie).
//! - Sign-ins in progress are bounded: `state` at most 512 bytes, 10 per client, 1000 per tenant.
//! - Only PKCE with S256; authorization codes are single-use and live [`CODE_TTL_SECONDS`]; a code
//!   presented twice revokes everything issued from it.
//! - `resource` must be the tenant's MCP URL in the authorization and every token request; access
//!   tokens are accepted only by that tenant's MCP endpoint and live [`ACCESS_TTL_SECONDS`].
//! - A refresh token works once: refreshing rotates it, and presenting a rotated one again revokes
//!   the whole family (every access and refresh token of that sign-in).
//! - Codes, tokens and the sign-in `state` are stored only as SHA-256 hashes and compared in
//!   constant time; the PKCE verifier and nonce sent to the IdP are sealed with the master key
//!   while the sign-in is in progress and deleted when it returns. No IdP token is kept.
//! - Admins list and revoke sign-ins per tenant (`custodian admin oauth …`); revocation is
//!   effective on the next request on every replica (the check reads the database).
//! - Every failure is an OAuth error with a specific description and changes nothing, except the
//!   replay and reuse cases above, which revoke on purpose.

mod flow;
pub mod http;
mod store;

pub use store::{Family, list_families, revoke_families};

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::agent_tokens::{self, AgentIdentity, Verified};
use crate::clock::UnixSeconds;
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

/// Prefix of access tokens (secret scanners can find leaked ones, as with `cst_`).
pub const ACCESS_PREFIX: &str = "csa_";
/// Prefix of refresh tokens.
pub const REFRESH_PREFIX: &str = "csr_";
/// Access tokens live this long.
pub const ACCESS_TTL_SECONDS: i64 = 600;
/// A refresh token is usable this long after it was issued (each refresh issues a new one).
pub const REFRESH_TTL_SECONDS: i64 = 7 * 24 * 3600;
/// No refresh beyond this long after the sign-in: then the engineer signs in again. A day, so
/// that an engineer disabled at the IdP keeps access for at most that long (Custodian does not ask
/// the IdP on refresh), while `codex mcp login` once a working day is enough.
pub const SIGN_IN_LIFETIME_SECONDS: i64 = 24 * 3600;
/// Authorization codes live this long.
pub const CODE_TTL_SECONDS: i64 = 60;
/// A sign-in at the IdP must come back within this long.
pub const SIGN_IN_TTL_SECONDS: i64 = 600;
/// The scopes this server knows. `mcp` is the MCP endpoint; `offline_access` is accepted (native
/// clients ask for it) and changes nothing: a refresh token is always issued.
pub const SCOPES: &[&str] = &["mcp", "offline_access"];

/// The engineer behind an MCP request made with an OAuth access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engineer {
    /// The subject at the tenant's IdP.
    pub subject: String,
    /// How they are shown: the verified email, else the subject.
    pub name: String,
}

/// The issuer (and base of every endpoint) of a tenant's authorization server.
pub fn issuer(public_url: &url::Url, tenant: &str) -> String {
    format!("{}/t/{tenant}", public_url.as_str().trim_end_matches('/'))
}

/// The tenant's MCP URL: the only `resource` its tokens are issued for.
pub fn resource(public_url: &url::Url, tenant: &str) -> String {
    format!("{}/mcp", issuer(public_url, tenant))
}

/// Errors of the authorization server, as OAuth error codes with a description that is safe to
/// show (it never contains a code, token or verifier).
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidClient(String),
    #[error("{0}")]
    InvalidGrant(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidRedirectUri(String),
    #[error("{0}")]
    InvalidClientMetadata(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    TemporarilyUnavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OAuthError {
    /// The OAuth `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidClient(_) => "invalid_client",
            Self::InvalidGrant(_) => "invalid_grant",
            Self::InvalidTarget(_) => "invalid_target",
            Self::InvalidScope(_) => "invalid_scope",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::InvalidRedirectUri(_) => "invalid_redirect_uri",
            Self::InvalidClientMetadata(_) => "invalid_client_metadata",
            Self::AccessDenied(_) => "access_denied",
            Self::TemporarilyUnavailable(_) => "temporarily_unavailable",
            Self::Store(_) => "server_error",
        }
    }
}

/// Checks a presented `csa_` access token for `tenant`, whose MCP URL is `resource`. Like
/// [`agent_tokens::verify`], one query that also tells whether the tenant exists; unknown,
/// expired, revoked, other-tenant and wrong-resource tokens are all [`Verified::Invalid`].
pub async fn verify_access(
    db: &Db,
    tenant: &TenantId,
    presented: &SecretString,
    resource: &str,
    now: UnixSeconds,
) -> Result<(Verified, Option<Engineer>), StoreError> {
    let (id, secret) =
        agent_tokens::split_prefixed(presented.expose_secret(), ACCESS_PREFIX).unwrap_or(("", ""));
    let found = store::access_token(db, tenant, id, now).await?;
    let presented_hash = agent_tokens::hash_secret(secret.as_bytes());
    let Some(found) = found else {
        return Ok((Verified::UnknownTenant, None));
    };
    let Some(token) = found else {
        return Ok((Verified::Invalid, None));
    };
    let matches: bool = presented_hash
        .as_bytes()
        .ct_eq(token.secret_hash.as_bytes())
        .into();
    if !matches || id.is_empty() || token.resource != resource {
        return Ok((Verified::Invalid, None));
    }
    let engineer = Engineer {
        name: token.email.unwrap_or_else(|| token.subject.clone()),
        subject: token.subject,
    };
    let identity = AgentIdentity {
        tenant: tenant.clone(),
        // Grants are bound to the sign-in, so that they outlive the rotation of its tokens.
        token_id: token.family_id,
        token_name: engineer.name.clone(),
    };
    Ok((Verified::Valid(identity), Some(engineer)))
}
