//! The HTTP/1.1 server loop, with the limits that keep hostile clients from starving everyone else.
//!
//! Guarantees:
//! - At most `server.max_connections` connections are served at once (lowered to fit the process's
//!   open-file limit); further ones wait in the listen backlog until one ends.
//! - A client has `server.header_read_timeout_seconds` to send a request's headers, counted from
//!   when the connection is ready for a request: slowloris clients and idle keep-alive connections
//!   are both closed after it. Header blocks are capped at [`MAX_HEADER_BYTES`] and 100 headers.
//! - A connection on which nothing moves in either direction for `server.idle_timeout_seconds`
//!   while the gateway waits on the client (to read a body, or for it to take the answer) is
//!   closed. Long MCP answers keep moving: rmcp sends SSE keep-alives more often than that.
//! - Request bodies of the MCP endpoint have `server.body_read_timeout_seconds` (see
//!   [`super::jsonrpc`]).
//! - On shutdown, accepting stops at once and open connections finish their requests.
//!
//! HTTP/2 is not served: TLS is terminated in front of the gateway, and MCP clients speak
//! HTTP/1.1 to it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;

/// Largest header block a request may carry (431 beyond it). Agent requests carry a few short
/// headers; browsers on the approval page stay well under it.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// File descriptors kept free for the database, runners, the IdP and logs.
const RESERVED_FILES: u64 = 128;

/// The connection limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    /// The configured limits, with the connection cap lowered to what the open-file limit allows.
    pub fn from_config(server: &ServerConfig) -> Self {
        let mut max_connections = server.max_connections;
        if let Some(files) = open_files_limit() {
            let fits =
                usize::try_from(files.saturating_sub(RESERVED_FILES).max(1)).unwrap_or(usize::MAX);
            if fits < max_connections {
                tracing::warn!(
                    configured = max_connections,
                    open_files_limit = files,
                    serving = fits,
                    "server.max_connections exceeds what the open-file limit allows; raise `ulimit -n` to serve more"
                );
                max_connections = fits;
            }
        }
        Self {
            max_connections,
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
        }
    }
}

/// The soft limit on open files, where the platform tells it.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Serves `router` on `listener` until `shutdown`, then waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(100);
    let mut at_capacity = false;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !at_capacity {
                    at_capacity = true;
                    tracing::warn!(
                        connections = limits.max_connections,
                        "connection limit reached; new connections wait"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    () = shutdown.cancelled() => break,
                }
            }
        };
        if at_capacity && slots.available_permits() > limits.max_connections / 10 {
            at_capacity = false;
            tracing::info!("below the connection limit again");
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Per-connection failures (reset before accept) and resource exhaustion alike:
                // back off briefly rather than spin.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // MCP answers are small SSE frames: without TCP_NODELAY, Nagle's algorithm and delayed
        // ACKs add ~40 ms to every call.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let io = TokioIo::new(Watched::new(tcp, limits.idle_timeout));
        let connection =
            graceful.watch(http.serve_connection(io, TowerToHyperService::new(router.clone())));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A TCP stream that fails a read or write which has been waiting for longer than `idle` since
/// the last byte moved either way.
struct Watched {
    io: TcpStream,
    idle: Duration,
    last_moved: Instant,
    deadline: Pin<Box<Sleep>>,
}

impl Watched {
    fn new(io: TcpStream, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            io,
            idle,
            last_moved: now,
            deadline: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    fn moved(&mut self) {
        self.last_moved = Instant::now();
    }

    /// Called when the stream is not ready: an error once it has been idle for too long.
    fn poll_stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        loop {
            let due = self.last_moved + self.idle;
            if self.deadline.deadline() != due {
                self.deadline.as_mut().reset(due);
            }
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.last_moved + self.idle <= Instant::now() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                )));
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.poll_stalled(cx),
            failed => failed,
        }
    }
}

impl Watched {
    /// Notes a write that moved bytes; a pending one counts towards the idle timeout.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.poll_stalled(cx),
            failed => failed,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.poll_stalled(cx),
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_stalled_read_fails_after_the_idle_timeout_and_moving_bytes_postpone_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut watched = Watched::new(server, Duration::from_millis(300));
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.write_all(b"x").await.unwrap();
            assert_eq!(watched.read(&mut buf).await.unwrap(), 1);
        }
        let started = Instant::now();
        let stalled = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(stalled.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn the_open_files_limit_is_read() {
        if cfg!(target_os = "linux") {
            assert!(open_files_limit().is_some_and(|n| n > 0));
        }
    }
}
