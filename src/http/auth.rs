//! Authentication of every MCP request.
//!
//! Guarantees:
//! - Each request is authenticated on its own; an MCP session never stands in for a token.
//! - Agent tokens (`cst_`) and OAuth access tokens (`csa_`, issued by the tenant's authorization
//!   server in `crate::oauth`, bound to this tenant's MCP URL) are accepted; an OAuth request also
//!   carries the signed-in [`oauth::Engineer`] to the handler.
//! - A missing, malformed, unknown, expired, revoked or other-tenant token gets the same `401` with the
//!   RFC 9728 `resource_metadata` pointer (GET, POST and DELETE alike), and so does any request to
//!   a tenant that does not exist: status, body and headers do not tell whether a tenant exists.
//! - A session is bound to the token that created it, on every replica: the same session id
//!   presented with any other token is answered as an unknown session (`404`).
//! - A request's `MCP-Protocol-Version`, when present, must name a supported version; inside a
//!   session it may be left out (the session's negotiated version applies, as the spec allows for
//!   2025-03-26 clients).
//! - Ending a session with `DELETE` answers `204 No Content`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};

use super::error::HttpError;
use super::sessions::{BindError, SessionCheck};
use crate::agent_tokens::{self, Verified};
use crate::app::App;
use crate::oauth;
use crate::tenants::TenantId;

const SESSION_HEADER: &str = "mcp-session-id";
const PROTOCOL_HEADER: &str = "mcp-protocol-version";

/// Protocol versions served.
pub const SUPPORTED_PROTOCOL_VERSIONS: &[&str] =
    &["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"];

/// The URL of the RFC 9728 document for a tenant's MCP endpoint.
pub fn metadata_url(app: &App, tenant: &str) -> String {
    let base = app.config.server.public_url.as_str().trim_end_matches('/');
    format!("{base}/.well-known/oauth-protected-resource/t/{tenant}/mcp")
}

fn bearer(headers: &HeaderMap) -> Option<SecretString> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| SecretString::from(token.trim().to_owned()))
}

/// Middleware for `/t/{tenant}/mcp`: resolves the tenant, verifies the bearer token, enforces the
/// session binding and protocol header, and hands the [`AgentIdentity`] to the MCP handler through
/// the request extensions.
pub async fn authenticate(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    mut request: Request,
    next: Next,
) -> Response {
    let not_found =
        || HttpError::new(StatusCode::NOT_FOUND, "not_found", "no such tenant").into_response();
    let Ok(tenant_id) = TenantId::parse(&tenant) else {
        return not_found();
    };
    let token = bearer(request.headers());
    let presented = token
        .clone()
        .unwrap_or_else(|| SecretString::from(String::new()));
    // An unknown tenant answers exactly like a known one without a valid token, so that tenant
    // names cannot be enumerated.
    let verified = if presented.expose_secret().starts_with(oauth::ACCESS_PREFIX) {
        let resource = oauth::resource(&app.config.server.public_url, tenant_id.as_str());
        oauth::verify_access(&app.db, &tenant_id, &presented, &resource, app.clock.now()).await
    } else {
        agent_tokens::verify_cached(&app.caches, &app.db, &tenant_id, &presented)
            .await
            .map(|verified| (verified, None))
    };
    let (identity, engineer) = match verified {
        Ok((Verified::Valid(identity), engineer)) => (identity, engineer),
        Ok((Verified::Invalid | Verified::UnknownTenant, _)) if token.is_none() => {
            return HttpError::unauthorized(
                &metadata_url(&app, tenant_id.as_str()),
                "an agent token is required: send Authorization: Bearer cst_…",
                false,
            )
            .into_response();
        }
        Ok((Verified::Invalid | Verified::UnknownTenant, _)) => {
            return HttpError::unauthorized(
                &metadata_url(&app, tenant_id.as_str()),
                "the agent token is not valid for this tenant",
                true,
            )
            .into_response();
        }
        Err(e) => return HttpError::internal("token verification failed", &e).into_response(),
    };
    drop((token, presented));

    let session = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let checked = match app.sessions.check(session.as_deref(), &identity).await {
        Ok(checked) => checked,
        Err(e) => {
            return HttpError::internal("looking up an MCP session failed", &e).into_response();
        }
    };
    if matches!(checked, SessionCheck::Foreign) {
        return HttpError::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            "unknown MCP session; initialize a new one",
        )
        .into_response();
    }
    // Without the header, rmcp applies the session's negotiated version (2025-03-26 clients
    // send none); a header that is present must name a supported version.
    if let Err(error) = check_protocol_header(request.headers()) {
        return error.into_response();
    }

    let is_delete = request.method() == Method::DELETE;
    request.extensions_mut().insert(identity.clone());
    if let Some(engineer) = engineer {
        request.extensions_mut().insert(engineer);
    }
    let mut response = next.run(request).await;

    match (&session, checked) {
        (None, SessionCheck::None) if response.status().is_success() => {
            let created = response
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(created) = created
                && let Err(refused) = app.sessions.bind(&created, &identity).await
            {
                app.sessions.close(&created).await;
                let BindError::Limit(limit) = refused else {
                    return HttpError::internal("recording an MCP session failed", &refused)
                        .into_response();
                };
                // The client is told; at debug so that a flood of attempts cannot flood the log.
                tracing::debug!(tenant.id = %identity.tenant, agent.token = %identity.token_name, "MCP session refused: {limit}");
                return super::jsonrpc::too_many_sessions(&limit.to_string());
            }
        }
        (Some(session), SessionCheck::Known) if is_delete && response.status().is_success() => {
            app.sessions.forget(session);
            // rmcp answers 202; the SDKs expect 200 or 204 (the Python SDK logs 202 as a failure).
            *response.status_mut() = StatusCode::NO_CONTENT;
            response.headers_mut().remove(header::CONTENT_LENGTH);
            *response.body_mut() = axum::body::Body::empty();
        }
        _ => {}
    }
    response
}

fn check_protocol_header(headers: &HeaderMap) -> Result<(), HttpError> {
    let mut values = headers.get_all(PROTOCOL_HEADER).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    // Several values: none of them is "the" version.
    let single = values.next().is_none().then_some(first);
    match single.map(HeaderValue::to_str) {
        Some(Ok(v)) if SUPPORTED_PROTOCOL_VERSIONS.contains(&v) => Ok(()),
        _ => Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_protocol_version",
            format!(
                "unsupported MCP-Protocol-Version; supported: {}",
                SUPPORTED_PROTOCOL_VERSIONS.join(", ")
            ),
        )),
    }
}
