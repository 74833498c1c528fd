//! `custodian dev` runs commands with an in-process runner on the machine that holds the data
//! directory: the master key, the SQLite database with every secret sealed under it, and the dev
//! CA's key. A run must reach none of them.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

use super::{assert_none, attack, canary, carries, controls};
use crate::mcp_clients::connect;
use crate::processes::{self, CUSTODIAN, RunAs, read_until, spawn_as};
use crate::runners::run;

as_root_and_unprivileged!(the_dev_data_directory_is_out_of_reach);

/// `$1`: the data directory. The control is a base64 blob of the run's own, found by the same grep.
const LOOT_DEV: &str = r#"printf '%s\n' "$0" | base64 -w0 > ./own.db
cat "$1/master.key" 2>/dev/null | out master-key
cat ./own.db "$1"/custodian.db* 2>/dev/null | grep -a -o -E '[A-Za-z0-9+/]{40,}={0,2}' | sort -u | out database
cat "$1"/pki/*.key 2>/dev/null | out pki-keys
ls -la "$1" 2>/dev/null | out listing
"#;

async fn the_dev_data_directory_is_out_of_reach(user: RunAs) {
    if !processes::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    user.own(dir.path());
    // A second environment whose secret the attacker has no grant for, set up the way an
    // operator would, as the user `custodian dev` runs as.
    let prod_secret = canary();
    seed_prod(dir.path(), &data, &prod_secret, user);

    let data_arg = data.to_str().unwrap();
    let mut dev = spawn_as(
        &["dev", "--listen", "127.0.0.1:0", "--data-dir", data_arg],
        user,
    );
    let banner = read_until(&mut dev.0, "Press Ctrl-C");
    let field = |label: &str| crate::processes::banner_field(&banner, label);
    let client = connect(&field("MCP URL:"), &field("Agent token:")).await;
    let call = |name: &str, args: Value| {
        client.call_tool(
            CallToolRequestParams::new(name.to_owned())
                .with_arguments(args.as_object().unwrap().clone()),
        )
    };
    let requested = call(
        "request_grant",
        json!({"environment": "demo", "purpose": "try the demo API"}),
    )
    .await
    .unwrap()
    .structured_content
    .unwrap();
    let grant = requested["grant_id"].as_str().unwrap().to_owned();
    let approved = processes::custodian(
        &[
            "dev",
            "approve",
            "--data-dir",
            data_arg,
            requested["user_code"].as_str().unwrap(),
        ],
        &[],
    );
    assert!(approved.status.success(), "{approved:?}");
    let status = call(
        "grant_status",
        json!({"grant_id": grant, "wait_seconds": 30}),
    )
    .await
    .unwrap()
    .structured_content
    .unwrap();
    assert_eq!(status["state"], "active", "{status}");
    // Positive control: the grant works and reaches its own secret.
    let own = run(
        &client,
        json!({"grant_id": grant, "command": "echo \"$DEMO_API_KEY\""}),
    )
    .await
    .unwrap();
    assert_eq!(own["stdout"], "[REDACTED:DEMO_API_KEY]\n", "{own}");

    let loot = attack(&client, &grant, LOOT_DEV, &[data_arg], None).await;
    assert!(dev.terminate(std::time::Duration::from_secs(10)).success());

    let control = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}\n", loot.control),
    );
    let mut violations = controls(&loot, &[("database", &control)]);
    let everything = loot.everything();
    let master_key = std::fs::read_to_string(data.join("master.key")).unwrap();
    let raw_key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        master_key.trim(),
    )
    .unwrap();
    if everything.contains(master_key.trim()) || everything.contains(&hex::encode(&raw_key)) {
        violations.push("the run read the master key".to_owned());
    }
    let sealed = sealed_secrets(&data).await;
    assert!(sealed.len() >= 2, "control failed: {sealed:?}");
    for (name, ciphertext) in &sealed {
        if everything.contains(ciphertext.as_str()) {
            violations.push(format!(
                "the run read the sealed secret {name} from the database"
            ));
        }
    }
    if carries(&everything, &prod_secret) {
        violations.push("the run found PROD_TOKEN, which it has no grant for".to_owned());
    }
    for key in ["ca.key", "runner.key", "gateway.key"] {
        let pem = std::fs::read_to_string(data.join("pki").join(key)).unwrap();
        if pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .any(|l| everything.contains(l))
        {
            violations.push(format!("the run read the dev {key}"));
        }
    }
    let listing = loot.route("listing");
    if listing.contains("master.key") || listing.contains("custodian.db") {
        violations.push(format!("the run lists the data directory:\n{listing}"));
    }
    assert_none("the dev data directory reached a run", user, &violations);
}

/// Creates tenant `dev`, environment `prod` and its secret `PROD_TOKEN` with `custodian admin`, as
/// `user`, on the database `custodian dev` will use.
fn seed_prod(dir: &Path, data: &Path, secret: &str, user: RunAs) {
    let key = data.join("master.key");
    let config = dir.join("admin.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1\"\n\n\
             [database]\nurl = \"sqlite://{}\"\n\n[secrets]\nmaster_key_file = \"{}\"\n",
            data.join("custodian.db").display(),
            key.display()
        ),
    )
    .unwrap();
    user.own(&config);
    let config = config.to_str().unwrap();
    let admin = |args: &[&str], stdin: Option<&str>| {
        let mut command = Command::new(CUSTODIAN);
        command
            .arg("admin")
            .args(args)
            .env_remove("CUSTODIAN_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = user.apply(&mut command).spawn().unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(format!("{input}\n").as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "custodian admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    admin(
        &["master-key", "generate", "--out", key.to_str().unwrap()],
        None,
    );
    admin(&["--config", config, "tenant", "create", "dev"], None);
    admin(
        &[
            "--config",
            config,
            "env",
            "create",
            "dev",
            "prod",
            "--secret",
            "PROD_TOKEN",
        ],
        None,
    );
    admin(
        &[
            "--config",
            config,
            "secret",
            "set",
            "dev/prod",
            "PROD_TOKEN",
        ],
        Some(secret),
    );
}

/// Every sealed secret in the dev database, read on the host after `custodian dev` stopped.
async fn sealed_secrets(data: &Path) -> Vec<(String, String)> {
    let db = custodian::store::Db::connect(
        &format!("sqlite://{}", data.join("custodian.db").display()),
        1,
    )
    .await
    .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, ciphertext FROM secrets")
        .fetch_all(db.pool())
        .await
        .unwrap();
    db.close().await;
    rows
}
