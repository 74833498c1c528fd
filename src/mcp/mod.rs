//! The MCP face of the gateway: tools an agent calls, each a thin translation to a domain call.
//!
//! The caller's identity comes from the HTTP request that carried the call (put there by
//! [`crate::http::auth`]), never from the MCP session.

use std::sync::Arc;

use rmcp::RoleServer;
use rmcp::handler::server::common::Extension;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ProtocolVersion, ServerCapabilities,
    ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, Json, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent_tokens::AgentIdentity;
use crate::app::App;
use crate::environments::{self, EnvironmentSummary};
use crate::http::error::correlation_id;

/// The rmcp handler; one is made per MCP session and shares the [`App`].
#[derive(Clone)]
pub struct CustodianMcp {
    app: Arc<App>,
    tool_router: ToolRouter<Self>,
}

/// Result of `list_environments`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct EnvironmentList {
    /// The environments this agent may request a grant for.
    pub environments: Vec<EnvironmentSummary>,
}

const SERVER_INSTRUCTIONS: &str = "Custodian runs commands that need credentials without giving you the \
credentials. Call list_environments to see which environments exist and which secret names each \
provides; secret values are never shown to you.";

#[tool_router]
impl CustodianMcp {
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        name = "list_environments",
        description = "List the environments (sets of credentials such as a staging database or a \
cloud account) that you can ask a human to grant you access to. Call this first when a task needs \
credentials, to find the environment name to request and the secret names (environment variables) \
a command run there will receive. Also returns each environment's limits: the longest grant \
lifetime (max_ttl_seconds), the most runs per grant (max_uses) and how recently the approver must \
have signed in. Secret values are never returned.",
        annotations(
            title = "List environments",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_environments(
        &self,
        Extension(parts): Extension<http::request::Parts>,
    ) -> Result<Json<EnvironmentList>, McpError> {
        let caller = identity(&parts)?;
        let envs = environments::list(&self.app.db, &caller.tenant)
            .await
            .map_err(|e| internal("listing environments failed", &e))?;
        Ok(Json(EnvironmentList {
            environments: envs.into_iter().map(Into::into).collect(),
        }))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for CustodianMcp {
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if !self.tool_router.has_route(&request.name) {
            let known: Vec<String> = self
                .tool_router
                .list_all()
                .into_iter()
                .map(|t| t.name.into_owned())
                .collect();
            return Err(McpError::invalid_params(
                format!(
                    "unknown tool `{}`; available tools: {}",
                    request.name.chars().take(64).collect::<String>(),
                    known.join(", ")
                ),
                None,
            ));
        }
        let call = ToolCallContext::new(self, request, context);
        self.tool_router.call(call).await
    }

    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("custodian", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(SERVER_INSTRUCTIONS.to_owned());
        info
    }

    fn supported_protocol_versions(&self) -> std::borrow::Cow<'static, [ProtocolVersion]> {
        std::borrow::Cow::Borrowed(&[
            ProtocolVersion::V_2025_06_18,
            ProtocolVersion::V_2025_11_25,
            ProtocolVersion::V_2026_07_28,
        ])
    }
}

/// The authenticated caller of this request.
fn identity(parts: &http::request::Parts) -> Result<&AgentIdentity, McpError> {
    parts
        .extensions
        .get::<AgentIdentity>()
        .ok_or_else(|| internal("request reached a tool without an identity", &"missing"))
}

/// Logs an internal failure once and returns an MCP error that names only a correlation id.
pub fn internal(context: &str, error: &dyn std::fmt::Display) -> McpError {
    let id = correlation_id();
    tracing::error!(correlation.id = %id, error = %error, "{context}");
    McpError::internal_error(
        format!("internal error; quote correlation id {id} to your operator"),
        None,
    )
}
