//! Authentication of every MCP request.
//!
//! Guarantees:
//! - Each request is authenticated on its own; an MCP session never stands in for a token.
//! - A missing, malformed, unknown, revoked or other-tenant token gets the same `401` with the
//!   RFC 9728 `resource_metadata` pointer (GET, POST and DELETE alike), and so does any request to
//!   a tenant that does not exist: status, body and headers do not tell whether a tenant exists.
//! - A session is bound to the token that created it: the same session id presented with any other
//!   token is answered as an unknown session (`404`).
//! - Requests inside a session must name a supported `MCP-Protocol-Version`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;

use super::error::HttpError;
use crate::agent_tokens::{self, AgentIdentity, Verified};
use crate::app::App;
use crate::tenants::TenantId;

const SESSION_HEADER: &str = "mcp-session-id";
const PROTOCOL_HEADER: &str = "mcp-protocol-version";

/// Protocol versions served; the header is required from 2025-06-18 on, so older ones are refused.
pub const SUPPORTED_PROTOCOL_VERSIONS: &[&str] = &["2025-06-18", "2025-11-25", "2026-07-28"];

/// Which token opened each live MCP session.
#[derive(Debug)]
pub struct SessionBindings {
    idle_timeout: Duration,
    bindings: Mutex<HashMap<String, Binding>>,
}

#[derive(Debug)]
struct Binding {
    tenant: TenantId,
    token_id: String,
    last_seen: Instant,
}

enum SessionCheck {
    /// No session id: an `initialize` or a stateless (2026-07-28) request.
    None,
    Known,
    Foreign,
}

impl SessionBindings {
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout,
            bindings: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, session: Option<&str>, who: &AgentIdentity) -> SessionCheck {
        let Some(session) = session else {
            return SessionCheck::None;
        };
        let mut bindings = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
        match bindings.get_mut(session) {
            Some(b) if b.tenant == who.tenant && b.token_id == who.token_id => {
                b.last_seen = Instant::now();
                SessionCheck::Known
            }
            _ => SessionCheck::Foreign,
        }
    }

    fn bind(&self, session: &str, who: &AgentIdentity) {
        let mut bindings = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
        let idle = self.idle_timeout;
        bindings.retain(|_, b| b.last_seen.elapsed() < idle);
        bindings.insert(
            session.to_owned(),
            Binding {
                tenant: who.tenant.clone(),
                token_id: who.token_id.clone(),
                last_seen: Instant::now(),
            },
        );
    }

    fn unbind(&self, session: &str) {
        let mut bindings = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
        bindings.remove(session);
    }
}

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
    let metadata = metadata_url(&app, tenant_id.as_str());
    let token = bearer(request.headers());
    let presented = token
        .clone()
        .unwrap_or_else(|| SecretString::from(String::new()));
    // An unknown tenant answers exactly like a known one without a valid token, so that tenant
    // names cannot be enumerated.
    let identity = match agent_tokens::verify(&app.db, &tenant_id, &presented).await {
        Ok(Verified::Valid(identity)) => identity,
        Ok(Verified::Invalid | Verified::UnknownTenant) if token.is_none() => {
            return HttpError::unauthorized(
                &metadata,
                "an agent token is required: send Authorization: Bearer cst_…",
                false,
            )
            .into_response();
        }
        Ok(Verified::Invalid | Verified::UnknownTenant) => {
            return HttpError::unauthorized(
                &metadata,
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
    let checked = app.sessions.check(session.as_deref(), &identity);
    if matches!(checked, SessionCheck::Foreign) {
        return HttpError::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            "unknown MCP session; initialize a new one",
        )
        .into_response();
    }
    // Inside a session the header is mandatory; outside one (initialize, or a stateless
    // 2026-07-28 request) it is checked when present.
    let required = matches!(checked, SessionCheck::Known);
    if let Err(error) = check_protocol_header(request.headers(), required) {
        return error.into_response();
    }

    let is_delete = request.method() == axum::http::Method::DELETE;
    request.extensions_mut().insert(identity.clone());
    let response = next.run(request).await;

    match (&session, checked) {
        (None, SessionCheck::None) if response.status().is_success() => {
            if let Some(created) = response
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                app.sessions.bind(created, &identity);
            }
        }
        (Some(session), SessionCheck::Known) if is_delete && response.status().is_success() => {
            app.sessions.unbind(session)
        }
        _ => {}
    }
    response
}

fn check_protocol_header(headers: &HeaderMap, required: bool) -> Result<(), HttpError> {
    let mut values = headers.get_all(PROTOCOL_HEADER).iter();
    let first = values.next();
    let first = if values.next().is_some() {
        Some(Err(())) // several values: none of them is "the" version
    } else {
        first.map(|v| v.to_str().map_err(drop))
    };
    match first {
        None if !required => Ok(()),
        None => Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "missing_protocol_version",
            format!(
                "the MCP-Protocol-Version header is required; supported: {}",
                SUPPORTED_PROTOCOL_VERSIONS.join(", ")
            ),
        )),
        Some(Ok(v)) if SUPPORTED_PROTOCOL_VERSIONS.contains(&v) => Ok(()),
        Some(_) => Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_protocol_version",
            format!(
                "unsupported MCP-Protocol-Version; supported: {}",
                SUPPORTED_PROTOCOL_VERSIONS.join(", ")
            ),
        )),
    }
}
