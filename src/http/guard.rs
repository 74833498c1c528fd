//! Host and Origin validation against the configured public URL (DNS-rebinding and cross-site
//! protection). rmcp's defaults accept only loopback hosts and check no Origin, so the gateway
//! decides both itself, before authentication, and hands rmcp the same lists.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use url::Url;

use super::error::HttpError;

/// What `Host` and `Origin` values requests may carry.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl OriginPolicy {
    pub fn new(public_url: &Url, extra_hosts: &[String], extra_origins: &[String]) -> Self {
        let host = public_url
            .host_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let mut hosts = vec![];
        match public_url.port() {
            Some(port) => hosts.push(format!("{host}:{port}")),
            None => {
                let default_port = public_url.port_or_known_default().unwrap_or(443);
                hosts.push(host.clone());
                hosts.push(format!("{host}:{default_port}"));
            }
        }
        hosts.extend(extra_hosts.iter().map(|h| h.to_ascii_lowercase()));
        let mut origins = vec![public_url.origin().ascii_serialization()];
        origins.extend(extra_origins.iter().cloned());
        Self { hosts, origins }
    }

    /// The accepted `Host` values.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The accepted origins, each with an explicit port (the form rmcp matches exactly).
    pub fn origins_with_ports(&self) -> Vec<String> {
        self.origins
            .iter()
            .filter_map(|o| Url::parse(o).ok())
            .filter_map(|u| {
                Some(format!(
                    "{}://{}:{}",
                    u.scheme(),
                    u.host_str()?,
                    u.port_or_known_default()?
                ))
            })
            .collect()
    }

    fn check(&self, request: &Request) -> Result<(), HttpError> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase)
            .or_else(|| {
                request
                    .uri()
                    .authority()
                    .map(|a| a.as_str().to_ascii_lowercase())
            });
        match host {
            Some(host) if self.hosts.contains(&host) => {}
            _ => {
                return Err(HttpError::new(
                    StatusCode::FORBIDDEN,
                    "host_not_allowed",
                    "the Host header does not name this gateway's public URL",
                ));
            }
        }
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let allowed = origin.to_str().is_ok_and(|origin| {
                let origin = origin.trim_end_matches('/');
                self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
            });
            if !allowed {
                return Err(HttpError::new(
                    StatusCode::FORBIDDEN,
                    "origin_not_allowed",
                    "requests from this Origin are not allowed",
                ));
            }
        }
        Ok(())
    }
}

/// Middleware: rejects requests whose `Host` or `Origin` the policy does not allow.
pub async fn check_origin(
    State(policy): State<Arc<OriginPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    match policy.check(&request) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}
