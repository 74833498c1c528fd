//! `custodian admin …`: direct operations on the configured database. No command prints or accepts
//! a secret value on the command line; a new agent token is printed once and never again.

use clap::Subcommand;
use secrecy::ExposeSecret;

use crate::app::App;
use crate::config::Config;
use crate::environments::{self, Approvers, LoginFreshness, Policy};
use crate::tenants::{self, TenantId};
use crate::{agent_tokens, clock};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Tenants: the unit of isolation (one per team or company).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Environments: named sets of secrets with a grant policy.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Agent tokens: how agents authenticate to a tenant's MCP endpoint.
    #[command(subcommand, name = "agent-token")]
    AgentToken(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Tenant id, used in the MCP URL `/t/{id}/mcp`.
        id: String,
        /// Human-readable name (defaults to the id).
        #[arg(long)]
        display_name: Option<String>,
        /// OIDC issuer URL of the tenant's identity provider.
        #[arg(long)]
        issuer: Option<String>,
    },
    /// List tenants.
    List,
}

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Create an environment in a tenant.
    Create {
        tenant: String,
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Name of a secret (environment variable) runs receive; repeat for several.
        #[arg(long = "secret", value_name = "NAME")]
        secrets: Vec<String>,
        /// Longest grant lifetime, in seconds.
        #[arg(long, default_value_t = Policy::default().max_ttl_seconds)]
        max_ttl: i64,
        /// Most runs per grant.
        #[arg(long, default_value_t = Policy::default().max_uses)]
        max_uses: i64,
        /// Approver must have signed in at most this many seconds before approving.
        #[arg(long, default_value_t = Policy::default().max_auth_age_seconds)]
        max_auth_age: i64,
        /// Runner pool that executes commands for this environment.
        #[arg(long, default_value = "default")]
        runner_pool: String,
        /// Allowed approver by IdP subject (repeatable).
        #[arg(long = "approver-subject")]
        approver_subjects: Vec<String>,
        /// Allowed approver by email (repeatable).
        #[arg(long = "approver-email")]
        approver_emails: Vec<String>,
        /// Allowed approvers by IdP group (repeatable).
        #[arg(long = "approver-group")]
        approver_groups: Vec<String>,
        /// Accept approvals from any IdP session, however old (default: a recent sign-in is required).
        #[arg(long)]
        no_fresh_login: bool,
        /// Accepted `acr` value of the approver's sign-in (repeatable; any of).
        #[arg(long = "accept-acr")]
        accepted_acr: Vec<String>,
        /// Required `amr` method of the approver's sign-in (repeatable; all of).
        #[arg(long = "require-amr")]
        required_amr: Vec<String>,
    },
    /// List a tenant's environments.
    List { tenant: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once.
    Create { tenant: String, name: String },
    /// List a tenant's tokens (ids and names, never the tokens).
    List { tenant: String },
    /// Revoke a token by id or name.
    Revoke { tenant: String, token: String },
}

pub async fn run(config: Config, command: AdminCommand) -> anyhow::Result<()> {
    let app = App::from_config(config).await?;
    let now = app.clock.now();
    let result = dispatch(&app, command, now).await;
    app.db.close().await;
    result
}

async fn dispatch(app: &App, command: AdminCommand, now: clock::UnixSeconds) -> anyhow::Result<()> {
    let db = &app.db;
    match command {
        AdminCommand::Tenant(TenantCommand::Create {
            id,
            display_name,
            issuer,
        }) => {
            let id = TenantId::parse(&id)?;
            let name = display_name.unwrap_or_else(|| id.to_string());
            let tenant = tenants::create(db, &id, &name, issuer.as_deref(), now).await?;
            println!("created tenant {}", tenant.id);
        }
        AdminCommand::Tenant(TenantCommand::List) => {
            println!("{:<24} {:<32} ISSUER", "ID", "NAME");
            for t in tenants::list(db).await? {
                let issuer = t.idp_issuer.as_deref().unwrap_or("-");
                println!("{:<24} {:<32} {issuer}", t.id, t.display_name);
            }
        }
        AdminCommand::Env(EnvCommand::Create {
            tenant,
            name,
            description,
            secrets,
            max_ttl,
            max_uses,
            max_auth_age,
            runner_pool,
            approver_subjects,
            approver_emails,
            approver_groups,
            no_fresh_login,
            accepted_acr,
            required_amr,
        }) => {
            let tenant = TenantId::parse(&tenant)?;
            let policy = Policy {
                approvers: Approvers {
                    subjects: approver_subjects,
                    emails: approver_emails,
                    groups: approver_groups,
                },
                max_ttl_seconds: max_ttl,
                max_uses,
                freshness: if no_fresh_login {
                    LoginFreshness::NotRequired
                } else {
                    LoginFreshness::Required
                },
                max_auth_age_seconds: max_auth_age,
                accepted_acr,
                required_amr,
                runner_pool,
            };
            let env =
                environments::create(db, &tenant, &name, &description, &secrets, &policy, now)
                    .await?;
            println!("created environment {}/{}", env.tenant_id, env.name);
        }
        AdminCommand::Env(EnvCommand::List { tenant }) => {
            let tenant = TenantId::parse(&tenant)?;
            println!(
                "{:<24} {:>8} {:>8} {:<12} SECRETS",
                "NAME", "MAX_TTL", "MAX_USES", "POOL"
            );
            for e in environments::list(db, &tenant).await? {
                println!(
                    "{:<24} {:>8} {:>8} {:<12} {}",
                    e.name,
                    e.policy.max_ttl_seconds,
                    e.policy.max_uses,
                    e.policy.runner_pool,
                    e.secret_names.join(",")
                );
            }
        }
        AdminCommand::AgentToken(TokenCommand::Create { tenant, name }) => {
            let tenant = TenantId::parse(&tenant)?;
            let (token, secret) = agent_tokens::create(db, &tenant, &name, now).await?;
            eprintln!(
                "created agent token {} ({}) for tenant {}; it is shown once, store it now:",
                token.name, token.id, token.tenant_id
            );
            println!("{}", secret.expose_secret());
        }
        AdminCommand::AgentToken(TokenCommand::List { tenant }) => {
            let tenant = TenantId::parse(&tenant)?;
            println!("{:<18} {:<32} {:<12} STATE", "ID", "NAME", "CREATED");
            for t in agent_tokens::list(db, &tenant).await? {
                let state = match t.revoked_at {
                    Some(at) => format!("revoked at {at}"),
                    None => "active".to_owned(),
                };
                println!("{:<18} {:<32} {:<12} {state}", t.id, t.name, t.created_at);
            }
        }
        AdminCommand::AgentToken(TokenCommand::Revoke { tenant, token }) => {
            let tenant = TenantId::parse(&tenant)?;
            agent_tokens::revoke(db, &tenant, &token, now).await?;
            println!("revoked agent token {token}");
        }
    }
    Ok(())
}
