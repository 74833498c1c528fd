//! The gateway's integration tests: real HTTP, real MCP clients, SQLite and PostgreSQL.

#![expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly at the failing step"
)]

mod audit;
mod auth;
mod bad_input;
mod cli;
mod codex;
mod config;
mod credential_files;
mod credentials_postgres;
mod docs;
mod egress;
mod egress_leaks;
mod grants;
mod harness;
mod hostile;
mod https_api;
mod idp;
mod isolation;
mod mcp_clients;
mod oauth;
mod oauth_consent;
mod oauth_tokens;
mod processes;
mod purpose;
mod replicas;
mod runners;
mod secrets;
mod served;
mod telemetry;
