//! One command per request: a fresh private work directory, a cleared environment with the secrets
//! and a minimal PATH/HOME/LANG/TMPDIR, its own process group killed on timeout and at exit, output
//! redacted as it streams and capped after redaction. The work directory is removed afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custodian_protocol::{ExecRequest, ExecResponse};
use custodian_redact::{Counts, Redactor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::sandbox::HELPER_ARG;

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How long output readers may outlive the process group (an escaped daemon holding a pipe).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Runs `request` through the sandbox helper `helper` (this program's own binary).
pub async fn run(
    helper: &Path,
    work_root: &Path,
    mut request: ExecRequest,
) -> Result<ExecResponse, String> {
    if request.argv.is_empty() {
        return Err("argv is empty".to_owned());
    }
    // Take the values out of the request into memory that is wiped when dropped.
    let secrets: Vec<(String, Zeroizing<String>)> = std::mem::take(&mut request.secrets)
        .into_iter()
        .map(|s| (s.name, Zeroizing::new(s.value)))
        .collect();
    let redactor = Arc::new(
        Redactor::new(secrets.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))
            .map_err(|e| e.to_string())?,
    );
    let work = tempfile::Builder::new()
        .prefix("custodian-exec-")
        .tempdir_in(work_root)
        .map_err(|e| format!("cannot create a work directory: {e}"))?;
    let work_dir: PathBuf = work.path().to_owned();

    let timeout = Duration::from_millis(request.timeout_ms.max(1));
    let cpu_seconds = timeout.as_secs() + 1;
    let mut command = tokio::process::Command::new(helper);
    command
        .arg(HELPER_ARG)
        .arg(&work_dir)
        .arg(cpu_seconds.to_string())
        .arg("--")
        .args(&request.argv)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", &work_dir)
        .env("TMPDIR", &work_dir)
        .env("LANG", "C.UTF-8")
        .current_dir(&work_dir)
        .process_group(0)
        .kill_on_drop(true)
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in &secrets {
        command.env(name, value.as_str());
    }
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the sandbox: {e}"))?;
    drop(command);
    let group = child.id().map(|pid| pid as i32);
    if let (Some(input), Some(mut pipe)) = (request.stdin.take(), child.stdin.take()) {
        tokio::spawn(async move {
            let _ = pipe.write_all(input.as_bytes()).await;
        });
    }
    let cap = request.max_output_bytes;
    let out = tokio::spawn(read_redacted(child.stdout.take(), redactor.clone(), cap));
    let err = tokio::spawn(read_redacted(child.stderr.take(), redactor, cap));

    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status.ok(), false),
        Err(_) => (None, true),
    };
    // Whatever the command left running in its group goes too.
    if let Some(group) = group {
        crate::sandbox::kill_group(group);
    }
    let status = match status {
        Some(status) => Some(status),
        None => child.wait().await.ok(),
    };
    let (stdout, out_counts, out_truncated) = finish_reader(out).await;
    let (stderr, err_counts, err_truncated) = finish_reader(err).await;
    drop(work);
    drop(secrets);

    let mut redactions: BTreeMap<String, u64> = BTreeMap::new();
    for (name, n) in out_counts.into_iter().chain(err_counts) {
        *redactions.entry(name).or_default() += n;
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(ExecResponse {
        exit_code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        redactions,
        truncated: out_truncated || err_truncated,
        timed_out,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
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
                b"[output unavailable: a process outside the sandbox group kept it open]".to_vec(),
                Counts::new(),
                true,
            )
        }
    }
}

/// Reads a pipe to the end through the redactor, keeping at most `cap` redacted bytes.
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
    let (rest, counts) = stream.finish();
    keep(rest, &mut kept, &mut truncated);
    (kept, counts, truncated)
}
