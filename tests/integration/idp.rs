//! The real OpenID Provider for tests: `oidc-provider` (npm) with the device flow, run by Node on a
//! loopback port in its default claim behaviour (email and groups only from userinfo, `auth_time`
//! only when asked for with `max_age`). Approval goes through the provider's own device pages and
//! its interaction endpoints, as a person's browser would. The tests of `tenant set-idp`'s checks
//! against it live here too.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::processes::{Proc, custodian, free_port};

pub struct TestIdp {
    pub issuer: String,
    _process: Proc,
}

/// How the approver signs in.
#[derive(Debug, Clone, Default)]
pub struct Login {
    pub account: &'static str,
    /// How long ago the approver signed in (sets `auth_time`; negative: in the future).
    pub auth_age_seconds: i64,
    pub acr: Option<&'static str>,
    pub amr: Vec<&'static str>,
}

impl Login {
    pub fn as_(account: &'static str) -> Self {
        Self {
            account,
            ..Self::default()
        }
    }
}

fn idp_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp")
}

impl TestIdp {
    /// Starts a provider, or `None` outside CI when its npm packages are not installed.
    pub fn start(device_ttl_seconds: u64) -> Option<Self> {
        Self::spawn(device_ttl_seconds, &[], &[])
    }

    /// Like [`TestIdp::start`], with more of its knobs (see `tests/idp/idp.mjs`).
    pub fn start_with_env(device_ttl_seconds: u64, env: &[(&str, &str)]) -> Option<Self> {
        Self::spawn(device_ttl_seconds, &[], env)
    }

    /// Starts a provider whose clients may also sign engineers in with the authorization-code
    /// flow, redirecting only to `redirect_uris` (Custodian's sign-in callbacks).
    pub fn start_with_sign_in(redirect_uris: &[String]) -> Option<Self> {
        Self::spawn(600, redirect_uris, &[])
    }

    fn spawn(
        device_ttl_seconds: u64,
        redirect_uris: &[String],
        env: &[(&str, &str)],
    ) -> Option<Self> {
        if !idp_dir().join("node_modules/oidc-provider").exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the test IdP is required in CI; run .ci/run (npm ci in tests/idp)"
            );
            eprintln!("skipping: tests/idp has no node_modules (run `npm ci --prefix tests/idp`)");
            return None;
        }
        let mut child = Command::new("node")
            .arg("idp.mjs")
            .current_dir(idp_dir())
            .env("CLIENTS", r#"["custodian","other-client"]"#)
            .env("DEVICE_TTL", device_ttl_seconds.to_string())
            .env("INTERVAL", "1")
            .env(
                "SIGNIN_REDIRECT_URIS",
                serde_json::to_string(redirect_uris).expect("json"),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("idp banner");
        let banner: serde_json::Value = serde_json::from_str(&line).expect("idp prints JSON");
        Some(Self {
            issuer: banner["issuer"].as_str().expect("issuer").to_owned(),
            _process: Proc(child),
        })
    }

    pub async fn set_mode(&self, mode: &str) {
        let response = reqwest::Client::new()
            .post(format!("{}/test/mode", self.issuer))
            .json(&serde_json::json!({ "mode": mode }))
            .send()
            .await
            .expect("set mode");
        assert!(response.status().is_success());
    }

    /// Times (ms) of the token requests the provider saw.
    pub async fn polls(&self) -> Vec<i64> {
        reqwest::get(format!("{}/test/polls", self.issuer))
            .await
            .expect("polls")
            .json()
            .await
            .expect("json")
    }

    /// Every device code and token the provider handed out.
    pub async fn issued(&self) -> Vec<String> {
        self.test_json("issued").await
    }

    /// The claims of every ID token the provider issued, in order.
    pub async fn id_tokens(&self) -> Vec<serde_json::Value> {
        self.test_json("id_tokens").await
    }

    /// `client_id`, `scope`, `max_age` and `status` of every device authorization request.
    pub async fn device_requests(&self) -> Vec<serde_json::Value> {
        self.test_json("device_requests").await
    }

    async fn test_json<T: serde::de::DeserializeOwned>(&self, what: &str) -> T {
        reqwest::get(format!("{}/test/{what}", self.issuer))
            .await
            .expect(what)
            .json()
            .await
            .expect("json")
    }

    fn browser() -> reqwest::Client {
        reqwest::Client::builder()
            .cookie_store(true)
            .build()
            .expect("client")
    }

    /// Enters and confirms `user_code` on the provider's device page; returns the browser and the
    /// interaction it was sent to.
    async fn confirm_code(
        &self,
        user_code: &str,
        abort: bool,
    ) -> (reqwest::Client, reqwest::Response) {
        let browser = Self::browser();
        let page = browser
            .get(format!("{}/device?user_code={user_code}", self.issuer))
            .send()
            .await
            .expect("device page")
            .text()
            .await
            .expect("html");
        let confirm_page = browser
            .post(format!("{}/device", self.issuer))
            .form(&hidden_inputs(&page))
            .send()
            .await
            .expect("submit code")
            .text()
            .await
            .expect("html");
        let mut fields = hidden_inputs(&confirm_page);
        assert!(
            fields.iter().any(|(k, _)| k == "confirm"),
            "no confirm form: {confirm_page}"
        );
        if abort {
            fields.retain(|(k, _)| k != "confirm");
            fields.push(("abort".to_owned(), "yes".to_owned()));
        }
        let response = browser
            .post(format!("{}/device", self.issuer))
            .form(&fields)
            .send()
            .await
            .expect("confirm code");
        (browser, response)
    }

    /// Approves as `login` (login, then consent), like a person at the IdP.
    pub async fn approve(&self, user_code: &str, login: Login) {
        let (browser, interaction) = self.confirm_code(user_code, false).await;
        let details: serde_json::Value = interaction.json().await.expect("interaction details");
        assert_eq!(details["prompt"], "login", "{details}");
        let mut body = serde_json::json!({
            "account": login.account,
            "auth_age_seconds": login.auth_age_seconds,
            "amr": login.amr,
        });
        if let Some(acr) = login.acr {
            body["acr"] = acr.into();
        }
        let mut next = self.finish(&browser, &details, "login", body).await;
        // Consent, when the provider asks for it.
        if next["prompt"] == "consent" {
            next = self
                .finish(&browser, &next, "consent", serde_json::json!({}))
                .await;
        }
        assert_eq!(next["done"], true, "approval did not complete: {next}");
    }

    /// Signs in as `login` at an authorization URL (Custodian's), like a person's browser: allow
    /// on Custodian's consent page, login and consent at the provider, then the redirects back
    /// through Custodian. Stops at the client's redirect (a path starting with `/callback`) and
    /// returns its URL, for the caller to deliver to the client.
    pub async fn sign_in(&self, authorization_url: &str, login: Login) -> String {
        let browser = Self::sign_in_browser();
        let first = browser
            .get(authorization_url)
            .send()
            .await
            .expect("authorization request");
        if let Some(to) = first.headers().get(reqwest::header::LOCATION) {
            // Custodian sent the browser straight back (an error for the client).
            return to.to_str().expect("location").to_owned();
        }
        let page = first.text().await.expect("consent page");
        let allowed = consent(&browser, &page, "allow").await;
        match self.continue_sign_in(&browser, allowed, login).await {
            Landed::Client(to) => to,
            Landed::Page(status, text) => panic!("sign-in stuck at {status}: {text}"),
        }
    }

    /// A browser of its own (no cookies of anyone else) follows `idp_url`, the provider's
    /// authorization URL of a sign-in someone allowed elsewhere, and signs in as `login`.
    pub async fn sign_in_at_idp(&self, idp_url: &str, login: Login) -> Landed {
        let browser = Self::sign_in_browser();
        let first = browser.get(idp_url).send().await.expect("provider");
        self.continue_sign_in(&browser, first, login).await
    }

    fn sign_in_browser() -> reqwest::Client {
        reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.url().path().starts_with("/callback") {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .expect("client")
    }

    /// From the provider's login interaction on: login, consent, and the way back.
    async fn continue_sign_in(
        &self,
        browser: &reqwest::Client,
        first: reqwest::Response,
        login: Login,
    ) -> Landed {
        if let Some(to) = first.headers().get(reqwest::header::LOCATION) {
            return Landed::Client(to.to_str().expect("location").to_owned());
        }
        let details: serde_json::Value = first.json().await.expect("interaction details");
        assert_eq!(details["prompt"], "login", "{details}");
        let body = serde_json::json!({
            "account": login.account,
            "auth_age_seconds": login.auth_age_seconds,
            "amr": login.amr,
        });
        let mut step = (details, "login", body);
        for _ in 0..3 {
            let (details, action, body) = step;
            let uid = details["uid"].as_str().expect("uid");
            let answer: serde_json::Value = browser
                .post(format!("{}/interaction/{uid}/{action}", self.issuer))
                .json(&body)
                .send()
                .await
                .expect("interaction")
                .json()
                .await
                .expect("json");
            let redirect = answer["redirectTo"]
                .as_str()
                .unwrap_or_else(|| panic!("{answer}"));
            let followed = browser.get(redirect).send().await.expect("follow");
            if let Some(to) = followed.headers().get(reqwest::header::LOCATION) {
                return Landed::Client(to.to_str().expect("location").to_owned());
            }
            let status = followed.status().as_u16();
            let text = followed.text().await.expect("body");
            let Ok(next) = serde_json::from_str::<serde_json::Value>(&text) else {
                return Landed::Page(status, text);
            };
            assert_eq!(next["prompt"], "consent", "{next}");
            step = (next, "consent", serde_json::json!({}));
        }
        panic!("the sign-in did not come back to the client");
    }

    /// Declines at the device confirmation page.
    pub async fn deny(&self, user_code: &str) {
        let (_, response) = self.confirm_code(user_code, true).await;
        let _ = response.text().await;
    }

    async fn finish(
        &self,
        browser: &reqwest::Client,
        details: &serde_json::Value,
        action: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let uid = details["uid"].as_str().expect("uid");
        let answer: serde_json::Value = browser
            .post(format!("{}/interaction/{uid}/{action}", self.issuer))
            .json(&body)
            .send()
            .await
            .expect("interaction")
            .json()
            .await
            .expect("json");
        let redirect = answer["redirectTo"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"));
        let followed = browser.get(redirect).send().await.expect("follow");
        let text = followed.text().await.expect("body");
        if text.contains("device-flow-success") {
            return serde_json::json!({ "done": true });
        }
        serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "page": text }))
    }
}

/// Where a browser's sign-in ended: redirected to the client, or on a page (status, body).
#[derive(Debug)]
pub enum Landed {
    Client(String),
    Page(u16, String),
}

/// The form of Custodian's consent page: where it posts, and its hidden fields.
pub fn consent_form(page: &str) -> (String, Vec<(String, String)>) {
    let action = page
        .split("action=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no consent form: {page}"))
        .to_owned();
    (action, hidden_inputs(page))
}

/// Answers the consent page `page` with `decision` (`allow` or `deny`) from `browser`.
pub async fn consent(browser: &reqwest::Client, page: &str, decision: &str) -> reqwest::Response {
    let (action, mut fields) = consent_form(page);
    fields.push(("decision".to_owned(), decision.to_owned()));
    browser
        .post(action)
        .form(&fields)
        .send()
        .await
        .expect("consent")
}

/// The hidden inputs of the forms in an HTML page, in order.
fn hidden_inputs(html: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for chunk in html.split("<input").skip(1) {
        let attr = |name: &str| {
            let start = chunk.find(&format!("{name}=\""))? + name.len() + 2;
            let end = chunk[start..].find('"')? + start;
            Some(chunk[start..end].to_owned())
        };
        if let (Some(name), Some(value)) = (attr("name"), attr("value")) {
            out.push((name, value));
        }
    }
    out
}

/// `custodian admin --config … ARGS` on a SQLite database of its own.
struct Admin {
    dir: tempfile::TempDir,
    config: String,
}

impl Admin {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let generated = custodian(
            &[
                "admin",
                "master-key",
                "generate",
                "--out",
                key.to_str().unwrap(),
            ],
            &[],
        );
        assert!(generated.status.success());
        let port = free_port();
        let config = dir.path().join("custodian.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\n\n[database]\nurl = \"sqlite://{}\"\n\n[secrets]\nmaster_key_file = \"{}\"\n",
                dir.path().join("custodian.db").display(),
                key.display()
            ),
        )
        .unwrap();
        let config = config.display().to_string();
        Self { dir, config }
    }

    /// Runs the command; returns (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec!["admin", "--config", &self.config];
        all.extend_from_slice(args);
        let out = custodian(&all, &[]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The tenant's stored (issuer, client id).
    async fn stored(&self, tenant: &str) -> (Option<String>, Option<String>) {
        let url = format!(
            "sqlite://{}",
            self.dir.path().join("custodian.db").display()
        );
        let db = custodian::store::Db::connect(&url, 1).await.unwrap();
        let t = custodian::tenants::get(&db, tenant).await.unwrap().unwrap();
        db.close().await;
        (t.idp_issuer, t.idp_client_id)
    }
}

#[tokio::test]
async fn set_idp_checks_the_provider_and_stores_nothing_on_failure() {
    let Some(idp) = TestIdp::start(600) else {
        return;
    };
    let admin = Admin::new();
    let created = admin.run(&[
        "tenant",
        "create",
        "acme",
        "--issuer",
        "https://idp.acme.example.com",
    ]);
    assert!(created.0, "{created:?}");
    let set_idp = |issuer: &str, client: &str| {
        admin.run(&[
            "tenant",
            "set-idp",
            "acme",
            "--issuer",
            issuer,
            "--client-id",
            client,
            "--scopes",
            "openid email groups",
        ])
    };
    let untouched = (Some("https://idp.acme.example.com".to_owned()), None);

    // Each problem is reported at set time, naming what is wrong, and nothing is stored.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let with_slash = format!("{}/", idp.issuer);
    let cases: [(&str, &str, &[&str]); 3] = [
        (&closed, "custodian", &["cannot be fetched", &closed]),
        (
            &with_slash,
            "custodian",
            &["trailing slash", &format!("--issuer {}", idp.issuer)],
        ),
        (
            &idp.issuer,
            "nobody",
            &["does not accept client id `nobody`", "invalid_client"],
        ),
    ];
    for (issuer, client, expected) in cases {
        let (ok, _, stderr) = set_idp(issuer, client);
        assert!(!ok, "{issuer} {client} was accepted");
        for part in expected {
            assert!(stderr.contains(part), "`{part}` missing from:\n{stderr}");
        }
        assert!(stderr.contains("nothing was stored"), "{stderr}");
        assert_eq!(admin.stored("acme").await, untouched);
    }
    idp.set_mode("no_device_endpoint").await;
    let (ok, _, stderr) = set_idp(&idp.issuer, "custodian");
    assert!(!ok);
    assert!(
        stderr.contains("no device_authorization_endpoint"),
        "{stderr}"
    );
    assert_eq!(admin.stored("acme").await, untouched);

    // A provider that passes every check is stored, after exactly one device authorization with
    // the client (the wrong client's was refused).
    idp.set_mode("normal").await;
    let (ok, stdout, stderr) = set_idp(&idp.issuer, "custodian");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("now approves grants at"), "{stdout}");
    assert_eq!(
        admin.stored("acme").await,
        (Some(idp.issuer.clone()), Some("custodian".to_owned()))
    );
    let requests = idp.device_requests().await;
    let statuses: Vec<_> = requests.iter().map(|r| r["status"].clone()).collect();
    assert_eq!(statuses, [401, 200], "{requests:?}");
    assert_eq!(requests[1]["client_id"], "custodian");
}
