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
use crate::tenants::{self, TenantId};

pub const DEV_TENANT: &str = "dev";
pub const DEV_ENVIRONMENT: &str = "demo";

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Directory for the SQLite database and other dev state.
    #[arg(long, default_value = "custodian-dev")]
    data_dir: PathBuf,
    /// Loopback address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
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
    let db_path = args.data_dir.join("custodian.db");
    let toml = format!(
        "[server]\nlisten = \"{addr}\"\npublic_url = \"http://{addr}\"\n\n[database]\nurl = \"sqlite://{}\"\n\n[log]\nfilter = \"warn,custodian=info\"\n",
        db_path.display()
    );
    let config = Config::from_toml(&toml, std::iter::empty())?;
    super::init_logging(&config.log);
    let grace = config.server.shutdown_grace;
    let app = Arc::new(App::from_config(config).await?);
    let token = seed(&app).await?;
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
         Press Ctrl-C to stop.",
        dir = args.data_dir.display(),
        token = token.expose_secret(),
    );
    shutdown_signal().await;
    server.shutdown(grace).await?;
    app.db.close().await;
    Ok(())
}

/// Makes sure tenant `dev` and environment `demo` exist, and creates a fresh agent token.
async fn seed(app: &App) -> anyhow::Result<secrecy::SecretString> {
    let now = app.clock.now();
    let tenant = TenantId::parse(DEV_TENANT)?;
    if tenants::get(&app.db, DEV_TENANT).await?.is_none() {
        tenants::create(&app.db, &tenant, "Development", None, now).await?;
    }
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
    let name = format!("dev-{now}");
    let (_, token) = agent_tokens::create(&app.db, &tenant, &name, now).await?;
    Ok(token)
}
