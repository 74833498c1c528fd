//! Tool calls the gateway answers itself, without a trip through rmcp's session worker.
//!
//! rmcp serves every request of a session through that session's worker task: the request is
//! handed to the worker, which starts the handler on a task of its own, and the answer travels back
//! through the worker to an SSE stream made for that one request. A call whose answer needs
//! nothing from the session (no progress notification, no request to the client, no cancellation
//! while it runs, one form for all the protocol versions answered here) does not need any of that. For those calls
//! this module builds the same JSON-RPC answer from the same tool function and sends it as
//! `application/json`, which the streamable HTTP transport allows for any request and every client
//! must accept. The profile of the load benchmark put most of a cheap call's time in that trip.
//!
//! Guarantees:
//! - It runs after every check of the MCP endpoint (Host/Origin, the token, the session's binding
//!   to the token, the protocol header, the JSON-RPC shape): a call answered here passed all of
//!   them; on this path the body is parsed once.
//! - It answers only `tools/call` of a tool in [`DIRECT_TOOLS`] with no arguments, no `_meta` and
//!   no other fields, inside a session (`Mcp-Session-Id`) of a protocol version that has sessions
//!   (2025-03-26 to 2025-11-25), with the `Accept` and `Content-Type` rmcp requires. Anything else,
//!   down to a field it does not expect, goes to rmcp unchanged, so rmcp's answers to everything
//!   out of the ordinary stay rmcp's.
//! - The answer is the JSON-RPC message rmcp would send for the call, built with rmcp's own types
//!   from the function its tool handler calls, in the shape rmcp gives peers of these versions.

use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rmcp::handler::server::tool::IntoCallToolResult;
use rmcp::model::{RequestId, ServerJsonRpcMessage};
use serde_json::{Map, Value};

use crate::agent_tokens::AgentIdentity;
use crate::app::App;

/// Tools whose answer needs nothing from the MCP session: read-only, no arguments, immediate.
pub const DIRECT_TOOLS: &[&str] = &["list_environments"];

/// Protocol versions that have sessions (2026-07-28 requests are rmcp's stateless path).
const SESSION_VERSIONS: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25"];

/// The answer to `message` if it is a call this module answers (see the module docs), else `None`.
pub async fn answer(app: &App, parts: &Parts, message: &Map<String, Value>) -> Option<Response> {
    if !plain_session_request(&parts.headers) {
        return None;
    }
    let (id, tool) = direct_call(message)?;
    let caller = parts.extensions.get::<AgentIdentity>()?;
    let answered = match tool {
        "list_environments" => crate::mcp::list_environments(app, caller).await,
        _ => return None,
    };
    let body = match answered {
        // The answer was serialized once, when it was cached.
        Ok(answer) => {
            let id = serde_json::to_string(&id).ok()?;
            format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{}}}"#, answer.json).into_bytes()
        }
        Err(error) => {
            let reply = match error.into_call_tool_result() {
                Ok(response) => {
                    ServerJsonRpcMessage::response(crate::mcp::legacy_result(response), id)
                }
                Err(error) => ServerJsonRpcMessage::error(error, Some(id)),
            };
            serde_json::to_vec(&reply).ok()?
        }
    };
    Some(
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
    )
}

/// A session request with the headers rmcp's session path takes without comment.
fn plain_session_request(headers: &HeaderMap) -> bool {
    let single = |name: &str| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok(),
            _ => None,
        }
    };
    let content_type = single(header::CONTENT_TYPE.as_str()).is_some_and(|v| {
        let essence = v.split_once(';').map_or(v, |(essence, _)| essence);
        essence.trim().eq_ignore_ascii_case("application/json")
    });
    let (mut json, mut sse) = (false, false);
    for value in headers.get_all(header::ACCEPT) {
        for accepted in value.to_str().unwrap_or_default().split(',') {
            let essence = accepted.split(';').next().unwrap_or_default().trim();
            json |= essence.eq_ignore_ascii_case("application/json");
            sse |= essence.eq_ignore_ascii_case("text/event-stream");
        }
    }
    let version = match headers.get_all("mcp-protocol-version").iter().count() {
        0 => true,
        _ => single("mcp-protocol-version").is_some_and(|v| SESSION_VERSIONS.contains(&v)),
    };
    content_type
        && json
        && sse
        && version
        && single("mcp-session-id").is_some()
        && !headers.contains_key("mcp-method")
        && !headers.contains_key("mcp-name")
}

/// The request id and tool of a `tools/call` of a [`DIRECT_TOOLS`] tool with nothing else in it.
fn direct_call(message: &Map<String, Value>) -> Option<(RequestId, &str)> {
    let only = |map: &Map<String, Value>, keys: &[&str]| map.keys().all(|k| keys.contains(&&**k));
    if !only(message, &["jsonrpc", "id", "method", "params"])
        || message.get("method")? != "tools/call"
    {
        return None;
    }
    let id = match message.get("id")? {
        id @ (Value::String(_) | Value::Number(_)) => serde_json::from_value(id.clone()).ok()?,
        _ => return None,
    };
    let params = message.get("params")?.as_object()?;
    let name = params.get("name")?.as_str()?;
    let no_arguments = match params.get("arguments") {
        None => true,
        Some(Value::Object(arguments)) => arguments.is_empty(),
        Some(_) => false,
    };
    (only(params, &["name", "arguments"]) && no_arguments && DIRECT_TOOLS.contains(&name))
        .then_some((id, name))
}
