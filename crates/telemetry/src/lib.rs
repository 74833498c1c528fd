//! OpenTelemetry trace export and W3C trace context, shared by the gateway and the runner.
//!
//! Export is configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`) over OTLP/HTTP protobuf, and is off when no endpoint is set.
//! Telemetry is not the audit log: an unreachable collector never blocks anything.
//!
//! Every grant is one trace: its `grant.request` span is a root whose W3C context is stored on the
//! grant row, and every later step (`grant.device_authorization`, `grant.approved`, `grant.denied`,
//! `grant.exec`, `grant.revoked`, `grant.expired`, `grant.exhausted`) is a span with that parent,
//! whenever and on whichever replica it happens. Span attributes never hold secret values, tokens,
//! device codes or command output.

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The configured tracer and meter providers, if export is on; flushes on
/// [`Telemetry::shutdown`].
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Builds the exporter from the variables in `env` (export is off when no endpoint is set);
    /// `service` names the service unless `OTEL_SERVICE_NAME` does.
    pub fn from_env(env: &[(String, String)], service: &'static str) -> anyhow::Result<Self> {
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let base = get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| b.trim_end_matches('/').to_owned());
        let endpoint = match (get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), &base) {
            (Some(traces), _) => traces.to_owned(),
            (None, Some(base)) => format!("{base}/v1/traces"),
            (None, None) => return Ok(Self::default()),
        };
        let metrics_endpoint = get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            .map(str::to_owned)
            .or_else(|| base.as_ref().map(|b| format!("{b}/v1/metrics")));
        if let Some(protocol) = get("OTEL_EXPORTER_OTLP_PROTOCOL")
            && protocol != "http/protobuf"
        {
            anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported by this build; use http/protobuf"
            );
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()?;
        let mut resource = Resource::builder()
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_attribute(KeyValue::new(
                "service.instance.id",
                uuid::Uuid::new_v4().simple().to_string(),
            ));
        if get("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        let resource = resource.build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.clone())
            .build();
        let meters = match metrics_endpoint {
            Some(endpoint) => {
                let exporter = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_endpoint(endpoint)
                    .build()?;
                Some(
                    SdkMeterProvider::builder()
                        .with_periodic_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                )
            }
            None => None,
        };
        Ok(Self {
            provider: Some(provider),
            meters,
        })
    }

    /// A tracing layer that exports spans, when export is on.
    pub fn layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S> + use<S>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        self.provider
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("custodian")))
    }

    /// A meter for the service's metrics (recording into nothing when export is off).
    pub fn meter(&self, name: &'static str) -> opentelemetry::metrics::Meter {
        match &self.meters {
            Some(meters) => meters.meter(name),
            None => SdkMeterProvider::default().meter(name),
        }
    }

    /// Sends what is buffered and stops exporting.
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
        if let Some(meters) = &self.meters
            && let Err(e) = meters.shutdown()
        {
            tracing::warn!(error = %e, "flushing metrics failed");
        }
    }
}

/// The W3C `traceparent` of `span`, if it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_ref = context.span();
    let sc = span_ref.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Makes `span` a child of the span named by `traceparent` (a grant's stored context).
pub fn attach(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(parent) = traceparent.and_then(parse_traceparent) else {
        return;
    };
    let _ = span.set_parent(Context::new().with_remote_span_context(parent));
}

fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || parts.next().is_some() {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_strictly() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = parse_traceparent(ok).unwrap();
        assert_eq!(
            parsed.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
