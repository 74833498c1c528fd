//! The one mapping from failures to HTTP responses. Clients get a stable code and a helpful
//! message; internal details are logged once, here, under a correlation id the client can quote.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP error answer.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
    www_authenticate: Option<String>,
}

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            www_authenticate: None,
        }
    }

    /// `401` with the RFC 9728 pointer to the protected-resource metadata.
    pub fn unauthorized(metadata_url: &str, message: &str, invalid_token: bool) -> Self {
        let mut challenge = format!("Bearer resource_metadata=\"{metadata_url}\"");
        if invalid_token {
            challenge.push_str(", error=\"invalid_token\"");
        }
        Self {
            www_authenticate: Some(challenge),
            ..Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        }
    }

    /// Logs `error` with a fresh correlation id and returns a `500` that names only that id.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        let correlation_id = correlation_id();
        tracing::error!(correlation.id = %correlation_id, error = %error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("internal error; quote correlation id {correlation_id} to your operator"),
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// A fresh id that ties a client-visible error to the operator's log line.
pub fn correlation_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.code, "error_description": self.message });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(challenge) = self.www_authenticate
            && let Ok(value) = HeaderValue::from_str(&challenge)
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}
