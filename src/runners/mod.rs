//! Runners: their registry per tenant and the dispatch of one exec over mutual TLS.
//!
//! Guarantees:
//! - A runner is chosen only among the tenant's runners of the environment's pool.
//! - Secrets are sent only after a TLS 1.3 handshake in which the runner proved the identity
//!   registered for it (`spiffe://<trust-domain>/tenant/<tenant>/runner/<name>`); a wrong or
//!   missing identity ends the handshake before any request byte is written.
//! - Connections are pooled per runner (a warm mTLS connection per call after the first).

pub mod tls;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use custodian_protocol::{
    CANCEL_PATH, CancelRequest, EXEC_PATH, ExecError, ExecReply, ExecRequest, ExecResponse,
    Identity,
};
use serde::Serialize;

use crate::clock::UnixSeconds;
use crate::store::{Db, StoreError};
use crate::tenants::{TenantId, validate_slug};

/// A registered runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Runner {
    pub tenant_id: String,
    pub name: String,
    pub pool: String,
    pub url: String,
    pub created_at: UnixSeconds,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("runner name: {0}")]
    InvalidName(String),
    #[error("runner url must be https://host:port, got `{0}`")]
    InvalidUrl(String),
    #[error("a runner named `{0}` already exists in this tenant")]
    AlreadyExists(String),
    #[error("no runner `{0}` in this tenant")]
    NotFound(String),
    #[error("no tenant `{0}`")]
    UnknownTenant(TenantId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Registers a runner for the tenant.
pub async fn add(
    db: &Db,
    tenant: &TenantId,
    name: &str,
    pool: &str,
    url: &str,
    now: UnixSeconds,
) -> Result<Runner, RunnerError> {
    validate_slug(name).map_err(|e| RunnerError::InvalidName(e.to_string()))?;
    validate_slug(pool).map_err(|e| RunnerError::InvalidName(e.to_string()))?;
    let parsed = url::Url::parse(url).map_err(|_| RunnerError::InvalidUrl(url.to_owned()))?;
    if parsed.scheme() != "https" || parsed.host().is_none() || parsed.path() != "/" {
        return Err(RunnerError::InvalidUrl(url.to_owned()));
    }
    if crate::tenants::get(db, tenant.as_str()).await?.is_none() {
        return Err(RunnerError::UnknownTenant(tenant.clone()));
    }
    let runner = Runner {
        tenant_id: tenant.as_str().to_owned(),
        name: name.to_owned(),
        pool: pool.to_owned(),
        url: url.trim_end_matches('/').to_owned(),
        created_at: now,
    };
    let insert = sqlx::query(
        "INSERT INTO runners (tenant_id, name, pool, url, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&runner.tenant_id)
    .bind(&runner.name)
    .bind(&runner.pool)
    .bind(&runner.url)
    .bind(now);
    // Runs read their pool from `crate::cache`.
    let inserted = crate::cache::execute_changing(db, insert).await;
    match inserted {
        Ok(_) => Ok(runner),
        Err(e) if e.is_unique_violation() => Err(RunnerError::AlreadyExists(name.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// The tenant's runners.
pub async fn list(db: &Db, tenant: &TenantId) -> Result<Vec<Runner>, StoreError> {
    Ok(sqlx::query_as::<_, Runner>("SELECT tenant_id, name, pool, url, created_at FROM runners WHERE tenant_id = $1 ORDER BY name")
        .bind(tenant.as_str())
        .fetch_all(db.pool())
        .await?)
}

pub async fn remove(db: &Db, tenant: &TenantId, name: &str) -> Result<(), RunnerError> {
    let delete = sqlx::query("DELETE FROM runners WHERE tenant_id = $1 AND name = $2")
        .bind(tenant.as_str())
        .bind(name);
    let done = crate::cache::execute_changing(db, delete).await?;
    if done.rows_affected() == 0 {
        return Err(RunnerError::NotFound(name.chars().take(64).collect()));
    }
    Ok(())
}

/// The runners of one pool of the tenant.
pub async fn in_pool(db: &Db, tenant: &TenantId, pool: &str) -> Result<Vec<Runner>, StoreError> {
    Ok(sqlx::query_as::<_, Runner>(
        "SELECT tenant_id, name, pool, url, created_at FROM runners WHERE tenant_id = $1 AND pool = $2 ORDER BY name",
    )
    .bind(tenant.as_str())
    .bind(pool)
    .fetch_all(db.pool())
    .await?)
}

/// Why a dispatch failed. Messages never contain secret material; they are for logs, spans and
/// the audit log (the agent gets a generic message with a correlation id).
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("runner TLS is not configured on this gateway (runners.cert_file, key_file, ca_file)")]
    NotConfigured,
    #[error("cannot reach runner {runner}: {reason}")]
    Unreachable { runner: String, reason: String },
    #[error("runner {runner} refused the command: {reason}")]
    Refused { runner: String, reason: String },
    #[error("runner {runner} could not start the command: {reason}")]
    NotStarted { runner: String, reason: String },
    #[error("the exchange with runner {runner} broke off after the command was sent: {reason}")]
    Lost { runner: String, reason: String },
}

impl DispatchError {
    /// Whether the command certainly never started (its use can be given back).
    pub fn nothing_ran(&self) -> bool {
        !matches!(self, DispatchError::Lost { .. })
    }
}

/// Sends execs to runners over mTLS, pooling one client per runner.
pub struct Dispatcher {
    trust_domain: String,
    material: Option<tls::ClientMaterial>,
    clients: Mutex<HashMap<(String, String, String), reqwest::Client>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    pub fn new(trust_domain: String, material: Option<tls::ClientMaterial>) -> Self {
        Self {
            trust_domain,
            material,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The identity a runner must prove.
    pub fn identity_of(&self, runner: &Runner) -> Identity {
        Identity::Runner {
            trust_domain: self.trust_domain.clone(),
            tenant: runner.tenant_id.clone(),
            name: runner.name.clone(),
        }
    }

    fn client(&self, runner: &Runner) -> Result<reqwest::Client, DispatchError> {
        let material = self.material.as_ref().ok_or(DispatchError::NotConfigured)?;
        let key = (
            runner.tenant_id.clone(),
            runner.name.clone(),
            runner.url.clone(),
        );
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let unreachable = |reason: String| DispatchError::Unreachable {
            runner: runner.name.clone(),
            reason,
        };
        let config = material
            .config_for(&self.identity_of(runner).to_string())
            .map_err(|e| unreachable(e.to_string()))?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Sends one exec; `timeout` bounds the whole exchange. The runner streams whitespace while
    /// the command runs, then its [`ExecReply`].
    pub async fn exec(
        &self,
        runner: &Runner,
        request: &ExecRequest,
        timeout: Duration,
    ) -> Result<ExecResponse, DispatchError> {
        let client = self.client(runner)?;
        let name = || runner.name.clone();
        let response = client
            .post(format!("{}{EXEC_PATH}", runner.url))
            .json(request)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                let connect = e.is_connect();
                let reason = crate::error_chain(&e.without_url());
                if connect {
                    DispatchError::Unreachable {
                        runner: name(),
                        reason,
                    }
                } else {
                    DispatchError::Lost {
                        runner: name(),
                        reason,
                    }
                }
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| DispatchError::Lost {
            runner: name(),
            reason: crate::error_chain(&e.without_url()),
        })?;
        if !status.is_success() {
            let reason = serde_json::from_slice::<ExecError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            return Err(DispatchError::Refused {
                runner: name(),
                reason,
            });
        }
        match serde_json::from_slice::<ExecReply>(&body) {
            Ok(ExecReply::Finished(response)) => Ok(response),
            Ok(ExecReply::NotStarted(e)) => Err(DispatchError::NotStarted {
                runner: name(),
                reason: e.error,
            }),
            Err(_) => Err(DispatchError::Lost {
                runner: name(),
                reason: "malformed or incomplete exec reply".to_owned(),
            }),
        }
    }

    /// Asks the runner to stop exec `exec_id`; returns whether it was still running there.
    pub async fn cancel(&self, runner: &Runner, exec_id: &str) -> Result<bool, DispatchError> {
        let client = self.client(runner)?;
        let unreachable = |reason: String| DispatchError::Unreachable {
            runner: runner.name.clone(),
            reason,
        };
        let response = client
            .post(format!("{}{CANCEL_PATH}", runner.url))
            .json(&CancelRequest {
                exec_id: exec_id.to_owned(),
                tenant: runner.tenant_id.clone(),
            })
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| unreachable(crate::error_chain(&e.without_url())))?;
        let answer: serde_json::Value = response
            .json()
            .await
            .map_err(|e| unreachable(crate::error_chain(&e.without_url())))?;
        Ok(answer["cancelled"] == serde_json::Value::Bool(true))
    }
}
