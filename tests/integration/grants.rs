//! Task grants against a real OpenID Provider (`oidc-provider`, device flow, default claim
//! behaviour: email and groups only from userinfo, `auth_time` only on `max_age`), on SQLite and
//! PostgreSQL: approval, denial, expiry, slow_down, policy, bad tokens and links, outages,
//! misconfiguration, restarts, races.

use std::time::Duration;

use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::idp::{Login, TestIdp};
use crate::mcp_clients::connect;
use crate::on_both_backends;
use custodian::clock::Clock;
use custodian::environments::{Approvers, Policy};
use custodian::grants::store;

on_both_backends!(
    approval_at_the_idp_activates_the_grant_with_the_approver,
    denial_at_the_idp_denies_the_grant,
    an_unapproved_request_expires_with_the_device_code,
    slow_down_adds_five_seconds_to_the_interval,
    approver_outside_the_policy_is_denied_with_the_reason,
    stale_sign_in_is_denied_when_fresh_login_is_required,
    id_token_for_another_audience_is_rejected,
    idp_outage_keeps_the_grant_pending_until_it_recovers,
    a_restarted_gateway_completes_a_pending_grant,
    two_gateways_on_one_database_approve_exactly_once,
    approve_racing_revoke_ends_in_exactly_one_terminal_state,
    requests_over_policy_or_for_others_get_specific_refusals,
    idp_secrets_appear_in_no_result_log_or_column,
    clients_declaring_url_elicitation_are_offered_the_approval_page,
    email_and_group_allowlists_use_claims_from_userinfo,
    an_unverified_email_never_matches_an_email_allowlist,
    a_sign_in_time_in_the_future_is_refused,
    userinfo_about_another_subject_or_unavailable_is_refused,
    verification_links_that_are_not_https_are_refused_and_never_rendered,
    a_misconfigured_client_is_reported_as_such_not_as_temporary,
);

pub(crate) type Client = rmcp::service::RunningService<rmcp::RoleClient, rmcp::model::ClientConfig>;

/// Calls a tool; returns `Ok(structured)` or `Err(text)` for a refusal (`isError`).
pub(crate) async fn call(
    client: &Client,
    tool: &'static str,
    args: Value,
) -> Result<Value, String> {
    let result = client
        .call_tool(
            CallToolRequestParams::new(tool).with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .expect("the call itself succeeds");
    if result.is_error == Some(true) {
        let text = serde_json::to_value(&result.content).unwrap();
        return Err(text[0]["text"].as_str().unwrap_or_default().to_owned());
    }
    Ok(result.structured_content.expect("structured result"))
}

struct Setup {
    t: TestApp,
    idp: TestIdp,
    client: Client,
}

async fn setup(backend: Backend, device_ttl: u64, policy: Policy) -> Option<Setup> {
    let idp = TestIdp::start(device_ttl)?;
    let t = TestApp::builder(backend).start().await?;
    let acme = t.tenant_with_idp("acme", &idp.issuer).await;
    t.environment_with(&acme, "staging", &policy).await;
    let token = t.token(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;
    Some(Setup { t, idp, client })
}

async fn request(client: &Client) -> Value {
    request_in(client, "staging").await
}

pub(crate) async fn request_in(client: &Client, environment: &str) -> Value {
    call(
        client,
        "request_grant",
        json!({"environment": environment, "purpose": "run the staging migration"}),
    )
    .await
    .expect("request_grant succeeds")
}

/// The stored grant row.
pub(crate) async fn row(t: &TestApp, grant: &Value) -> custodian::grants::Grant {
    let tenant = custodian::tenants::TenantId::parse("acme").unwrap();
    store::get(t.db(), &tenant, grant["grant_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap()
}

async fn wait_state(client: &Client, grant: &Value, seconds: u64) -> Value {
    call(
        client,
        "grant_status",
        json!({"grant_id": grant["grant_id"], "wait_seconds": seconds}),
    )
    .await
    .expect("grant_status")
}

pub(crate) async fn wait_until(client: &Client, grant: &Value, state: &str) -> Value {
    for _ in 0..20 {
        let status = wait_state(client, grant, 5).await;
        if status["state"] == state {
            return status;
        }
    }
    panic!("grant never became {state}");
}

pub(crate) fn user_code(grant: &Value) -> &str {
    grant["user_code"].as_str().unwrap()
}

async fn event_kinds(t: &TestApp, grant: &Value) -> Vec<String> {
    let tenant = custodian::tenants::TenantId::parse("acme").unwrap();
    store::events(t.db(), &tenant, grant["grant_id"].as_str().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn approval_at_the_idp_activates_the_grant_with_the_approver(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    assert_eq!(grant["state"], "pending");
    let approval_url = grant["approval_url"].as_str().unwrap();
    assert!(
        approval_url.starts_with(&format!("{}/approve/gr_", s.t.base_url)),
        "{approval_url}"
    );
    assert!(
        grant["message"]
            .as_str()
            .unwrap()
            .contains(user_code(&grant))
    );

    // The approval page shows the request, escaped and not frameable.
    let page = reqwest::get(approval_url).await.unwrap();
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let html = page.text().await.unwrap();
    for shown in [
        "staging",
        "codex",
        "run the staging migration",
        "API_KEY",
        user_code(&grant),
    ] {
        assert!(html.contains(shown), "approval page lacks {shown}");
    }

    s.idp.approve(user_code(&grant), Login::as_("alice")).await;
    let status = wait_until(&s.client, &grant, "active").await;
    assert_eq!(status["approver"], "alice@example.com");
    assert_eq!(status["uses_left"], 10);
    // The provider in its default configuration: Custodian asked for a sign-in within the
    // policy's 300 s, so the ID token states auth_time; email and groups were NOT in the ID token
    // (they came from userinfo).
    let requests = s.idp.device_requests().await;
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["max_age"], "300", "{requests:?}");
    let id_tokens = s.idp.id_tokens().await;
    assert_eq!(id_tokens.len(), 1);
    let id_token = id_tokens[0].as_object().unwrap();
    assert_eq!(id_token["sub"], "alice");
    assert!(id_token["auth_time"].is_i64(), "{id_token:?}");
    for claim in ["email", "email_verified", "groups"] {
        assert!(
            !id_token.contains_key(claim),
            "the ID token has {claim}: {id_token:?}"
        );
    }
    let tenant = custodian::tenants::TenantId::parse("acme").unwrap();
    let row = store::get(s.t.db(), &tenant, grant["grant_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.approver_sub.as_deref(), Some("alice"));
    assert_eq!(row.approver_groups, ["platform", "developers"]);
    assert!(row.auth_time.is_some());
    assert_eq!(row.expires_at, row.approved_at.unwrap() + 900);
    assert_eq!(
        event_kinds(&s.t, &grant).await,
        ["grant.requested", "grant.approved"]
    );

    // Revoking ends it; a second revoke says so.
    let revoked = call(
        &s.client,
        "revoke_grant",
        json!({"grant_id": grant["grant_id"]}),
    )
    .await
    .unwrap();
    assert_eq!(revoked["state"], "revoked");
    let again = call(
        &s.client,
        "revoke_grant",
        json!({"grant_id": grant["grant_id"]}),
    )
    .await
    .unwrap_err();
    assert!(again.contains("is already revoked"), "{again}");
    s.t.stop().await;
}

async fn denial_at_the_idp_denies_the_grant(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    s.idp.deny(user_code(&grant)).await;
    let status = wait_until(&s.client, &grant, "denied").await;
    assert!(
        status["reason"].as_str().unwrap().contains("declined"),
        "{status}"
    );
    assert_eq!(status["uses_left"], 0);
    s.t.stop().await;
}

async fn an_unapproved_request_expires_with_the_device_code(backend: Backend) {
    let Some(s) = setup(backend, 3, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    let status = wait_until(&s.client, &grant, "expired").await;
    assert!(
        status["reason"].as_str().unwrap().contains("expired"),
        "{status}"
    );
    s.t.stop().await;
}

async fn slow_down_adds_five_seconds_to_the_interval(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    // Let a normal poll or two happen at the announced 1 s interval, then ask to slow down.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.idp.set_mode("slow_down").await;
    let slowed_at = s.idp.polls().await.len();
    tokio::time::sleep(Duration::from_millis(8000)).await;
    let polls = s.idp.polls().await;
    assert!(polls.len() >= slowed_at + 2, "polling continued: {polls:?}");
    // The poll answered `slow_down` is polls[slowed_at]; the next one comes ≥ 6 s later.
    let gap = polls[slowed_at + 1] - polls[slowed_at];
    assert!(gap >= 6000, "gap after slow_down was {gap} ms");
    let tenant = custodian::tenants::TenantId::parse("acme").unwrap();
    let row = store::get(s.t.db(), &tenant, grant["grant_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.poll_interval_ms, 6000);
    assert_eq!(row.state, custodian::grants::GrantState::Pending);
    s.t.stop().await;
}

async fn approver_outside_the_policy_is_denied_with_the_reason(backend: Backend) {
    let policy = Policy {
        approvers: Approvers {
            subjects: vec![],
            emails: vec![],
            groups: vec!["platform".into()],
        },
        ..Policy::default()
    };
    let Some(s) = setup(backend, 600, policy).await else {
        return;
    };
    let grant = request(&s.client).await;
    s.idp.approve(user_code(&grant), Login::as_("bob")).await;
    let status = wait_until(&s.client, &grant, "denied").await;
    assert_eq!(
        status["reason"],
        "bob@example.com is not allowed to approve grants for this environment"
    );
    assert_eq!(
        status["approver"],
        Value::Null,
        "a refused approver is not recorded as the approver"
    );
    // `run` on it names the real cause, with a runner registered so nothing else can be blamed.
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    custodian::runners::add(
        s.t.db(),
        &acme,
        "r1",
        "default",
        "https://runner.invalid:8443/",
        1,
    )
    .await
    .unwrap();
    let refused = call(
        &s.client,
        "run",
        json!({"grant_id": grant["grant_id"], "argv": ["true"]}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        refused,
        format!(
            "grant `{}` is denied: bob@example.com is not allowed to approve grants for this environment; request a new grant",
            grant["grant_id"].as_str().unwrap()
        )
    );
    s.t.stop().await;
}

async fn stale_sign_in_is_denied_when_fresh_login_is_required(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    let stale = Login {
        auth_age_seconds: 3600,
        ..Login::as_("alice")
    };
    s.idp.approve(user_code(&grant), stale).await;
    let status = wait_until(&s.client, &grant, "denied").await;
    assert!(
        status["reason"]
            .as_str()
            .unwrap()
            .contains("requires a sign-in within 300 s"),
        "{status}"
    );
    s.t.stop().await;
}

async fn id_token_for_another_audience_is_rejected(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    s.idp.set_mode("wrong_aud").await;
    s.idp.approve(user_code(&grant), Login::as_("alice")).await;
    let status = wait_until(&s.client, &grant, "denied").await;
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not verify") && reason.contains("audience"),
        "{reason}"
    );
    s.t.stop().await;
}

async fn idp_outage_keeps_the_grant_pending_until_it_recovers(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    s.idp.set_mode("down").await;
    let during = wait_state(&s.client, &grant, 3).await;
    assert_eq!(during["state"], "pending");
    // Garbage from the token endpoint does not end it either.
    s.idp.set_mode("garbage").await;
    assert_eq!(wait_state(&s.client, &grant, 2).await["state"], "pending");
    // A request while the IdP is down is refused cleanly and stores nothing.
    s.idp.set_mode("down").await;
    let refused = call(
        &s.client,
        "request_grant",
        json!({"environment": "staging", "purpose": "x"}),
    )
    .await
    .unwrap_err();
    assert!(
        refused.contains("unavailable") && refused.contains("try again shortly"),
        "{refused}"
    );
    let tenant = custodian::tenants::TenantId::parse("acme").unwrap();
    assert_eq!(
        store::list(s.t.db(), &tenant, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // Back up: the approval completes.
    s.idp.set_mode("normal").await;
    s.idp.approve(user_code(&grant), Login::as_("alice")).await;
    wait_until(&s.client, &grant, "active").await;
    s.t.stop().await;
}

async fn a_restarted_gateway_completes_a_pending_grant(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    let database = s.t.database();
    let token_client = s.client;
    drop(token_client);
    s.t.stop().await;
    // Approved while no gateway runs.
    s.idp.approve(user_code(&grant), Login::as_("alice")).await;
    let restarted = TestApp::builder(backend)
        .on_database(database)
        .start()
        .await
        .unwrap();
    let tenant = custodian::tenants::TenantId::parse("acme").unwrap();
    let id = grant["grant_id"].as_str().unwrap();
    for _ in 0..50 {
        let row = store::get(restarted.db(), &tenant, id)
            .await
            .unwrap()
            .unwrap();
        if row.state == custodian::grants::GrantState::Active {
            assert_eq!(row.approver_name.as_deref(), Some("alice@example.com"));
            restarted.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = store::get(restarted.db(), &tenant, id)
        .await
        .unwrap()
        .unwrap();
    panic!("the restarted gateway did not complete the grant: {row:?}");
}

async fn two_gateways_on_one_database_approve_exactly_once(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let second = TestApp::builder(backend)
        .on_database(s.t.database())
        .start()
        .await
        .unwrap();
    let mut grants = Vec::new();
    for _ in 0..4 {
        grants.push(request(&s.client).await);
    }
    for grant in &grants {
        s.idp.approve(user_code(grant), Login::as_("alice")).await;
    }
    for grant in &grants {
        wait_until(&s.client, grant, "active").await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for grant in &grants {
        let kinds = event_kinds(&s.t, grant).await;
        assert_eq!(
            kinds,
            ["grant.requested", "grant.approved"],
            "exactly one approval event"
        );
    }
    second.stop().await;
    s.t.stop().await;
}

async fn approve_racing_revoke_ends_in_exactly_one_terminal_state(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    for _ in 0..3 {
        let grant = request(&s.client).await;
        let (_, revoked) = tokio::join!(
            s.idp.approve(user_code(&grant), Login::as_("alice")),
            async {
                tokio::time::sleep(Duration::from_millis(900)).await;
                call(
                    &s.client,
                    "revoke_grant",
                    json!({"grant_id": grant["grant_id"]}),
                )
                .await
            }
        );
        assert_eq!(
            revoked.expect("revocation of a live grant succeeds")["state"],
            "revoked"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let kinds = event_kinds(&s.t, &grant).await;
        let terminal: Vec<_> = kinds
            .iter()
            .filter(|k| !matches!(k.as_str(), "grant.requested" | "grant.approved"))
            .collect();
        assert_eq!(terminal, ["grant.revoked"], "{kinds:?}");
        // If the approval landed, it landed before the revocation, never after.
        assert!(
            kinds == ["grant.requested", "grant.revoked"]
                || kinds == ["grant.requested", "grant.approved", "grant.revoked"],
            "{kinds:?}"
        );
        assert_eq!(wait_state(&s.client, &grant, 0).await["state"], "revoked");
    }
    s.t.stop().await;
}

async fn requests_over_policy_or_for_others_get_specific_refusals(backend: Backend) {
    let Some(s) = setup(
        backend,
        600,
        Policy {
            max_ttl_seconds: 600,
            max_uses: 5,
            ..Policy::default()
        },
    )
    .await
    else {
        return;
    };
    let refusal = |args: Value| call(&s.client, "request_grant", args);
    let cases = [
        (
            json!({"environment": "staging", "purpose": "x", "ttl_seconds": 601}),
            "ttl_seconds: 601 is over this environment's limit of 600",
        ),
        (
            json!({"environment": "staging", "purpose": "x", "max_uses": 6}),
            "max_uses: 6 is over this environment's limit of 5",
        ),
        (
            json!({"environment": "staging", "purpose": "   "}),
            "purpose: must say what the credentials are for",
        ),
        (
            json!({"environment": "prod", "purpose": "x"}),
            "no environment `prod` in this tenant",
        ),
    ];
    for (args, expected) in cases {
        let message = refusal(args.clone()).await.unwrap_err();
        assert!(message.contains(expected), "{args}: {message}");
    }
    let grant = request(&s.client).await;
    // Another agent token of the same tenant, and another tenant, see nothing of it.
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    let other_token = s.t.token(&acme, "other-agent").await;
    let other = connect(&s.t.mcp_url("acme"), &other_token).await;
    let globex = s.t.tenant_with_idp("globex", &s.idp.issuer).await;
    let globex_token = s.t.token(&globex, "codex").await;
    let foreign = connect(&s.t.mcp_url("globex"), &globex_token).await;
    let id = grant["grant_id"].as_str().unwrap();
    for client in [&other, &foreign] {
        for tool in ["grant_status", "revoke_grant"] {
            let message = call(client, tool, json!({"grant_id": id}))
                .await
                .unwrap_err();
            assert_eq!(message, format!("no grant `{id}` for this agent"));
        }
    }
    let unknown = call(
        &s.client,
        "grant_status",
        json!({"grant_id": "gr_00000000000000000000000000000000"}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        unknown,
        "no grant `gr_00000000000000000000000000000000` for this agent"
    );
    assert!(
        call(
            &s.client,
            "grant_status",
            json!({"grant_id": id, "wait_seconds": 241})
        )
        .await
        .unwrap_err()
        .contains("at most 240")
    );
    // The approval page of an unknown id is a bare 404.
    let missing = reqwest::get(format!(
        "{}/approve/gr_00000000000000000000000000000000",
        s.t.base_url
    ))
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(!missing.text().await.unwrap().contains("gr_0000"));
    // Still pending and untouched.
    assert_eq!(wait_state(&s.client, &grant, 0).await["state"], "pending");
    s.t.stop().await;
}

async fn idp_secrets_appear_in_no_result_log_or_column(backend: Backend) {
    let logs = crate::harness::capture_logs();
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    let mut seen = vec![grant.to_string()];
    s.idp.approve(user_code(&grant), Login::as_("alice")).await;
    seen.push(wait_until(&s.client, &grant, "active").await.to_string());
    seen.push(
        call(
            &s.client,
            "revoke_grant",
            json!({"grant_id": grant["grant_id"]}),
        )
        .await
        .unwrap()
        .to_string(),
    );
    let issued = s.idp.issued().await;
    assert!(
        issued.len() >= 3,
        "the IdP handed out a device code and tokens: {issued:?}"
    );
    let dump = crate::harness::dump_all_text(s.t.db()).await;
    let log_text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(log_text.contains("grant approved"), "logs were captured");
    for secret in &issued {
        for (place, text) in [
            ("tool results", seen.join("\n")),
            ("database", dump.clone()),
            ("logs", log_text.clone()),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "an IdP secret appears in the {place}"
            );
        }
    }
    s.t.stop().await;
}

/// A client that declares URL-mode elicitation and records what it is asked to open.
#[derive(Clone)]
struct ElicitationRecorder(tokio::sync::mpsc::UnboundedSender<Value>);

impl rmcp::ClientHandler for ElicitationRecorder {
    fn get_info(&self) -> rmcp::model::ClientConfig {
        let mut capabilities = rmcp::model::ClientCapabilities::default();
        capabilities.elicitation = Some(
            rmcp::model::ElicitationCapability::new()
                .with_url(rmcp::model::UrlElicitationCapability::new()),
        );
        rmcp::model::ClientConfig::new(
            capabilities,
            rmcp::model::Implementation::new("elicit", "1"),
        )
    }

    async fn create_elicitation(
        &self,
        request: rmcp::model::ElicitRequestParams,
        _: rmcp::service::RequestContext<rmcp::RoleClient>,
    ) -> Result<rmcp::model::ElicitResult, rmcp::ErrorData> {
        let _ = self.0.send(serde_json::to_value(&request).unwrap());
        Ok(rmcp::model::ElicitResult::new(
            rmcp::model::ElicitationAction::Accept,
        ))
    }
}

async fn clients_declaring_url_elicitation_are_offered_the_approval_page(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    let token = s.t.token(&acme, "elicit-agent").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let transport = rmcp::transport::StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
            s.t.mcp_url("acme"),
        )
        .auth_header(token),
    );
    let client = rmcp::ServiceExt::serve(ElicitationRecorder(tx), transport)
        .await
        .unwrap();
    let grant = client
        .call_tool(
            CallToolRequestParams::new("request_grant").with_arguments(
                json!({"environment": "staging", "purpose": "elicit"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap()
        .structured_content
        .unwrap();
    let offered = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an elicitation")
        .unwrap();
    assert_eq!(offered["mode"], "url", "{offered}");
    assert_eq!(offered["url"], grant["approval_url"]);
    assert_eq!(offered["elicitationId"], grant["grant_id"]);
    assert!(
        offered["message"]
            .as_str()
            .unwrap()
            .contains(grant["user_code"].as_str().unwrap())
    );
    // A client without the capability (the rmcp client of `setup`) gets none and still works.
    let plain = request(&s.client).await;
    assert_eq!(plain["state"], "pending");
    s.t.stop().await;
}

fn allow(emails: &[&str], groups: &[&str]) -> Approvers {
    Approvers {
        subjects: vec![],
        emails: emails.iter().map(|e| e.to_string()).collect(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

async fn email_and_group_allowlists_use_claims_from_userinfo(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    // Email allowlist without a fresh sign-in (no max_age sent); group allowlist with one.
    let by_email = Policy {
        approvers: allow(&["alice@example.com"], &[]),
        freshness: custodian::environments::LoginFreshness::NotRequired,
        ..Policy::default()
    };
    s.t.environment_with(&acme, "by-email", &by_email).await;
    let by_group = Policy {
        approvers: allow(&[], &["platform"]),
        ..Policy::default()
    };
    s.t.environment_with(&acme, "by-group", &by_group).await;

    for (environment, account, expected) in [
        ("by-email", "alice", "active"),
        ("by-email", "bob", "denied"),
        ("by-group", "alice", "active"),
        ("by-group", "mallory", "denied"),
    ] {
        let grant = request_in(&s.client, environment).await;
        s.idp.approve(user_code(&grant), Login::as_(account)).await;
        let status = wait_until(&s.client, &grant, expected).await;
        let stored = row(&s.t, &grant).await;
        if expected == "active" {
            assert_eq!(status["approver"], "alice@example.com");
            assert_eq!(stored.approver_email.as_deref(), Some("alice@example.com"));
            assert_eq!(stored.approver_groups, ["platform", "developers"]);
        } else {
            let reason = status["reason"].as_str().unwrap();
            assert!(
                reason.contains(" is not allowed to approve grants for this environment"),
                "{environment}/{account}: {reason}"
            );
            assert_eq!(stored.approver_sub, None);
        }
    }
    // max_age went out only where the policy requires a fresh sign-in, and auth_time came back
    // only then; no ID token carried email or groups.
    let max_ages: Vec<Value> = s
        .idp
        .device_requests()
        .await
        .iter()
        .map(|r| r["max_age"].clone())
        .collect();
    assert_eq!(
        max_ages,
        [Value::Null, Value::Null, json!("300"), json!("300")]
    );
    let id_tokens = s.idp.id_tokens().await;
    assert_eq!(id_tokens.len(), 4);
    for (i, token) in id_tokens.iter().enumerate() {
        assert_eq!(token.get("auth_time").is_some(), i >= 2, "{token}");
        assert!(
            token.get("email").is_none() && token.get("groups").is_none(),
            "{token}"
        );
    }
    s.t.stop().await;
}

async fn an_unverified_email_never_matches_an_email_allowlist(backend: Backend) {
    let policy = Policy {
        approvers: allow(&["alice@example.com", "trent@example.com"], &[]),
        ..Policy::default()
    };
    let Some(s) = setup(backend, 600, policy).await else {
        return;
    };
    // eve put alice's address on her profile (email_verified: false); trent's provider says
    // nothing about verification.
    for (account, shown) in [
        ("eve", "alice@example.com (unverified)"),
        ("trent", "trent@example.com (unverified)"),
    ] {
        let grant = request(&s.client).await;
        s.idp.approve(user_code(&grant), Login::as_(account)).await;
        let status = wait_until(&s.client, &grant, "denied").await;
        assert_eq!(
            status["reason"],
            format!(
                "{shown} is not allowed to approve grants for this environment; the identity provider sent no verified email for them (email_verified must be true)"
            )
        );
    }
    // Where anyone may approve, eve can, but she is never recorded under alice's address.
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    s.t.environment_with(&acme, "open", &Policy::default())
        .await;
    let grant = request_in(&s.client, "open").await;
    s.idp.approve(user_code(&grant), Login::as_("eve")).await;
    let status = wait_until(&s.client, &grant, "active").await;
    assert_eq!(status["approver"], "alice@example.com (unverified)");
    let stored = row(&s.t, &grant).await;
    assert_eq!(stored.approver_sub.as_deref(), Some("eve"));
    assert_eq!(stored.approver_email, None);
    s.t.stop().await;
}

async fn a_sign_in_time_in_the_future_is_refused(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let grant = request(&s.client).await;
    let future = Login {
        auth_age_seconds: -3600,
        ..Login::as_("alice")
    };
    s.idp.approve(user_code(&grant), future).await;
    let status = wait_until(&s.client, &grant, "denied").await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("in the future (auth_time)"), "{reason}");
    let auth_time = s.idp.id_tokens().await[0]["auth_time"].as_i64().unwrap();
    assert!(auth_time > s.t.clock.now() + 3000, "the IdP did send it");
    assert_eq!(row(&s.t, &grant).await.approver_sub, None);
    s.t.stop().await;
}

async fn userinfo_about_another_subject_or_unavailable_is_refused(backend: Backend) {
    let policy = Policy {
        approvers: allow(&[], &["platform"]),
        ..Policy::default()
    };
    let Some(s) = setup(backend, 600, policy).await else {
        return;
    };
    for (mode, expected) in [
        ("userinfo_other_sub", "another subject than the ID token"),
        ("userinfo_down", "503"),
    ] {
        s.idp.set_mode(mode).await;
        let grant = request(&s.client).await;
        s.idp.approve(user_code(&grant), Login::as_("bob")).await;
        let status = wait_until(&s.client, &grant, "denied").await;
        let reason = status["reason"].as_str().unwrap();
        assert!(
            reason.contains("userinfo endpoint did not supply them") && reason.contains(expected),
            "{mode}: {reason}"
        );
        let stored = row(&s.t, &grant).await;
        assert_eq!(stored.approver_sub, None, "{mode}");
        assert!(stored.approver_groups.is_empty(), "{mode}");
    }
    s.t.stop().await;
}

async fn verification_links_that_are_not_https_are_refused_and_never_rendered(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    for mode in ["javascript_link", "http_link"] {
        s.idp.set_mode(mode).await;
        let refused = call(
            &s.client,
            "request_grant",
            json!({"environment": "staging", "purpose": "x"}),
        )
        .await
        .unwrap_err();
        assert!(
            refused.contains("is not an https link"),
            "{mode}: {refused}"
        );
        assert!(!refused.contains("try again"), "{mode}: {refused}");
        for canary in ["javascript", "alert", "idp.example.com"] {
            assert!(!refused.contains(canary), "{mode}: {refused}");
        }
    }
    assert!(
        store::list(s.t.db(), &acme, None, 10)
            .await
            .unwrap()
            .is_empty(),
        "no grant was stored"
    );
    // A row holding such a link (stored before links were checked) never renders it.
    let id = custodian::grants::GrantId::generate();
    store::insert(
        s.t.db(),
        &s.t.app.audit_key,
        &store::NewGrant {
            tenant: &acme,
            id: &id,
            environment: "staging",
            agent_token_id: "t",
            agent_name: "codex",
            purpose: "old row",
            ttl_seconds: 60,
            max_uses: 1,
            expires_at: s.t.clock.now() + 600,
            user_code: "OLD-CODE",
            verification_uri: "http://idp.example.com/device",
            verification_uri_complete: Some("javascript:alert(document.domain)"),
            device_code_sealed: "not-used",
            poll_interval_ms: 3_600_000,
            trace_context: None,
            requester: None,
        },
        s.t.clock.now_ms(),
    )
    .await
    .unwrap();
    let page = reqwest::get(format!("{}/approve/{}", s.t.base_url, id.as_str()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("OLD-CODE"), "{page}");
    for canary in ["javascript", "alert(", "idp.example.com", "href="] {
        assert!(!page.contains(canary), "{canary} rendered: {page}");
    }
    s.t.stop().await;
}

async fn a_misconfigured_client_is_reported_as_such_not_as_temporary(backend: Backend) {
    let Some(s) = setup(backend, 600, Policy::default()).await else {
        return;
    };
    // The client was deleted at the IdP after set-idp checked it.
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    custodian::tenants::set_idp(
        s.t.db(),
        &acme,
        &custodian::tenants::IdpSettings {
            issuer: s.idp.issuer.clone(),
            client_id: "nobody".to_owned(),
            client_secret: None,
            scopes: "openid email groups".to_owned(),
            approver_claim: "email".to_owned(),
            groups_claim: "groups".to_owned(),
        },
        s.t.clock.now(),
    )
    .await
    .unwrap();
    let refused = call(
        &s.client,
        "request_grant",
        json!({"environment": "staging", "purpose": "x"}),
    )
    .await
    .unwrap_err();
    assert!(
        refused.contains("misconfigured")
            && refused.contains("does not accept client id `nobody`")
            && refused.contains("invalid_client")
            && refused.contains("retrying will not fix"),
        "{refused}"
    );
    assert!(!refused.contains("try again"), "{refused}");
    assert!(
        store::list(s.t.db(), &acme, None, 10)
            .await
            .unwrap()
            .is_empty(),
        "no grant was stored"
    );
    s.t.stop().await;
}
