//! The runner's HTTPS endpoint: mTLS (TLS 1.3, client certificate required), and only the gateway
//! of this trust domain may call it; a runner serves only its own tenant.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use custodian_protocol::{
    CANCEL_PATH, CancelRequest, EXEC_PATH, ExecError, ExecReply, ExecRequest,
};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc::error::TrySendError;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::config::RunnerConfig;
use crate::sandbox::Sandbox;

/// While a command runs, a space is written this often: a gateway that went away is noticed at
/// the next write or the one after, and its run is killed.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a cancel for an exec that has not arrived yet is remembered.
const EARLY_CANCEL_MEMORY: Duration = Duration::from_secs(120);

/// How long a client may take to complete its TLS handshake: one that never handshakes (a flood
/// from anything that can reach this port; runs cannot, they have no route out) holds an open file
/// of the runner until then.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of open files) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type Body = BoxBody<Bytes, Infallible>;

/// Everything a request needs.
pub struct Runner {
    pub config: RunnerConfig,
    pub sandbox: Sandbox,
    /// Runs in flight by exec id, so that a cancel can reach them.
    runs: Mutex<HashMap<String, CancellationToken>>,
    /// Exec ids cancelled before their exec arrived (the cancel overtook it): such an exec is
    /// answered `cancelled` without running. Forgotten after [`EARLY_CANCEL_MEMORY`].
    cancelled_early: Mutex<HashMap<String, std::time::Instant>>,
    /// Cancelled when the runner shuts down: every run in flight is killed.
    stopping: CancellationToken,
    /// How runs' egress verifies upstream TLS.
    upstream: Arc<rustls::ClientConfig>,
}

impl Runner {
    pub fn new(
        config: RunnerConfig,
        sandbox: Sandbox,
        stopping: CancellationToken,
    ) -> anyhow::Result<Self> {
        let upstream = crate::egress::upstream_tls(config.egress.ca_file.as_deref())?;
        Ok(Self {
            config,
            sandbox,
            runs: Mutex::new(HashMap::new()),
            cancelled_early: Mutex::new(HashMap::new()),
            stopping,
            upstream,
        })
    }
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
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of open files (a flood of connections that never handshake), out of memory,
                // or a connection reset before it was accepted: never a reason to stop serving
                // the runs in flight and the next ones.
                tracing::warn!(error = %e, "cannot accept a connection; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        // The reply follows a heartbeat on the same connection: without this, Nagle's algorithm
        // holds it until the gateway's delayed ACK (~40 ms per run).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let runner = runner.clone();
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %peer, "TLS handshake timed out");
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

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())).boxed())
        .expect("static response parts")
}

fn refuse(status: StatusCode, error: &str) -> Response<Body> {
    json(
        status,
        &ExecError {
            error: error.to_owned(),
        },
    )
}

/// Reads a JSON body of at most `limit` bytes into memory wiped when dropped.
async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
    limit: usize,
) -> Result<T, Response<Body>> {
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Zeroizing::new(collected.to_bytes().to_vec()),
        Err(_) => {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            ));
        }
    };
    // serde's message could quote input; say only where it failed.
    serde_json::from_slice(&body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            &format!(
                "malformed request (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

async fn handle(
    runner: Arc<Runner>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let limit = runner.config.max_body_bytes;
    match (request.method(), request.uri().path()) {
        (&Method::POST, EXEC_PATH) => Ok(match read_json(request, limit).await {
            Ok(exec) => exec_streaming(runner, exec),
            Err(refusal) => refusal,
        }),
        (&Method::POST, CANCEL_PATH) => Ok(match read_json(request, limit).await {
            Ok(cancel) => cancel_run(&runner, &cancel),
            Err(refusal) => refusal,
        }),
        _ => Ok(refuse(StatusCode::NOT_FOUND, "unknown endpoint")),
    }
}

fn cancel_run(runner: &Runner, cancel: &CancelRequest) -> Response<Body> {
    if cancel.tenant != runner.config.tenant {
        return refuse(
            StatusCode::FORBIDDEN,
            "this runner does not serve that tenant",
        );
    }
    let found = runner
        .runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&cancel.exec_id)
        .cloned();
    if let Some(token) = &found {
        tracing::info!(exec.id = %cancel.exec_id, "cancelling a run");
        token.cancel();
    } else {
        // The exec may still be on its way (the cancel overtook it): it must not run when it comes.
        let mut early = runner
            .cancelled_early
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        early.retain(|_, at| at.elapsed() < EARLY_CANCEL_MEMORY);
        early.insert(cancel.exec_id.clone(), std::time::Instant::now());
    }
    json(
        StatusCode::OK,
        &serde_json::json!({ "cancelled": found.is_some() }),
    )
}

/// Forgets a run's cancel token when its exec ends in any way.
struct Registered {
    runner: Arc<Runner>,
    exec_id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.runner
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.exec_id);
    }
}

/// Starts the exec and answers at once with a body that carries heartbeats, then the reply.
/// When the body is dropped (the gateway is gone), the run is cancelled.
fn exec_streaming(runner: Arc<Runner>, exec: ExecRequest) -> Response<Body> {
    if exec.tenant != runner.config.tenant {
        tracing::warn!(tenant = %exec.tenant, "refused a request for another tenant");
        return refuse(
            StatusCode::FORBIDDEN,
            "this runner does not serve that tenant",
        );
    }
    let cancel = runner.stopping.child_token();
    let overtaken = runner
        .cancelled_early
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&exec.exec_id)
        .is_some();
    if overtaken {
        tracing::info!(exec.id = %exec.exec_id, "exec cancelled before it arrived; not run");
        cancel.cancel();
    }
    {
        let mut runs = runner.runs.lock().unwrap_or_else(|e| e.into_inner());
        if runs.contains_key(&exec.exec_id) {
            return refuse(
                StatusCode::CONFLICT,
                "an exec with this id is already running",
            );
        }
        runs.insert(exec.exec_id.clone(), cancel.clone());
    }
    let registered = Registered {
        runner: runner.clone(),
        exec_id: exec.exec_id.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let _registered = registered;
        let reply = run_one(&runner, exec, cancel.clone());
        tokio::pin!(reply);
        // The first beat after one period: a run that ends sooner sends only its reply.
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        let reply = loop {
            tokio::select! {
                reply = &mut reply => break reply,
                _ = beat.tick() => match tx.try_send(Bytes::from_static(b" ")) {
                    // Nobody is listening any more: stop the run (the reply is dropped).
                    Err(TrySendError::Closed(_)) => cancel.cancel(),
                    // A gateway that stopped reading skips a beat; it never holds up the run,
                    // whose timeout and cancellation are watched only while `reply` is polled.
                    Ok(()) | Err(TrySendError::Full(_)) => {}
                },
            }
        };
        let _ = tx
            .send(Bytes::from(serde_json::to_vec(&reply).unwrap_or_default()))
            .await;
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("static response parts")
}

async fn run_one(runner: &Runner, exec: ExecRequest, cancel: CancellationToken) -> ExecReply {
    let grant = exec.grant_id.clone();
    let exec_id = exec.exec_id.clone();
    tracing::info!(exec.id = %exec_id, grant.id = %grant, argv0 = ?exec.argv.first(), secrets = exec.secrets.len(), "exec");
    // Joins the gateway's `grant.exec` span, and so the grant's trace.
    let span = tracing::info_span!(
        parent: None,
        "runner.exec",
        custodian.tenant = %exec.tenant,
        custodian.grant.id = %grant,
        custodian.exec.id = %exec_id,
        custodian.runner = %runner.config.identity(),
        custodian.exit_code = tracing::field::Empty,
        custodian.duration_ms = tracing::field::Empty,
        custodian.cancelled = tracing::field::Empty,
    );
    custodian_telemetry::attach(&span, exec.traceparent.as_deref());
    let outcome = crate::exec::run(&runner.sandbox, &runner.upstream, exec, cancel)
        .instrument(span.clone())
        .await;
    if let Ok(response) = &outcome {
        span.record("custodian.exit_code", response.exit_code.unwrap_or(-1));
        span.record("custodian.duration_ms", response.duration_ms);
        span.record("custodian.cancelled", response.cancelled);
    }
    drop(span);
    match outcome {
        Ok(response) => {
            tracing::info!(exec.id = %exec_id, grant.id = %grant, exit_code = ?response.exit_code, duration_ms = response.duration_ms, cancelled = response.cancelled, timed_out = response.timed_out, redactions = ?response.redactions, egress = ?response.egress, "exec finished");
            ExecReply::Finished(response)
        }
        Err(error) => {
            tracing::warn!(exec.id = %exec_id, grant.id = %grant, error = %error, "exec did not start");
            ExecReply::NotStarted(ExecError {
                error: error.to_string(),
            })
        }
    }
}
