//! Agent authentication, RFC 9728 metadata, tenant isolation and session binding.

use crate::harness::{Backend, RawMcp, TestApp, bearer, secret};
use crate::on_both_backends;
use custodian::agent_tokens::{self, Verified};
use custodian::clock::Clock;

on_both_backends!(
    requests_without_a_valid_token_get_401_with_metadata_pointer,
    metadata_document_does_not_reveal_whether_a_tenant_exists,
    unknown_tenants_answer_like_known_ones_without_a_valid_token,
    tenant_a_token_sees_nothing_of_tenant_b,
    revoked_token_stops_working_on_the_next_request,
    another_replicas_changes_are_honoured_within_a_second,
    session_is_bound_to_the_token_that_opened_it,
    verify_accepts_only_the_exact_token,
);

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

async fn requests_without_a_valid_token_get_401_with_metadata_pointer(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let good = t.token(&acme, "codex").await;
    let url = t.mcp_url("acme");
    let expected_pointer = format!(
        "Bearer resource_metadata=\"{}/.well-known/oauth-protected-resource/t/acme/mcp\"",
        t.base_url
    );
    // Same shape as a real token, other secret.
    let forged = format!("{}{}", &good[..good.len() - 4], "AAAA");
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("not bearer", Some(format!("Basic {good}"))),
        ("garbage", Some(bearer("cst_nope"))),
        ("forged secret", Some(bearer(&forged))),
    ];
    let http = reqwest::Client::new();
    for (what, header) in cases {
        for method in ["GET", "POST", "DELETE"] {
            let mut request = http
                .request(method.parse().unwrap(), &url)
                .header("accept", "application/json, text/event-stream")
                .header("content-type", "application/json");
            if method == "POST" {
                request = request.body(INIT);
            }
            if let Some(h) = &header {
                request = request.header("authorization", h);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{what} token on {method}");
            let challenge = response.headers()["www-authenticate"].to_str().unwrap();
            assert!(
                challenge.starts_with(&expected_pointer),
                "{what} on {method}: {challenge}"
            );
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
            assert!(!body.to_string().contains(&good[4..]), "token echoed");
        }
    }
    t.stop().await;
}

/// The metadata document of `tenant`: status, headers without `date`, body.
async fn metadata(t: &TestApp, tenant: &str) -> (u16, Vec<(String, String)>, String) {
    let response = reqwest::get(format!(
        "{}/.well-known/oauth-protected-resource/t/{tenant}/mcp",
        t.base_url
    ))
    .await
    .unwrap();
    let (status, headers) = comparable(&response, tenant);
    (
        status,
        headers,
        response.text().await.unwrap().replace(tenant, "TENANT"),
    )
}

/// Status and headers (without `date`), with the tenant's name replaced, for comparison.
fn comparable(response: &reqwest::Response, tenant: &str) -> (u16, Vec<(String, String)>) {
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(name, value)| {
            (
                name.to_string(),
                value.to_str().unwrap().replace(tenant, "TENANT"),
            )
        })
        .collect();
    headers.sort();
    (response.status().as_u16(), headers)
}

async fn metadata_document_does_not_reveal_whether_a_tenant_exists(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    t.tenant("acme").await;
    let (status, _, body) = metadata(&t, "acme").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["resource"], format!("{}/t/TENANT/mcp", t.base_url));
    assert_eq!(
        doc["bearer_methods_supported"],
        serde_json::json!(["header"])
    );
    // Its authorization server is Custodian's own for the tenant (sign-in), never the tenant's
    // IdP (whose tokens this endpoint does not accept); nor is the tenant's display name shown.
    assert_eq!(
        doc["authorization_servers"],
        serde_json::json!([format!("{}/t/TENANT", t.base_url)])
    );
    assert!(
        !body.contains("idp.acme.example.com") && !body.contains("Tenant"),
        "{body}"
    );
    // An unknown tenant (a name of the same length, so that even Content-Length could tell) gets
    // the very same answer.
    assert_eq!(metadata(&t, "acme").await, metadata(&t, "zulu").await);
    t.stop().await;
}

async fn unknown_tenants_answer_like_known_ones_without_a_valid_token(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    t.tenant("bravo").await;
    let good = t.token(&acme, "codex").await;
    let forged = format!("{}{}", &good[..good.len() - 4], "AAAA");
    let http = reqwest::Client::new();
    let cases = [
        (None, &["acme", "bravo", "ghost"][..]),
        (Some(bearer("cst_nope")), &["acme", "bravo", "ghost"]),
        (Some(bearer(&forged)), &["acme", "bravo", "ghost"]),
        // A valid token, on tenants it does not belong to.
        (Some(bearer(&good)), &["bravo", "ghost"]),
    ];
    for (header, tenants) in cases {
        for method in ["GET", "POST", "DELETE"] {
            let mut answers = vec![];
            for tenant in tenants {
                let mut request = http
                    .request(method.parse().unwrap(), t.mcp_url(tenant))
                    .header("accept", "application/json, text/event-stream")
                    .header("content-type", "application/json");
                if method == "POST" {
                    request = request.body(INIT);
                }
                if let Some(h) = &header {
                    request = request.header("authorization", h);
                }
                let response = request.send().await.unwrap();
                let (status, headers) = comparable(&response, tenant);
                let body = response.text().await.unwrap().replace(tenant, "TENANT");
                answers.push((status, headers, body));
            }
            assert_eq!(answers[0].0, 401, "{method}: {answers:?}");
            assert!(
                answers[0]
                    .1
                    .iter()
                    .any(|(name, value)| name == "www-authenticate"
                        && value.contains("/.well-known/oauth-protected-resource/t/TENANT/mcp")),
                "{answers:?}"
            );
            for other in &answers[1..] {
                assert_eq!(&answers[0], other, "{method} with {:?}", header.is_some());
            }
        }
    }
    t.stop().await;
}

async fn tenant_a_token_sees_nothing_of_tenant_b(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let a = t.tenant("alpha").await;
    let b = t.tenant("bravo").await;
    t.environment(&a, "alpha-db", &["ALPHA_PASSWORD"]).await;
    t.environment(&b, "bravo-db", &["BRAVO_PASSWORD"]).await;
    let token_a = t.token(&a, "codex").await;
    // The same token name exists in B: names do not cross tenants either.
    let token_b = t.token(&b, "codex").await;

    // A's token on B's path: 401, exactly like an unknown token.
    let mut on_b = RawMcp::new(t.mcp_url("bravo"), Some(&token_a));
    let (status, body) = on_b.send(INIT).await;
    assert_eq!(status, 401);
    let mut unknown = RawMcp::new(
        t.mcp_url("bravo"),
        Some("cst_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    );
    let (unknown_status, unknown_body) = unknown.send(INIT).await;
    assert_eq!((status, body.clone()), (unknown_status, unknown_body));
    on_b.token = Some(token_b.clone());
    on_b.initialize().await;
    unknown.token = None;

    // A sees only A's environment.
    let mut on_a = RawMcp::new(t.mcp_url("alpha"), Some(&token_a));
    on_a.initialize().await;
    let (_, listed) = on_a
        .send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"list_environments","arguments":{}}}"#)
        .await;
    let listed = listed.expect("a JSON-RPC answer");
    let envs = &listed["result"]["structuredContent"]["environments"];
    assert_eq!(envs.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(envs[0]["name"], "alpha-db");
    assert!(!listed.to_string().contains("bravo"), "{listed}");
    assert!(!listed.to_string().contains("BRAVO"), "{listed}");
    t.stop().await;
}

async fn revoked_token_stops_working_on_the_next_request(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let token = t.token(&acme, "codex").await;
    let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
    mcp.initialize().await;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    assert_eq!(mcp.send(list).await.0, 200);
    agent_tokens::revoke(t.db(), &acme, "codex", t.clock.now())
        .await
        .unwrap();
    // The open session does not keep the revoked token alive.
    assert_eq!(mcp.send(list).await.0, 401);
    // A new token with the same name may be issued after revocation.
    let again = t.token(&acme, "codex").await;
    assert_ne!(again, token);
    t.stop().await;
}

/// Two replicas on one database; the admin CLI (a process of its own) changes the database. The
/// second replica, which has the token and the listing cached, must see an added environment and
/// refuse the revoked token within a second.
async fn another_replicas_changes_are_honoured_within_a_second(backend: Backend) {
    let Some(a) = TestApp::builder(backend).start().await else {
        return;
    };
    let Some(b) = TestApp::builder(backend)
        .on_database(a.database())
        .start()
        .await
    else {
        return;
    };
    let acme = a.tenant("acme").await;
    a.environment(&acme, "first", &["API_KEY"]).await;
    let token = a.token(&acme, "codex").await;
    let database = a.database();
    let admin = |args: &[&str]| database.admin(args);
    let mut on_b = RawMcp::new(b.mcp_url("acme"), Some(&token));
    on_b.initialize().await;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"list_environments","arguments":{}}}"#;
    let names = |answer: Option<serde_json::Value>| -> Vec<String> {
        let answer = answer.expect("a JSON-RPC answer");
        answer["result"]["structuredContent"]["environments"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // Before: the token works on B, and B has the token and the listing cached.
    for _ in 0..3 {
        let (status, answer) = on_b.send(list).await;
        assert_eq!(status, 200);
        assert_eq!(names(answer), ["first"]);
    }

    admin(&["env", "create", "acme", "second", "--secret", "DB_URL"]);
    let changed = std::time::Instant::now();
    loop {
        let (status, answer) = on_b.send(list).await;
        assert_eq!(status, 200);
        if names(answer) == ["first", "second"] {
            break;
        }
        assert!(
            changed.elapsed() < std::time::Duration::from_secs(1),
            "replica B still lists the old environments a second after the change"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    admin(&["agent-token", "revoke", "acme", "codex"]);
    let revoked = std::time::Instant::now();
    loop {
        let (status, answer) = on_b.send(list).await;
        if status == 401 {
            assert!(answer.is_none_or(|a| a.get("result").is_none()));
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < std::time::Duration::from_secs(1),
            "replica B still accepts the revoked token a second after the revocation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // And it stays refused, on both replicas.
    assert_eq!(on_b.send(list).await.0, 401);
    let on_a = RawMcp::new(a.mcp_url("acme"), Some(&token));
    assert_eq!(on_a.send(list).await.0, 401);
    b.stop().await;
    a.stop().await;
}

async fn session_is_bound_to_the_token_that_opened_it(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let first = t.token(&acme, "first").await;
    let second = t.token(&acme, "second").await;
    let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&first));
    mcp.initialize().await;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    assert_eq!(mcp.send(list).await.0, 200);
    mcp.token = Some(second);
    let (status, body) = mcp.send(list).await;
    assert_eq!(status, 404, "another token must not ride on the session");
    assert_eq!(body.unwrap()["error"], "session_not_found");
    // A made-up session id is unknown too.
    mcp.token = Some(first);
    mcp.session = Some(uuid::Uuid::new_v4().to_string());
    assert_eq!(mcp.send(list).await.0, 404);
    t.stop().await;
}

async fn verify_accepts_only_the_exact_token(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let other = t.tenant("other").await;
    let token = t.token(&acme, "codex").await;
    let Verified::Valid(ok) = agent_tokens::verify(t.db(), &acme, &secret(&token))
        .await
        .unwrap()
    else {
        panic!("the issued token verifies");
    };
    assert_eq!(ok.token_name, "codex");
    assert_eq!(ok.tenant, acme);
    assert!(token.starts_with("cst_") && token.len() == 4 + 16 + 1 + 43);
    for bad in [
        token.to_uppercase(),
        format!("{token}x"),
        token[..token.len() - 1].to_owned(),
        String::new(),
    ] {
        assert!(
            agent_tokens::verify(t.db(), &acme, &secret(&bad))
                .await
                .unwrap()
                .eq(&Verified::Invalid)
        );
    }
    assert!(
        agent_tokens::verify(t.db(), &other, &secret(&token))
            .await
            .unwrap()
            .eq(&Verified::Invalid)
    );
    let ghost = custodian::tenants::TenantId::parse("ghost").unwrap();
    assert_eq!(
        agent_tokens::verify(t.db(), &ghost, &secret(&token))
            .await
            .unwrap(),
        Verified::UnknownTenant
    );
    // Only a hash is stored.
    let stored: Vec<(String,)> = sqlx::query_as("SELECT secret_hash FROM agent_tokens")
        .fetch_all(t.db().pool())
        .await
        .unwrap();
    let secret_part = &token[21..];
    assert!(
        stored
            .iter()
            .all(|(h,)| !h.contains(secret_part) && h.len() == 64)
    );
    t.stop().await;
}
