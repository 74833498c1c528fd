//! Team sign-in (`crate::oauth`): discovery, registration, PKCE, audience, code replay and refresh
//! rotation, driven over HTTP as a native OAuth client would, with the real test IdP
//! (oidc-provider) as the tenant's IdP and a person's sign-in through its interaction endpoints.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{Backend, RawMcp, TestApp, dump_all_text};
use crate::idp::{Login, TestIdp};
use crate::on_both_backends;
use crate::processes::free_port;

/// A native client as Codex is one: registered with a loopback redirect URI, PKCE S256.
pub struct NativeClient {
    http: reqwest::Client,
    pub issuer: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub resource: String,
}

/// What one sign-in produced: the client's callback URL and the verifier it used.
pub struct SignedIn {
    pub callback: url::Url,
    pub verifier: String,
}

impl SignedIn {
    pub fn param(&self, name: &str) -> Option<String> {
        self.callback
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

impl NativeClient {
    /// Discovers the authorization server from the MCP endpoint's 401 and registers.
    pub async fn discover_and_register(mcp_url: &str) -> Self {
        let http = no_redirects();
        let unauthenticated = http
            .post(mcp_url)
            .header("mcp-protocol-version", "2024-11-05")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(unauthenticated.status(), 401);
        let challenge = unauthenticated.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        let metadata_url = challenge
            .split("resource_metadata=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("{challenge}"));
        let resource = get_json(&http, metadata_url).await;
        assert_eq!(resource["resource"], mcp_url);
        let issuer = resource["authorization_servers"][0]
            .as_str()
            .unwrap()
            .to_owned();
        let path = url::Url::parse(&issuer).unwrap().path().to_owned();
        let base = issuer.trim_end_matches(&path).to_owned();
        let server = get_json(
            &http,
            &format!("{base}/.well-known/oauth-authorization-server{path}"),
        )
        .await;
        assert_eq!(server["issuer"], issuer.as_str());
        assert_eq!(server["code_challenge_methods_supported"], json!(["S256"]));
        assert_eq!(
            server["token_endpoint_auth_methods_supported"],
            json!(["none"])
        );
        assert_eq!(
            server["authorization_response_iss_parameter_supported"],
            true
        );
        let redirect_uri = format!("http://127.0.0.1:{}/callback/test", free_port());
        let registered = http
            .post(server["registration_endpoint"].as_str().unwrap())
            .json(&json!({
                "client_name": "test client",
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(registered.status(), 201);
        let registered: Value = registered.json().await.unwrap();
        assert_eq!(registered["redirect_uris"], json!([redirect_uri]));
        Self {
            http,
            client_id: registered["client_id"].as_str().unwrap().to_owned(),
            issuer,
            redirect_uri,
            resource: mcp_url.to_owned(),
        }
    }

    /// The authorization URL for a fresh PKCE verifier; `tweak` edits the query before sending.
    pub fn authorization_url(&self, tweak: impl Fn(&mut Vec<(&str, String)>)) -> (String, String) {
        let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let mut query = vec![
            ("response_type", "code".to_owned()),
            ("client_id", self.client_id.clone()),
            ("redirect_uri", self.redirect_uri.clone()),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256".to_owned()),
            ("state", "client-state-1".to_owned()),
            ("scope", "mcp offline_access".to_owned()),
            ("resource", self.resource.clone()),
        ];
        tweak(&mut query);
        let mut url = url::Url::parse(&format!("{}/oauth/authorize", self.issuer)).unwrap();
        url.query_pairs_mut().extend_pairs(query);
        (url.to_string(), verifier)
    }

    pub async fn sign_in(&self, idp: &TestIdp, account: &'static str) -> SignedIn {
        let (url, verifier) = self.authorization_url(|_| {});
        let callback = idp.sign_in(&url, Login::as_(account)).await;
        SignedIn {
            callback: url::Url::parse(&callback).unwrap(),
            verifier,
        }
    }

    pub async fn token(&self, form: &[(&str, &str)]) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/oauth/token", self.issuer))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status == 200 {
            assert_eq!(response.headers()["cache-control"], "no-store");
        }
        (status, response.json().await.unwrap())
    }

    pub async fn redeem(&self, signed_in: &SignedIn) -> (u16, Value) {
        let code = signed_in.param("code").expect("a code");
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &self.redirect_uri),
            ("client_id", &self.client_id),
            ("code_verifier", &signed_in.verifier),
            ("resource", &self.resource),
        ])
        .await
    }

    pub async fn refresh(&self, refresh_token: &str, resource: &str) -> (u16, Value) {
        self.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", &self.client_id),
            ("scope", "mcp offline_access"),
            ("resource", resource),
        ])
        .await
    }
}

/// Calls `list_environments` with `token`; the HTTP status of `initialize` (401 when refused) and
/// the tool result when admitted.
pub async fn list_environments(mcp_url: &str, token: &str) -> (u16, Option<Value>) {
    let mut mcp = RawMcp::new(mcp_url.to_owned(), Some(token));
    let probe = mcp
        .post()
        .body(r#"{"jsonrpc":"2.0","id":0,"method":"ping"}"#)
        .send()
        .await
        .unwrap();
    if probe.status() == 401 {
        let challenge = probe.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        return (401, None);
    }
    mcp.initialize().await;
    let (status, result) = mcp
        .send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"list_environments","arguments":{}}}"#)
        .await;
    (status, result)
}

pub fn error_of(answer: &(u16, Value)) -> (u16, &str) {
    (answer.0, answer.1["error"].as_str().unwrap_or(""))
}

pub async fn gateway_and_idp(backend: Backend) -> Option<(TestApp, TestIdp)> {
    let t = TestApp::builder(backend).start().await?;
    let idp = TestIdp::start_with_sign_in(&[
        format!("{}/t/acme/oauth/callback", t.base_url),
        format!("{}/t/other/oauth/callback", t.base_url),
    ])?;
    let acme = t.tenant_with_idp("acme", &idp.issuer).await;
    t.environment(&acme, "staging", &["API_KEY"]).await;
    t.tenant_with_idp("other", &idp.issuer).await;
    Some((t, idp))
}

async fn registration_and_authorization_requests_are_strict(backend: Backend) {
    let Some((t, idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let client = NativeClient::discover_and_register(&t.mcp_url("acme")).await;
    let http = no_redirects();
    let register = |body: Value| {
        http.post(format!("{}/oauth/register", client.issuer))
            .json(&body)
            .send()
    };
    // Only loopback redirect URIs of public clients register.
    for (body, code) in [
        (
            json!({"redirect_uris": ["https://evil.example.com/cb"]}),
            "invalid_redirect_uri",
        ),
        (
            json!({"redirect_uris": ["http://127.0.0.1/cb"]}),
            "invalid_redirect_uri",
        ),
        (json!({"redirect_uris": []}), "invalid_redirect_uri"),
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "client_secret_basic"}),
            "invalid_client_metadata",
        ),
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb"], "grant_types": ["client_credentials"]}),
            "invalid_client_metadata",
        ),
    ] {
        let answer = register(body.clone()).await.unwrap();
        assert_eq!(answer.status(), 400, "{body}");
        let answer: Value = answer.json().await.unwrap();
        assert_eq!(answer["error"], code, "{body}: {answer}");
    }
    // A tenant without an IdP (or none at all) offers no sign-in.
    t.tenant("plain").await;
    for tenant in ["plain", "nosuch"] {
        let answer = http
            .post(format!("{}/t/{tenant}/oauth/register", t.base_url))
            .json(&json!({"redirect_uris": ["http://127.0.0.1:9/cb"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400);
    }

    // Unknown client and unregistered redirect URI: an error page, never a redirect.
    for tweak in [
        ("client_id", "ocl_unknown".to_owned()),
        (
            "redirect_uri",
            "http://127.0.0.1:9/callback/evil".to_owned(),
        ),
    ] {
        let (url, _) = client.authorization_url(|q| {
            q.retain(|(k, _)| *k != tweak.0);
            q.push((tweak.0, tweak.1.clone()));
        });
        let answer = http.get(url).send().await.unwrap();
        assert_eq!(answer.status(), 400, "{tweak:?}");
        assert!(answer.headers().get("location").is_none(), "{tweak:?}");
    }
    // Everything else goes back to the client as an OAuth error, with state and iss.
    let cases: [(&str, Option<&str>, &str); 5] = [
        ("code_challenge_method", Some("plain"), "invalid_request"),
        ("code_challenge", None, "invalid_request"),
        (
            "resource",
            Some("http://127.0.0.1:1/t/acme/mcp"),
            "invalid_target",
        ),
        ("resource", None, "invalid_target"),
        ("scope", Some("mcp admin"), "invalid_scope"),
    ];
    for (key, value, expected) in cases {
        let (url, _) = client.authorization_url(|q| {
            q.retain(|(k, _)| *k != key);
            if let Some(v) = value {
                q.push((key, v.to_owned()));
            }
        });
        let answer = http.get(url).send().await.unwrap();
        assert_eq!(answer.status(), 303, "{key}");
        let back = url::Url::parse(answer.headers()["location"].to_str().unwrap()).unwrap();
        assert!(back.as_str().starts_with(&client.redirect_uri), "{back}");
        let param = |n: &str| {
            back.query_pairs()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.into_owned())
        };
        assert_eq!(param("error").as_deref(), Some(expected), "{key}: {back}");
        assert_eq!(param("state").as_deref(), Some("client-state-1"));
        assert_eq!(param("iss").as_deref(), Some(client.issuer.as_str()));
        assert!(param("code").is_none());
    }
    // No sign-in was started by any of them, and a forged return from the IdP is refused.
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM oauth_signins")
        .fetch_one(t.db().pool())
        .await
        .unwrap();
    assert_eq!(count, 0);
    let forged = http
        .get(format!(
            "{}/oauth/callback?code=x&state=forged",
            client.issuer
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    assert!(forged.headers().get("location").is_none());
    drop(idp);
    t.stop().await;
}

async fn codes_are_single_use_bound_to_pkce_and_tokens_to_their_resource(backend: Backend) {
    let Some((t, idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let mcp = t.mcp_url("acme");
    let client = NativeClient::discover_and_register(&mcp).await;

    // A wrong verifier: refused, and the code is spent.
    let signed_in = client.sign_in(&idp, "alice").await;
    assert_eq!(
        signed_in.param("iss").as_deref(),
        Some(client.issuer.as_str())
    );
    assert_eq!(signed_in.param("state").as_deref(), Some("client-state-1"));
    let wrong = SignedIn {
        callback: signed_in.callback.clone(),
        verifier: URL_SAFE_NO_PAD.encode([7u8; 32]),
    };
    assert_eq!(
        error_of(&client.redeem(&wrong).await),
        (400, "invalid_grant")
    );
    assert_eq!(
        error_of(&client.redeem(&signed_in).await),
        (400, "invalid_grant")
    );

    // A token request for another resource is refused and leaves the code usable; then the code
    // works once, and the token it gave is accepted by acme's MCP endpoint only.
    let signed_in = client.sign_in(&idp, "alice").await;
    let code = signed_in.param("code").unwrap();
    let other_resource = t.mcp_url("other");
    let wrong_resource = client
        .token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &client.redirect_uri),
            ("client_id", &client.client_id),
            ("code_verifier", &signed_in.verifier),
            ("resource", &other_resource),
        ])
        .await;
    assert_eq!(error_of(&wrong_resource), (400, "invalid_target"));
    let (status, tokens) = client.redeem(&signed_in).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 600);
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    assert!(access.starts_with("csa_") && refresh.starts_with("csr_"));
    let (status, listed) = list_environments(&mcp, &access).await;
    assert_eq!(status, 200);
    assert!(listed.unwrap().to_string().contains("staging"));
    assert_eq!(list_environments(&other_resource, &access).await.0, 401);

    // The same code again: refused, and the sign-in it started is revoked with its tokens.
    assert_eq!(
        error_of(&client.redeem(&signed_in).await),
        (400, "invalid_grant")
    );
    assert_eq!(list_environments(&mcp, &access).await.0, 401);
    assert_eq!(
        error_of(&client.refresh(&refresh, &mcp).await),
        (400, "invalid_grant")
    );

    // Access tokens expire.
    let signed_in = client.sign_in(&idp, "bob").await;
    let (_, tokens) = client.redeem(&signed_in).await;
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    assert_eq!(list_environments(&mcp, &access).await.0, 200);
    t.clock.advance(601);
    assert_eq!(list_environments(&mcp, &access).await.0, 401);

    // Nothing a client holds is stored in plaintext.
    let stored = dump_all_text(t.db()).await;
    // Tokens are `csa_<hex id>_<secret>`; the secret is base64url, so it may itself hold `_`.
    let secret_of = |token: &str| token[4..].split_once('_').unwrap().1.to_owned();
    for value in [
        secret_of(&access),
        code,
        secret_of(&refresh),
        signed_in.verifier,
    ] {
        let secret_part = value.as_str();
        assert!(
            secret_part.len() >= 43,
            "a random part too short to search for"
        );
        assert!(!stored.contains(secret_part), "stored in plaintext");
    }
    for issued in idp.issued().await {
        assert!(!stored.contains(&issued), "an IdP token was stored");
    }
    t.stop().await;
}

async fn refresh_rotates_and_a_reused_refresh_token_revokes_the_family(backend: Backend) {
    let Some((t, idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let mcp = t.mcp_url("acme");
    let client = NativeClient::discover_and_register(&mcp).await;
    let signed_in = client.sign_in(&idp, "alice").await;
    let (_, first) = client.redeem(&signed_in).await;
    let first_refresh = first["refresh_token"].as_str().unwrap().to_owned();

    // Bad refresh requests change nothing: wrong resource, unknown scope, another client.
    let wrong_resource = client.refresh(&first_refresh, &t.mcp_url("other")).await;
    assert_eq!(error_of(&wrong_resource), (400, "invalid_target"));
    let more_scope = client
        .token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &first_refresh),
            ("client_id", &client.client_id),
            ("scope", "mcp admin"),
            ("resource", &mcp),
        ])
        .await;
    assert_eq!(error_of(&more_scope), (400, "invalid_scope"));
    let other_client = client
        .token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &first_refresh),
            ("client_id", "ocl_someone_else"),
            ("resource", &mcp),
        ])
        .await;
    assert_eq!(error_of(&other_client), (400, "invalid_grant"));

    // Rotation: a new pair; the new access token works.
    let (status, second) = client.refresh(&first_refresh, &mcp).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["token_type"], "Bearer");
    let second_access = second["access_token"].as_str().unwrap().to_owned();
    let second_refresh = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, first_refresh);
    assert_eq!(list_environments(&mcp, &second_access).await.0, 200);

    // The rotated refresh token again: the whole family is revoked (the newest tokens too).
    assert_eq!(
        error_of(&client.refresh(&first_refresh, &mcp).await),
        (400, "invalid_grant")
    );
    assert_eq!(list_environments(&mcp, &second_access).await.0, 401);
    assert_eq!(
        error_of(&client.refresh(&second_refresh, &mcp).await),
        (400, "invalid_grant")
    );
    let families = custodian::oauth::list_families(
        t.db(),
        &custodian::tenants::TenantId::parse("acme").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(families.len(), 1);
    assert_eq!(families[0].subject, "alice");
    assert_eq!(families[0].email.as_deref(), Some("alice@example.com"));
    assert_eq!(
        families[0].revoke_reason.as_deref(),
        Some("refresh token reused")
    );

    // A fresh sign-in is independent of the revoked one.
    let signed_in = client.sign_in(&idp, "alice").await;
    let (status, fresh) = client.redeem(&signed_in).await;
    assert_eq!(status, 200);
    let access = fresh["access_token"].as_str().unwrap();
    assert_eq!(list_environments(&mcp, access).await.0, 200);
    t.stop().await;
}

on_both_backends!(
    registration_and_authorization_requests_are_strict,
    codes_are_single_use_bound_to_pkce_and_tokens_to_their_resource,
    refresh_rotates_and_a_reused_refresh_token_revokes_the_family,
);

/// Identity through to grants: a grant requested with a signed-in engineer's token records them,
/// and the environment's rule decides whether they may (or must) approve it themselves.
async fn grants_know_the_engineer_and_enforce_own_or_four_eyes_approval(backend: Backend) {
    use crate::grants::{call, request_in, row, user_code, wait_until};
    use custodian::environments::{Policy, RequesterRule};
    let Some((t, idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    for (name, rule) in [
        ("production", RequesterRule::NotRequester),
        ("personal", RequesterRule::Requester),
    ] {
        let policy = Policy {
            approver_vs_requester: rule,
            ..Policy::default()
        };
        t.environment_with(&acme, name, &policy).await;
    }
    let mcp = t.mcp_url("acme");
    let client = NativeClient::discover_and_register(&mcp).await;
    let (_, tokens) = client.redeem(&client.sign_in(&idp, "alice").await).await;
    let alice = crate::mcp_clients::connect(&mcp, tokens["access_token"].as_str().unwrap()).await;
    let agent_token = t.token(&acme, "ci-bot").await;
    let bot = crate::mcp_clients::connect(&mcp, &agent_token).await;

    // An agent token names no engineer: an environment that needs the requester's own approval
    // refuses it up front, and creates nothing.
    let refused = call(
        &bot,
        "request_grant",
        json!({"environment": "personal", "purpose": "read my own data"}),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("codex mcp login"), "{refused}");
    assert_eq!(grant_count(&t).await, 0);

    // Four eyes: alice cannot approve her own production grant; bob can.
    let own = request_in(&alice, "production").await;
    assert_eq!(row(&t, &own).await.requester_sub.as_deref(), Some("alice"));
    idp.approve(user_code(&own), Login::as_("alice")).await;
    let denied = wait_until(&alice, &own, "denied").await;
    assert!(
        denied["reason"].as_str().unwrap().contains("four eyes"),
        "{denied}"
    );
    let grant = request_in(&alice, "production").await;
    idp.approve(user_code(&grant), Login::as_("bob")).await;
    wait_until(&alice, &grant, "active").await;
    let stored = row(&t, &grant).await;
    assert_eq!(stored.requester_name.as_deref(), Some("alice@example.com"));
    assert_eq!(stored.approver_sub.as_deref(), Some("bob"));

    // Own approval: bob cannot approve alice's personal grant; alice can.
    let grant = request_in(&alice, "personal").await;
    idp.approve(user_code(&grant), Login::as_("bob")).await;
    wait_until(&alice, &grant, "denied").await;
    let grant = request_in(&alice, "personal").await;
    idp.approve(user_code(&grant), Login::as_("alice")).await;
    wait_until(&alice, &grant, "active").await;

    // An agent token names no engineer, so four eyes refuses it too (whoever holds a `cst_`
    // token could otherwise request with it and approve their own grant): nothing is created.
    let before = grant_count(&t).await;
    let refused = call(
        &bot,
        "request_grant",
        json!({"environment": "production", "purpose": "deploy the release"}),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("codex mcp login"), "{refused}");
    assert_eq!(grant_count(&t).await, before);
    t.stop().await;
}

async fn grant_count(t: &TestApp) -> i64 {
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM grants")
        .fetch_one(t.db().pool())
        .await
        .unwrap();
    count
}

on_both_backends!(grants_know_the_engineer_and_enforce_own_or_four_eyes_approval);
