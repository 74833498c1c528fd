//! The audit log: a per-tenant HMAC chain written with each action; tampering is found and named,
//! and an action whose record cannot be written does not happen.

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;
use custodian::audit::{self, Tampering};
use custodian::clock::Clock;
use custodian::grants::{GrantState, store};
use custodian::tenants::TenantId;

on_both_backends!(
    verify_names_changed_deleted_reordered_and_inserted_records,
    no_audit_record_no_transition,
    a_chain_deleted_with_its_head_is_tampering_for_the_cli,
);

/// A tenant with a few records: two grants approved, one revoked.
async fn chain(t: &TestApp) -> TenantId {
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &[]).await;
    let (token_id, _) = t.token_with_id(&acme, "codex").await;
    let first = t.active_grant(&acme, &token_id, "staging", 5, 600).await;
    t.active_grant(&acme, &token_id, "staging", 5, 600).await;
    custodian::grants::revoke_as_admin(&t.app, &acme, &first)
        .await
        .unwrap();
    acme
}

async fn verify(t: &TestApp, tenant: &TenantId) -> Result<usize, Tampering> {
    audit::verify(t.db(), &t.app.audit_key, tenant)
        .await
        .unwrap()
}

async fn exec(t: &TestApp, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(t.db().pool())
        .await
        .unwrap();
}

async fn verify_names_changed_deleted_reordered_and_inserted_records(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = chain(&t).await;
    // Another tenant's chain is independent.
    let globex = chain_for_other(&t).await;
    assert_eq!(verify(&t, &acme).await, Ok(5));
    assert_eq!(verify(&t, &globex).await, Ok(2));
    let original = audit::all(t.db(), &acme).await.unwrap();

    // Changed: someone edits the detail of record 3.
    exec(&t, "UPDATE audit_log SET detail = '{\"approver\":\"mallory\"}' WHERE tenant_id = 'acme' AND seq = 3").await;
    assert_eq!(
        verify(&t, &acme).await,
        Err(Tampering::Changed {
            tenant: "acme".into(),
            seq: 3
        })
    );
    restore(&t, &original).await;
    assert_eq!(verify(&t, &acme).await, Ok(5));

    // Deleted: record 2 disappears.
    exec(
        &t,
        "DELETE FROM audit_log WHERE tenant_id = 'acme' AND seq = 2",
    )
    .await;
    assert_eq!(
        verify(&t, &acme).await,
        Err(Tampering::Missing {
            tenant: "acme".into(),
            expected: 2,
            found: 3
        })
    );
    restore(&t, &original).await;

    // Reordered: records 2 and 3 swap places (numbers swapped, content kept).
    exec(
        &t,
        "UPDATE audit_log SET seq = -2 WHERE tenant_id = 'acme' AND seq = 2",
    )
    .await;
    exec(
        &t,
        "UPDATE audit_log SET seq = 2 WHERE tenant_id = 'acme' AND seq = 3",
    )
    .await;
    exec(
        &t,
        "UPDATE audit_log SET seq = 3 WHERE tenant_id = 'acme' AND seq = -2",
    )
    .await;
    assert_eq!(
        verify(&t, &acme).await,
        Err(Tampering::Changed {
            tenant: "acme".into(),
            seq: 2
        })
    );
    restore(&t, &original).await;

    // Inserted: a forged record between 3 and 4, later ones renumbered.
    exec(
        &t,
        "UPDATE audit_log SET seq = seq + 100 WHERE tenant_id = 'acme' AND seq >= 4",
    )
    .await;
    exec(
        &t,
        "UPDATE audit_log SET seq = seq - 99 WHERE tenant_id = 'acme' AND seq >= 104",
    )
    .await;
    exec(
        &t,
        &format!(
            "INSERT INTO audit_log (tenant_id, seq, at_ms, kind, grant_id, detail, prev_mac, mac) \
         VALUES ('acme', 4, 1, 'grant.approved', 'gr_x', '{{}}', '{}', '{}')",
            original[2].mac,
            "00".repeat(32)
        ),
    )
    .await;
    exec(
        &t,
        "UPDATE audit_heads SET seq = 6 WHERE tenant_id = 'acme'",
    )
    .await;
    assert_eq!(
        verify(&t, &acme).await,
        Err(Tampering::Changed {
            tenant: "acme".into(),
            seq: 4
        })
    );
    restore(&t, &original).await;

    // Removed from the end: the head still counts them.
    exec(
        &t,
        "DELETE FROM audit_log WHERE tenant_id = 'acme' AND seq = 5",
    )
    .await;
    assert_eq!(
        verify(&t, &acme).await,
        Err(Tampering::Truncated {
            tenant: "acme".into(),
            last: 4,
            head: 5
        })
    );
    restore(&t, &original).await;
    assert_eq!(verify(&t, &acme).await, Ok(5));
    // The other tenant was never affected.
    assert_eq!(verify(&t, &globex).await, Ok(2));
    t.stop().await;
}

async fn chain_for_other(t: &TestApp) -> TenantId {
    let globex = t.tenant("globex").await;
    t.environment(&globex, "staging", &[]).await;
    let (token_id, _) = t.token_with_id(&globex, "codex").await;
    t.active_grant(&globex, &token_id, "staging", 5, 600).await;
    globex
}

/// Puts the tenant's original records and head back.
async fn restore(t: &TestApp, original: &[audit::Entry]) {
    exec(t, "DELETE FROM audit_log WHERE tenant_id = 'acme'").await;
    for e in original {
        sqlx::query("INSERT INTO audit_log (tenant_id, seq, at_ms, kind, grant_id, detail, prev_mac, mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&e.tenant_id)
            .bind(e.seq)
            .bind(e.at_ms)
            .bind(&e.kind)
            .bind(&e.grant_id)
            .bind(&e.detail)
            .bind(&e.prev_mac)
            .bind(&e.mac)
            .execute(t.db().pool())
            .await
            .unwrap();
    }
    let last = original.last().unwrap();
    sqlx::query("UPDATE audit_heads SET seq = $1, mac = $2 WHERE tenant_id = 'acme'")
        .bind(last.seq)
        .bind(&last.mac)
        .execute(t.db().pool())
        .await
        .unwrap();
}

async fn no_audit_record_no_transition(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = chain(&t).await;
    let (token_id, _) = t.token_with_id(&acme, "agent-2").await;
    let grant = t.active_grant(&acme, &token_id, "staging", 5, 600).await;
    // The audit store starts refusing writes.
    match backend {
        Backend::Sqlite => exec(&t, "CREATE TRIGGER audit_down BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'audit store down'); END").await,
        Backend::Postgres => {
            exec(&t, "CREATE FUNCTION audit_down() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit store down'; END $$ LANGUAGE plpgsql").await;
            exec(&t, "CREATE TRIGGER audit_down BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_down()").await;
        }
    }
    // No use is taken, so no exec can be dispatched, and no revocation happens.
    let taken = store::consume_use(
        t.db(),
        &t.app.audit_key,
        &acme,
        &grant,
        &token_id,
        &json!({"argv": "true"}),
        t.clock.now_ms(),
    )
    .await;
    assert!(taken.is_err(), "a use was taken without its audit record");
    assert!(
        custodian::grants::revoke_as_admin(&t.app, &acme, &grant)
            .await
            .is_err()
    );
    let row = store::get(t.db(), &acme, &grant).await.unwrap().unwrap();
    assert_eq!((row.state, row.uses), (GrantState::Active, 0));
    assert_eq!(verify(&t, &acme).await, Ok(7));
    t.stop().await;
}

/// `custodian admin audit verify [--tenant T]` on the test gateway's database: (success, stdout).
fn cli_verify(t: &TestApp, config: &std::path::Path, tenant: Option<&str>) -> (bool, String) {
    let mut args = vec![
        "admin",
        "--config",
        config.to_str().unwrap(),
        "audit",
        "verify",
    ];
    if let Some(tenant) = tenant {
        args.extend(["--tenant", tenant]);
    }
    let database = t.database();
    let out = crate::processes::custodian(&args, &[("CUSTODIAN_MASTER_KEY", &database.master_key)]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{stdout}{stderr}"))
}

async fn a_chain_deleted_with_its_head_is_tampering_for_the_cli(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = chain(&t).await;
    let globex = chain_for_other(&t).await;
    // A tenant that never had a grant has no chain, and that is fine.
    t.tenant("initech").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("custodian.toml");
    std::fs::write(
        &config,
        format!("[database]\nurl = \"{}\"\n", t.database().url),
    )
    .unwrap();
    let (ok, out) = cli_verify(&t, &config, None);
    assert!(ok, "{out}");
    for line in [
        "tenant acme: 5 records verified",
        "tenant globex: 2 records verified",
        "tenant initech: 0 records verified",
    ] {
        assert!(out.contains(line), "{line} missing from:\n{out}");
    }
    let original = audit::all(t.db(), &acme).await.unwrap();

    // The head row alone is deleted: the chain is still listed (from the log) and fails.
    exec(&t, "DELETE FROM audit_heads WHERE tenant_id = 'acme'").await;
    assert_eq!(
        verify(&t, &acme).await,
        Err(Tampering::HeadMissing {
            tenant: "acme".into(),
            last: 5
        })
    );
    for tenant in [None, Some("acme")] {
        let (ok, out) = cli_verify(&t, &config, tenant);
        assert!(!ok, "--tenant {tenant:?} passed without a head:\n{out}");
        assert!(out.contains("tenant acme: "), "{out}");
        assert!(!out.contains("tenant acme: 5 records verified"), "{out}");
    }
    exec(
        &t,
        "INSERT INTO audit_heads (tenant_id, seq, mac) VALUES ('acme', 0, 'genesis')",
    )
    .await;
    restore(&t, &original).await;
    assert_eq!(verify(&t, &acme).await, Ok(5));

    // Head and every record deleted: the grants they recorded remain as evidence.
    exec(&t, "DELETE FROM audit_log WHERE tenant_id = 'acme'").await;
    exec(&t, "DELETE FROM audit_heads WHERE tenant_id = 'acme'").await;
    let grants: Vec<&str> = original.iter().map(|e| e.grant_id.as_str()).collect();
    let Err(Tampering::Unrecorded { tenant, grant }) = verify(&t, &acme).await else {
        panic!("a chain deleted with its head verified");
    };
    assert_eq!(tenant, "acme");
    assert!(grants.contains(&grant.as_str()), "{grant}");
    for tenant in [None, Some("acme")] {
        let (ok, out) = cli_verify(&t, &config, tenant);
        assert!(!ok, "--tenant {tenant:?} passed without a chain:\n{out}");
        assert!(
            out.contains("tenant acme: ") && out.contains(&grant),
            "{out}"
        );
    }
    // The other tenants still verify, alone and in the full run.
    let (ok, out) = cli_verify(&t, &config, Some("globex"));
    assert!(
        ok && out.contains("tenant globex: 2 records verified"),
        "{out}"
    );
    let (_, out) = cli_verify(&t, &config, None);
    assert!(out.contains("tenant globex: 2 records verified"), "{out}");
    assert_eq!(verify(&t, &globex).await, Ok(2));

    // A tenant that exists nowhere is an error, not an empty success.
    let (ok, out) = cli_verify(&t, &config, Some("nobody"));
    assert!(!ok && out.contains("no tenant `nobody`"), "{out}");
    t.stop().await;
}
