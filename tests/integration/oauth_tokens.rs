//! `oauth` credentials against the real OpenID Provider (`oidc-provider`, default claim behaviour,
//! with its `clientCredentials` and `introspection` features on and clients registered for them):
//! a run receives an access token the IdP says is active; a second run of the grant reuses it, a
//! run of another grant gets its own; a refresh token that the IdP rotates is stored as the next
//! version, also when two gateways on one database refresh at the same time. The client secret
//! and every refresh token are absent from runs (their environment and output, read reversed so
//! that redaction cannot hide a leak), the logs (span fields included), the runner's log and the
//! database files.

use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::idp::{Login, TestIdp};
use crate::mcp_clients::connect;
use crate::on_both_backends;
use crate::processes::files_containing;
use crate::runners::{Pki, TestRunner, run};
use custodian::credentials::{Kind, Spec};

on_both_backends!(oauth_access_tokens_are_minted_per_grant_from_secrets_that_stay_in_the_gateway);

fn reversed(text: &str) -> String {
    text.chars().rev().collect()
}

/// The access token a run printed reversed (`printenv NAME | rev`).
fn token_of(result: &Value) -> String {
    let out = result["stdout"].as_str().unwrap_or_default();
    reversed(out.lines().next().unwrap_or_default().trim())
}

/// The values of the token variables in the runs' environments (printed reversed by `env | rev`).
fn given_tokens(outputs: &[Value]) -> Vec<String> {
    outputs
        .iter()
        .flat_map(|o| {
            let out = o["stdout"].as_str().unwrap_or_default().to_owned();
            out.lines()
                .map(reversed)
                .filter_map(|line| {
                    let (name, value) = line.split_once('=')?;
                    ["REPORTS_TOKEN", "OFFLINE"]
                        .contains(&name)
                        .then(|| value.to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn introspect(idp: &TestIdp, secret: &str, token: &str) -> Value {
    reqwest::Client::new()
        .post(format!("{}/token/introspection", idp.issuer))
        .basic_auth("introspector", Some(secret))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A refresh token of the public client `offline-cli`, approved through the device flow.
async fn refresh_token(idp: &TestIdp) -> String {
    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{}/device/auth", idp.issuer))
        .form(&[
            ("client_id", "offline-cli"),
            ("scope", "openid offline_access"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    idp.approve(started["user_code"].as_str().unwrap(), Login::as_("alice"))
        .await;
    let tokens: Value = http
        .post(format!("{}/token", idp.issuer))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", started["device_code"].as_str().unwrap()),
            ("client_id", "offline-cli"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tokens["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no refresh token: {tokens}"))
        .to_owned()
}

async fn set(t: &TestApp, name: &str, settings: Value, value: &[u8]) -> i64 {
    let spec = Spec::new(Kind::Oauth, Some(&settings.to_string())).unwrap();
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    custodian::secrets::set_credential(
        t.db(),
        &t.app.master_key,
        &acme,
        "api",
        name,
        &spec,
        value,
        1,
    )
    .await
    .unwrap()
    .version
}

async fn version_of(t: &TestApp, name: &str) -> i64 {
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    custodian::secrets::list(t.db(), &acme, "api")
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
        .version
}

async fn oauth_access_tokens_are_minted_per_grant_from_secrets_that_stay_in_the_gateway(
    backend: Backend,
) {
    if !crate::processes::require_root() {
        return;
    }
    let Some(_) = crate::runners::runner_binary() else {
        return;
    };
    let logs = crate::harness::capture_logs();
    let service_secret = format!("svc-{}", hex::encode(rand::random::<[u8; 16]>()));
    let introspector = hex::encode(rand::random::<[u8; 16]>());
    let Some(idp) = TestIdp::start_with_env(
        600,
        &[
            ("SERVICE_SECRET", service_secret.as_str()),
            ("INTROSPECTOR_SECRET", introspector.as_str()),
        ],
    ) else {
        return;
    };
    let pki = Pki::new();
    let (cert, key) = pki.gateway();
    let Some(t) = TestApp::builder(backend)
        .runner_tls(&pki.ca(), &cert, &key)
        .start()
        .await
    else {
        return;
    };
    let acme = t.tenant("acme").await;
    t.environment(&acme, "api", &[]).await;
    let token_url = format!("{}/token", idp.issuer);
    set(
        &t,
        "REPORTS",
        json!({"token_url": token_url, "client_id": "svc-reporter", "grant": "client_credentials",
               "scope": "reports:read", "variable": "REPORTS_TOKEN"}),
        service_secret.as_bytes(),
    )
    .await;
    let first_refresh = refresh_token(&idp).await;
    let offline_settings =
        json!({"token_url": token_url, "client_id": "offline-cli", "grant": "refresh_token"});
    set(
        &t,
        "OFFLINE",
        offline_settings.clone(),
        json!({"refresh_token": first_refresh})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(version_of(&t, "OFFLINE").await, 1);

    let runner = TestRunner::start(&pki.ca(), &pki.runner("acme", "r1"), "acme", "r1")
        .await
        .unwrap();
    custodian::runners::add(t.db(), &acme, "r1", "default", &runner.url, 1)
        .await
        .unwrap();
    let (token_id, agent_token) = t.token_with_id(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &agent_token).await;
    let grant = t.active_grant(&acme, &token_id, "api", 100, 600).await;
    let other = t.active_grant(&acme, &token_id, "api", 100, 600).await;
    let show = |grant: &str, variable: &str| json!({"grant_id": grant, "command": format!("printenv {variable} | rev; env | rev")});
    let mut outputs = Vec::new();

    // Client credentials: the token is active at the IdP, for the client and scope configured.
    let polls = idp.polls().await.len();
    let first = run(client.peer(), show(&grant, "REPORTS_TOKEN"))
        .await
        .unwrap();
    let token = token_of(&first);
    let seen = introspect(&idp, &introspector, &token).await;
    assert_eq!(seen["active"], true, "{seen}");
    assert_eq!(seen["client_id"], "svc-reporter", "{seen}");
    assert_eq!(seen["scope"], "reports:read", "{seen}");
    // The same grant reuses it without asking the IdP again; another grant gets its own.
    let again = run(client.peer(), show(&grant, "REPORTS_TOKEN"))
        .await
        .unwrap();
    assert_eq!(token_of(&again), token);
    let elsewhere = run(client.peer(), show(&other, "REPORTS_TOKEN"))
        .await
        .unwrap();
    assert_ne!(token_of(&elsewhere), token);
    assert_eq!(
        introspect(&idp, &introspector, &token_of(&elsewhere)).await["active"],
        true
    );
    // Each grant's first run also refreshed the environment's other credential, OFFLINE.
    assert_eq!(idp.polls().await.len() - polls, 2 + 2);
    outputs.extend([first, again, elsewhere]);

    // Refresh token: every refresh rotates it (public client) and the new one is stored.
    let versions = version_of(&t, "OFFLINE").await;
    assert_eq!(versions, 1 + 2, "two grants' first runs refreshed");
    let refreshed = run(client.peer(), show(&grant, "OFFLINE")).await.unwrap();
    let offline_token = token_of(&refreshed);
    assert_eq!(
        introspect(&idp, &introspector, &offline_token).await["active"],
        true
    );
    assert_eq!(
        introspect(&idp, &introspector, &offline_token).await["client_id"],
        "offline-cli"
    );
    assert_eq!(
        version_of(&t, "OFFLINE").await,
        versions,
        "cached for the grant: no refresh"
    );
    outputs.push(refreshed);

    // Two gateways on one database refresh at once: one after the other, each with the newest
    // refresh token (a rotated-away one would make the IdP revoke them all).
    let Some(t2) = TestApp::builder(backend)
        .on_database(t.database())
        .runner_tls(&pki.ca(), &cert, &key)
        .start()
        .await
    else {
        return;
    };
    let client2 = connect(&t2.mcp_url("acme"), &agent_token).await;
    let third = t.active_grant(&acme, &token_id, "api", 100, 600).await;
    let fourth = t.active_grant(&acme, &token_id, "api", 100, 600).await;
    let (a, b) = tokio::join!(
        run(client.peer(), show(&third, "OFFLINE")),
        run(client2.peer(), show(&fourth, "OFFLINE")),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    for result in [&a, &b] {
        let seen = introspect(&idp, &introspector, &token_of(result)).await;
        assert_eq!(seen["active"], true, "{result} {seen}");
    }
    assert_eq!(version_of(&t, "OFFLINE").await, versions + 2);
    outputs.extend([a, b]);
    // The stored refresh token still works: the chain was never broken.
    let after = t.active_grant(&acme, &token_id, "api", 100, 600).await;
    let last = run(client.peer(), show(&after, "OFFLINE")).await.unwrap();
    assert_eq!(
        introspect(&idp, &introspector, &token_of(&last)).await["active"],
        true
    );
    outputs.push(last);

    // A refused client: the IdP's error code, not the secret.
    set(
        &t,
        "REPORTS",
        json!({"token_url": token_url, "client_id": "svc-reporter", "grant": "client_credentials"}),
        b"wrong-secret-for-the-client",
    )
    .await;
    let refused = run(client.peer(), show(&grant, "REPORTS"))
        .await
        .unwrap_err();
    assert!(refused.contains("invalid_client"), "{refused}");
    assert!(!refused.contains("wrong-secret"), "{refused}");

    // Nowhere: the client secrets, and every token the IdP issued (refresh tokens above all)
    // but the access tokens the runs were given.
    let given = given_tokens(&outputs);
    let opened = custodian::secrets::load_for_run(t.db(), &t.app.master_key, &acme, "api")
        .await
        .unwrap();
    let stored_refresh: Value =
        serde_json::from_slice(&opened.iter().find(|s| s.name == "OFFLINE").unwrap().value)
            .unwrap();
    let stored_refresh = stored_refresh["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(stored_refresh, first_refresh);
    assert!(!given.contains(&stored_refresh) && !given.contains(&first_refresh));
    let issued: Vec<String> = idp
        .issued()
        .await
        .into_iter()
        .filter(|v| !given.contains(v))
        .collect();
    assert!(issued.contains(&stored_refresh));
    assert!(issued.contains(&first_refresh));
    assert!(issued.len() >= 2 + 6, "{}", issued.len());
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned() + &runner.log();
    let db_text = crate::harness::dump_all_text(t.db()).await;
    let db_files = t.database().url.strip_prefix("sqlite://").map(|path| {
        std::path::PathBuf::from(path)
            .parent()
            .unwrap()
            .to_path_buf()
    });
    let secrets: Vec<&str> = [service_secret.as_str(), "wrong-secret-for-the-client"]
        .into_iter()
        .chain(issued.iter().map(String::as_str))
        .collect();
    for secret in secrets {
        for output in &outputs {
            let text = output.to_string();
            assert!(
                !text.contains(secret) && !text.contains(&reversed(secret)),
                "{output}"
            );
        }
        assert!(!logged.contains(secret));
        assert!(!db_text.contains(secret));
        if let Some(dir) = &db_files {
            assert_eq!(
                files_containing(dir, secret),
                Vec::<std::path::PathBuf>::new()
            );
        }
    }
    if backend == Backend::Postgres {
        let dump = std::process::Command::new("pg_dump")
            .arg(&t.database().url)
            .output()
            .expect("pg_dump");
        assert!(dump.status.success());
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(dump.contains("credential_refresh_locks"));
        assert!(!dump.contains(&service_secret));
        assert!(!dump.contains(&first_refresh));
    }
    drop((client, client2));
    t2.stop().await;
    t.stop().await;
}
