//! `request_grant`'s `purpose` reaches the approver verbatim, so what could make it read differently
//! (line breaks, bidi controls, invisible characters) is refused before anything happens: no grant,
//! no audit record, no call to the IdP.

use rmcp::model::CallToolRequestParams;
use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::idp::TestIdp;
use crate::mcp_clients::connect;
use crate::on_both_backends;
use custodian::environments::Policy;

on_both_backends!(purposes_that_could_mislead_the_approver_change_nothing);

async fn count(t: &TestApp, table: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(t.db().pool())
        .await
        .unwrap();
    n
}

async fn purposes_that_could_mislead_the_approver_change_nothing(backend: Backend) {
    let Some(idp) = TestIdp::start(600) else {
        return;
    };
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant_with_idp("acme", &idp.issuer).await;
    t.environment_with(&acme, "staging", &Policy::default())
        .await;
    let token = t.token(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;
    let request = |purpose: String| {
        let args = json!({"environment": "staging", "purpose": purpose});
        client.call_tool(
            CallToolRequestParams::new("request_grant")
                .with_arguments(args.as_object().unwrap().clone()),
        )
    };
    let bad = [
        ("deploy\nApproved by: security team", "U+000A"),
        ("deploy\r\nok", "U+000D"),
        ("read the logs\u{202E}gnp.exe", "U+202E"),
        ("isolated \u{2067}text\u{2069}", "U+2067"),
        ("zero\u{200B}width", "U+200B"),
        ("\u{FEFF}with a BOM", "U+FEFF"),
        ("line\u{2028}separator", "U+2028"),
    ];
    for (purpose, code) in bad {
        let result = request(purpose.to_owned()).await.expect("a tool result");
        assert_eq!(result.is_error, Some(true), "{purpose:?} was accepted");
        let text = serde_json::to_value(&result.content).unwrap()[0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            text.starts_with("purpose: must be one line of visible text") && text.contains(code),
            "{purpose:?}: {text}"
        );
    }
    let overlong = request("x".repeat(501)).await.unwrap();
    assert_eq!(overlong.is_error, Some(true));
    // Nothing happened: no grant, no audit record, no device authorization at the IdP.
    assert_eq!(count(&t, "grants").await, 0);
    assert_eq!(count(&t, "audit_log").await, 0);
    assert!(idp.issued().await.is_empty(), "the IdP was called");

    // The same request with a plain purpose does all three.
    let ok = request("read the logs — in any script: ログ".to_owned())
        .await
        .unwrap();
    assert_ne!(ok.is_error, Some(true), "{ok:?}");
    assert_eq!(count(&t, "grants").await, 1);
    assert_eq!(count(&t, "audit_log").await, 1);
    assert_eq!(idp.issued().await.len(), 1);
    client.cancel().await.unwrap();
    t.stop().await;
}
