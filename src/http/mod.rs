//! The HTTP surface: the MCP endpoint per tenant, RFC 9728 metadata, the tenants' authorization
//! servers (`crate::oauth::http`), and health probes.

pub mod approve;
pub mod auth;
pub mod direct;
pub mod error;
pub mod guard;
pub mod jsonrpc;
pub mod serve;
pub mod sessions;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::mcp::CustodianMcp;
use error::HttpError;
use guard::OriginPolicy;
use sessions::manager::ReplicaSessionManager;

/// The longest pause between SSE keep-alives on an open MCP stream.
const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Builds the gateway's router. `shutdown` ends open MCP streams when cancelled.
pub fn router(app: Arc<App>, shutdown: CancellationToken) -> Router {
    let server = &app.config.server;
    let policy = Arc::new(OriginPolicy::new(
        &server.public_url,
        &server.allowed_hosts,
        &server.allowed_origins,
    ));
    let mcp_config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(policy.hosts().to_vec())
        .with_allowed_origins(policy.origins_with_ports())
        .enforce_origin_validation()
        .with_max_request_body_bytes(server.max_body_bytes)
        // Long answers must keep moving to outlive the connection idle timeout (see `serve`).
        .with_sse_keep_alive(Some((server.idle_timeout / 3).min(SSE_KEEP_ALIVE)))
        .with_cancellation_token(shutdown);
    // Any replica serves any session: one it does not hold is re-created from the database.
    let mut mcp_config = mcp_config;
    mcp_config.session_store = Some(app.sessions.clone());
    let handler_app = app.clone();
    let mcp = SharedMcp(Arc::new(StreamableHttpService::new(
        move || Ok(CustodianMcp::new(handler_app.clone())),
        app.sessions.manager(),
        mcp_config,
    )));

    let tenant_routes = Router::new()
        .route_service("/t/{tenant}/mcp", mcp)
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            jsonrpc::validate,
        ))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            auth::authenticate,
        ))
        .route(
            "/.well-known/oauth-protected-resource/t/{tenant}/mcp",
            get(protected_resource_metadata),
        )
        .route("/approve/{id}", get(approve::page))
        .layer(middleware::from_fn_with_state(
            policy.clone(),
            guard::check_origin,
        ));

    let sign_in = crate::oauth::http::routes()
        .layer(middleware::from_fn_with_state(policy, guard::check_origin));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .merge(tenant_routes)
        .merge(sign_in)
        .with_state(app)
}

/// rmcp's service behind an `Arc`: the router clones its service for every request, and rmcp's
/// clones its whole configuration (host and origin lists included).
#[derive(Clone)]
struct SharedMcp(Arc<StreamableHttpService<CustodianMcp, ReplicaSessionManager>>);

impl tower::Service<axum::extract::Request> for SharedMcp {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move { Ok(service.handle(request).await.map(axum::body::Body::new)) })
    }
}

/// Ready when the database answers.
async fn ready(State(app): State<Arc<App>>) -> Response {
    match app.db.ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

/// RFC 9728 protected-resource metadata for a tenant's MCP endpoint.
///
/// The document is built from the URL alone, without looking the tenant up, so that it is the
/// same for every well-formed tenant id and does not reveal which tenants exist (the `401` of the
/// MCP endpoint points here for unknown tenants too). Its authorization server is Custodian's own
/// for the tenant (`crate::oauth`), which delegates sign-in to the tenant's IdP; the IdP itself is
/// not named, and its tokens are not accepted here.
async fn protected_resource_metadata(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
) -> Response {
    let Ok(tenant) = crate::tenants::TenantId::parse(&tenant) else {
        return HttpError::new(StatusCode::NOT_FOUND, "not_found", "no such tenant")
            .into_response();
    };
    let base = app.config.server.public_url.as_str().trim_end_matches('/');
    Json(json!({
        "resource": format!("{base}/t/{tenant}/mcp"),
        "authorization_servers": [crate::oauth::issuer(&app.config.server.public_url, tenant.as_str())],
        "scopes_supported": crate::oauth::SCOPES,
        "bearer_methods_supported": ["header"],
        "resource_name": "Custodian",
    }))
    .into_response()
}
