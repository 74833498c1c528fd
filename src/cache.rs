//! Per-replica caches of what every MCP call would otherwise read from the database: verified
//! agent tokens, each tenant's `list_environments` answer, what a `run` needs of its environment
//! (the environment, its runner pool, its egress rules) and which environment a grant is for.
//!
//! Guarantees:
//! - Nothing secret is cached. A token entry holds what the database holds (the SHA-256 of the
//!   token's secret part and the token's name); every request still hashes the presented token and
//!   compares in constant time. Only valid tokens are cached: malformed, unknown, revoked and
//!   other-tenant tokens and unknown tenants go to the database every time.
//! - Every change a cache depends on (agent token revocation, environments and their declared
//!   secret names and credential kinds, egress rules, runners) increments the `cache_generation`
//!   row in the change's own transaction ([`changed`]). Before answering from a cache, a replica
//!   re-reads that row if its last reading is older than [`REFRESH`] and drops every entry when the
//!   row moved: a revocation on any replica is honoured by all of them within [`REFRESH`] plus one
//!   query. A change made by this process makes its next request re-read the row. Entries also
//!   expire after [`MAX_AGE`].
//! - An entry is kept only if no change was seen while it was read: it carries the generation read
//!   before the database was (a [`Ticket`]), and an entry from an older generation is dropped.
//! - A failure to read the row fails the request (no answer from a cache that cannot be checked).
//! - A grant's environment never changes, so that mapping is right whatever the generation; it is
//!   kept only for grants this replica has used, and only spares the read naming the environment
//!   (every use is still checked and counted by the database, see `grants::consume`).
//!
//! A change made outside Custodian (SQL by hand) must increment `cache_generation` too, or it is
//! seen only after [`MAX_AGE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::CallToolResult;

use crate::environments::Environment;
use crate::runners::Runner;
use crate::store::{Db, StoreError};
use crate::tenants::TenantId;

/// How old the last reading of the generation may be when a cache answers.
pub const REFRESH: Duration = Duration::from_millis(250);
/// How long an entry is kept even when nothing changed.
pub const MAX_AGE: Duration = Duration::from_secs(30);
/// Entries per cache; a full cache is emptied (bounded memory under many tokens or tenants).
const MAX_ENTRIES: usize = 10_000;

/// Changes made by this process, so that its own next request re-reads the generation.
static LOCAL_CHANGES: AtomicU64 = AtomicU64::new(0);

/// Records, inside the transaction making a change, that cached views are out of date. Call
/// [`committed`] after the transaction commits.
pub async fn changed(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(), StoreError> {
    sqlx::query("UPDATE cache_generation SET generation = generation + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    LOCAL_CHANGES.fetch_add(1, Ordering::Release);
    Ok(())
}

/// After the commit of a transaction that called [`changed`]: this process's next request re-reads
/// the generation again, so that a read made between the change and its commit (which saw the
/// old rows) is not served from the cache until the next refresh.
pub fn committed() {
    LOCAL_CHANGES.fetch_add(1, Ordering::Release);
}

/// Runs one statement that changes what is cached, with [`changed`], in one transaction.
pub async fn execute_changing(
    db: &Db,
    statement: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
) -> Result<sqlx::any::AnyQueryResult, StoreError> {
    let mut tx = db.pool().begin().await?;
    let done = statement.execute(&mut *tx).await?;
    changed(&mut tx).await?;
    tx.commit().await?;
    committed();
    Ok(done)
}

/// A verified token as cached: what the database row says.
#[derive(Debug, Clone)]
pub struct CachedToken {
    /// Hex SHA-256 of the token's secret part, as stored.
    pub secret_hash: String,
    pub name: String,
}

/// The generation current when a read from the database began.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(i64);

#[derive(Debug)]
struct Entry<T> {
    value: T,
    at: Instant,
}

#[derive(Debug, Default)]
struct State {
    generation: Option<i64>,
    checked_at: Option<Instant>,
    local_seen: u64,
    tokens: HashMap<(TenantId, String), Entry<CachedToken>>,
    environments: HashMap<TenantId, Entry<Arc<EnvironmentsAnswer>>>,
    run_targets: HashMap<(TenantId, String), Entry<Arc<RunTarget>>>,
    grant_environments: HashMap<(TenantId, String), Entry<String>>,
}

/// A tenant's `list_environments` answer, and the same serialized as a JSON-RPC `result`.
#[derive(Debug)]
pub struct EnvironmentsAnswer {
    pub result: CallToolResult,
    pub json: String,
}

/// What a run needs to know of its environment, as the database said under one generation.
#[derive(Debug)]
pub struct RunTarget {
    pub environment: Environment,
    /// The runners of the environment's pool, by name.
    pub runners: Vec<Runner>,
    pub egress: Vec<crate::egress::Rule>,
}

impl State {
    fn current(&self, local: u64) -> Option<Ticket> {
        let recent = self.checked_at.is_some_and(|at| at.elapsed() < REFRESH);
        (recent && self.local_seen == local)
            .then_some(self.generation)
            .flatten()
            .map(Ticket)
    }
}

/// The caches of one replica.
#[derive(Debug, Default)]
pub struct Caches {
    state: Mutex<State>,
    /// One reader of the generation at a time; the others wait for its answer.
    refresh: tokio::sync::Mutex<()>,
}

impl Caches {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data: a panic elsewhere cannot leave it half-updated.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Brings the caches up to date with changes committed more than [`REFRESH`] ago (and with
    /// this process's own), and returns the ticket for entries read from the database now.
    pub async fn fresh(&self, db: &Db) -> Result<Ticket, StoreError> {
        if let Some(ticket) = self.state().current(LOCAL_CHANGES.load(Ordering::Acquire)) {
            return Ok(ticket);
        }
        let _one = self.refresh.lock().await;
        let local = LOCAL_CHANGES.load(Ordering::Acquire);
        if let Some(ticket) = self.state().current(local) {
            return Ok(ticket);
        }
        let started = Instant::now();
        let (generation,): (i64,) =
            sqlx::query_as("SELECT generation FROM cache_generation WHERE id = 1")
                .fetch_one(db.pool())
                .await?;
        let mut state = self.state();
        if state.generation != Some(generation) {
            state.tokens = HashMap::new();
            state.environments = HashMap::new();
            state.run_targets = HashMap::new();
            state.grant_environments = HashMap::new();
            state.generation = Some(generation);
        }
        state.checked_at = Some(started);
        state.local_seen = local;
        Ok(Ticket(generation))
    }

    /// The cached token `id` of `tenant`; call [`Caches::fresh`] first.
    pub fn token(&self, tenant: &TenantId, id: &str) -> Option<CachedToken> {
        let state = self.state();
        let entry = state.tokens.get(&(tenant.clone(), id.to_owned()))?;
        (entry.at.elapsed() < MAX_AGE).then(|| entry.value.clone())
    }

    /// Keeps a token read from the database under `ticket`.
    pub fn keep_token(&self, ticket: Ticket, tenant: &TenantId, id: &str, token: CachedToken) {
        let mut state = self.state();
        if state.generation == Some(ticket.0) {
            keep(&mut state.tokens, (tenant.clone(), id.to_owned()), token);
        }
    }

    /// The cached `list_environments` answer of `tenant`; call [`Caches::fresh`] first.
    pub fn environments(&self, tenant: &TenantId) -> Option<Arc<EnvironmentsAnswer>> {
        let state = self.state();
        let entry = state.environments.get(tenant)?;
        (entry.at.elapsed() < MAX_AGE).then(|| Arc::clone(&entry.value))
    }

    /// Keeps a `list_environments` answer read from the database under `ticket`.
    pub fn keep_environments(
        &self,
        ticket: Ticket,
        tenant: &TenantId,
        answer: Arc<EnvironmentsAnswer>,
    ) {
        let mut state = self.state();
        if state.generation == Some(ticket.0) {
            keep(&mut state.environments, tenant.clone(), answer);
        }
    }
}

impl Caches {
    /// What a run in `environment` of `tenant` needs; call [`Caches::fresh`] first.
    pub fn run_target(&self, tenant: &TenantId, environment: &str) -> Option<Arc<RunTarget>> {
        let state = self.state();
        let entry = state
            .run_targets
            .get(&(tenant.clone(), environment.to_owned()))?;
        (entry.at.elapsed() < MAX_AGE).then(|| Arc::clone(&entry.value))
    }

    /// Keeps what a run needs, read from the database under `ticket`.
    pub fn keep_run_target(&self, ticket: Ticket, tenant: &TenantId, target: Arc<RunTarget>) {
        let mut state = self.state();
        if state.generation == Some(ticket.0) {
            let key = (tenant.clone(), target.environment.name.clone());
            keep(&mut state.run_targets, key, target);
        }
    }

    /// The environment of grant `id` of `tenant`, if this replica used the grant before.
    pub fn grant_environment(&self, tenant: &TenantId, id: &str) -> Option<String> {
        let state = self.state();
        let entry = state
            .grant_environments
            .get(&(tenant.clone(), id.to_owned()))?;
        (entry.at.elapsed() < MAX_AGE).then(|| entry.value.clone())
    }

    /// Remembers the environment of a grant just used.
    pub fn keep_grant_environment(&self, tenant: &TenantId, id: &str, environment: &str) {
        let mut state = self.state();
        let key = (tenant.clone(), id.to_owned());
        keep(&mut state.grant_environments, key, environment.to_owned());
    }
}

fn keep<K: std::hash::Hash + Eq, T>(map: &mut HashMap<K, Entry<T>>, key: K, value: T) {
    if map.len() >= MAX_ENTRIES {
        *map = HashMap::new();
    }
    map.insert(
        key,
        Entry {
            value,
            at: Instant::now(),
        },
    );
}
