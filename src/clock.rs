//! The one source of time for expiry and timestamps, so that tests can move time without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Seconds since the Unix epoch, as stored in the database.
pub type UnixSeconds = i64;
/// Milliseconds since the Unix epoch (poll scheduling, leases).
pub type UnixMillis = i64;

/// A clock shared by everything that reads the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> UnixMillis;

    fn now(&self) -> UnixSeconds {
        self.now_ms().div_euclid(1000)
    }
}

/// The wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMillis {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock for tests: the wall clock plus an offset that tests move forward (expiry without
/// sleeping). It follows the wall clock otherwise, because real IdPs stamp real times.
#[derive(Debug)]
pub struct OffsetClock(AtomicI64);

impl OffsetClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(0)))
    }

    /// Moves time forward by `seconds`.
    pub fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds * 1000, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> UnixMillis {
        SystemClock.now_ms() + self.0.load(Ordering::SeqCst)
    }
}
