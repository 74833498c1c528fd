//! `postgres` credentials against the real PostgreSQL on 127.0.0.1:5432, with a real runner and
//! `psql` inside runs (reached through the environment's `tcp:127.0.0.1:5432` forward). The admin
//! is a non-superuser role with CREATEROLE and `pg_signal_backend`, as an operator would set it up.
//!
//! The server trusts every local connection, so it does not check passwords: a login test against
//! it would prove nothing. Instead the test learns the password the way an agent could (a run
//! prints its environment in base64) and checks it against the SCRAM verifier PostgreSQL stores,
//! and "no longer logs in" is asserted as "the role does not exist", which stops every way in.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use crate::harness::{Backend, TestApp};
use crate::mcp_clients::connect;
use crate::on_both_backends;
use crate::processes::{CUSTODIAN, Proc, free_port, wait_healthy};
use crate::runners::{Client, Pki, TestRunner, run, runner_binary};
use custodian::credentials::{Kind, Spec};
use custodian::tenants::TenantId;

on_both_backends!(
    a_grant_has_its_own_role_only_while_it_is_active,
    roles_of_expired_and_used_up_grants_go_after_their_last_run,
);

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// A throwaway database, a template role (reads `items`, may create tables), an owner role (takes
/// over what dropped roles owned, when so configured) and an admin role; all dropped with this
/// value (and any role Custodian made that a failed test left behind).
struct Cluster {
    pool: PgPool,
    database: String,
    template: String,
    owner: String,
    admin: String,
    admin_password: String,
}

impl Cluster {
    async fn new() -> Option<Cluster> {
        // The admin's password is a canary: the test's own statements are not logged either.
        let options =
            <PgConnectOptions as std::str::FromStr>::from_str(&format!("{SERVER}/postgres"))
                .unwrap()
                .disable_statement_logging();
        let pool = match PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
        {
            Ok(pool) => pool,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipping: PostgreSQL is unreachable: {e}");
                return None;
            }
            Err(e) => panic!("PostgreSQL is required in CI: {e}"),
        };
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let cluster = Cluster {
            pool,
            database: format!("credtest_{tag}"),
            template: format!("credtest_read_{tag}"),
            owner: format!("credtest_owner_{tag}"),
            admin: format!("credtest_admin_{tag}"),
            admin_password: format!("admPw{}", hex::encode(rand::random::<[u8; 12]>())),
        };
        for statement in [
            format!("CREATE DATABASE {}", cluster.database),
            format!("CREATE ROLE {} NOLOGIN", cluster.template),
            format!("CREATE ROLE {} NOLOGIN", cluster.owner),
            format!(
                "CREATE ROLE {} LOGIN CREATEROLE PASSWORD '{}'",
                cluster.admin, cluster.admin_password
            ),
            format!("GRANT pg_signal_backend TO {}", cluster.admin),
            format!("GRANT {} TO {}", cluster.owner, cluster.admin),
        ] {
            cluster.exec(&statement).await;
        }
        let mut db = cluster.connect_as("postgres").await;
        for statement in [
            "CREATE TABLE items (name text)".to_owned(),
            "INSERT INTO items VALUES ('first'), ('second')".to_owned(),
            format!("GRANT SELECT ON items TO {}", cluster.template),
            format!("GRANT CREATE ON SCHEMA public TO {}", cluster.template),
            // The owner that objects are reassigned to must be able to own them there.
            format!("GRANT CREATE ON SCHEMA public TO {}", cluster.owner),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&mut db)
                .await
                .unwrap();
        }
        Some(cluster)
    }

    async fn exec(&self, statement: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn connect_as(&self, user: &str) -> sqlx::PgConnection {
        self.try_connect_as(user).await.unwrap()
    }

    async fn try_connect_as(&self, user: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(5432)
            .username(user)
            .database(&self.database)
            .connect()
            .await
    }

    fn admin_url(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:5432/{}",
            self.admin, self.admin_password, self.database
        )
    }

    fn settings(&self) -> String {
        json!({"roles": [self.template], "connection_limit": 3}).to_string()
    }

    /// The owner of `table` in the test database, if it exists.
    async fn table_owner(&self, table: &str) -> Option<String> {
        let mut db = self.connect_as("postgres").await;
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = $1")
            .bind(table)
            .fetch_optional(&mut db)
            .await
            .unwrap()
    }

    /// `(can log in, valid until as epoch seconds, connection limit, member of the template)`.
    async fn role(&self, name: &str) -> Option<(bool, Option<i64>, i32, bool)> {
        sqlx::query_as(
            "SELECT rolcanlogin, CAST(EXTRACT(EPOCH FROM rolvaliduntil) AS BIGINT), rolconnlimit, \
             pg_has_role(oid, CAST($2 AS name), 'MEMBER') FROM pg_roles WHERE rolname = $1",
        )
        .bind(name)
        .bind(&self.template)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    /// The SCRAM verifier PostgreSQL stores for `name`.
    async fn verifier(&self, name: &str) -> Option<String> {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
        .flatten()
    }

    async fn sessions(&self, name: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE usename = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn wait_for_sessions(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.sessions(name).await == 0 {
            assert!(Instant::now() < deadline, "no session of {name} appeared");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until `name` is gone with all its sessions.
    async fn wait_dropped(&self, name: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.role(name).await.is_some() || self.sessions(name).await > 0 {
            assert!(
                Instant::now() < deadline,
                "role {name} still exists (or has sessions) after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let (database, template, owner, admin) = (
            self.database.clone(),
            self.template.clone(),
            self.owner.clone(),
            self.admin.clone(),
        );
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(mut conn) = sqlx::PgConnection::connect(&format!("{SERVER}/postgres")).await
                else {
                    return;
                };
                let left: Vec<String> = sqlx::query_scalar(
                    "SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid \
                     JOIN pg_roles t ON t.oid = m.roleid WHERE t.rolname = $1 AND r.rolname LIKE 'cst\\_%'",
                )
                .bind(&template)
                .fetch_all(&mut conn)
                .await
                .unwrap_or_default();
                let mut statements = vec![format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")];
                statements.extend(left.iter().map(|r| format!("DROP ROLE IF EXISTS {r}")));
                statements.push(format!("DROP ROLE IF EXISTS {template}"));
                statements.push(format!("DROP ROLE IF EXISTS {owner}"));
                statements.push(format!("DROP ROLE IF EXISTS {admin}"));
                for statement in statements {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Whether `password` matches a stored `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` verifier.
fn scram_matches(verifier: &str, password: &str) -> bool {
    let (Some(rest), true) = (
        verifier.strip_prefix("SCRAM-SHA-256$"),
        !password.is_empty(),
    ) else {
        return false;
    };
    let (params, keys) = rest.split_once('$').unwrap();
    let (iterations, salt) = params.split_once(':').unwrap();
    let (stored, _) = keys.split_once(':').unwrap();
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(
        password.as_bytes(),
        &STANDARD.decode(salt).unwrap(),
        iterations.parse().unwrap(),
        &mut salted,
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&salted).unwrap();
    mac.update(b"Client Key");
    STANDARD.encode(Sha256::digest(mac.finalize().into_bytes())) == stored
}

/// Every value of every text column in every table of the gateway's database.
async fn every_stored_text(db: &custodian::store::Db) -> String {
    let columns: Vec<(String, String)> = match db.backend() {
        custodian::store::Backend::Postgres => sqlx::query_as(
            "SELECT CAST(table_name AS TEXT), CAST(column_name AS TEXT) FROM information_schema.columns \
             WHERE table_schema = 'public' AND data_type IN ('text', 'character varying') \
             ORDER BY table_name, column_name",
        )
        .fetch_all(db.pool())
        .await
        .unwrap(),
        custodian::store::Backend::Sqlite => sqlx::query_as(
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND upper(p.type) IN ('TEXT', 'VARCHAR') ORDER BY m.name, p.name",
        )
        .fetch_all(db.pool())
        .await
        .unwrap(),
    };
    assert!(
        columns.iter().any(|(t, _)| t == "credential_leases"),
        "{columns:?}"
    );
    let mut out = String::new();
    for (table, column) in columns {
        let values: Vec<(Option<String>,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(\"{column}\" AS TEXT) FROM \"{table}\""
        )))
        .fetch_all(db.pool())
        .await
        .unwrap();
        for (value,) in values {
            out.push_str(value.as_deref().unwrap_or(""));
            out.push('\n');
        }
    }
    out
}

/// The run's environment, as an agent could read it: `printenv` compressed (which the redactors
/// cannot see through), decoded here.
async fn environment_of_run(client: &Client, grant: &str) -> String {
    let shown = run(
        client.peer(),
        json!({"grant_id": grant, "command": "printenv | gzip -c | base64 -w0"}),
    )
    .await
    .expect("run");
    crate::egress::gunzip_base64(stdout(&shown))
}

fn variable<'a>(environment: &'a str, name: &str) -> &'a str {
    environment
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} is not in the run's environment"))
}

fn stdout(result: &Value) -> &str {
    result["stdout"].as_str().unwrap_or_default()
}

struct Setup {
    t: TestApp,
    _pki: Pki,
    runner: TestRunner,
    client: Client,
    token_id: String,
    acme: TenantId,
    cluster: Cluster,
}

async fn setup(backend: Backend) -> Option<Setup> {
    if !crate::processes::require_root() {
        return None;
    }
    runner_binary()?;
    let cluster = Cluster::new().await?;
    let pki = Pki::new();
    let (cert, key) = pki.gateway();
    let t = TestApp::builder(backend)
        .runner_tls(&pki.ca(), &cert, &key)
        .start()
        .await?;
    let acme = t.tenant("acme").await;
    let keep = json!({"roles": [cluster.template], "on_drop": {"reassign_to": cluster.owner}});
    for (env, settings) in [
        ("db", cluster.settings()),
        ("keep", keep.to_string()),
        (
            "broken",
            json!({"roles": ["credtest_no_such_role"]}).to_string(),
        ),
    ] {
        t.environment(&acme, env, &[]).await;
        let spec = Spec::new(Kind::Postgres, Some(&settings)).unwrap();
        custodian::secrets::set_credential(
            t.db(),
            &t.app.master_key,
            &acme,
            env,
            "DB",
            &spec,
            cluster.admin_url().as_bytes(),
            1,
        )
        .await
        .unwrap();
        let rule = custodian::egress::Rule {
            destination: custodian::egress::parse_destination("tcp:127.0.0.1:5432").unwrap(),
            allow_private: true,
            inject: None,
        };
        custodian::egress::add(t.db(), &acme, env, &rule, 1)
            .await
            .unwrap();
    }
    let runner = TestRunner::start(&pki.ca(), &pki.runner("acme", "r1"), "acme", "r1").await?;
    custodian::runners::add(t.db(), &acme, "r1", "default", &runner.url, 1)
        .await
        .unwrap();
    let (token_id, token) = t.token_with_id(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;
    Some(Setup {
        t,
        _pki: pki,
        runner,
        client,
        token_id,
        acme,
        cluster,
    })
}

impl Setup {
    async fn run(&self, grant: &str, command: &str) -> Value {
        match run(
            self.client.peer(),
            json!({"grant_id": grant, "command": command, "timeout_seconds": 60}),
        )
        .await
        {
            Ok(result) => result,
            Err(e) => panic!(
                "run: {e}\naudit: {:?}\nrunner: {}",
                self.audit_kinds(grant).await,
                self.runner.log()
            ),
        }
    }

    /// Starts a run in the background.
    fn spawn_run(
        &self,
        grant: &str,
        command: &str,
    ) -> tokio::task::JoinHandle<Result<Value, String>> {
        let peer = self.client.peer().clone();
        let call = json!({"grant_id": grant, "command": command, "timeout_seconds": 60});
        tokio::spawn(async move { run(&peer, call).await })
    }

    async fn leases(&self) -> Vec<custodian::credentials::lease::LeaseInfo> {
        custodian::credentials::lease::list(self.t.db(), &self.acme)
            .await
            .unwrap()
    }

    async fn audit_kinds(&self, grant: &str) -> Vec<(String, Value)> {
        custodian::audit::for_grant(self.t.db(), &self.acme, grant)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.kind, serde_json::from_str(&r.detail).unwrap()))
            .collect()
    }

    async fn uses(&self, grant: &str) -> i64 {
        custodian::grants::store::get(self.t.db(), &self.acme, grant)
            .await
            .unwrap()
            .unwrap()
            .uses
    }
}

async fn a_grant_has_its_own_role_only_while_it_is_active(backend: Backend) {
    let logs = crate::harness::capture_logs();
    let Some(s) = setup(backend).await else {
        return;
    };
    let cluster = &s.cluster;

    // A credential that cannot be issued: the run is refused, its use given back, nothing left.
    let broken =
        s.t.active_grant(&s.acme, &s.token_id, "broken", 5, 600)
            .await;
    let refused = run(
        s.client.peer(),
        json!({"grant_id": broken, "command": "true"}),
    )
    .await
    .expect_err("a role that joins a missing role cannot be made");
    assert!(refused.contains("could not be issued"), "{refused}");
    assert!(!refused.contains(&cluster.admin_password), "{refused}");
    assert_eq!(s.uses(&broken).await, 0, "the use was not given back");
    let failed = s.audit_kinds(&broken).await;
    let (_, detail) = failed.iter().find(|(k, _)| k == "exec.failed").unwrap();
    assert_eq!(detail["use_given_back"], json!(true), "{detail}");
    let broken_role = custodian::credentials::postgres::role_name(&broken, "DB");
    assert!(cluster.role(&broken_role).await.is_none());

    let grant = s.t.active_grant(&s.acme, &s.token_id, "db", 20, 600).await;
    let role = custodian::credentials::postgres::role_name(&grant, "DB");
    assert!(cluster.role(&role).await.is_none(), "a role before any run");
    assert!(s.leases().await.iter().all(|l| l.grant_id != grant));

    // psql in the run works with no arguments, as the grant's role, which reads what the
    // template role may read.
    let first = s
        .run(
            &grant,
            "psql -tA -c 'select current_user' -c 'select count(*) from items'",
        )
        .await;
    assert_eq!(stdout(&first), format!("{role}\n2\n"), "{first}");
    let expires_at = custodian::grants::store::get(s.t.db(), &s.acme, &grant)
        .await
        .unwrap()
        .unwrap()
        .expires_at;
    assert_eq!(
        cluster.role(&role).await,
        Some((true, Some(expires_at), 3, true)),
        "login, VALID UNTIL the grant's expiry, its connection limit, member of the template"
    );

    // The run sees the PG* variables and DATABASE_URL for that role, and nothing of the admin.
    let environment = environment_of_run(&s.client, &grant).await;
    assert_eq!(variable(&environment, "PGUSER"), role);
    assert_eq!(variable(&environment, "PGHOST"), "127.0.0.1");
    assert_eq!(variable(&environment, "PGPORT"), "5432");
    assert_eq!(variable(&environment, "PGDATABASE"), cluster.database);
    let password = variable(&environment, "PGPASSWORD").to_owned();
    assert_eq!(
        variable(&environment, "DATABASE_URL"),
        format!(
            "postgres://{role}:{password}@127.0.0.1:5432/{}?sslmode=prefer",
            cluster.database
        )
    );
    assert!(!environment.contains(&cluster.admin_password));
    assert!(!environment.contains(&cluster.admin));
    // ... and the password it got is the role's (PostgreSQL's stored verifier accepts it).
    let verifier = cluster.verifier(&role).await.unwrap();
    assert!(scram_matches(&verifier, &password), "{verifier}");
    assert!(!scram_matches(&verifier, "not-the-password"));

    // Output never carries the password: the canary is replaced and counted.
    let echoed = s
        .run(&grant, "echo \"$PGPASSWORD\"; echo \"$DATABASE_URL\"")
        .await;
    assert!(!echoed.to_string().contains(&password), "{echoed}");
    assert!(
        echoed["redactions"]["PGPASSWORD"].as_u64().unwrap_or(0)
            + echoed["redactions"]["DATABASE_URL"].as_u64().unwrap_or(0)
            >= 2,
        "{echoed}"
    );

    // A second run works while the first one's session is still open.
    let sleeper = s.spawn_run(&grant, "psql -tAc 'select pg_sleep(6)'");
    cluster.wait_for_sessions(&role).await;
    let second = s.run(&grant, "psql -tAc 'select current_user'").await;
    assert_eq!(stdout(&second), format!("{role}\n"), "{second}");
    let slept = sleeper.await.unwrap().unwrap();
    assert_eq!(slept["exit_code"], json!(0), "{slept}");
    assert_eq!(
        cluster.verifier(&role).await.as_deref(),
        Some(verifier.as_str()),
        "the password changed between runs"
    );

    // An open session of the role (the test's own; the server lets it in without a password),
    // then revoke: the session is ended and the role is dropped, promptly.
    let mut open = cluster.connect_as(&role).await;
    let (one,): (i32,) = sqlx::query_as("SELECT 1")
        .fetch_one(&mut open)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let revoke = Instant::now();
    s.client
        .call_tool(
            rmcp::model::CallToolRequestParams::new("revoke_grant")
                .with_arguments(json!({"grant_id": grant}).as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    cluster.wait_dropped(&role, Duration::from_secs(5)).await;
    eprintln!("role dropped {:?} after revoke", revoke.elapsed());
    assert!(
        sqlx::query("SELECT 1").execute(&mut open).await.is_err(),
        "the open session survived the revocation"
    );
    // Nothing can log in as it any more: the role, and its verifier, are gone.
    assert!(cluster.verifier(&role).await.is_none());
    let login = cluster.try_connect_as(&role).await.expect_err("no login");
    assert!(login.to_string().contains("does not exist"), "{login}");

    let lease = s
        .leases()
        .await
        .into_iter()
        .find(|l| l.grant_id == grant)
        .unwrap();
    assert_eq!(
        (lease.state.as_str(), lease.resource.as_str()),
        ("dropped", role.as_str())
    );
    let records = s.audit_kinds(&grant).await;
    let issued: Vec<_> = records
        .iter()
        .filter(|(k, _)| k == "credential.issued")
        .collect();
    assert_eq!(issued.len(), 1, "{records:?}");
    assert_eq!(issued[0].1["resource"], json!(role));
    let (_, revoked) = records
        .iter()
        .find(|(k, _)| k == "credential.revoked")
        .expect("credential.revoked");
    assert_eq!(revoked["resource"], json!(role));
    assert_eq!(revoked["reason"], json!("its grant was revoked"));

    // The password and the admin URL's password are nowhere the gateway writes.
    let stored = every_stored_text(s.t.db()).await;
    assert!(
        stored.contains(&role),
        "positive control: the scan sees the lease"
    );
    for canary in [&password, &cluster.admin_password] {
        assert!(!stored.contains(canary.as_str()), "stored in plaintext");
    }
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.contains(&role),
        "positive control: the logs name the role"
    );
    for canary in [&password, &cluster.admin_password] {
        let lines: Vec<String> = logged
            .lines()
            .filter(|l| l.contains(canary.as_str()))
            .map(|l| l.replace(canary.as_str(), "<CANARY>"))
            .collect();
        assert!(lines.is_empty(), "logged: {lines:#?}");
    }
    let runner_log = s.runner.log();
    assert!(!runner_log.contains(&password) && !runner_log.contains(&cluster.admin_password));
    drop(s.client);
    s.t.stop().await;
}

async fn roles_of_expired_and_used_up_grants_go_after_their_last_run(backend: Backend) {
    let Some(s) = setup(backend).await else {
        return;
    };
    let cluster = &s.cluster;
    let whoami = "psql -tAc 'select current_user'";

    // Used up: the last run takes the last use (the grant is exhausted at once) but the role
    // stays until that run has ended.
    let used = s.t.active_grant(&s.acme, &s.token_id, "db", 2, 600).await;
    let used_role = custodian::credentials::postgres::role_name(&used, "DB");
    s.run(&used, whoami).await;
    let last = s.spawn_run(
        &used,
        "psql -tAc 'select pg_sleep(3)'; psql -tAc 'select current_user'",
    );
    cluster.wait_for_sessions(&used_role).await;
    let state = custodian::grants::store::get(s.t.db(), &s.acme, &used)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(state, custodian::grants::GrantState::Exhausted);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        cluster.role(&used_role).await.is_some(),
        "dropped while its last run ran"
    );
    let last = last.await.unwrap().unwrap();
    assert!(
        stdout(&last).ends_with(&format!("{used_role}\n")),
        "the role went while its last run ran: {last}"
    );
    cluster
        .wait_dropped(&used_role, Duration::from_secs(5))
        .await;

    // Expired: dropped once the grant's time is up (the gateway's clock moves; PostgreSQL's
    // VALID UNTIL is the same instant).
    let timed = s.t.active_grant(&s.acme, &s.token_id, "db", 10, 600).await;
    let timed_role = custodian::credentials::postgres::role_name(&timed, "DB");
    let out = s.run(&timed, whoami).await;
    assert_eq!(stdout(&out), format!("{timed_role}\n"), "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(cluster.role(&timed_role).await.is_some());
    s.t.clock.advance(601);
    cluster
        .wait_dropped(&timed_role, Duration::from_secs(5))
        .await;

    let reasons = [
        (used, "its grant's last run ended"),
        (timed, "its grant's time ran out"),
    ];
    for (grant, reason) in reasons {
        let records = s.audit_kinds(&grant).await;
        let (_, revoked) = records
            .iter()
            .find(|(k, _)| k == "credential.revoked")
            .expect("credential.revoked");
        assert_eq!(revoked["reason"], json!(reason), "{records:?}");
    }
    assert!(s.leases().await.iter().all(|l| l.state == "dropped"));

    // What a role owns goes with it, or to the configured owner.
    let dropping = s.t.active_grant(&s.acme, &s.token_id, "db", 10, 600).await;
    let keeping =
        s.t.active_grant(&s.acme, &s.token_id, "keep", 10, 600)
            .await;
    // The kept role also leaves a SECURITY DEFINER function and a view, which would run with the
    // new owner's privileges once they are its.
    let definer_and_view = " && psql -tAc 'create function kept_definer() returns text security definer \
         language sql as $$select current_user::text$$' && psql -tAc 'create view kept_view as select 1 as one'";
    for (grant, table, more) in [
        (&dropping, "scratch", ""),
        (&keeping, "kept", definer_and_view),
    ] {
        let made = s
            .run(
                grant,
                &format!("psql -tAc 'create table {table} (x int)'{more}"),
            )
            .await;
        assert_eq!(made["exit_code"], json!(0), "{made}");
        let role = custodian::credentials::postgres::role_name(grant, "DB");
        assert_eq!(cluster.table_owner(table).await, Some(role));
        custodian::grants::revoke_as_admin(&s.t.app, &s.acme, grant)
            .await
            .unwrap();
    }
    for grant in [&dropping, &keeping] {
        let role = custodian::credentials::postgres::role_name(grant, "DB");
        cluster.wait_dropped(&role, Duration::from_secs(5)).await;
    }
    assert_eq!(cluster.table_owner("scratch").await, None);
    assert_eq!(
        cluster.table_owner("kept").await,
        Some(cluster.owner.clone())
    );
    let mut db = cluster.connect_as("postgres").await;
    let definer: Option<(bool, String)> = sqlx::query_as(
        "SELECT prosecdef, pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = 'kept_definer'",
    )
    .fetch_optional(&mut db)
    .await
    .unwrap();
    assert_eq!(
        definer,
        Some((false, cluster.owner.clone())),
        "the kept function runs with its caller's privileges"
    );
    let view: Option<(String, Option<Vec<String>>)> = sqlx::query_as(
        "SELECT pg_get_userbyid(relowner)::text, reloptions::text[] FROM pg_class WHERE relname = 'kept_view'",
    )
    .fetch_optional(&mut db)
    .await
    .unwrap();
    assert_eq!(
        view,
        Some((
            cluster.owner.clone(),
            Some(vec!["security_invoker=true".to_owned()])
        )),
        "the kept view runs with its caller's privileges"
    );
    drop(s.client);
    s.t.stop().await;
}

/// `custodian serve` killed while a run holds a session of the grant's role; the grant is revoked
/// with the admin CLI while no gateway runs (nothing drops the role then); the next gateway's
/// startup sweep drops it and ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_grant_leaves_no_role_after_restart() {
    if !crate::processes::require_root() || runner_binary().is_none() {
        return;
    }
    let Some(cluster) = Cluster::new().await else {
        return;
    };
    let pki = Pki::new();
    let seed = TestApp::builder(Backend::Sqlite).start().await.unwrap();
    let acme = seed.tenant("acme").await;
    seed.environment(&acme, "db", &[]).await;
    let rule = custodian::egress::Rule {
        destination: custodian::egress::parse_destination("tcp:127.0.0.1:5432").unwrap(),
        allow_private: true,
        inject: None,
    };
    custodian::egress::add(seed.db(), &acme, "db", &rule, 1)
        .await
        .unwrap();
    let runner = TestRunner::start(&pki.ca(), &pki.runner("acme", "r1"), "acme", "r1")
        .await
        .unwrap();
    custodian::runners::add(seed.db(), &acme, "r1", "default", &runner.url, 1)
        .await
        .unwrap();
    let (token_id, token) = seed.token_with_id(&acme, "codex").await;
    let grant = seed.active_grant(&acme, &token_id, "db", 10, 600).await;
    let role = custodian::credentials::postgres::role_name(&grant, "DB");
    let database = seed.database();
    // No gateway but the served ones works on this database from here on.
    seed.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.gateway();
    let port = free_port();
    let config = dir.path().join("custodian.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[database]\nurl = \"{}\"\n\n[runners]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            database.url,
            pki.ca().display(),
            cert.display(),
            key.display(),
        ),
    )
    .unwrap();
    let cli = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = std::process::Command::new(CUSTODIAN)
            .args(args)
            .env_remove("CUSTODIAN_CONFIG")
            .env("CUSTODIAN_MASTER_KEY", &database.master_key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let config_arg = config.to_str().unwrap();
    // The credential is set as an operator sets it: the admin URL on stdin.
    let settings = cluster.settings();
    let stored = cli(
        &[
            "admin",
            "--config",
            config_arg,
            "secret",
            "set",
            "acme/db",
            "DB",
            "--kind",
            "postgres",
            "--settings",
            &settings,
        ],
        Some(&format!("{}\n", cluster.admin_url())),
    );
    assert!(stored.contains("(postgres)"), "{stored}");
    let serve = |log: &str| {
        Proc(
            std::process::Command::new(CUSTODIAN)
                .args(["serve", "--config", config_arg])
                .env_remove("CUSTODIAN_CONFIG")
                .env_remove("RUST_LOG")
                .env("CUSTODIAN_MASTER_KEY", &database.master_key)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let health = format!("http://127.0.0.1:{port}/healthz");

    let first = serve("first.log");
    wait_healthy(&health).await;
    let client = connect(&format!("http://127.0.0.1:{port}/t/acme/mcp"), &token).await;
    let peer = client.peer().clone();
    let call = json!({"grant_id": grant, "command": "psql -tAc 'select pg_sleep(60)'", "timeout_seconds": 90});
    let in_flight = tokio::spawn(async move { run(&peer, call).await });
    cluster.wait_for_sessions(&role).await;
    crate::processes::sigkill(first.0.id());
    drop(first);
    // The client would keep reconnecting to the dead gateway.
    in_flight.abort();
    drop(client);
    assert!(cluster.role(&role).await.is_some());

    let revoked = cli(
        &[
            "admin", "--config", config_arg, "grants", "revoke", "acme", &grant,
        ],
        None,
    );
    assert!(revoked.contains("revoked"), "{revoked}");
    // No gateway runs: nothing drops the role yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cluster.role(&role).await.is_some());

    let second = serve("second.log");
    wait_healthy(&health).await;
    cluster.wait_dropped(&role, Duration::from_secs(10)).await;
    assert!(cluster.verifier(&role).await.is_none());
    let db = custodian::store::Db::connect(&database.url, 1)
        .await
        .unwrap();
    let leases = custodian::credentials::lease::list(&db, &acme)
        .await
        .unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].state, "dropped", "{leases:?}");
    let stored = every_stored_text(&db).await;
    assert!(!stored.contains(&cluster.admin_password));
    db.close().await;
    // An admin sees what was made for the grant and what became of it.
    let shown = cli(
        &[
            "admin", "--config", config_arg, "grants", "show", "acme", &grant,
        ],
        None,
    );
    assert!(
        shown.contains(&format!("DB (postgres) {role}  dropped")),
        "{shown}"
    );
    for kind in ["credential.issued", "credential.revoked"] {
        assert!(shown.contains(kind), "{shown}");
    }
    assert!(second.terminate(Duration::from_secs(15)).success());
    for log in ["first.log", "second.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap();
        assert!(!text.contains(&cluster.admin_password), "{log}");
    }
    runner.stop(Duration::from_secs(10));
}
