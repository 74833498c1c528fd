//! Metrics over OTLP (with the traces; see `docs/TELEMETRY.md`): grants by state, approval latency,
//! exec duration, redactions and runner errors. Attributes name tenants, environments, states,
//! runners and secret names — never values.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

/// The gateway's instruments.
#[derive(Debug, Clone)]
pub struct Metrics {
    grants: Counter<u64>,
    approval_latency: Histogram<f64>,
    exec_duration: Histogram<f64>,
    redactions: Counter<u64>,
    runner_errors: Counter<u64>,
}

impl Default for Metrics {
    /// Instruments that record into nothing (export off).
    fn default() -> Self {
        Self::new(&custodian_telemetry::Telemetry::default().meter("custodian"))
    }
}

impl Metrics {
    pub fn new(meter: &Meter) -> Self {
        Self {
            grants: meter
                .u64_counter("custodian.grants")
                .with_description("Grant state transitions, by state")
                .build(),
            approval_latency: meter
                .f64_histogram("custodian.grant.approval_latency")
                .with_unit("s")
                .with_description("From request_grant to approval")
                .build(),
            exec_duration: meter
                .f64_histogram("custodian.exec.duration")
                .with_unit("ms")
                .with_description("Duration of runs as measured by the runner")
                .build(),
            redactions: meter
                .u64_counter("custodian.redactions")
                .with_description("Secret occurrences replaced in run output, by secret name")
                .build(),
            runner_errors: meter
                .u64_counter("custodian.runner.errors")
                .with_description("Runs that could not be dispatched to a runner")
                .build(),
        }
    }

    /// A grant entered `state`.
    pub fn grant(&self, tenant: &str, state: &'static str) {
        self.grants.add(
            1,
            &[
                KeyValue::new("custodian.tenant", tenant.to_owned()),
                KeyValue::new("custodian.grant.state", state),
            ],
        );
    }

    pub fn approved_after(&self, tenant: &str, seconds: f64) {
        self.approval_latency.record(
            seconds,
            &[KeyValue::new("custodian.tenant", tenant.to_owned())],
        );
    }

    pub fn exec(&self, tenant: &str, environment: &str, duration_ms: f64, exit_code: Option<i32>) {
        self.exec_duration.record(
            duration_ms,
            &[
                KeyValue::new("custodian.tenant", tenant.to_owned()),
                KeyValue::new("custodian.environment", environment.to_owned()),
                KeyValue::new("custodian.exec.succeeded", exit_code == Some(0)),
            ],
        );
    }

    pub fn redacted(&self, tenant: &str, secret: &str, count: u64) {
        self.redactions.add(
            count,
            &[
                KeyValue::new("custodian.tenant", tenant.to_owned()),
                KeyValue::new("custodian.secret.name", secret.to_owned()),
            ],
        );
    }

    pub fn runner_error(&self, tenant: &str, runner: &str) {
        self.runner_errors.add(
            1,
            &[
                KeyValue::new("custodian.tenant", tenant.to_owned()),
                KeyValue::new("custodian.runner.name", runner.to_owned()),
            ],
        );
    }
}
