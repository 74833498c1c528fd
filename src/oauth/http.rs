//! The authorization server's HTTP endpoints (mounted by `crate::http::router`).
//!
//! - `GET /.well-known/oauth-authorization-server/t/{tenant}`: RFC 8414 metadata, built from the
//!   URL alone (the same for every well-formed tenant id).
//! - `POST /t/{tenant}/oauth/register`: RFC 7591 registration.
//! - `GET /t/{tenant}/oauth/authorize`: starts a sign-in; redirects to the tenant's IdP.
//! - `GET /t/{tenant}/oauth/callback`: the IdP's redirect back; redirects to the client.
//! - `POST /t/{tenant}/oauth/token`: code redemption and refresh.
//!
//! Token answers carry `Cache-Control: no-store`; errors are OAuth error bodies.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use secrecy::ExposeSecret;
use serde_json::json;

use super::flow::{
    self, AuthorizationRequest, CallbackQuery, Next, RegistrationRequest, Server, TokenRequest,
};
use super::{OAuthError, SCOPES};
use crate::app::App;
use crate::tenants::TenantId;

/// Largest registration or token request body read.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// The authorization server's routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/.well-known/oauth-authorization-server/t/{tenant}",
            get(metadata),
        )
        .route("/t/{tenant}/oauth/register", post(register))
        .route("/t/{tenant}/oauth/authorize", get(authorize))
        .route("/t/{tenant}/oauth/callback", get(callback))
        .route("/t/{tenant}/oauth/token", post(token))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
}

fn server(app: &App) -> Server<'_> {
    Server {
        db: &app.db,
        oidc: &app.oidc,
        master_key: &app.master_key,
        public_url: &app.config.server.public_url,
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::InvalidClient(_) => StatusCode::UNAUTHORIZED,
            Self::TemporarilyUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(e) => {
                return crate::http::error::HttpError::internal("OAuth request failed", e)
                    .into_response();
            }
            _ => StatusCode::BAD_REQUEST,
        };
        let body = json!({ "error": self.code(), "error_description": self.to_string() });
        (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
    }
}

fn tenant_id(tenant: &str) -> Result<TenantId, OAuthError> {
    TenantId::parse(tenant).map_err(|_| {
        OAuthError::InvalidRequest("sign-in is not available at this endpoint".to_owned())
    })
}

async fn metadata(State(app): State<Arc<App>>, Path(tenant): Path<String>) -> Response {
    let tenant = match tenant_id(&tenant) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let issuer = super::issuer(&app.config.server.public_url, tenant.as_str());
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/oauth/authorize"),
        "token_endpoint": format!("{issuer}/oauth/token"),
        "registration_endpoint": format!("{issuer}/oauth/register"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": SCOPES,
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": false,
    }))
    .into_response()
}

async fn register(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let result = async {
        let tenant = tenant_id(&tenant)?;
        let request: RegistrationRequest = serde_json::from_slice(&body).map_err(|e| {
            OAuthError::InvalidClientMetadata(format!("the registration is not valid JSON: {e}"))
        })?;
        flow::register(&server(&app), &tenant, request, app.clock.now()).await
    }
    .await;
    match result {
        Ok(registration) => (StatusCode::CREATED, Json(registration)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A page for errors that must not be redirected to an unverified redirect URI.
fn error_page(error: &OAuthError) -> Response {
    if let OAuthError::Store(_) = error {
        return crate::http::error::HttpError::internal("sign-in failed", error).into_response();
    }
    let text = html_escape::encode_text(&error.to_string()).into_owned();
    (
        StatusCode::BAD_REQUEST,
        [(header::CACHE_CONTROL, "no-store")],
        Html(format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign-in failed</title></head>\
             <body><h1>Sign-in failed</h1><p>{}: {text}</p></body></html>",
            error.code()
        )),
    )
        .into_response()
}

fn go(next: Result<Next, OAuthError>) -> Response {
    match next {
        Ok(Next::SignIn(url) | Next::Client(url)) => {
            let mut response = Redirect::to(url.as_str()).into_response();
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(e) => error_page(&e),
    }
}

async fn authorize(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    Query(request): Query<AuthorizationRequest>,
) -> Response {
    let next = match tenant_id(&tenant) {
        Ok(tenant) => flow::authorize(&server(&app), &tenant, request, app.clock.now()).await,
        Err(e) => Err(e),
    };
    go(next)
}

async fn callback(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let next = match tenant_id(&tenant) {
        Ok(tenant) => flow::finish_sign_in(&server(&app), &tenant, query, app.clock.now()).await,
        Err(e) => Err(e),
    };
    go(next)
}

async fn token(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    form: Result<Form<TokenRequest>, axum::extract::rejection::FormRejection>,
) -> Response {
    let result = async {
        let tenant = tenant_id(&tenant)?;
        let Form(request) = form.map_err(|_| {
            OAuthError::InvalidRequest(
                "send the token request as application/x-www-form-urlencoded".to_owned(),
            )
        })?;
        let server = server(&app);
        let now = app.clock.now();
        match request.grant_type.as_deref() {
            Some("authorization_code") => flow::redeem_code(&server, &tenant, &request, now).await,
            Some("refresh_token") => flow::refresh(&server, &tenant, &request, now).await,
            _ => Err(OAuthError::UnsupportedGrantType(
                "grant_type must be authorization_code or refresh_token".to_owned(),
            )),
        }
    }
    .await;
    match result {
        Ok(issued) => (
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
            ],
            Json(json!({
                "access_token": issued.access_token.expose_secret(),
                "token_type": "Bearer",
                "expires_in": issued.expires_in,
                "refresh_token": issued.refresh_token.expose_secret(),
                "scope": issued.scope,
            })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}
