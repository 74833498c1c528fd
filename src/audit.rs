//! The tamper-evident audit log: append-only, one HMAC-SHA256 chain per tenant under an audit key
//! that is not a data key.
//!
//! Guarantees:
//! - Every grant transition and every exec appends a record in the same database transaction as
//!   the action itself: if the record cannot be written, the action does not happen (fail closed).
//! - Record `n` carries `HMAC(key, tenant | n | time | kind | grant | detail | mac of n-1)`.
//!   [`verify`] finds a changed, deleted, reordered or inserted record and names it.
//! - [`tenants`] lists every tenant of the tenants table, of the chain heads and of the records, so
//!   a chain whose head was deleted is still checked; a chain without its head, and a tenant whose
//!   grants have no records (head and records deleted together), are tampering.
//! - Details never hold secret material (values, tokens, device codes).
//!
//! Limit: someone with write access to the database who deletes the newest records (and the grants
//! they recorded) and rewinds the chain head accordingly is not detected by the chain alone; export
//! the log (or watch the head) to detect truncation.

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::clock::UnixMillis;
use crate::keys::{MasterKey, Purpose};
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

/// The MAC of the record before the first.
const GENESIS: &str = "genesis";

/// The key that MACs the audit chain.
pub struct AuditKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// Derived from the master key under its own label: independent of every data key.
    pub fn derived_from(master: &MasterKey) -> Self {
        Self(master.subkey(Purpose::Audit))
    }

    /// A dedicated key (a file in the master key's format), to keep the audit key apart.
    pub fn load(file: &std::path::Path) -> Result<Self, crate::keys::KeyError> {
        let key = MasterKey::load(Some(file), "", std::iter::empty())?;
        Ok(Self(key.subkey(Purpose::Audit)))
    }

    fn mac(&self, record: &Record<'_>) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_slice())
            .expect("HMAC takes keys of any length");
        for part in [
            record.tenant,
            &record.seq.to_string(),
            &record.at_ms.to_string(),
            record.kind,
            record.grant_id,
            record.detail,
            record.prev_mac,
        ] {
            // Length-prefixed, so that no two records serialize alike.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

struct Record<'a> {
    tenant: &'a str,
    seq: i64,
    at_ms: i64,
    kind: &'a str,
    grant_id: &'a str,
    detail: &'a str,
    prev_mac: &'a str,
}

/// Appends a record inside the caller's transaction (which must also perform the action).
pub async fn append(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    key: &AuditKey,
    tenant: &str,
    grant_id: &str,
    kind: &str,
    detail: &serde_json::Value,
    now_ms: UnixMillis,
) -> Result<i64, StoreError> {
    // Taking the head row first serializes appenders of this tenant (row lock until commit); the
    // first record of a tenant follows the genesis head.
    let (seq, prev_mac): (i64, String) = sqlx::query_as(
        "INSERT INTO audit_heads (tenant_id, seq, mac) VALUES ($1, 1, $2) \
         ON CONFLICT (tenant_id) DO UPDATE SET seq = audit_heads.seq + 1 RETURNING seq, mac",
    )
    .bind(tenant)
    .bind(GENESIS)
    .fetch_one(&mut **tx)
    .await?;
    let detail = detail.to_string();
    let record = Record {
        tenant,
        seq,
        at_ms: now_ms,
        kind,
        grant_id,
        detail: &detail,
        prev_mac: &prev_mac,
    };
    let mac = key.mac(&record);
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, seq, at_ms, kind, grant_id, detail, prev_mac, mac) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(tenant)
    .bind(seq)
    .bind(now_ms)
    .bind(kind)
    .bind(grant_id)
    .bind(&detail)
    .bind(&prev_mac)
    .bind(&mac)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE audit_heads SET mac = $1 WHERE tenant_id = $2")
        .bind(&mac)
        .bind(tenant)
        .execute(&mut **tx)
        .await?;
    Ok(seq)
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub tenant_id: String,
    pub seq: i64,
    pub at_ms: i64,
    pub kind: String,
    pub grant_id: String,
    pub detail: String,
    pub prev_mac: String,
    pub mac: String,
}

macro_rules! select_entries {
    ($clause:literal) => {
        concat!(
            "SELECT tenant_id, seq, at_ms, kind, grant_id, detail, prev_mac, mac FROM audit_log ",
            $clause
        )
    };
}

/// The records of one grant, oldest first.
pub async fn for_grant(
    db: &Db,
    tenant: &TenantId,
    grant_id: &str,
) -> Result<Vec<Entry>, StoreError> {
    Ok(sqlx::query_as::<_, Entry>(select_entries!(
        "WHERE tenant_id = $1 AND grant_id = $2 ORDER BY seq"
    ))
    .bind(tenant.as_str())
    .bind(grant_id)
    .fetch_all(db.pool())
    .await?)
}

/// Every record of a tenant, in chain order.
pub async fn all(db: &Db, tenant: &TenantId) -> Result<Vec<Entry>, StoreError> {
    Ok(
        sqlx::query_as::<_, Entry>(select_entries!("WHERE tenant_id = $1 ORDER BY seq"))
            .bind(tenant.as_str())
            .fetch_all(db.pool())
            .await?,
    )
}

/// Every tenant that has, or should have, an audit chain: those of the tenants table, of the chain
/// heads and of the records. A tenant that appears in only one of them is still verified.
pub async fn tenants(db: &Db) -> Result<Vec<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM tenants UNION SELECT tenant_id FROM audit_heads \
         UNION SELECT tenant_id FROM audit_log ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
}

/// The first problem found in a tenant's chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tampering {
    #[error("tenant {tenant}: record {seq} was changed (its MAC does not match its content)")]
    Changed { tenant: String, seq: i64 },
    #[error("tenant {tenant}: record {expected} is missing (deleted), the chain jumps to {found}")]
    Missing {
        tenant: String,
        expected: i64,
        found: i64,
    },
    #[error(
        "tenant {tenant}: record {seq} does not follow record {previous} (reordered or inserted)"
    )]
    Unlinked {
        tenant: String,
        seq: i64,
        previous: i64,
    },
    #[error(
        "tenant {tenant}: the chain ends at record {last} but its head says {head} (records removed from the end)"
    )]
    Truncated {
        tenant: String,
        last: i64,
        head: i64,
    },
    #[error(
        "tenant {tenant}: the chain has records up to {last} but its head is missing (deleted)"
    )]
    HeadMissing { tenant: String, last: i64 },
    #[error(
        "tenant {tenant}: grant {grant} has no audit record (its records were deleted, with the chain head rewound or removed)"
    )]
    Unrecorded { tenant: String, grant: String },
}

/// Checks a tenant's chain; `Ok(n)` is the number of records verified.
pub async fn verify(
    db: &Db,
    key: &AuditKey,
    tenant: &TenantId,
) -> Result<Result<usize, Tampering>, StoreError> {
    let entries = all(db, tenant).await?;
    let head: Option<(i64,)> = sqlx::query_as("SELECT seq FROM audit_heads WHERE tenant_id = $1")
        .bind(tenant.as_str())
        .fetch_optional(db.pool())
        .await?;
    let t = tenant.as_str().to_owned();
    let mut previous_mac = GENESIS.to_owned();
    let mut previous_seq = 0;
    for entry in &entries {
        if entry.seq != previous_seq + 1 {
            return Ok(Err(if entry.seq > previous_seq + 1 {
                Tampering::Missing {
                    tenant: t,
                    expected: previous_seq + 1,
                    found: entry.seq,
                }
            } else {
                Tampering::Unlinked {
                    tenant: t,
                    seq: entry.seq,
                    previous: previous_seq,
                }
            }));
        }
        let expected = key.mac(&Record {
            tenant: &entry.tenant_id,
            seq: entry.seq,
            at_ms: entry.at_ms,
            kind: &entry.kind,
            grant_id: &entry.grant_id,
            detail: &entry.detail,
            prev_mac: &entry.prev_mac,
        });
        let mac_ok: bool =
            subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), entry.mac.as_bytes()).into();
        if !mac_ok {
            return Ok(Err(Tampering::Changed {
                tenant: t,
                seq: entry.seq,
            }));
        }
        if entry.prev_mac != previous_mac {
            return Ok(Err(Tampering::Unlinked {
                tenant: t,
                seq: entry.seq,
                previous: previous_seq,
            }));
        }
        previous_mac = entry.mac.clone();
        previous_seq = entry.seq;
    }
    match head {
        Some((head,)) if head != previous_seq => {
            return Ok(Err(Tampering::Truncated {
                tenant: t,
                last: previous_seq,
                head,
            }));
        }
        None if !entries.is_empty() => {
            return Ok(Err(Tampering::HeadMissing {
                tenant: t,
                last: previous_seq,
            }));
        }
        _ => {}
    }
    // Every grant is requested in the same transaction as its first record: a grant without one
    // means records were removed, head included, and the chain alone would look consistent.
    let unrecorded: Option<(String,)> = sqlx::query_as(
        "SELECT g.id FROM grants g WHERE g.tenant_id = $1 AND NOT EXISTS \
         (SELECT 1 FROM audit_log a WHERE a.tenant_id = g.tenant_id AND a.grant_id = g.id \
          AND a.kind = 'grant.requested') ORDER BY g.created_at, g.id LIMIT 1",
    )
    .bind(tenant.as_str())
    .fetch_optional(db.pool())
    .await?;
    if let Some((grant,)) = unrecorded {
        return Ok(Err(Tampering::Unrecorded { tenant: t, grant }));
    }
    Ok(Ok(entries.len()))
}
