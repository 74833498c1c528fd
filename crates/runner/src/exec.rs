//! One command per request, in a sandbox of its own ([`crate::sandbox`]): a cleared environment
//! with the secrets and a minimal PATH/HOME/LANG/TMPDIR, output redacted as it streams and capped
//! after redaction, the whole run killed at its timeout, on cancel, or when the request is dropped
//! (the gateway went away or the runner is shutting down).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custodian_protocol::{ExecRequest, ExecResponse};
use custodian_redact::{Counts, Redactor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::sandbox::{Isolation, Sandbox};

/// How long a run that already ended may take to hand over its listeners (they are in the socket
/// if it sent them; this only waits for the receiving thread).
const LISTENERS_AFTER_EXIT: Duration = Duration::from_secs(1);

/// How long output readers may outlive the run (a process holding a pipe past its namespace).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Why a command did not start; nothing ran.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("{0}")]
    Secrets(String),
    #[error("the sandbox could not start: {0}")]
    Sandbox(String),
    #[error("egress: {0}")]
    Egress(String),
}

/// Runs `request` in `sandbox`; `cancel` stops it (the answer then says `cancelled`). The
/// run's egress ([`crate::egress`]) verifies upstream TLS with `upstream`.
pub async fn run(
    sandbox: &Sandbox,
    upstream: &Arc<rustls::ClientConfig>,
    mut request: ExecRequest,
    cancel: CancellationToken,
) -> Result<ExecResponse, NotStarted> {
    if request.argv.is_empty() {
        return Err(NotStarted::EmptyArgv);
    }
    if cancel.is_cancelled() {
        // Its grant ended before it got here: nothing runs.
        return Ok(ExecResponse {
            cancelled: true,
            ..ExecResponse::default()
        });
    }
    let mut plan = crate::egress::Plan::new(std::mem::take(&mut request.egress))
        .map_err(NotStarted::Egress)?;
    if plan.is_some() && sandbox.isolation() != Isolation::Full {
        tracing::warn!(
            "egress rules are not served without isolation: the run shares the runner's network"
        );
    }
    // Take the values out of the request into memory that is wiped when dropped.
    let secrets: Vec<(String, Zeroizing<String>)> = std::mem::take(&mut request.secrets)
        .into_iter()
        .map(|s| (s.name, Zeroizing::new(s.value)))
        .collect();
    let files = crate::sandbox::files::decode(std::mem::take(&mut request.files))
        .map_err(NotStarted::Secrets)?;
    if let Some(clash) = files
        .iter()
        .find(|f| secrets.iter().any(|(n, _)| *n == f.variable))
    {
        return Err(NotStarted::Secrets(format!(
            "the variable `{}` is both a secret and a credential file's path",
            clash.variable
        )));
    }
    // A file's content and the pieces a command can print alone, under its variable's name.
    let fragments: Vec<(&str, Zeroizing<Vec<u8>>)> = files
        .iter()
        .flat_map(|f| {
            custodian_redact::file_fragments(&f.content)
                .into_iter()
                .map(|piece| (f.variable.as_str(), piece))
        })
        .collect();
    // Injected credentials are redacted too, though they never enter the run.
    let redactor = Arc::new(
        Redactor::new(
            secrets
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .chain(
                    files
                        .iter()
                        .map(|f| (f.variable.as_str(), f.content.as_slice())),
                )
                .chain(fragments.iter().map(|(n, v)| (*n, v.as_slice())))
                .chain(plan.iter().flat_map(crate::egress::Plan::secrets)),
        )
        .map_err(|e| NotStarted::Secrets(e.to_string()))?,
    );
    let timeout = Duration::from_millis(request.timeout_ms.max(1));
    if sandbox.isolation() != Isolation::Full {
        plan = None;
    }
    let proxy_env = plan
        .as_ref()
        .map(crate::egress::Plan::env)
        .unwrap_or_default();
    let plain = std::mem::take(&mut request.env);
    let env: Vec<(&str, &str)> = plain
        .iter()
        .map(|v| (v.name.as_str(), v.value.as_str()))
        .chain(secrets.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        .chain(proxy_env.iter().map(|(n, v)| (*n, v.as_str())))
        .collect();
    let started = Instant::now();
    let crate::sandbox::Started {
        mut child,
        lease,
        socket,
    } = sandbox
        .start(
            &request.argv,
            &env,
            &files,
            timeout.as_secs() + 1,
            plan.as_ref().map(crate::egress::Plan::net),
            request.stdin.is_some(),
        )
        .await
        .map_err(NotStarted::Sandbox)?;
    drop(env);
    drop(fragments);
    drop(files);
    let group = child.id().map(|pid| pid as i32);
    // The group is bubblewrap's: killing it ends the run's namespace init, and the kernel then
    // kills every process of the run. It is killed however this future ends (dropped included).
    let _kill = crate::sandbox::KillGroupOnDrop(group);
    // Taken before anything waits on the child (waiting closes its stdin).
    let stdin_pipe = child.stdin.take();
    // The run's listeners arrive before its command starts; without them it does not start.
    let serving = match (plan, socket) {
        (Some(plan), Some(socket)) => {
            let mut received = tokio::task::spawn_blocking(move || {
                crate::sandbox::fdpass::recv(std::os::fd::AsRawFd::as_raw_fd(&socket))
            });
            let flatten = |r: Result<std::io::Result<_>, tokio::task::JoinError>| {
                r.map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            };
            let fds = tokio::select! {
                biased;
                received = &mut received => flatten(received),
                _ = child.wait() => {
                    // A quick command can end before the receiving thread reports: the helper sent
                    // the listeners before it exec'ed, so they are in the socket already.
                    match tokio::time::timeout(LISTENERS_AFTER_EXIT, &mut received).await {
                        Ok(received) => flatten(received),
                        Err(_) => Err("the sandbox ended before its network was ready".to_owned()),
                    }
                }
            };
            match fds.and_then(|fds| {
                plan.serve(
                    fds,
                    upstream.clone(),
                    tracing::Span::current(),
                    redactor.clone(),
                )
            }) {
                Ok(serving) => Some(serving),
                Err(e) => {
                    if let Some(group) = group {
                        crate::sandbox::kill_group(group);
                    }
                    let _ = child.wait().await;
                    return Err(NotStarted::Egress(e));
                }
            }
        }
        _ => None,
    };
    if let (Some(input), Some(mut pipe)) = (request.stdin.take(), stdin_pipe) {
        tokio::spawn(async move {
            let _ = pipe.write_all(input.as_bytes()).await;
        });
    }
    let cap = request.max_output_bytes;
    let out = tokio::spawn(read_redacted(child.stdout.take(), redactor.clone(), cap));
    let err = tokio::spawn(read_redacted(child.stderr.take(), redactor, cap));

    let (status, timed_out, cancelled) = tokio::select! {
        status = child.wait() => (status.ok(), false, false),
        () = tokio::time::sleep(timeout) => (None, true, false),
        () = cancel.cancelled() => (None, false, true),
    };
    if let Some(group) = group {
        crate::sandbox::kill_group(group);
    }
    let status = match status {
        Some(status) => Some(status),
        None => child.wait().await.ok(),
    };
    let (stdout, out_counts, out_truncated) = finish_reader(out).await;
    let (stderr, err_counts, err_truncated) = finish_reader(err).await;
    let egress = serving
        .as_ref()
        .map(crate::egress::Serving::counts)
        .unwrap_or_default();
    drop(serving);
    drop(lease);
    drop(secrets);

    let mut redactions: BTreeMap<String, u64> = BTreeMap::new();
    for (name, n) in out_counts.into_iter().chain(err_counts) {
        *redactions.entry(name).or_default() += n;
    }
    use std::os::unix::process::ExitStatusExt;
    let killed = timed_out || cancelled;
    Ok(ExecResponse {
        exit_code: status.and_then(|s| s.code()).filter(|_| !killed),
        signal: status
            .and_then(|s| s.signal())
            .or(killed.then_some(libc::SIGKILL)),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        redactions,
        truncated: out_truncated || err_truncated,
        timed_out,
        cancelled,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        egress,
    })
}

type Reader = tokio::task::JoinHandle<(Vec<u8>, Counts, bool)>;

async fn finish_reader(reader: Reader) -> (Vec<u8>, Counts, bool) {
    let abort = reader.abort_handle();
    match tokio::time::timeout(DRAIN_GRACE, reader).await {
        Ok(Ok(result)) => result,
        _ => {
            abort.abort();
            (
                b"[output unavailable: a process outside the run kept it open]".to_vec(),
                Counts::new(),
                true,
            )
        }
    }
}

/// Reads a pipe to the end through the redactor, keeping at most `cap` redacted bytes. Counts
/// describe what is returned: replacements in output that was dropped are not counted.
async fn read_redacted(
    pipe: Option<impl AsyncRead + Unpin>,
    redactor: Arc<Redactor>,
    cap: usize,
) -> (Vec<u8>, Counts, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), Counts::new(), false);
    };
    let mut stream = redactor.stream();
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = Zeroizing::new(vec![0u8; 64 * 1024]);
    let keep = |bytes: Vec<u8>, kept: &mut Vec<u8>, truncated: &mut bool| {
        let room = cap.saturating_sub(kept.len());
        if bytes.len() > room {
            *truncated = true;
        }
        kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    };
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let released = stream.push(&buf[..n]);
                keep(released, &mut kept, &mut truncated);
            }
        }
    }
    let (rest, _) = stream.finish();
    keep(rest, &mut kept, &mut truncated);
    (kept.clone(), count_markers(&redactor, &kept), truncated)
}

/// Replacements that are in `kept`, counted from their markers.
fn count_markers(redactor: &Redactor, kept: &[u8]) -> Counts {
    let mut counts = Counts::new();
    for name in redactor.names() {
        let marker = format!("[REDACTED:{name}]");
        let n = kept
            .windows(marker.len())
            .filter(|w| *w == marker.as_bytes())
            .count() as u64;
        if n > 0 {
            counts.insert(name.to_owned(), n);
        }
    }
    counts
}
