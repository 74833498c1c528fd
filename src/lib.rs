//! Custodian: a multi-tenant MCP gateway that lets AI coding agents use credentials without
//! holding them. See `../shared/DESIGN.md` in the project workspace and `README.md`.

pub mod agent_tokens;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod environments;
pub mod grants;
pub mod http;
pub mod keys;
pub mod mcp;
pub mod oidc;
pub mod secrets;
pub mod store;
pub mod tenants;
