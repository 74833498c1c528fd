//! The secret store: values an environment's commands receive, envelope-encrypted at rest.
//!
//! Guarantees:
//! - A value is sealed (AES-256-GCM) under its tenant's data key with `tenant/environment/name/
//!   version` as associated data; a ciphertext moved to another row does not open. Data keys are
//!   stored only wrapped by the master key (bound to `tenant/version`).
//! - Values shorter than 8 bytes are refused (they cannot be redacted safely).
//! - Nothing here returns a value to a client: [`list`] gives names, versions and times; only
//!   [`open_for_run`] (which [`load_for_run`] calls) opens values, into zeroizing memory, for
//!   dispatch to a runner. [`sealed_for_run`] reads them still encrypted.
//! - Rotating the master key re-wraps every data key; values are not touched.

use serde::Serialize;
use zeroize::Zeroizing;

use crate::clock::UnixSeconds;
use crate::credentials::{CredentialError, Kind, Spec};
use crate::environments::{self, validate_secret_name};
use crate::keys::{DataKey, KeyError, MasterKey};
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

/// Shortest value accepted (the redactor's limit).
pub const MIN_VALUE_LEN: usize = custodian_redact::MIN_SECRET_LEN;
/// Longest value accepted.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no environment `{0}` in this tenant")]
    UnknownEnvironment(String),
    #[error("secret name: {0}")]
    InvalidName(String),
    #[error(
        "the value is {0} bytes; values shorter than {MIN_VALUE_LEN} bytes cannot be redacted safely and are refused"
    )]
    TooShort(usize),
    #[error("the value is over {MAX_VALUE_LEN} bytes")]
    TooLong,
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error("no secret `{0}` in this environment")]
    NotFound(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for SecretError {
    fn from(e: sqlx::Error) -> Self {
        SecretError::Store(e.into())
    }
}

/// A stored secret as listed (never its value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SecretInfo {
    pub name: String,
    pub version: i64,
    pub set_at: UnixSeconds,
}

fn value_aad(tenant: &TenantId, env: &str, name: &str, version: i64) -> String {
    format!("secret/{}/{env}/{name}/{version}", tenant.as_str())
}

fn key_aad(tenant: &TenantId, version: i64) -> String {
    format!("data-key/{}/{version}", tenant.as_str())
}

/// The tenant's newest data key, created on first use.
async fn data_key(
    db: &Db,
    master: &MasterKey,
    tenant: &TenantId,
    now: UnixSeconds,
) -> Result<(i64, DataKey), SecretError> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT version, wrapped_key FROM tenant_keys WHERE tenant_id = $1 ORDER BY version DESC LIMIT 1",
    )
    .bind(tenant.as_str())
    .fetch_optional(db.pool())
    .await?;
    if let Some((version, wrapped)) = row {
        return Ok((
            version,
            DataKey::unwrap_with(master, &key_aad(tenant, version), &wrapped)?,
        ));
    }
    let key = DataKey::generate();
    let inserted = sqlx::query(
        "INSERT INTO tenant_keys (tenant_id, version, wrapped_key, master_key_id, created_at) VALUES ($1, 1, $2, $3, $4)",
    )
    .bind(tenant.as_str())
    .bind(key.wrap(master, &key_aad(tenant, 1)))
    .bind(master.id())
    .bind(now)
    .execute(db.pool())
    .await
    .map_err(StoreError::from);
    match inserted {
        Ok(_) => Ok((1, key)),
        // Another writer created it first: use theirs.
        Err(e) if e.is_unique_violation() => Box::pin(data_key(db, master, tenant, now)).await,
        Err(e) => Err(e.into()),
    }
}

async fn data_key_version(
    db: &Db,
    master: &MasterKey,
    tenant: &TenantId,
    version: i64,
) -> Result<DataKey, SecretError> {
    let (wrapped,): (String,) =
        sqlx::query_as("SELECT wrapped_key FROM tenant_keys WHERE tenant_id = $1 AND version = $2")
            .bind(tenant.as_str())
            .bind(version)
            .fetch_one(db.pool())
            .await?;
    Ok(DataKey::unwrap_with(
        master,
        &key_aad(tenant, version),
        &wrapped,
    )?)
}

/// Seals `value` under the tenant's newest data key with `aad` (for values the gateway makes
/// itself, e.g. a password of a per-grant database role); returns the key version and ciphertext.
pub(crate) async fn seal_for_tenant(
    db: &Db,
    master: &MasterKey,
    tenant: &TenantId,
    aad: &str,
    value: &[u8],
    now: UnixSeconds,
) -> Result<(i64, String), SecretError> {
    let (version, key) = data_key(db, master, tenant, now).await?;
    Ok((version, key.seal(aad, value)))
}

/// Opens what [`seal_for_tenant`] sealed.
pub(crate) async fn open_for_tenant(
    db: &Db,
    master: &MasterKey,
    tenant: &TenantId,
    key_version: i64,
    aad: &str,
    sealed: &str,
) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let key = data_key_version(db, master, tenant, key_version).await?;
    Ok(key.open(aad, sealed)?)
}

/// Stores a new version of `name` in `env` as an environment variable, declaring the name on the
/// environment if needed.
pub async fn set(
    db: &Db,
    master: &MasterKey,
    tenant: &TenantId,
    env: &str,
    name: &str,
    value: &[u8],
    now: UnixSeconds,
) -> Result<SecretInfo, SecretError> {
    let spec = Spec {
        kind: Kind::Env,
        settings: serde_json::Value::Null,
    };
    set_credential(db, master, tenant, env, name, &spec, value, now).await
}

/// Stores a new version of the credential `name` in `env` with its kind and settings (`spec`,
/// validated by [`Spec::new`]), declaring the name on the environment if needed. The value and
/// the kind change together, in one transaction.
#[allow(clippy::too_many_arguments)]
pub async fn set_credential(
    db: &Db,
    master: &MasterKey,
    tenant: &TenantId,
    env: &str,
    name: &str,
    spec: &Spec,
    value: &[u8],
    now: UnixSeconds,
) -> Result<SecretInfo, SecretError> {
    validate_secret_name(name).map_err(|e| SecretError::InvalidName(e.to_string()))?;
    if value.len() < MIN_VALUE_LEN {
        return Err(SecretError::TooShort(value.len()));
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(SecretError::TooLong);
    }
    spec.check_value(value)?;
    let Some(environment) = environments::get(db, tenant, env).await? else {
        return Err(SecretError::UnknownEnvironment(env.to_owned()));
    };
    let (key_version, key) = data_key(db, master, tenant, now).await?;
    let mut tx = db.begin_write().await?;
    let (latest,): (Option<i64>,) = sqlx::query_as(
        "SELECT MAX(version) FROM secrets WHERE tenant_id = $1 AND environment = $2 AND name = $3",
    )
    .bind(tenant.as_str())
    .bind(env)
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    let version = latest.unwrap_or(0) + 1;
    sqlx::query(
        "INSERT INTO secrets (tenant_id, environment, name, version, key_version, ciphertext, set_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(tenant.as_str())
    .bind(env)
    .bind(name)
    .bind(version)
    .bind(key_version)
    .bind(key.seal(&value_aad(tenant, env, name, version), value))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let mut names = environment.secret_names.clone();
    if !names.iter().any(|n| n == name) {
        names.push(name.to_owned());
    }
    let mut kinds = environment.credentials.clone();
    if spec.kind == Kind::Env {
        kinds.remove(name);
    } else {
        kinds.insert(name.to_owned(), spec.clone());
    }
    if names != environment.secret_names || kinds != environment.credentials {
        environments::set_secret_names(&mut tx, tenant, env, &names, &kinds).await?;
    }
    tx.commit().await?;
    crate::cache::committed();
    Ok(SecretInfo {
        name: name.to_owned(),
        version,
        set_at: now,
    })
}

/// The newest version of each secret in `env` (names, versions, times).
pub async fn list(db: &Db, tenant: &TenantId, env: &str) -> Result<Vec<SecretInfo>, SecretError> {
    Ok(sqlx::query_as::<_, SecretInfo>(
        "SELECT s.name, s.version, s.set_at FROM secrets s WHERE s.tenant_id = $1 AND s.environment = $2 \
         AND s.version = (SELECT MAX(version) FROM secrets m WHERE m.tenant_id = s.tenant_id \
         AND m.environment = s.environment AND m.name = s.name) ORDER BY s.name",
    )
    .bind(tenant.as_str())
    .bind(env)
    .fetch_all(db.pool())
    .await?)
}

/// Deletes every version of `name` in `env` and undeclares it.
pub async fn delete(db: &Db, tenant: &TenantId, env: &str, name: &str) -> Result<(), SecretError> {
    let Some(environment) = environments::get(db, tenant, env).await? else {
        return Err(SecretError::UnknownEnvironment(env.to_owned()));
    };
    let mut tx = db.begin_write().await?;
    let done =
        sqlx::query("DELETE FROM secrets WHERE tenant_id = $1 AND environment = $2 AND name = $3")
            .bind(tenant.as_str())
            .bind(env)
            .bind(name)
            .execute(&mut *tx)
            .await?;
    if done.rows_affected() == 0 {
        return Err(SecretError::NotFound(name.chars().take(128).collect()));
    }
    let names: Vec<String> = environment
        .secret_names
        .into_iter()
        .filter(|n| n != name)
        .collect();
    let mut kinds = environment.credentials;
    kinds.remove(name);
    environments::set_secret_names(&mut tx, tenant, env, &names, &kinds).await?;
    tx.commit().await?;
    crate::cache::committed();
    Ok(())
}

/// A secret opened for one run.
pub struct OpenedSecret {
    pub name: String,
    pub version: i64,
    pub value: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for OpenedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenedSecret({}, ..)", self.name)
    }
}

/// Opens the newest version of every secret of `env`, for dispatch to a runner.
pub async fn load_for_run(
    db: &Db,
    master: &MasterKey,
    tenant: &TenantId,
    env: &str,
) -> Result<Vec<OpenedSecret>, SecretError> {
    let sealed = sealed_for_run(db, tenant, env).await?;
    open_for_run(master, tenant, env, sealed)
}

/// The newest version of every secret of `env` as stored: encrypted, with the wrapped data key
/// that sealed it. Nothing in it can be read without the master key; see [`open_for_run`].
pub async fn sealed_for_run(
    db: &Db,
    tenant: &TenantId,
    env: &str,
) -> Result<SealedSecrets, SecretError> {
    // One query: each secret's newest version with the wrapped data key that sealed it.
    let rows: Vec<(String, i64, i64, String, Option<String>)> = sqlx::query_as(
        "SELECT s.name, s.version, s.key_version, s.ciphertext, k.wrapped_key FROM secrets s \
         LEFT JOIN tenant_keys k ON k.tenant_id = s.tenant_id AND k.version = s.key_version \
         WHERE s.tenant_id = $1 AND s.environment = $2 AND s.version = (SELECT MAX(version) \
         FROM secrets m WHERE m.tenant_id = s.tenant_id AND m.environment = s.environment \
         AND m.name = s.name) ORDER BY s.name",
    )
    .bind(tenant.as_str())
    .bind(env)
    .fetch_all(db.pool())
    .await?;
    Ok(SealedSecrets(rows))
}

/// Secrets of one environment as [`sealed_for_run`] read them: ciphertext and wrapped keys only.
pub struct SealedSecrets(Vec<(String, i64, i64, String, Option<String>)>);

/// Opens what [`sealed_for_run`] read for `tenant` and `env`, into zeroizing memory.
pub fn open_for_run(
    master: &MasterKey,
    tenant: &TenantId,
    env: &str,
    sealed: SealedSecrets,
) -> Result<Vec<OpenedSecret>, SecretError> {
    let rows = sealed.0;
    let mut opened = Vec::with_capacity(rows.len());
    let mut keys: Vec<(i64, DataKey)> = Vec::new();
    for (name, version, key_version, ciphertext, wrapped) in rows {
        if !keys.iter().any(|(v, _)| *v == key_version) {
            // A secret whose key is gone fails the run rather than going missing from it.
            let wrapped = wrapped.ok_or_else(|| {
                StoreError::Corrupt(format!("data key version {key_version} is missing"))
            })?;
            let key = DataKey::unwrap_with(master, &key_aad(tenant, key_version), &wrapped)?;
            keys.push((key_version, key));
        }
        let key = &keys
            .iter()
            .find(|(v, _)| *v == key_version)
            .expect("just loaded")
            .1;
        let value = key.open(&value_aad(tenant, env, &name, version), &ciphertext)?;
        opened.push(OpenedSecret {
            name,
            version,
            value,
        });
    }
    Ok(opened)
}

/// Re-wraps every tenant data key from `old` to `new`. Returns how many keys were re-wrapped.
pub async fn rotate_master_key(
    db: &Db,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, SecretError> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT tenant_id, version, wrapped_key FROM tenant_keys ORDER BY tenant_id, version",
    )
    .fetch_all(db.pool())
    .await?;
    let mut tx = db.begin_write().await?;
    let count = rows.len();
    for (tenant, version, wrapped) in rows {
        let tenant =
            TenantId::parse(&tenant).map_err(|_| StoreError::Corrupt("tenant id".into()))?;
        let aad = key_aad(&tenant, version);
        let key = DataKey::unwrap_with(old, &aad, &wrapped)?;
        sqlx::query("UPDATE tenant_keys SET wrapped_key = $1, master_key_id = $2 WHERE tenant_id = $3 AND version = $4")
            .bind(key.wrap(new, &aad))
            .bind(new.id())
            .bind(tenant.as_str())
            .bind(version)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(count)
}
