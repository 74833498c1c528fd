//! Keeps MCP message contents out of logs and spans at every level.
//!
//! rmcp logs whole messages: each request with its arguments and each response with the tool
//! result (`debug`), each notification (`info`), and every event and SSE frame (`trace`). A tool
//! result is command output, which must never reach a log, so [`Quiet`] disables those callsites
//! whatever the configured filter says; rmcp's other lines stay available. Separately,
//! [`directives`] holds rmcp at `warn` unless the filter names it, because its `info` lines come
//! once or more per MCP session and drown the gateway's own.

use tracing::Metadata;
use tracing::subscriber::Interest;
use tracing_subscriber::layer::{Context, Layer};

/// Fields under which rmcp logs a message or a part of one.
const MESSAGE_FIELDS: &[&str] = &["request", "result", "notification", "evt"];

/// A layer that disables every rmcp event that could carry message contents: all of its `trace`
/// events, and events at other levels with a field in [`MESSAGE_FIELDS`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

/// Whether `metadata` names an event that may hold MCP message contents.
pub fn carries_messages(metadata: &Metadata<'_>) -> bool {
    metadata.is_event()
        && (metadata.target() == "rmcp" || metadata.target().starts_with("rmcp::"))
        && (*metadata.level() == tracing::Level::TRACE
            || metadata
                .fields()
                .iter()
                .any(|f| MESSAGE_FIELDS.contains(&f.name())))
}

impl<S: tracing::Subscriber> Layer<S> for Quiet {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if carries_messages(metadata) {
            Interest::never()
        } else {
            Interest::always()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        !carries_messages(metadata)
    }
}

/// The filter directives for `filter`: rmcp is held at `warn` unless `filter` names it.
pub fn directives(filter: &str) -> String {
    if filter.contains("rmcp") {
        filter.to_owned()
    } else if filter.trim().is_empty() {
        "rmcp=warn".to_owned()
    } else {
        format!("{filter},rmcp=warn")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn rmcp_is_quiet_unless_named() {
        assert_eq!(directives("info"), "info,rmcp=warn");
        assert_eq!(directives("debug,sqlx=warn"), "debug,sqlx=warn,rmcp=warn");
        assert_eq!(directives("info,rmcp=debug"), "info,rmcp=debug");
        assert_eq!(directives(""), "rmcp=warn");
    }

    #[test]
    fn message_carrying_events_are_dropped_at_trace_and_the_rest_kept() {
        let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = seen.clone();
        let subscriber = tracing_subscriber::registry()
            .with(Quiet)
            .with(tracing_subscriber::EnvFilter::new("trace"))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || Writer(sink.clone())),
            );
        tracing::subscriber::with_default(subscriber, || {
            let result = "RESULT-CANARY";
            tracing::debug!(target: "rmcp::service", id = 1, ?result, "response message");
            tracing::debug!(target: "rmcp::service", request = result, "received request");
            tracing::info!(target: "rmcp::service", notification = result, "received notification");
            tracing::trace!(target: "rmcp::transport::streamable_http_server::tower", message = result);
            tracing::debug!(target: "rmcp::service", "kept rmcp line");
            tracing::trace!(target: "custodian::http", "kept own trace line");
        });
        let logged = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
        assert!(!logged.contains("RESULT-CANARY"), "{logged}");
        assert!(logged.contains("kept rmcp line"), "{logged}");
        assert!(logged.contains("kept own trace line"), "{logged}");
    }

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
