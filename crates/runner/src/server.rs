//! The runner's HTTPS endpoint: mTLS (TLS 1.3, client certificate required), and only the gateway
//! of this trust domain may call it; a runner serves only its own tenant.

use std::sync::Arc;

use bytes::Bytes;
use custodian_protocol::{EXEC_PATH, ExecError, ExecRequest};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::config::RunnerConfig;

/// Everything a request needs.
pub struct Runner {
    pub config: RunnerConfig,
    /// The binary that acts as the sandbox helper (normally this program).
    pub helper: std::path::PathBuf,
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    runner: Arc<Runner>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = crate::tls::server_config(
        &runner.config.cert_file,
        &runner.config.key_file,
        &runner.config.ca_file,
    )?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let gateway = runner.config.gateway().to_string();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let acceptor = acceptor.clone();
        let runner = runner.clone();
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "TLS handshake refused");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(crate::tls::uri_names)
                .unwrap_or_default();
            if !identity.contains(&gateway) {
                tracing::warn!(peer = %peer, identity = ?identity, "refused a client that is not this trust domain's gateway");
                return;
            }
            let service = service_fn(move |request| handle(runner.clone(), request));
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).unwrap_or_default(),
        )))
        .expect("static response parts")
}

fn refuse(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ExecError {
            error: error.to_owned(),
        },
    )
}

async fn handle(
    runner: Arc<Runner>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if request.method() != Method::POST || request.uri().path() != EXEC_PATH {
        return Ok(refuse(StatusCode::NOT_FOUND, "unknown endpoint"));
    }
    let limit = runner.config.max_body_bytes;
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Zeroizing::new(collected.to_bytes().to_vec()),
        Err(_) => {
            return Ok(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            ));
        }
    };
    let exec: ExecRequest = match serde_json::from_slice(&body) {
        Ok(exec) => exec,
        // serde's message could quote input; say only where it failed.
        Err(e) => {
            return Ok(refuse(
                StatusCode::BAD_REQUEST,
                &format!(
                    "malformed exec request (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            ));
        }
    };
    drop(body);
    if exec.tenant != runner.config.tenant {
        tracing::warn!(tenant = %exec.tenant, "refused a request for another tenant");
        return Ok(refuse(
            StatusCode::FORBIDDEN,
            "this runner does not serve that tenant",
        ));
    }
    let grant = exec.grant_id.clone();
    tracing::info!(grant.id = %grant, argv0 = ?exec.argv.first(), secrets = exec.secrets.len(), "exec");
    // Joins the gateway's `grant.exec` span, and so the grant's trace.
    let span = tracing::info_span!(
        parent: None,
        "runner.exec",
        custodian.tenant = %exec.tenant,
        custodian.grant.id = %grant,
        custodian.runner = %runner.config.identity(),
        custodian.exit_code = tracing::field::Empty,
        custodian.duration_ms = tracing::field::Empty,
    );
    custodian_telemetry::attach(&span, exec.traceparent.as_deref());
    let outcome = crate::exec::run(&runner.helper, &runner.config.work_root, exec)
        .instrument(span.clone())
        .await;
    if let Ok(response) = &outcome {
        span.record("custodian.exit_code", response.exit_code.unwrap_or(-1));
        span.record("custodian.duration_ms", response.duration_ms);
    }
    drop(span);
    match outcome {
        Ok(response) => {
            tracing::info!(grant.id = %grant, exit_code = ?response.exit_code, duration_ms = response.duration_ms, redactions = ?response.redactions, "exec finished");
            Ok(json(StatusCode::OK, &response))
        }
        Err(error) => {
            tracing::warn!(grant.id = %grant, error = %error, "exec failed");
            Ok(refuse(StatusCode::UNPROCESSABLE_ENTITY, &error))
        }
    }
}
