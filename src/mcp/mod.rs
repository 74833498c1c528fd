//! The MCP face of the gateway: tools an agent calls, each a thin translation to a domain call.
//!
//! The caller's identity comes from the HTTP request that carried the call (put there by
//! [`crate::http::auth`]), never from the MCP session.

pub mod logs;
pub mod run_result;

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

use std::time::Duration;

use rmcp::handler::server::tool::IntoCallToolResult;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ProgressNotificationParam};

use crate::agent_tokens::AgentIdentity;
use crate::app::App;
use crate::cache::EnvironmentsAnswer;
use crate::environments::{self, EnvironmentSummary};
use crate::grants::{self, GrantError, GrantStatus, RequestArgs, RequestedGrant};
use crate::http::error::correlation_id;
use crate::runs::{self, RunArgs, RunError, RunResult};

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
provides, request_grant to ask your human for access to one of them for this task (relay the \
message it returns), grant_status with wait_seconds until the grant is active, run to execute \
commands with the environment's secrets as environment variables, then revoke_grant when done. \
Secret values are never shown to you.";

#[tool_router]
impl CustodianMcp {
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            tool_router: TOOLS.clone(),
        }
    }

    #[tool(
        name = "request_grant",
        description = "Ask a human for access to one environment for this task. Returns a grant_id \
and a message with an approval link and code: relay the message to your human verbatim, then call \
grant_status with wait_seconds to wait for their decision. Once the grant is active, pass its \
grant_id to `run`; when the task is done, call revoke_grant. Say in `purpose` exactly what you need \
the credentials for; the approver reads it. ttl_seconds and max_uses are capped by the \
environment's limits (see list_environments).",
        annotations(
            title = "Request a task grant",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn request_grant(
        &self,
        Parameters(args): Parameters<RequestArgs>,
        Extension(parts): Extension<http::request::Parts>,
        context: RequestContext<RoleServer>,
    ) -> Result<Json<RequestedGrant>, ToolError> {
        let caller = identity(&parts)?;
        let requester = parts.extensions.get::<crate::oauth::Engineer>();
        let requested = grants::request(&self.app, caller, requester, args).await?;
        offer_url_elicitation(&context, &requested);
        Ok(Json(requested))
    }

    #[tool(
        name = "grant_status",
        description = "Check a grant's state: pending (waiting for the human), active (usable with \
`run`), or ended (exhausted, expired, revoked, denied, with the reason). With wait_seconds (up to \
240) it waits for the state to change and returns as soon as it does, sending progress \
notifications meanwhile; call it again if it is still pending. Also returns who approved, when the \
grant expires and how many runs are left.",
        annotations(
            title = "Grant status",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn grant_status(
        &self,
        Parameters(args): Parameters<GrantStatusArgs>,
        Extension(parts): Extension<http::request::Parts>,
        context: RequestContext<RoleServer>,
    ) -> Result<Json<GrantStatus>, ToolError> {
        let caller = identity(&parts)?;
        let wait = args.wait_seconds.unwrap_or(0);
        if wait > grants::MAX_WAIT_SECONDS {
            return Err(ToolError::Refused(format!(
                "wait_seconds: at most {} (the agent's tool call would time out), got {wait}",
                grants::MAX_WAIT_SECONDS
            )));
        }
        let token = context.meta.get_progress_token();
        let peer = context.peer.clone();
        let status = grants::wait(
            &self.app,
            caller,
            &args.grant_id,
            Duration::from_secs(wait),
            &move |done: u64, total: u64| {
                let (peer, token) = (peer.clone(), token.clone());
                Box::pin(async move {
                    if let Some(token) = token {
                        let mut note = ProgressNotificationParam::new(token, done as f64);
                        note.total = Some(total as f64);
                        note.message = Some("waiting for the approver".to_owned());
                        let _ = peer.notify_progress(note).await;
                    }
                })
            },
        )
        .await?;
        Ok(Json(status))
    }

    #[tool(
        name = "run",
        description = "Run one command with an active grant's credentials. The environment's \
secrets are set as environment variables of the command (names from list_environments), so refer \
to them as $NAME inside `command` or let the program read them; you never see their values. Give \
`argv` (a list: program and arguments) or `command` (one shell line, run with /bin/sh -c), \
optionally `stdin` and `timeout_seconds`. Each call uses one of the grant's runs. The command runs \
in a fresh, empty working directory that is deleted afterwards: nothing persists between runs. \
Returns exit_code, stdout, stderr, and how many times each secret was found and replaced by \
[REDACTED:NAME] in the output.",
        output_schema = rmcp::handler::server::tool::schema_for_output::<RunResult>(),
        annotations(
            title = "Run a command with a grant",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn run(
        &self,
        Parameters(args): Parameters<RunArgs>,
        Extension(parts): Extension<http::request::Parts>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolError> {
        let caller = identity(&parts)?;
        let result = runs::run(&self.app, caller, args).await?;
        let form = run_result::TextForm::for_version(context.protocol_version().as_ref());
        let id_bytes = run_result::serialized_len(&context.id);
        Ok(run_result::to_call_tool_result(result, form, id_bytes))
    }

    #[tool(
        name = "revoke_grant",
        description = "End a grant as soon as the task no longer needs it (pending or active). \
Afterwards no command can run under it. Grants also end by themselves when they expire or their \
uses run out.",
        annotations(
            title = "Revoke a grant",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn revoke_grant(
        &self,
        Parameters(args): Parameters<GrantIdArgs>,
        Extension(parts): Extension<http::request::Parts>,
    ) -> Result<Json<GrantStatus>, ToolError> {
        let caller = identity(&parts)?;
        Ok(Json(
            grants::revoke(&self.app, caller, &args.grant_id).await?,
        ))
    }

    #[tool(
        name = "list_environments",
        description = "List the environments (sets of credentials such as a staging database or a \
cloud account) that you can ask a human to grant you access to. Call this first when a task needs \
credentials, to find the environment name to request and the secret names (environment variables) \
a command run there will receive. Also returns each environment's limits: the longest grant \
lifetime (max_ttl_seconds), the most runs per grant (max_uses) and how recently the approver must \
have signed in, and where its runs may connect (egress: nothing else is reachable), with any \
credential the runner adds to requests there for you. Secret values are never returned.",
        output_schema = rmcp::handler::server::tool::schema_for_output::<EnvironmentList>(),
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
    ) -> Result<CallToolResult, ToolError> {
        let answer = list_environments(&self.app, identity(&parts)?).await?;
        Ok(answer.result.clone())
    }
}

/// `list_environments` for `caller`: the same answer until an environment or egress rule of any
/// tenant changes (see `crate::cache`). Also answered without rmcp (see [`crate::http::direct`]).
pub async fn list_environments(
    app: &App,
    caller: &AgentIdentity,
) -> Result<Arc<EnvironmentsAnswer>, ToolError> {
    let failed =
        |e: &dyn std::fmt::Display| ToolError::Internal(internal("listing environments failed", e));
    let (db, caches) = (&app.db, &app.caches);
    let ticket = caches.fresh(db).await.map_err(|e| failed(&e))?;
    if let Some(answer) = caches.environments(&caller.tenant) {
        return Ok(answer);
    }
    let envs = environments::list(db, &caller.tenant)
        .await
        .map_err(|e| failed(&e))?;
    let egress = crate::egress::by_environment(db, &caller.tenant)
        .await
        .map_err(|e| failed(&e))?;
    let list = EnvironmentList {
        environments: envs
            .into_iter()
            .map(|env| {
                let rules = egress.get(&env.name).map(Vec::as_slice).unwrap_or_default();
                EnvironmentSummary::new(env, rules)
            })
            .collect(),
    };
    let result = CallToolResult::structured(serde_json::to_value(list).map_err(|e| failed(&e))?);
    let json =
        serde_json::to_string(&legacy_result(result.clone().into())).map_err(|e| failed(&e))?;
    let answer = Arc::new(EnvironmentsAnswer { result, json });
    caches.keep_environments(ticket, &caller.tenant, Arc::clone(&answer));
    Ok(answer)
}

/// A tool call's result in the shape rmcp gives peers of protocol versions before 2026-07-28 (no
/// `resultType`, object-only structured output), as the direct answers of `http::direct` need it.
pub fn legacy_result(response: CallToolResponse) -> rmcp::model::ServerResult {
    let mut result = rmcp::model::ServerResult::from(response);
    result.strip_result_type_for_legacy_peer();
    result.strip_non_object_output_for_legacy_peer();
    result
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
            ProtocolVersion::V_2025_03_26,
            ProtocolVersion::V_2025_06_18,
            ProtocolVersion::V_2025_11_25,
            ProtocolVersion::V_2026_07_28,
        ])
    }
}

/// The tools with their schemas as clients get them: built once, with [`standard_formats`].
static TOOLS: std::sync::LazyLock<ToolRouter<CustodianMcp>> = std::sync::LazyLock::new(|| {
    let mut router = CustodianMcp::tool_router();
    for route in router.map.values_mut() {
        let tool = &mut route.attr;
        tool.input_schema = Arc::new(standard_formats(&tool.input_schema));
        if let Some(output) = &tool.output_schema {
            tool.output_schema = Some(Arc::new(standard_formats(output)));
        }
    }
    router
});

/// `format` values a standard JSON Schema validator knows: those of draft 2020-12 and OpenAPI's
/// numeric ones.
const KNOWN_FORMATS: &[&str] = &[
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
    "int32",
    "int64",
    "float",
    "double",
];

/// `schema` without the `format` values schemars makes up for Rust's unsigned integers (`uint64`
/// and the like), which stock validators warn about on every result they check (the TypeScript
/// SDK's Ajv prints `unknown format "uint64" ignored`). Their range stays as `minimum: 0`.
fn standard_formats(schema: &rmcp::model::JsonObject) -> rmcp::model::JsonObject {
    fn strip(map: &mut rmcp::model::JsonObject) {
        let unknown = map
            .get("format")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|format| !KNOWN_FORMATS.contains(&format));
        if unknown {
            map.remove("format");
        }
        map.values_mut().for_each(walk);
    }
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => strip(map),
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut schema = schema.clone();
    strip(&mut schema);
    schema
}

/// The authenticated caller of this request.
fn identity(parts: &http::request::Parts) -> Result<&AgentIdentity, ToolError> {
    parts.extensions.get::<AgentIdentity>().ok_or_else(|| {
        ToolError::Internal(internal(
            "request reached a tool without an identity",
            &"missing",
        ))
    })
}

/// Arguments naming one grant.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantIdArgs {
    /// The grant_id returned by request_grant.
    pub grant_id: String,
}

/// Arguments of `grant_status`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantStatusArgs {
    /// The grant_id returned by request_grant.
    pub grant_id: String,
    /// Wait up to this many seconds (at most 240) for the state to change.
    pub wait_seconds: Option<u64>,
}

/// How a tool call fails: refusals the agent should read (a tool result with `isError`), or an
/// internal failure (a JSON-RPC error naming only a correlation id).
#[derive(Debug)]
pub enum ToolError {
    Refused(String),
    Internal(McpError),
}

impl From<GrantError> for ToolError {
    fn from(error: GrantError) -> Self {
        match error {
            GrantError::Internal(e) => ToolError::Internal(internal("grant operation failed", &e)),
            refused => ToolError::Refused(refused.to_string()),
        }
    }
}

impl From<RunError> for ToolError {
    fn from(error: RunError) -> Self {
        match error {
            RunError::Grant(e) => e.into(),
            RunError::Secrets(e) => {
                ToolError::Internal(internal("opening secrets for a run failed", &e))
            }
            refused => ToolError::Refused(refused.to_string()),
        }
    }
}

impl IntoCallToolResult for ToolError {
    fn into_call_tool_result(self) -> Result<CallToolResponse, McpError> {
        match self {
            ToolError::Refused(message) => {
                Ok(CallToolResult::error(vec![ContentBlock::text(message)]).into())
            }
            ToolError::Internal(error) => Err(error),
        }
    }
}

/// How long an offered URL elicitation waits for the client's answer. Behind a load balancer the
/// answer may reach another replica and never come back here; the wait must end anyway.
const ELICITATION_WAIT: Duration = Duration::from_secs(600);

/// Offers the approval page as a URL-mode elicitation when the client declared support; the text
/// path (the returned message) works without it. Fire and forget: the approval itself happens at
/// the IdP, whatever the client answers.
fn offer_url_elicitation(context: &RequestContext<RoleServer>, requested: &RequestedGrant) {
    let declared = context.peer.peer_info().is_some_and(|info| {
        info.capabilities
            .elicitation
            .as_ref()
            .is_some_and(|e| e.url.is_some())
    });
    let Ok(url) = url::Url::parse(&requested.approval_url) else {
        return;
    };
    if !declared {
        return;
    }
    let peer = context.peer.clone();
    let message = requested.message.clone();
    let id = requested.grant_id.clone();
    tokio::spawn(async move {
        if let Err(e) = peer
            .elicit_url_with_timeout(message, url, id, Some(ELICITATION_WAIT))
            .await
        {
            tracing::debug!(error = %e, "URL elicitation not taken up by the client");
        }
    });
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
