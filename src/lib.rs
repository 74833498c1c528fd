//! Custodian: a multi-tenant MCP gateway that lets AI coding agents use credentials without
//! holding them. An agent asks for a task grant, a human approves it at the tenant's identity
//! provider (OIDC device flow), and commands then run on sandboxed runners that receive the secrets
//! over mTLS and return redacted output; every step is an audit record and a span of the grant's
//! trace.
//!
//! The repository's `README.md` explains how to run and operate it, `SECURITY.md` what it
//! guarantees, `docs/ARCHITECTURE.md` how the modules below fit together, and
//! `docs/DEVELOPMENT.md` how the code is organised and tested.

pub mod agent_tokens;
pub mod app;
pub mod audit;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod egress;
pub mod environments;
pub mod grants;
pub mod http;
pub mod keys;
pub mod mcp;
pub mod metrics;
pub mod oauth;
pub mod oidc;
pub mod pki;
pub mod runners;
pub mod runs;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod tenants;

/// An error and its causes on one line (for log lines and safe error messages).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
