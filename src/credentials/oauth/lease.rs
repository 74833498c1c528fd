//! One refresh of a credential at a time across replicas: a row in `credential_refresh_locks`,
//! taken with a conditional upsert (free, or its holder's time has passed) and deleted by its holder.

use std::time::Duration;

use crate::app::App;
use crate::grants::Grant;

/// How long a replica holds a credential's refresh lease at most (longer than a token request).
const LEASE_MS: i64 = 30_000;
/// How long a run waits for another replica's refresh of the same credential.
const LEASE_WAIT: Duration = Duration::from_secs(20);

/// Takes the credential's refresh lease, waiting for another holder; returns the holder id.
pub(super) async fn lock(app: &App, grant: &Grant, name: &str) -> Result<String, String> {
    let holder = uuid::Uuid::new_v4().simple().to_string();
    let started = std::time::Instant::now();
    loop {
        let now = app.clock.now_ms();
        let taken = sqlx::query(
            "INSERT INTO credential_refresh_locks (tenant_id, environment, name, holder, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, environment, name) DO UPDATE \
             SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
             WHERE credential_refresh_locks.expires_at_ms < $6",
        )
        .bind(&grant.tenant_id)
        .bind(&grant.environment)
        .bind(name)
        .bind(&holder)
        .bind(now + LEASE_MS)
        .bind(now)
        .execute(app.db.pool())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "taking an oauth refresh lease failed");
            "the credential's refresh lease cannot be taken".to_owned()
        })?;
        if taken.rows_affected() == 1 {
            return Ok(holder);
        }
        if started.elapsed() > LEASE_WAIT {
            return Err("another refresh of this credential did not finish in time".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn unlock(app: &App, grant: &Grant, name: &str, holder: &str) {
    let released = sqlx::query(
        "DELETE FROM credential_refresh_locks WHERE tenant_id = $1 AND environment = $2 AND name = $3 AND holder = $4",
    )
    .bind(&grant.tenant_id)
    .bind(&grant.environment)
    .bind(name)
    .bind(holder)
    .execute(app.db.pool())
    .await;
    if let Err(e) = released {
        // It expires on its own.
        tracing::warn!(error = %e, "releasing an oauth refresh lease failed");
    }
}
