//! Storage: one sqlx pool over SQLite (the embedded default) or PostgreSQL (production, several
//! replicas). Queries and migrations (`migrations/`) are written once in the SQL both engines share,
//! with `$n` placeholders that both drivers accept, and the whole suite runs against both.
//!
//! Every query on tenant data takes the tenant id as a bound parameter: there is no query that reads
//! or writes across tenants except the admin listing of tenants itself.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

/// Which database engine is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle to the database, cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// A migration applied by [`Db::migrate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: i64,
    pub description: String,
}

/// Errors from the storage layer. Their text may name SQL or paths, so it is logged, never sent to
/// a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether this is a uniqueness violation (e.g. a name that already exists).
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Sqlx(sqlx::Error::Database(e)) if e.is_unique_violation())
    }
}

impl Db {
    /// Connects to `url` (`sqlite:PATH`, `postgres://…`), creating a SQLite file and its directory if
    /// missing. Does not migrate: call [`Db::migrate`].
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let url = match backend {
            Backend::Sqlite => prepare_sqlite_url(url)?,
            Backend::Postgres => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings a connection each time it leaves the pool. A SQLite connection is a file
            // this process holds open and cannot go stale; the ping was a round trip to its
            // worker thread before every transaction. PostgreSQL connections can die with the
            // server, so they are still tested.
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self { pool, backend })
    }

    /// Applies pending migrations and returns those this call applied (none when the database was
    /// up to date). Concurrent callers (several replicas starting) are serialized by the
    /// migrator's database lock, so each migration is reported by the one caller that applied it.
    pub async fn migrate(&self) -> Result<Vec<AppliedMigration>, StoreError> {
        use sqlx::migrate::Migrate;
        let mut migrator = sqlx::migrate!("./migrations");
        let mut conn = self.pool.acquire().await?;
        conn.lock().await?;
        // The lock is ours for the whole listing and run; the migrator must not take it again.
        migrator.set_locking(false);
        let applied = async {
            conn.ensure_migrations_table(&migrator.table_name).await?;
            let before: std::collections::HashSet<i64> = conn
                .list_applied_migrations(&migrator.table_name)
                .await?
                .into_iter()
                .map(|m| m.version)
                .collect();
            migrator.run_direct(None, &mut *conn, false).await?;
            Ok::<_, sqlx::migrate::MigrateError>(
                migrator
                    .iter()
                    .filter(|m| !m.migration_type.is_down_migration())
                    .filter(|m| !before.contains(&m.version))
                    .map(|m| AppliedMigration {
                        version: m.version,
                        description: m.description.to_string(),
                    })
                    .collect(),
            )
        }
        .await;
        let unlocked = conn.unlock().await;
        let applied = applied?;
        unlocked?;
        Ok(applied)
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begins a transaction that reads before it writes. SQLite's default (deferred) transaction
    /// takes the write lock only at its first write, and fails at once with `SQLITE_BUSY`, without
    /// waiting, when another connection wrote since its first read; `BEGIN IMMEDIATE` takes the
    /// write lock at the start, waiting for it under the busy timeout. PostgreSQL: a plain `BEGIN`.
    /// Transactions whose first statement writes need none of this (and are faster without it).
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(tx)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates the directory of a SQLite file and asks the driver to create the file.
fn prepare_sqlite_url(url: &str) -> Result<String, StoreError> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:"
        && let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok(format!("sqlite://{path}?{query}"))
}
