//! The real Codex CLI (npm `@openai/codex`, installed in tests/codex by `.ci/run`) signs in to
//! `custodian dev` with `codex mcp login`, the tenant's IdP being the real test IdP
//! (oidc-provider), and then uses the token from `codex exec`.
//!
//! The model behind `codex exec` cannot run here: [`ScriptedModel`] is a MOCK of the OpenAI
//! Responses API (the only mock in these tests). It answers the first turn with a call of the
//! Custodian tool `list_environments` and the next with a short message, and keeps every request
//! body so that the test can read the tool's output as Codex passed it back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::idp::{Login, TestIdp};
use crate::oauth::list_environments;
use crate::processes::{Proc, custodian, free_port, read_until, spawn};

fn codex_binary() -> Option<PathBuf> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/codex/node_modules/.bin/codex");
    if bin.exists() {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "Codex is required in CI; run .ci/run (npm ci in tests/codex)"
    );
    eprintln!("skipping: tests/codex has no node_modules (run `npm ci --prefix tests/codex`)");
    None
}

/// MOCK of the OpenAI Responses API (`POST /v1/responses`, streamed), scripted for one tool call.
#[derive(Clone, Default)]
struct ScriptedModel {
    requests: Arc<Mutex<Vec<Value>>>,
}

impl ScriptedModel {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .route("/v1/responses", axum::routing::post(Self::respond))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    async fn respond(State(model): State<Self>, body: axum::body::Bytes) -> impl IntoResponse {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let answered_tool = request["input"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["type"] == "function_call_output"));
        let turn = {
            let mut requests = model.requests.lock().unwrap();
            requests.push(request);
            requests.len()
        };
        let id = format!("resp_{turn}");
        let item = if answered_tool {
            json!({"type": "message", "id": format!("msg_{turn}"), "role": "assistant",
                   "content": [{"type": "output_text", "text": "done", "annotations": []}]})
        } else {
            // Codex exposes an MCP server's tools as a namespace `mcp__<server>`.
            json!({"type": "function_call", "id": format!("fc_{turn}"), "call_id": format!("call_{turn}"),
                   "namespace": "mcp__custodian", "name": "list_environments", "arguments": "{}"})
        };
        let events = [
            json!({"type": "response.created", "response": {"id": id}}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            json!({"type": "response.completed", "response": {"id": id, "usage": {
                "input_tokens": 1, "input_tokens_details": null, "output_tokens": 1,
                "output_tokens_details": null, "total_tokens": 2}}}),
        ];
        let body: String = events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect();
        ([("content-type", "text/event-stream")], body)
    }

    /// The outputs of tool calls that Codex sent back to the model, in order.
    fn tool_outputs(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r["input"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["type"] == "function_call_output")
            .map(|i| i["output"].to_string())
            .collect()
    }
}

struct Codex {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Codex {
    /// A CODEX_HOME whose config names Custodian's MCP URL with no token (sign-in instead), keeps
    /// OAuth credentials in a file, and talks to the scripted model.
    fn new(bin: PathBuf, mcp_url: &str, model_url: &str) -> Self {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join("config.toml"),
            format!(
                "mcp_oauth_credentials_store = \"file\"\nmodel = \"scripted\"\nmodel_provider = \"scripted\"\n\n\
                 [model_providers.scripted]\nname = \"scripted model (mock of the Responses API)\"\n\
                 base_url = \"{model_url}\"\nwire_api = \"responses\"\nrequest_max_retries = 0\nstream_max_retries = 0\n\n\
                 [mcp_servers.custodian]\nurl = \"{mcp_url}\"\ndefault_tools_approval_mode = \"approve\"\n"
            ),
        )
        .unwrap();
        Self { bin, home }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .env("CODEX_HOME", self.home.path())
            .env_remove("OPENAI_API_KEY")
            .current_dir(self.home.path());
        command
    }

    /// The OAuth credentials Codex stored for the server.
    fn credentials(&self) -> Value {
        let text = std::fs::read_to_string(self.home.path().join(".credentials.json"))
            .expect("codex stored credentials in a file");
        let all: Value = serde_json::from_str(&text).unwrap();
        all.as_object()
            .and_then(|o| o.values().find(|v| v["server_name"] == "custodian"))
            .cloned()
            .unwrap_or_else(|| panic!("no credentials for custodian: {all}"))
    }

    /// Makes Codex consider its access token expired, as if its lifetime had passed.
    fn expire_access_token(&self) {
        let path = self.home.path().join(".credentials.json");
        let mut all: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for entry in all.as_object_mut().unwrap().values_mut() {
            entry["expires_at"] = json!(1000);
        }
        std::fs::write(&path, all.to_string()).unwrap();
    }

    /// Starts `codex mcp login custodian --no-browser`; returns it with the authorization URL it
    /// printed. Its stdin stays open (it would also accept a pasted callback URL there).
    fn start_login(&self, base: &str) -> (Proc, String) {
        let mut login = Proc(
            self.command()
                .args(["mcp", "login", "custodian", "--no-browser"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdout = login.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let wanted = format!("{base}/t/dev/oauth/authorize?");
        loop {
            let line = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("codex printed no authorization URL");
            if let Some(at) = line.find(&wanted) {
                return (login, line[at..].trim().to_owned());
            }
        }
    }

    /// `codex exec` with a prompt; its exit status and stderr.
    fn exec(&self) -> (bool, String) {
        let out = self
            .command()
            .args(["exec", "--skip-git-repo-check", "list the environments"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_signs_in_at_the_company_idp_uses_refreshes_and_loses_its_token() {
    let Some(bin) = codex_binary() else { return };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let Some(idp) = TestIdp::start_with_sign_in(&[format!("{base}/t/dev/oauth/callback")]) else {
        return;
    };
    let (dir, dev, _) = start_dev(port);
    let data = dir.path().join("data");
    let config = data.join("custodian.toml");
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = custodian(&all, &[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    // The company IdP becomes the dev tenant's.
    admin(&[
        "tenant",
        "set-idp",
        "dev",
        "--issuer",
        &idp.issuer,
        "--client-id",
        "custodian",
        "--scopes",
        "openid email groups",
    ]);
    let mcp_url = format!("{base}/t/dev/mcp");
    let model = ScriptedModel::default();
    let codex = Codex::new(bin, &mcp_url, &model.start().await);

    // `codex mcp login` prints the authorization URL and waits for the browser's callback (its
    // stdin stays open: it would also accept the callback URL pasted there).
    let (mut login, authorization_url) = codex.start_login(&base);
    let callback = idp.sign_in(&authorization_url, Login::as_("alice")).await;
    assert!(callback.starts_with("http://127.0.0.1:"), "{callback}");
    assert!(callback.contains("code="), "{callback}");
    let delivered = reqwest::get(&callback)
        .await
        .expect("codex's callback listener");
    assert!(delivered.status().is_success());
    assert!(wait(&mut login, 60).success(), "codex mcp login failed");
    let first = codex.credentials();
    let first_access = first["access_token"].as_str().unwrap().to_owned();
    assert!(first_access.starts_with("csa_"), "{first}");
    let listed = admin(&["sign-ins", "list", "dev"]);
    assert!(
        listed.contains("alice@example.com") && listed.contains("Codex"),
        "{listed}"
    );

    // `codex exec` calls list_environments with the signed-in token.
    let (ok, stderr) = codex.exec();
    assert!(ok, "{stderr}");
    let outputs = model.tool_outputs();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert!(outputs[0].contains("\\\"demo\\\""), "{}", outputs[0]);

    // Once its access token is expired, Codex refreshes it and carries on.
    codex.expire_access_token();
    let (ok, stderr) = codex.exec();
    assert!(ok, "{stderr}");
    let second = codex.credentials();
    let second_access = second["access_token"].as_str().unwrap().to_owned();
    assert_ne!(second_access, first_access, "no refresh happened");
    assert_ne!(
        second["refresh_token"], first["refresh_token"],
        "the refresh token was not rotated"
    );
    let outputs = model.tool_outputs();
    assert_eq!(outputs.len(), 2, "{outputs:?}");
    assert!(outputs[1].contains("\\\"demo\\\""), "{}", outputs[1]);

    // An admin revokes alice's access: her token is refused, and Codex lists nothing any more.
    let revoked = admin(&["sign-ins", "revoke", "dev", "alice@example.com"]);
    assert!(revoked.contains("revoked 1"), "{revoked}");
    assert_eq!(list_environments(&mcp_url, &second_access).await.0, 401);
    let _ = codex.exec();
    let outputs = model.tool_outputs();
    assert!(
        outputs
            .iter()
            .skip(2)
            .all(|o| !o.contains("Demo environment")),
        "{outputs:?}"
    );
    let listed = admin(&["sign-ins", "list", "dev", "--all"]);
    assert!(listed.contains("revoked by an admin"), "{listed}");
    drop(dev);
}

/// Starts `custodian dev` on `port` with a data directory in a new temporary directory; returns
/// the directory (holding `data/`), the process and its banner.
fn start_dev(port: u16) -> (tempfile::TempDir, Proc, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{port}");
    let mut dev = spawn(&[
        "dev",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let banner = read_until(&mut dev.0, "Press Ctrl-C");
    (dir, dev, banner)
}

/// Waits up to `seconds` for `proc` to exit.
fn wait(proc: &mut Proc, seconds: u64) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The sign-in `custodian dev` offers out of the box: its embedded dev IdP's one-button page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_signs_in_to_custodian_dev_with_its_dev_idp() {
    let Some(bin) = codex_binary() else { return };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let (_dir, dev, banner) = start_dev(port);
    assert!(banner.contains("codex mcp login custodian"), "{banner}");
    let model = ScriptedModel::default();
    let codex = Codex::new(bin, &format!("{base}/t/dev/mcp"), &model.start().await);
    let (mut login, authorization_url) = codex.start_login(&base);

    // The browser: Custodian sends it to the dev IdP, whose page has one button.
    // First Custodian's consent page (its form and cookie go together), then the dev IdP.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .unwrap();
    let location = |r: &reqwest::Response| r.headers()["location"].to_str().unwrap().to_owned();
    let consent_page = browser.get(&authorization_url).send().await.unwrap();
    assert_eq!(consent_page.status(), 200);
    let consent_page = consent_page.text().await.unwrap();
    assert!(consent_page.contains("Codex"), "{consent_page}");
    let to_idp = crate::idp::consent(&browser, &consent_page, "allow").await;
    assert_eq!(to_idp.status(), 303);
    let idp_page_url = location(&to_idp);
    let page = browser
        .get(&idp_page_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let request = page
        .split("name=\"request\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("{page}"));
    let idp_base = idp_page_url.split("/authorize").next().unwrap();
    let signed_in = browser
        .post(format!("{idp_base}/authorize/approve"))
        .form(&[("request", request)])
        .send()
        .await
        .unwrap();
    let to_custodian = location(&signed_in);
    assert!(
        to_custodian.starts_with(&format!("{base}/t/dev/oauth/callback?")),
        "{to_custodian}"
    );
    let to_codex = location(&browser.get(&to_custodian).send().await.unwrap());
    assert!(to_codex.contains("code="), "{to_codex}");
    assert!(
        browser
            .get(&to_codex)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    assert!(wait(&mut login, 60).success(), "codex mcp login failed");

    let (ok, stderr) = codex.exec();
    assert!(ok, "{stderr}");
    let outputs = model.tool_outputs();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert!(outputs[0].contains("\\\"demo\\\""), "{}", outputs[0]);
    drop(dev);
}
