//! Shape checks on MCP POST bodies before rmcp sees them, so that malformed input gets a specific
//! JSON-RPC error (rmcp answers most of it with a bare `415`) and reaches no handler.
//!
//! - not JSON → `400`, `-32700 Parse error`;
//! - a batch (array) → `400`, `-32600`, batches were removed from MCP in 2025-06-18;
//! - not a JSON-RPC 2.0 request, notification or response → `400`, `-32600`;
//! - `tools/call` whose `params` are not `{name: string, arguments?: object}` → `-32602` naming
//!   the field.
//!
//! A well-formed call that [`super::direct`] answers goes no further; every other message goes on
//! to rmcp with the body as it came.
//!
//! Bodies over the configured limit are refused with `413` while being read, and bodies that take
//! longer than `server.body_read_timeout_seconds` to arrive with `408`.

use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::error::HttpError;
use crate::app::App;

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC's implementation-defined server error, used for refusals of capacity.
const SERVER_ERROR: i64 = -32000;

/// A JSON-RPC error answered before dispatch.
struct RpcError {
    status: StatusCode,
    id: Value,
    code: i64,
    message: String,
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let body = json!({
            "jsonrpc": "2.0",
            "id": self.id,
            "error": { "code": self.code, "message": self.message },
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// `429` with a JSON-RPC error: the caller holds too many MCP sessions (see `sessions`).
pub fn too_many_sessions(message: &str) -> Response {
    RpcError {
        status: StatusCode::TOO_MANY_REQUESTS,
        id: Value::Null,
        code: SERVER_ERROR,
        message: message.to_owned(),
    }
    .into_response()
}

/// Middleware: buffers and checks POST bodies (see the module docs).
pub async fn validate(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let limit = app.config.server.max_body_bytes;
    let timeout = app.config.server.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Err(_) => {
            return unread_body(HttpError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                ),
            ));
        }
        Ok(Err(_)) => {
            return unread_body(HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body exceeds {limit} bytes"),
            ));
        }
    };
    let message = match check(&bytes) {
        Ok(message) => message,
        Err(error) => return error.into_response(),
    };
    if let Some(answer) = super::direct::answer(&app, &parts, &message).await {
        return answer;
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A refusal sent before the body was read to its end: the rest of the body would be read as the
/// next request, so the connection closes, and `Connection: close` tells the client not to reuse it
/// (without it a pooling client races the close and sees a reset instead of its next answer).
fn unread_body(error: HttpError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// The message, if its shape is right.
fn check(bytes: &[u8]) -> Result<Map<String, Value>, RpcError> {
    let invalid = |id: Value, message: &str| RpcError {
        status: StatusCode::BAD_REQUEST,
        id,
        code: INVALID_REQUEST,
        message: format!("Invalid Request: {message}"),
    };
    let value: Value = serde_json::from_slice(bytes).map_err(|e| RpcError {
        status: StatusCode::BAD_REQUEST,
        id: Value::Null,
        code: PARSE_ERROR,
        message: format!("Parse error: body is not valid JSON ({e})"),
    })?;
    let message = match value {
        Value::Object(message) => message,
        Value::Array(_) => {
            return Err(invalid(
                Value::Null,
                "JSON-RPC batches are not supported (removed from MCP in 2025-06-18); send one message per request",
            ));
        }
        _ => {
            return Err(invalid(
                Value::Null,
                "the body must be one JSON-RPC message object",
            ));
        }
    };
    let id = message.get("id").cloned().unwrap_or(Value::Null);
    if message.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(invalid(id, "`jsonrpc` must be \"2.0\""));
    }
    if !matches!(id, Value::Null | Value::String(_) | Value::Number(_)) {
        return Err(invalid(Value::Null, "`id` must be a string or a number"));
    }
    match message.get("method") {
        Some(Value::String(method)) => {
            if let Some(params) = message.get("params")
                && !params.is_object()
            {
                return Err(invalid(id, "`params` must be an object"));
            }
            if method == "tools/call" {
                check_tool_call(id, message.get("params"))?;
            }
            Ok(message)
        }
        Some(_) => Err(invalid(id, "`method` must be a string")),
        None if message.contains_key("result") || message.contains_key("error") => Ok(message),
        None => Err(invalid(
            id,
            "a message needs a `method` (request or notification) or a `result`/`error` (response)",
        )),
    }
}

fn check_tool_call(id: Value, params: Option<&Value>) -> Result<(), RpcError> {
    let bad = |message: &str| RpcError {
        status: StatusCode::OK,
        id: id.clone(),
        code: INVALID_PARAMS,
        message: format!("Invalid params: {message}"),
    };
    let Some(params) = params else {
        return Err(bad("tools/call needs `params` with the tool `name`"));
    };
    match params.get("name") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(bad("`params.name` must be a string (the tool name)")),
        None => return Err(bad("`params.name` is required (the tool name)")),
    }
    match params.get("arguments") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err(bad(
            "`params.arguments` must be an object of the tool's arguments",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> Option<i64> {
        check(body.as_bytes()).err().map(|e| e.code)
    }

    #[test]
    fn accepts_requests_notifications_and_responses() {
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#),
            None
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            None
        );
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#), None);
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#),
            None
        );
    }

    #[test]
    fn rejects_each_malformed_shape_with_its_code() {
        assert_eq!(code("{nope"), Some(PARSE_ERROR));
        assert_eq!(code("[]"), Some(INVALID_REQUEST));
        assert_eq!(code("42"), Some(INVALID_REQUEST));
        assert_eq!(code(r#"{"id":1,"method":"x"}"#), Some(INVALID_REQUEST));
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#),
            Some(INVALID_REQUEST)
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":7}"#),
            Some(INVALID_REQUEST)
        );
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":1}"#), Some(INVALID_REQUEST));
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#),
            Some(INVALID_REQUEST)
        );
        assert_eq!(
            code(
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":"y"}}"#
            ),
            Some(INVALID_PARAMS)
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":3}}"#),
            Some(INVALID_PARAMS)
        );
    }
}
