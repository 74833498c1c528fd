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
