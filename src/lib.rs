//! Custodian: a multi-tenant MCP gateway that lets AI coding agents use credentials without
//! holding them. See `../shared/DESIGN.md` in the project workspace and `README.md`.

pub mod agent_tokens;
pub mod app;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod environments;
pub mod grants;
pub mod http;
pub mod keys;
pub mod mcp;
pub mod metrics;
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
