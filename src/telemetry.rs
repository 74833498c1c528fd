//! Logs and OpenTelemetry traces: see [`custodian_telemetry`] (shared with the runner).
//!
//! Every grant is one trace: its `grant.request` span is a root whose W3C context is stored on the
//! grant row, and every later step is a span with that parent (see `docs/TELEMETRY.md`).

pub use custodian_telemetry::{Telemetry, attach, traceparent};
