//! `custodian dev`: the whole product on one machine with nothing to install beyond the build.
//! SQLite under a data directory, tenant `dev`, environment `demo`, a fresh agent token, loopback only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use secrecy::ExposeSecret;

use crate::agent_tokens;
use crate::app::{App, Server, shutdown_signal};
use crate::config::Config;
use crate::environments::{self, Policy};
use crate::oidc::dev_idp::{DEV_CLIENT_ID, DevIdp, DevModeOnly};
use crate::tenants::{self, IdpSettings, TenantId};

pub const DEV_TENANT: &str = "dev";
/// Where `custodian dev` keeps its state unless `--data-dir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "custodian-dev";
pub const DEV_ENVIRONMENT: &str = "demo";

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    #[command(subcommand)]
    action: Option<DevAction>,
    /// Directory for the SQLite database and other dev state.
    #[arg(long, default_value = DEFAULT_DATA_DIR, global = true)]
    data_dir: PathBuf,
    /// Loopback address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Run the local runner's commands WITHOUT namespaces (no bubblewrap, or no user namespaces
    /// here): a command can then read this data directory, i.e. every secret. Never with real ones.
    #[arg(long)]
    dangerously_run_without_isolation: bool,
}

#[derive(Debug, clap::Subcommand)]
enum DevAction {
    /// Approve a pending grant at the dev identity provider, as the dev approver.
    Approve {
        /// The user code shown by request_grant (e.g. BCDF-GHJK).
        user_code: String,
    },
}

const IDP_URL_FILE: &str = "dev-idp.url";
const DEV_RUNNER: &str = "local";
const TRUST_DOMAIN: &str = "custodian.local";
const MASTER_KEY_FILE: &str = "master.key";

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if let Some(DevAction::Approve { user_code }) = &args.action {
        return approve(&args.data_dir, user_code).await;
    }
    if !args.listen.ip().is_loopback() {
        bail!(
            "custodian dev only listens on loopback (got {}); use `custodian serve` for anything else",
            args.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "binding {} (is another instance running? try --listen 127.0.0.1:0)",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    // Absolute paths, so that the written config works from any directory.
    let data_dir = std::fs::canonicalize(&args.data_dir)
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;
    let db_path = data_dir.join("custodian.db");
    let key_path = data_dir.join(MASTER_KEY_FILE);
    if !key_path.exists() {
        super::admin::write_master_key(&key_path)?;
    }
    let pki = dev_pki(&data_dir)?;
    let toml = format!(
        "# Written by `custodian dev` at each start; `custodian admin --config THIS_FILE …` manages this instance.\n[server]\nlisten = \"{addr}\"\npublic_url = \"http://{addr}\"\n\n[database]\nurl = \"sqlite://{}\"\n\n[secrets]\nmaster_key_file = \"{}\"\n\n[runners]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[log]\nfilter = \"warn,custodian=info,custodian_runner=info\"\n",
        db_path.display(),
        key_path.display(),
        pki.join("ca.pem").display(),
        pki.join("gateway.pem").display(),
        pki.join("gateway.key").display(),
    );
    let config = Config::from_toml(&toml, std::iter::empty())?;
    let config_path = config_file(&args.data_dir);
    std::fs::write(&config_path, &toml)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let telemetry = super::init_logging(&config.log);
    let grace = config.server.shutdown_grace;
    let mut app = App::from_config(config, std::env::vars()).await?;
    app.metrics = crate::metrics::Metrics::new(&telemetry.meter("custodian"));
    let app = Arc::new(app);
    let idp = DevIdp::start(
        DevModeOnly::assert_dev_mode(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await?;
    std::fs::write(args.data_dir.join(IDP_URL_FILE), &idp.issuer)?;
    let runner_stop = tokio_util::sync::CancellationToken::new();
    let isolation = if args.dangerously_run_without_isolation {
        custodian_runner::Isolation::DangerouslyNone
    } else {
        custodian_runner::Isolation::Full
    };
    let runner_url = start_runner(&pki, isolation, runner_stop.clone()).await?;
    let token = seed(&app, &idp.issuer, &runner_url).await?;
    let server = Server::start_on(app.clone(), listener)?;

    let url = format!("http://{addr}/t/{DEV_TENANT}/mcp");
    println!(
        "Custodian dev gateway is running (data in {dir}).\n\n\
         MCP URL:     {url}\n\
         Agent token: {token}\n\n\
         Give the token to the agent's environment:\n\n  \
         export CUSTODIAN_TOKEN={token}\n\n\
         and add this to ~/.codex/config.toml:\n\n\
         [mcp_servers.custodian]\n\
         url = \"{url}\"\n\
         bearer_token_env_var = \"CUSTODIAN_TOKEN\"\n\
         # Custodian's own human approval gates access; let Codex call its tools without asking.\n\
         default_tools_approval_mode = \"approve\"\n\
         # grant_status may wait up to 240 s for a human.\n\
         tool_timeout_sec = 300\n\n\
         Grants are approved at the dev identity provider ({issuer}): open the approval link the\n\
         agent relays, or run `custodian dev approve <user code>`.\n\n\
         Manage this instance with `custodian admin --config {config} …`\n\
         (e.g. `custodian admin --config {config} grants list dev`).\n\n\
         To sign in instead of pasting a token, leave `bearer_token_env_var` out of the Codex config\n\
         (when present it overrides sign-in) and run `codex mcp login custodian`; the dev identity\n\
         provider signs you in as {email}. `custodian admin --config {config} sign-ins list dev`\n\
         shows who is signed in.\n\n\
         Press Ctrl-C to stop.",
        email = crate::oidc::dev_idp::DEV_EMAIL,
        config = config_path.display(),
        issuer = idp.issuer,
        dir = args.data_dir.display(),
        token = token.expose_secret(),
    );
    shutdown_signal().await;
    idp.stop();
    runner_stop.cancel();
    server.shutdown(grace).await?;
    app.db.close().await;
    telemetry.shutdown();
    Ok(())
}

/// The configuration `custodian dev` runs with, written into its data directory for `admin`.
pub fn config_file(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("custodian.toml")
}

/// Makes sure tenant `dev` (approving at the dev IdP) and environment `demo` exist, and creates a
/// fresh agent token.
async fn seed(app: &App, issuer: &str, runner_url: &str) -> anyhow::Result<secrecy::SecretString> {
    let now = app.clock.now();
    let tenant = TenantId::parse(DEV_TENANT)?;
    if tenants::get(&app.db, DEV_TENANT).await?.is_none() {
        tenants::create(&app.db, &tenant, "Development", None, now).await?;
    }
    tenants::set_idp(
        &app.db,
        &tenant,
        &IdpSettings {
            issuer: issuer.to_owned(),
            client_id: DEV_CLIENT_ID.to_owned(),
            client_secret: None,
            scopes: "openid email groups".to_owned(),
            approver_claim: "email".to_owned(),
            groups_claim: "groups".to_owned(),
        },
        now,
    )
    .await?;
    if environments::get(&app.db, &tenant, DEV_ENVIRONMENT)
        .await?
        .is_none()
    {
        environments::create(
            &app.db,
            &tenant,
            DEV_ENVIRONMENT,
            "Demo environment with a sample API key, for trying Custodian out",
            &["DEMO_API_KEY".to_owned()],
            &Policy::default(),
            now,
        )
        .await?;
    }
    // The local runner, at this start's port.
    let _ = crate::runners::remove(&app.db, &tenant, DEV_RUNNER).await;
    crate::runners::add(&app.db, &tenant, DEV_RUNNER, "default", runner_url, now).await?;
    if crate::secrets::list(&app.db, &tenant, DEV_ENVIRONMENT)
        .await?
        .is_empty()
    {
        let mut sample = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut sample);
        let value = zeroize::Zeroizing::new(format!("demo-{}", hex::encode(sample)));
        crate::secrets::set(
            &app.db,
            &app.master_key,
            &tenant,
            DEV_ENVIRONMENT,
            "DEMO_API_KEY",
            value.as_bytes(),
            now,
        )
        .await?;
    }
    // A fresh token per start; the previous starts' tokens stop working.
    for old in agent_tokens::list(&app.db, &tenant).await? {
        if old.revoked_at.is_none() && old.name.starts_with("dev-") {
            agent_tokens::revoke(&app.db, &tenant, &old.id, now).await?;
        }
    }
    let name = format!("dev-{}", uuid::Uuid::new_v4().simple());
    let (_, token) = agent_tokens::create(&app.db, &tenant, &name[..12], now).await?;
    Ok(token)
}

/// `custodian dev approve CODE`: approves at the running dev IdP found in the data directory.
async fn approve(data_dir: &std::path::Path, user_code: &str) -> anyhow::Result<()> {
    let path = data_dir.join(IDP_URL_FILE);
    let issuer = std::fs::read_to_string(&path).with_context(|| {
        format!("no running `custodian dev` found ({} is missing); start it first, with the same --data-dir", path.display())
    })?;
    let url = url::Url::parse(issuer.trim()).context("the dev IdP address file is corrupt")?;
    anyhow::ensure!(
        matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")),
        "the dev IdP address is not on loopback; refusing"
    );
    let response = reqwest::Client::new()
        .post(format!("{}/device/approve", issuer.trim()))
        .form(&[("user_code", user_code)])
        .send()
        .await
        .context("the dev identity provider does not answer; is `custodian dev` still running?")?;
    match response.status() {
        s if s.is_success() => {
            println!(
                "approved {user_code} as {}",
                crate::oidc::dev_idp::DEV_EMAIL
            );
            Ok(())
        }
        reqwest::StatusCode::NOT_FOUND => anyhow::bail!("no pending request with code {user_code}"),
        s => anyhow::bail!("the dev identity provider answered {s}"),
    }
}

/// A dev CA with gateway and runner certificates under `DATA_DIR/pki` (made once).
fn dev_pki(data_dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use custodian_protocol::Identity;
    let dir = data_dir.join("pki");
    if !dir.join("ca.key").exists() {
        crate::pki::init(&dir, TRUST_DOMAIN)?;
        let gateway = Identity::Gateway {
            trust_domain: TRUST_DOMAIN.to_owned(),
        };
        crate::pki::issue(&dir, &gateway, &[], 3650, &dir.join("gateway"))?;
        let runner = Identity::Runner {
            trust_domain: TRUST_DOMAIN.to_owned(),
            tenant: DEV_TENANT.to_owned(),
            name: DEV_RUNNER.to_owned(),
        };
        crate::pki::issue(
            &dir,
            &runner,
            &["127.0.0.1".to_owned()],
            3650,
            &dir.join("runner"),
        )?;
    }
    Ok(dir)
}

/// Starts the local runner on a loopback port (real mTLS, real sandbox); returns its URL.
async fn start_runner(
    pki: &std::path::Path,
    isolation: custodian_runner::Isolation,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = custodian_runner::config::RunnerConfig {
        listen: addr,
        trust_domain: TRUST_DOMAIN.to_owned(),
        tenant: DEV_TENANT.to_owned(),
        name: DEV_RUNNER.to_owned(),
        cert_file: pki.join("runner.pem"),
        key_file: pki.join("runner.key"),
        ca_file: pki.join("ca.pem"),
        max_body_bytes: 1 << 20,
        sandbox: custodian_runner::config::SandboxConfig::default(),
        egress: custodian_runner::config::EgressConfig::default(),
    };
    let helper = std::env::current_exe()?;
    let runner = custodian_runner::prepare(config, helper, isolation, stop.clone())
        .await
        .context("the local runner cannot start (custodian dev --dangerously-run-without-isolation runs it without namespaces, never with real secrets)")?;
    tokio::spawn(async move {
        if let Err(e) = custodian_runner::server::serve(runner, listener, stop).await {
            tracing::error!(error = %e, "the local runner stopped");
        }
    });
    Ok(format!("https://{addr}"))
}
