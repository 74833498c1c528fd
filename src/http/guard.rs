//! Host and Origin validation against the configured public URL (DNS-rebinding and cross-site
//! protection). rmcp's defaults accept only loopback hosts and check no Origin, so the gateway
//! decides both itself, before authentication, and hands rmcp the same lists.
//!
//! When the public URL names a loopback host (`localhost`, `127.0.0.1`, `[::1]`), the other two
//! loopback spellings with the same port are accepted too, in `Host` and in `Origin`: they name the
//! same listener, and a DNS-rebinding attacker's page can only send its own host name.

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
        let mut hosts = vec![];
        let mut origins = vec![];
        for url in equivalent_urls(public_url) {
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            match url.port() {
                Some(port) => hosts.push(format!("{host}:{port}")),
                None => {
                    let default_port = url.port_or_known_default().unwrap_or(443);
                    hosts.push(host.clone());
                    hosts.push(format!("{host}:{default_port}"));
                }
            }
            origins.push(url.origin().ascii_serialization());
        }
        hosts.extend(extra_hosts.iter().map(|h| h.to_ascii_lowercase()));
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

/// The public URL, and for a loopback one its other loopback spellings (same scheme and port).
fn equivalent_urls(public_url: &Url) -> Vec<Url> {
    const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];
    let loopback = match public_url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip == std::net::Ipv4Addr::LOCALHOST,
        Some(url::Host::Ipv6(ip)) => ip == std::net::Ipv6Addr::LOCALHOST,
        None => false,
    };
    let mut urls = vec![public_url.clone()];
    if loopback {
        for host in LOOPBACK {
            let mut url = public_url.clone();
            if url.set_host(Some(host)).is_ok() && !urls.contains(&url) {
                urls.push(url);
            }
        }
    }
    urls
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(public_url: &str) -> OriginPolicy {
        OriginPolicy::new(&Url::parse(public_url).expect("valid URL"), &[], &[])
    }

    #[test]
    fn a_loopback_public_url_accepts_every_loopback_spelling_of_its_port() {
        for public in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            let p = policy(public);
            for host in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"] {
                assert!(p.hosts().contains(&host.to_owned()), "{public}: {host}");
            }
            let mut origins = p.origins_with_ports();
            origins.sort();
            assert_eq!(
                origins,
                [
                    "http://127.0.0.1:8080",
                    "http://[::1]:8080",
                    "http://localhost:8080"
                ]
            );
            assert!(!p.hosts().iter().any(|h| h.ends_with(":8081")));
        }
    }

    #[test]
    fn a_public_host_gets_no_loopback_spellings() {
        let p = policy("https://custodian.example.com");
        assert_eq!(
            p.hosts(),
            ["custodian.example.com", "custodian.example.com:443"]
        );
        assert_eq!(
            p.origins_with_ports(),
            ["https://custodian.example.com:443"]
        );
    }
}
