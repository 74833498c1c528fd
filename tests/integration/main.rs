//! The gateway's integration tests: real HTTP, real MCP clients, SQLite and PostgreSQL.

#![expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly at the failing step"
)]

mod audit;
mod auth;
mod bad_input;
mod cli;
mod config;
mod egress;
mod docs;
mod grants;
mod harness;
mod hostile;
mod idp;
mod isolation;
mod mcp_clients;
mod processes;
mod purpose;
mod runners;
mod secrets;
mod served;
mod telemetry;
