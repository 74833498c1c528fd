//! The binary as users run it: `serve` + a real Python MCP client, `dev` with the Python and
//! TypeScript SDKs, `migrate`, `admin`.

use std::time::Duration;

use crate::harness::{Backend, TestDb};
use crate::on_both_backends;
use crate::processes::{
    CUSTODIAN, banner_field, custodian, free_port, python, python_client, python_client_approving,
    read_until, spawn, typescript_client, typescript_client_approving, wait_healthy,
};

on_both_backends!(
    serve_answers_a_python_mcp_client_and_stops_on_sigterm,
    admin_and_migrate_manage_the_database
);

pub(crate) fn write_config(dir: &std::path::Path, port: u16, db_url: &str) -> String {
    let key = dir.join("master.key");
    ok(custodian(
        &[
            "admin",
            "master-key",
            "generate",
            "--out",
            key.to_str().unwrap(),
        ],
        &[],
    ));
    let path = dir.join("custodian.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\nshutdown_grace_seconds = 5\n\n[database]\nurl = \"{db_url}\"\n\n[secrets]\nmaster_key_file = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

pub(crate) fn ok(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn serve_answers_a_python_mcp_client_and_stops_on_sigterm(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, &db.url);
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--config", &config];
        all.extend_from_slice(args);
        ok(custodian(&all, &[]))
    };
    admin(&[
        "tenant",
        "create",
        "acme",
        "--issuer",
        "https://idp.acme.example.com",
    ]);
    admin(&[
        "env",
        "create",
        "acme",
        "staging-db",
        "--description",
        "Staging Postgres",
        "--secret",
        "PGPASSWORD",
        "--max-ttl",
        "900",
    ]);
    let token = admin(&["agent-token", "create", "acme", "codex-alice"])
        .trim()
        .to_owned();

    let server = spawn(&["serve", "--config", &config]);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{base}/healthz")).await;
    wait_healthy(&format!("{base}/readyz")).await;

    let seen = python_client(&python, &format!("{base}/t/acme/mcp"), &token);
    let tools = seen["tools"].as_array().unwrap();
    assert_the_five_tools(tools);
    let list = tools
        .iter()
        .find(|t| t["name"] == "list_environments")
        .unwrap();
    assert_eq!(list["read_only"], true);
    assert_eq!(seen["is_error"], false);
    let envs = &seen["structured"]["environments"];
    assert_eq!(envs.as_array().unwrap().len(), 1, "{seen}");
    assert_eq!(envs[0]["name"], "staging-db");
    assert_eq!(envs[0]["secret_names"], serde_json::json!(["PGPASSWORD"]));
    assert_eq!(envs[0]["max_ttl_seconds"], 900);

    let status = server.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "serve should exit 0 on SIGTERM, got {status}"
    );
}

async fn admin_and_migrate_manage_the_database(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), &db.url);
    let run = |args: &[&str]| {
        let mut all = vec![args[0], "--config", &config];
        all.extend_from_slice(&args[1..]);
        custodian(&all, &[])
    };
    // The first run says which migrations it applied; the second that there was nothing to do.
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    let first = ok(run(&["migrate"]));
    assert!(
        first.starts_with(&format!(
            "applied {migrations} migrations: 1 foundation, 2 grants"
        )),
        "{first}"
    );
    assert!(!first.contains("up to date"), "{first}");
    let second = ok(run(&["migrate"]));
    assert_eq!(
        second.trim(),
        "database already up to date (no migration to apply)"
    );

    ok(run(&["admin", "tenant", "create", "acme"]));
    let dup = run(&["admin", "tenant", "create", "acme"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("tenant `acme` already exists"));
    let bad = run(&["admin", "tenant", "create", "Acme Corp"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a valid name"));
    assert!(ok(run(&["admin", "tenant", "list"])).contains("acme"));

    let bad_secret = run(&[
        "admin",
        "env",
        "create",
        "acme",
        "prod",
        "--secret",
        "lower-case",
    ]);
    assert!(
        String::from_utf8_lossy(&bad_secret.stderr)
            .contains("secret name `lower-case` is not valid")
    );
    let too_long = run(&[
        "admin",
        "env",
        "create",
        "acme",
        "prod",
        "--max-ttl",
        "99999999",
    ]);
    assert!(
        String::from_utf8_lossy(&too_long.stderr)
            .contains("max_ttl_seconds must be between 1 and 604800")
    );
    let no_tenant = run(&["admin", "env", "create", "ghost", "prod"]);
    assert!(String::from_utf8_lossy(&no_tenant.stderr).contains("no tenant `ghost`"));
    ok(run(&[
        "admin", "env", "create", "acme", "prod", "--secret", "API_KEY", "--secret", "DB_URL",
    ]));
    assert!(ok(run(&["admin", "env", "list", "acme"])).contains("API_KEY,DB_URL"));

    // Egress rules: checked, listed with the credential by name (never a value), removed; a
    // refused rule changes nothing.
    let egress = |args: &[&str]| {
        let mut all = vec!["admin", "env", "egress"];
        all.extend_from_slice(args);
        run(&all)
    };
    ok(egress(&[
        "add",
        "acme/prod",
        "https://API.example.com",
        "--inject-secret",
        "API_KEY",
        "--header",
        "X-API-Key: {value}",
    ]));
    ok(egress(&["add", "acme/prod", "tcp:db.internal:5432"]));
    let listed = ok(egress(&["list", "acme/prod"]));
    for expected in [
        "https://api.example.com:443",
        "X-API-Key: <API_KEY>",
        "tcp:db.internal:5432",
    ] {
        assert!(listed.contains(expected), "{listed}");
    }
    for (args, says) in [
        (vec!["https://169.254.169.254"], "--allow-private"),
        (vec!["tcp:10.0.0.1:5432"], "--allow-private"),
        (
            vec![
                "https://api.example.com:8443",
                "--inject-secret",
                "GHOST",
                "--header",
                "X: {value}",
            ],
            "secret `GHOST` is not declared",
        ),
        (
            vec!["tcp:db.internal:5432", "--inject-secret", "API_KEY"],
            "--header",
        ),
        (vec!["tcp:db.internal:5432"], "already listed"),
        (vec!["ftp://example.com"], "is not a destination"),
    ] {
        let mut all = vec!["add", "acme/prod"];
        all.extend(args.iter().copied());
        let refused = egress(&all);
        assert!(!refused.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains(says),
            "{args:?}: {}",
            String::from_utf8_lossy(&refused.stderr)
        );
    }
    assert_eq!(ok(egress(&["list", "acme/prod"])), listed);
    ok(egress(&["remove", "acme/prod", "tcp:db.internal:5432"]));
    assert!(!ok(egress(&["list", "acme/prod"])).contains("tcp:db.internal"));

    // Secret values come from stdin only and are never printed back.
    let canary = "cli-canary-secret-value-91";
    let mut child = std::process::Command::new(crate::processes::CUSTODIAN)
        .args([
            "admin",
            "--config",
            &config,
            "secret",
            "set",
            "acme/prod",
            "DB_URL",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!("{canary}\n").as_bytes(),
    )
    .unwrap();
    let set = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&set.stdout),
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(set.status.success(), "{printed}");
    assert!(
        printed.contains("DB_URL (env) version 1") && !printed.contains(canary),
        "{printed}"
    );
    let listed = ok(run(&["admin", "secret", "list", "acme/prod"]));
    assert!(
        listed.contains("DB_URL") && !listed.contains(canary),
        "{listed}"
    );
    let short = std::process::Command::new(crate::processes::CUSTODIAN)
        .args([
            "admin",
            "--config",
            &config,
            "secret",
            "set",
            "acme/prod",
            "PIN",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&short.stderr).contains("cannot be redacted safely"));
    ok(run(&["admin", "secret", "delete", "acme/prod", "DB_URL"]));
    assert!(!ok(run(&["admin", "secret", "list", "acme/prod"])).contains("DB_URL"));

    let created = run(&["admin", "agent-token", "create", "acme", "ci-bot"]);
    let token = ok(created).trim().to_owned();
    assert!(token.starts_with("cst_"));
    let listing = ok(run(&["admin", "agent-token", "list", "acme"]));
    assert!(listing.contains("ci-bot") && listing.contains("active"));
    assert!(
        !listing.contains(&token[20..]),
        "the token must never be listed"
    );
    // Passing the token itself to revoke is refused without echoing it.
    let wrong = run(&["admin", "agent-token", "revoke", "acme", &token]);
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("not the token itself") && !stderr.contains(&token[20..]),
        "{stderr}"
    );
    ok(run(&["admin", "agent-token", "revoke", "acme", "ci-bot"]));
    assert!(ok(run(&["admin", "agent-token", "list", "acme"])).contains("revoked at"));
    let again = run(&["admin", "agent-token", "revoke", "acme", "ci-bot"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no active token `ci-bot`"));
}

/// A client's report of `tools/list` names Custodian's five tools, each with an output schema.
fn assert_the_five_tools(tools: &[serde_json::Value]) {
    let mut names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "grant_status",
            "list_environments",
            "request_grant",
            "revoke_grant",
            "run"
        ]
    );
    let missing: Vec<_> = tools
        .iter()
        .filter(|t| t["has_output_schema"] != true)
        .collect();
    assert!(
        missing.is_empty(),
        "tools without an output schema: {missing:?}"
    );
}

/// The command a human runs (with the user code appended) to approve a grant on `custodian dev`.
fn dev_approve(data: &std::path::Path) -> [&str; 5] {
    let data = data.to_str().unwrap();
    [CUSTODIAN, "dev", "approve", "--data-dir", data]
}

/// Starts `custodian dev` on a free loopback port with `data` and returns it with its banner.
fn start_dev(data: &std::path::Path) -> (crate::processes::Proc, String) {
    let mut dev = spawn(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let banner = read_until(&mut dev.0, "Press Ctrl-C");
    (dev, banner)
}

/// The TypeScript SDK as a stock client: default transport and client options, so it negotiates
/// its newest protocol version, checks every structured result against its tool's output schema
/// (with Ajv) and ends its session with DELETE.
#[tokio::test]
async fn dev_serves_the_typescript_sdk_through_the_whole_loop_without_a_warning() {
    let Some(client) = typescript_client() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (dev, banner) = start_dev(&data);
    let field = |label: &str| banner_field(&banner, label);
    let (url, token) = (field("MCP URL:"), field("Agent token:"));
    let approve = dev_approve(&data);
    let (seen, stderr) = typescript_client_approving(&client, &url, &token, &approve);
    // Nothing from the SDK: no schema it cannot read (`unknown format "uint64"`), no failed DELETE.
    assert_eq!(stderr, "", "{seen}");
    assert_eq!(seen["protocol"], "2025-11-25", "{seen}");
    assert_eq!(seen["session"], true, "{seen}");
    assert_the_five_tools(seen["tools"].as_array().unwrap());
    assert_eq!(seen["listing"]["is_error"], false, "{seen}");
    let env = &seen["listing"]["structured"]["environments"][0];
    assert_eq!(env["name"], "demo", "{seen}");
    assert_eq!(env["secret_names"], serde_json::json!(["DEMO_API_KEY"]));
    assert_eq!(seen["status"]["state"], "active", "{seen}");
    assert_eq!(
        seen["run"]["stdout"], "key=[REDACTED:DEMO_API_KEY]\n",
        "{seen}"
    );
    assert_eq!(seen["run"]["redactions"]["DEMO_API_KEY"], 1);
    assert_eq!(seen["run"]["exit_code"], 0);
    assert_eq!(seen["revoked"]["state"], "revoked", "{seen}");
    // After revoke_grant, the same run is refused as a tool error the agent can read.
    assert_eq!(seen["after_revoke"]["is_error"], true, "{seen}");
    let refusal = seen["after_revoke"]["text"][0].as_str().unwrap();
    assert!(refusal.contains("revoked"), "{refusal}");
    assert!(dev.terminate(Duration::from_secs(10)).success());
}

#[tokio::test]
async fn dev_prints_url_token_and_codex_snippet_that_a_real_client_can_use() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (dev, banner) = start_dev(&data);
    let field = |label: &str| banner_field(&banner, label);
    let url = field("MCP URL:");
    let token = field("Agent token:");
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/t/dev/mcp"),
        "{url}"
    );
    assert!(banner.contains(&format!("export CUSTODIAN_TOKEN={token}")));
    // The Codex snippet is valid TOML with what Codex needs.
    let snippet_start = banner.find("[mcp_servers.custodian]").expect("snippet");
    let snippet_end = banner.find("Grants are approved").unwrap();
    let snippet: toml::Table = banner[snippet_start..snippet_end]
        .parse()
        .expect("snippet is TOML");
    let server = &snippet["mcp_servers"]["custodian"];
    assert_eq!(server["url"].as_str(), Some(url.as_str()));
    assert_eq!(
        server["bearer_token_env_var"].as_str(),
        Some("CUSTODIAN_TOKEN")
    );
    assert_eq!(
        server["default_tools_approval_mode"].as_str(),
        Some("approve")
    );

    // request_grant → `custodian dev approve CODE` → grant_status, all through the Python SDK.
    let approve = dev_approve(&data);
    let seen = python_client_approving(&python, &url, &token, &approve);
    assert_eq!(
        seen["structured"]["environments"][0]["name"], "demo",
        "{seen}"
    );
    assert_eq!(seen["status"]["state"], "active", "{seen}");
    assert_eq!(seen["status"]["approver"], "approver@custodian.dev");
    // The sample secret reached the command and came back redacted.
    assert_eq!(
        seen["run"]["stdout"], "key=[REDACTED:DEMO_API_KEY]\n",
        "{seen}"
    );
    assert_eq!(seen["run"]["redactions"]["DEMO_API_KEY"], 1);
    assert_eq!(seen["run"]["exit_code"], 0);
    let approval_url = seen["grant"]["approval_url"].as_str().unwrap();
    let page = reqwest::get(approval_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("This request is <strong>active</strong>"),
        "{page}"
    );
    assert_eq!(
        seen["structured"]["environments"][0]["secret_names"],
        serde_json::json!(["DEMO_API_KEY"])
    );

    // The admin CLI manages this instance through the config `dev` wrote and names.
    let dev_config = data.join("custodian.toml");
    let dev_config = dev_config.to_str().unwrap();
    assert!(
        banner.contains(&format!("custodian admin --config {dev_config}")),
        "{banner}"
    );
    let grants = ok(custodian(
        &["admin", "--config", dev_config, "grants", "list", "dev"],
        &[],
    ));
    assert!(
        grants.contains(seen["grant"]["grant_id"].as_str().unwrap()),
        "{grants}"
    );

    let anonymous = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let challenge = anonymous.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("resource_metadata=")
            && challenge.contains("/.well-known/oauth-protected-resource/t/dev/mcp")
    );
    assert!(dev.terminate(Duration::from_secs(10)).success());

    // A second start reuses the data and issues a new token.
    let (again, second) = start_dev(&data);
    assert!(!second.contains(&token));
    // The previous start's token no longer works.
    let old = reqwest::Client::new()
        .post(
            second
                .lines()
                .find_map(|l| l.strip_prefix("MCP URL:"))
                .unwrap()
                .trim(),
        )
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401);
    assert!(again.terminate(Duration::from_secs(10)).success());
}

#[test]
fn dev_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = custodian(
        &[
            "dev",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only listens on loopback"));
}

#[test]
fn invalid_config_file_is_refused_with_every_problem_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"nowhere\"\nmax_body_bytes = -5\n[database]\nurl = \"sqlite://{}\"\npool = 3\n", db.display()),
    )
    .unwrap();
    let out = custodian(&["serve", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "server.listen",
        "server.max_body_bytes",
        "database.pool: unknown key",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    assert!(
        !db.exists(),
        "a refused config must not create the database"
    );
    let missing = custodian(&["serve", "--config", "/nonexistent/custodian.toml"], &[]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read config file"));
}

/// `custodian ARGS` run in `dir` with no configuration anywhere but a master key in the environment
/// (so that only the missing configuration can stop it).
fn in_dir(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let key = custodian::keys::MasterKey::generate().to_base64();
    std::process::Command::new(CUSTODIAN)
        .args(args)
        .current_dir(dir)
        .env_remove("CUSTODIAN_CONFIG")
        .env("CUSTODIAN_MASTER_KEY", key.as_str())
        .output()
        .unwrap()
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

#[test]
fn admin_without_a_config_refuses_and_creates_no_database() {
    assert!(
        !std::path::Path::new(custodian::cli::DEFAULT_CONFIG_FILE).exists(),
        "this test needs a machine without {}",
        custodian::cli::DEFAULT_CONFIG_FILE
    );
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["admin", "tenant", "list"][..],
        &["admin", "tenant", "create", "acme"],
        &["admin", "audit", "verify"],
    ] {
        let out = in_dir(dir.path(), args);
        assert!(!out.status.success(), "{args:?} ran without a config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--config") && stderr.contains("CUSTODIAN_CONFIG"),
            "{stderr}"
        );
        assert_eq!(files_in(dir.path()), Vec::<String>::new(), "{args:?}");
    }
    // A `custodian dev` data directory is pointed at, not silently used.
    std::fs::create_dir(dir.path().join("custodian-dev")).unwrap();
    std::fs::write(
        dir.path().join("custodian-dev/custodian.toml"),
        "[database]\nurl = \"sqlite://custodian-dev/custodian.db\"\n",
    )
    .unwrap();
    let out = in_dir(dir.path(), &["admin", "tenant", "list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--config custodian-dev/custodian.toml"),
        "{stderr}"
    );
    assert_eq!(
        files_in(&dir.path().join("custodian-dev")),
        ["custodian.toml"]
    );
    assert_eq!(files_in(dir.path()), ["custodian-dev"]);
    // Commands that touch no database need no configuration.
    let key = in_dir(
        dir.path(),
        &["admin", "master-key", "generate", "--out", "k"],
    );
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
}

#[test]
fn pki_issue_refuses_an_identity_outside_the_cas_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki = pki.to_str().unwrap();
    ok(custodian(
        &[
            "admin",
            "pki",
            "init",
            "--dir",
            pki,
            "--trust-domain",
            "prod.example",
        ],
        &[],
    ));
    let out = dir.path().join("r1");
    let out = out.to_str().unwrap();
    for identity in [&["--runner", "acme/r1"][..], &["--gateway"]] {
        let mut args = vec![
            "admin",
            "pki",
            "issue",
            "--dir",
            pki,
            "--trust-domain",
            "custodian.local",
            "--out",
            out,
        ];
        args.extend_from_slice(identity);
        let refused = custodian(&args, &[]);
        assert!(!refused.status.success(), "{identity:?} was issued");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("custodian.local") && stderr.contains("prod.example"),
            "{stderr}"
        );
        assert_eq!(files_in(dir.path()), ["pki"], "something was written");
    }
    // Without --trust-domain the CA's is used.
    let issued = ok(custodian(
        &[
            "admin", "pki", "issue", "--dir", pki, "--runner", "acme/r1", "--out", out,
        ],
        &[],
    ));
    assert!(
        issued.contains("spiffe://prod.example/tenant/acme/runner/r1"),
        "{issued}"
    );
    assert_eq!(files_in(dir.path()), ["pki", "r1.key", "r1.pem"]);
}
