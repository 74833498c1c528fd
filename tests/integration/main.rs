//! The gateway's integration tests: real HTTP, real MCP clients, SQLite and PostgreSQL.

mod auth;
mod bad_input;
mod config;
mod harness;
