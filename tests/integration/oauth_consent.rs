//! Team sign-in's defences in the browser and against anonymous floods: the consent page and its
//! double-submit cookie, the browser binding at the IdP's return, bounded sign-ins in progress and
//! pending registrations, and sign-ins that end with an IdP change or after a day. Driven over
//! HTTP with the real test IdP (oidc-provider).

use custodian::clock::Clock;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::idp::{Landed, Login, consent, consent_form};
use crate::oauth::{NativeClient, error_of, gateway_and_idp, list_environments, no_redirects};
use crate::on_both_backends;

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .unwrap()
}

fn location(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_owned())
}

fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().to_owned())
        .collect()
}

async fn count(t: &TestApp, sql: &'static str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(t.db().pool()).await.unwrap();
    n
}

const PENDING: &str = "SELECT COUNT(*) FROM oauth_signins WHERE browser_hash IS NULL";

/// The consent page names the tenant, the client and where the result goes, cannot be framed, and
/// only the browser it was shown in can answer it; the IdP's return is accepted only from the
/// browser that allowed the sign-in.
async fn consent_is_asked_in_the_browser_and_bound_to_it(backend: Backend) {
    let Some((t, idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let client = NativeClient::discover_and_register(&t.mcp_url("acme")).await;
    let redirect = url::Url::parse(&client.redirect_uri).unwrap();
    let redirect_to = format!("127.0.0.1:{}", redirect.port().unwrap());

    // The page: what is asked, with headers that keep it out of frames and caches, and no script.
    let victim = browser();
    let (url, _) = client.authorization_url(|_| {});
    let shown = victim.get(&url).send().await.unwrap();
    assert_eq!(shown.status(), 200);
    let headers = shown.headers().clone();
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["cache-control"], "no-store");
    let cookies = set_cookies(&shown);
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/t/acme/oauth"] {
        assert!(cookies[0].contains(flag), "{flag}: {cookies:?}");
    }
    let victim_page = shown.text().await.unwrap();
    for shown in ["test client", "acme", redirect_to.as_str()] {
        assert!(victim_page.contains(shown), "{shown}: {victim_page}");
    }
    assert!(!victim_page.contains("<script"), "{victim_page}");

    // A client's name cannot inject markup.
    let hostile = no_redirects()
        .post(format!("{}/oauth/register", client.issuer))
        .json(&json!({"client_name": "<script>canary()</script>", "redirect_uris": [client.redirect_uri]}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let (hostile_url, _) = client.authorization_url(|q| {
        q.retain(|(k, _)| *k != "client_id");
        q.push((
            "client_id",
            hostile["client_id"].as_str().unwrap().to_owned(),
        ));
    });
    let page = browser()
        .get(&hostile_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("<script>canary()"), "{page}");

    // The attacker starts a sign-in himself and makes the victim's browser post his consent
    // token: without the cookie, or with the victim's own cookie, it is refused and nothing moves.
    let attacker = browser();
    let attacker_page = attacker
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (action, attacker_fields) = consent_form(&attacker_page);
    let mut forged = attacker_fields.clone();
    forged.push(("decision".to_owned(), "allow".to_owned()));
    let pending = count(&t, PENDING).await;
    for from in [no_redirects(), victim.clone()] {
        let answer = from.post(&action).form(&forged).send().await.unwrap();
        assert_eq!(answer.status(), 400);
        assert_eq!(location(&answer), None);
        assert!(set_cookies(&answer).is_empty());
    }
    assert_eq!(count(&t, PENDING).await, pending);

    // Deny: back to the client with access_denied, its state and iss; the sign-in is gone.
    let denied = consent(&victim, &victim_page, "deny").await;
    let back = url::Url::parse(&location(&denied).unwrap()).unwrap();
    assert!(back.as_str().starts_with(&client.redirect_uri), "{back}");
    let param = |n: &str| {
        back.query_pairs()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(param("error").as_deref(), Some("access_denied"));
    assert_eq!(param("state").as_deref(), Some("client-state-1"));
    assert_eq!(param("iss").as_deref(), Some(client.issuer.as_str()));
    assert_eq!(param("code"), None);
    assert_eq!(count(&t, PENDING).await, pending - 1);
    // An answered page cannot be answered again.
    let again = consent(&victim, &victim_page, "allow").await;
    assert_eq!(location(&again), None);

    // The attacker allows his own sign-in and sends the victim the IdP's URL: the victim signs in
    // at the IdP, but their browser does not hold the binding cookie, so nothing is issued and
    // nothing reaches the client.
    let allowed = consent(&attacker, &attacker_page, "allow").await;
    assert_eq!(allowed.status(), 303);
    let binding = set_cookies(&allowed);
    assert!(
        binding.iter().any(|c| c.contains("custodian-sign-in-acme=")
            && c.contains("HttpOnly")
            && c.contains("SameSite=Lax")),
        "{binding:?}"
    );
    let idp_url = location(&allowed).unwrap();
    assert!(idp_url.starts_with(&idp.issuer), "{idp_url}");
    match idp.sign_in_at_idp(&idp_url, Login::as_("alice")).await {
        Landed::Page(status, _) => assert_eq!(status, 400),
        Landed::Client(to) => panic!("the victim's sign-in reached the client: {to}"),
    }
    assert_eq!(count(&t, "SELECT COUNT(*) FROM oauth_families").await, 0);

    // The browser that allowed its own sign-in completes it.
    let signed_in = client.sign_in(&idp, "alice").await;
    let (status, _) = client.redeem(&signed_in).await;
    assert_eq!(status, 200);
    t.stop().await;
}

/// Anonymous callers cannot grow the stored sign-ins: an oversized state is refused (not stored,
/// not echoed), a client keeps at most 10 in progress, a tenant at most 1000, and expired ones go.
async fn sign_ins_in_progress_are_bounded(backend: Backend) {
    let Some((t, _idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let client = NativeClient::discover_and_register(&t.mcp_url("acme")).await;
    let http = no_redirects();
    let canary = format!("CANARY{}", "x".repeat(600));
    let (url, _) = client.authorization_url(|q| {
        q.retain(|(k, _)| *k != "state");
        q.push(("state", canary.clone()));
    });
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(location(&refused), None);
    assert!(set_cookies(&refused).is_empty());
    assert!(!refused.text().await.unwrap().contains("CANARY"));
    assert_eq!(count(&t, "SELECT COUNT(*) FROM oauth_signins").await, 0);

    let (url, _) = client.authorization_url(|_| {});
    for _ in 0..15 {
        assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(count(&t, "SELECT COUNT(*) FROM oauth_signins").await, 10);

    // The tenant is full (other clients' sign-ins): refused with temporarily_unavailable.
    let mut tx = t.db().pool().begin().await.unwrap();
    for i in 0..990 {
        sqlx::query(
            "INSERT INTO oauth_signins (state_hash, tenant_id, client_id, redirect_uri, code_challenge, \
             scope, upstream_sealed, expires_at) VALUES ($1, 'acme', $2, 'http://127.0.0.1:9/cb', 'c', 'mcp', '', $3)",
        )
        .bind(format!("filler-{i}"))
        .bind(format!("ocl_filler{}", i % 99))
        .bind(t.clock.now() + 600)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let other = NativeClient::discover_and_register(&t.mcp_url("acme")).await;
    let (other_url, _) = other.authorization_url(|_| {});
    let full = http.get(&other_url).send().await.unwrap();
    assert_eq!(full.status(), 303);
    assert!(
        location(&full)
            .unwrap()
            .contains("error=temporarily_unavailable")
    );
    assert_eq!(count(&t, "SELECT COUNT(*) FROM oauth_signins").await, 1000);

    // Expired sign-ins are dropped as new ones start.
    t.clock.advance(601);
    assert_eq!(http.get(&other_url).send().await.unwrap().status(), 200);
    assert_eq!(count(&t, "SELECT COUNT(*) FROM oauth_signins").await, 1);
    t.stop().await;
}

/// Registrations without a sign-in cannot lock a tenant out: beyond 200 the oldest pending ones
/// (and their sign-ins) are dropped, and clients someone signed in with are never counted.
async fn registrations_cannot_lock_out_sign_in(backend: Backend) {
    let Some((t, idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let mcp = t.mcp_url("acme");
    let used = NativeClient::discover_and_register(&mcp).await;
    let (_, tokens) = used.redeem(&used.sign_in(&idp, "alice").await).await;
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    t.clock.advance(1);
    let oldest_pending = NativeClient::discover_and_register(&mcp).await;
    let (oldest_url, _) = oldest_pending.authorization_url(|_| {});
    let http = no_redirects();
    assert_eq!(http.get(&oldest_url).send().await.unwrap().status(), 200);
    t.clock.advance(1);
    for _ in 0..200 {
        let answer = http
            .post(format!("{}/oauth/register", used.issuer))
            .json(&json!({"redirect_uris": ["http://127.0.0.1:9/cb"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201);
    }
    // A new engineer can still register and start a sign-in.
    let late = NativeClient::discover_and_register(&mcp).await;
    let (late_url, _) = late.authorization_url(|_| {});
    assert_eq!(http.get(&late_url).send().await.unwrap().status(), 200);
    // The oldest pending client is gone with its sign-in; the signed-in one is untouched.
    let gone = http.get(&oldest_url).send().await.unwrap();
    assert_eq!(gone.status(), 400);
    assert_eq!(location(&gone), None);
    let (left,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM oauth_signins WHERE client_id = $1")
        .bind(&oldest_pending.client_id)
        .fetch_one(t.db().pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(used.refresh(&refresh, &mcp).await.0, 200);
    t.stop().await;
}

/// A sign-in ends when the tenant's IdP is changed, and a day after it was made.
async fn sign_ins_end_with_an_idp_change_and_after_a_day(backend: Backend) {
    let Some((t, idp)) = gateway_and_idp(backend).await else {
        return;
    };
    let mcp = t.mcp_url("acme");
    let client = NativeClient::discover_and_register(&mcp).await;
    let (_, tokens) = client.redeem(&client.sign_in(&idp, "alice").await).await;
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(list_environments(&mcp, &access).await.0, 200);
    // Another tenant's change leaves acme's sign-ins alone.
    let other = custodian::tenants::TenantId::parse("other").unwrap();
    assert_eq!(set_idp(&t, &other, &idp.issuer, "other-client").await, 0);
    assert_eq!(list_environments(&mcp, &access).await.0, 200);
    // Re-setting the same issuer and client (new scopes, a rotated secret) keeps them.
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    assert_eq!(set_idp(&t, &acme, &idp.issuer, "custodian").await, 0);
    assert_eq!(list_environments(&mcp, &access).await.0, 200);
    // Another client at the IdP (pairwise subjects may differ) ends them.
    let revoked = set_idp(&t, &acme, &idp.issuer, "custodian-elsewhere").await;
    assert_eq!(revoked, 1);
    assert_eq!(list_environments(&mcp, &access).await.0, 401);
    assert_eq!(
        error_of(&client.refresh(&refresh, &mcp).await),
        (400, "invalid_grant")
    );
    set_idp(&t, &acme, &idp.issuer, "custodian").await;

    // A day later a refresh token no longer refreshes: the engineer signs in again.
    let (_, tokens) = client.redeem(&client.sign_in(&idp, "alice").await).await;
    let mut refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        t.clock.advance(11 * 3600);
        let (status, next) = client.refresh(&refresh, &mcp).await;
        assert_eq!(status, 200, "{next}");
        refresh = next["refresh_token"].as_str().unwrap().to_owned();
    }
    t.clock.advance(2 * 3600 + 1);
    assert_eq!(
        error_of(&client.refresh(&refresh, &mcp).await),
        (400, "invalid_grant")
    );
    t.stop().await;
}

async fn set_idp(
    t: &TestApp,
    tenant: &custodian::tenants::TenantId,
    issuer: &str,
    client_id: &str,
) -> u64 {
    custodian::tenants::set_idp(
        t.db(),
        tenant,
        &custodian::tenants::IdpSettings {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: None,
            scopes: "openid email groups".to_owned(),
            approver_claim: "email".to_owned(),
            groups_claim: "groups".to_owned(),
        },
        t.clock.now(),
    )
    .await
    .unwrap()
}

on_both_backends!(
    consent_is_asked_in_the_browser_and_bound_to_it,
    sign_ins_in_progress_are_bounded,
    registrations_cannot_lock_out_sign_in,
    sign_ins_end_with_an_idp_change_and_after_a_day,
);
