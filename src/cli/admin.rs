//! `custodian admin …`: direct operations on the configured database. No command prints or accepts
//! a secret value on the command line; a new agent token is printed once and never again.

use clap::Subcommand;
use secrecy::ExposeSecret;

use crate::app::App;
use crate::config::Config;
use crate::environments::{self, Approvers, LoginFreshness, Policy, RequesterRule};
use crate::grants::{self, GrantState};
use crate::tenants::{self, IdpSettings, SecretRef, TenantId};
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
    /// Task grants: list, inspect (timeline), revoke.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// The master key that protects secrets at rest.
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
    /// Secret values of environments (set from stdin only; never shown).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Runners registered for a tenant.
    #[command(subcommand)]
    Runner(RunnerCommand),
    /// A development/test CA and certificates with SPIFFE identities (rcgen).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Engineers signed in with `codex mcp login` (OAuth sessions): list, revoke.
    #[command(subcommand, name = "sign-ins", alias = "oauth")]
    SignIns(super::sign_ins::SignInCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the chain of every tenant (of the tenants table and of the log), or of one; fails
    /// naming the first changed, deleted, reordered or inserted record, a missing chain head, and
    /// grants whose records are gone.
    Verify {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Write a tenant's records as JSON lines (for a SIEM).
    Export { tenant: String },
}

#[derive(Debug, Subcommand)]
pub enum RunnerCommand {
    /// Register a runner; it must present spiffe://<trust-domain>/tenant/<tenant>/runner/<name>.
    Add {
        tenant: String,
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        /// https://host:port of the runner.
        #[arg(long)]
        url: String,
    },
    List {
        tenant: String,
    },
    Remove {
        tenant: String,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value = "custodian.local")]
        trust_domain: String,
    },
    /// Issue a certificate signed by the CA in DIR: OUT.pem and OUT.key.
    Issue {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Trust domain of the identity; it must be the CA's (the default).
        #[arg(long)]
        trust_domain: Option<String>,
        /// The gateway's identity (spiffe://<trust-domain>/gateway).
        #[arg(long, conflicts_with = "runner")]
        gateway: bool,
        /// A runner's identity: TENANT/NAME.
        #[arg(long)]
        runner: Option<String>,
        /// DNS name or IP the certificate also serves (repeatable; runners need the host they are
        /// reached at).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 90)]
        days: i64,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a new version of a credential; the value is read from stdin (one trailing newline is
    /// dropped, except for `file` credentials) or from --from-file (as is), never from the command
    /// line.
    Set {
        /// TENANT/ENVIRONMENT
        place: String,
        /// The credential's name (A-Z, 0-9, _): the variable runs see for `env` credentials.
        name: String,
        /// env (default): an environment variable; file: a 0400 file in the run, its path in a
        /// variable; postgres: an admin connection URL from which each grant gets its own role;
        /// oauth: a client secret or refresh token from which runs get short-lived access tokens.
        #[arg(long, default_value = "env")]
        kind: String,
        /// The kind's settings as a JSON object (never secret; see docs/CREDENTIALS.md).
        #[arg(long, conflicts_with = "settings_file")]
        settings: Option<String>,
        /// A file holding the kind's settings as a JSON object.
        #[arg(long)]
        settings_file: Option<std::path::PathBuf>,
        /// Read the value from this file, byte for byte, instead of stdin.
        #[arg(long)]
        from_file: Option<std::path::PathBuf>,
    },
    /// List an environment's credentials: names, kinds, versions, when set. Never values.
    List { place: String },
    /// Delete every version of a secret.
    Delete { place: String, name: String },
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// List a tenant's grants, newest first.
    List {
        tenant: String,
        /// Only grants in this state (pending, active, exhausted, expired, revoked, denied).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Show one grant and its timeline.
    Show { tenant: String, grant_id: String },
    /// Revoke a pending or active grant.
    Revoke { tenant: String, grant_id: String },
}

#[derive(Debug, Subcommand)]
pub enum MasterKeyCommand {
    /// Write a new random master key (base64) to a file readable only by its owner.
    Generate {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Re-wrap every tenant data key from the configured master key to the key in NEW_KEY_FILE;
    /// then point secrets.master_key_file at the new file.
    Rotate {
        #[arg(long)]
        new_key_file: std::path::PathBuf,
    },
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
    /// Configure the tenant's identity provider (a device-flow client registered there). The
    /// provider is checked first: discovery, exact issuer, device endpoint, and one device
    /// authorization with the client. Nothing is stored if a check fails.
    SetIdp {
        tenant: String,
        /// OIDC issuer URL (discovery at ISSUER/.well-known/openid-configuration).
        #[arg(long)]
        issuer: String,
        /// Client id registered at the IdP for the device authorization grant.
        #[arg(long)]
        client_id: String,
        /// Environment variable that holds the client secret (confidential clients).
        #[arg(long, conflicts_with = "client_secret_file")]
        client_secret_env: Option<String>,
        /// File that holds the client secret (confidential clients).
        #[arg(long)]
        client_secret_file: Option<std::path::PathBuf>,
        /// Scopes to ask for (must include openid).
        #[arg(long, default_value = crate::tenants::DEFAULT_SCOPES)]
        scopes: String,
        /// Claim that names the approver (ID token, else userinfo).
        #[arg(long, default_value = "email")]
        approver_claim: String,
        /// Claim that lists the approver's groups (ID token, else userinfo).
        #[arg(long, default_value = "groups")]
        groups_claim: String,
    },
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
        /// Who approves relative to the engineer who asked (signed in with `codex mcp login`):
        /// `any`, `requester` (only they), or `not-requester` (four eyes).
        #[arg(long, default_value = "any", value_parser = parse_requester_rule)]
        approver_vs_requester: RequesterRule,
    },
    /// List a tenant's environments.
    List { tenant: String },
    /// Where an environment's runs may connect (default: nowhere), and injected credentials.
    #[command(subcommand)]
    Egress(EgressCommand),
}

#[derive(Debug, Subcommand)]
pub enum EgressCommand {
    /// Allow runs of TENANT/ENV to reach DESTINATION: https://host[:port] or http://host[:port]
    /// through the runner's proxy, or tcp:host:port as a forward on 127.0.0.1:port in the run.
    Add {
        /// TENANT/ENV
        place: String,
        destination: String,
        /// Allow private, loopback, link-local and metadata addresses (refused otherwise).
        #[arg(long)]
        allow_private: bool,
        /// A secret of the environment that the proxy adds to every request (HTTP(S) only); it
        /// is then no longer in the run's environment.
        #[arg(long, value_name = "NAME")]
        inject_secret: Option<String>,
        /// The header to add, with {value} where the secret goes, e.g. 'Authorization: Bearer {value}'.
        #[arg(long)]
        header: Option<String>,
        /// Basic auth with this user and the secret as password.
        #[arg(long, value_name = "USER")]
        basic_user: Option<String>,
    },
    /// List the egress rules of TENANT/ENV.
    List { place: String },
    /// Remove the rule for DESTINATION from TENANT/ENV.
    Remove { place: String, destination: String },
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

fn parse_requester_rule(text: &str) -> Result<RequesterRule, String> {
    RequesterRule::parse(text).ok_or_else(|| "expected any, requester or not-requester".to_owned())
}

/// Runs the commands that touch no database (`master-key generate`, `pki …`), which therefore need
/// no configuration; `None` for every other command.
pub fn offline(command: &AdminCommand) -> Option<anyhow::Result<()>> {
    match command {
        AdminCommand::MasterKey(MasterKeyCommand::Generate { out }) => Some(write_master_key(out)),
        AdminCommand::Pki(pki) => Some(pki_command(pki)),
        _ => None,
    }
}

/// Runs a command that needs the database (every one [`offline`] does not take).
pub async fn run(config: Config, command: AdminCommand) -> anyhow::Result<()> {
    let app = App::from_config(config, std::env::vars()).await?;
    let now = app.clock.now();
    let result = dispatch(&app, command, now).await;
    app.db.close().await;
    result
}

async fn dispatch(app: &App, command: AdminCommand, now: clock::UnixSeconds) -> anyhow::Result<()> {
    let db = &app.db;
    match command {
        AdminCommand::SignIns(command) => super::sign_ins::run(db, command, now).await?,
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
        AdminCommand::Tenant(TenantCommand::SetIdp {
            tenant,
            issuer,
            client_id,
            client_secret_env,
            client_secret_file,
            scopes,
            approver_claim,
            groups_claim,
        }) => {
            let tenant = TenantId::parse(&tenant)?;
            let client_secret = match (client_secret_env, client_secret_file) {
                (Some(name), _) => Some(SecretRef::Env(name)),
                (None, Some(path)) => Some(SecretRef::File(path)),
                (None, None) => None,
            };
            let idp = IdpSettings {
                issuer,
                client_id,
                client_secret,
                scopes,
                approver_claim,
                groups_claim,
            };
            tenants::validate_idp(&idp)?;
            if tenants::get(db, tenant.as_str()).await?.is_none() {
                return Err(tenants::TenantError::NotFound(tenant).into());
            }
            let checked = app.oidc.check(&idp).await?;
            let revoked = tenants::set_idp(db, &tenant, &idp, now).await?;
            println!("tenant {tenant} now approves grants at {}", idp.issuer);
            if revoked > 0 {
                println!(
                    "revoked {revoked} sign-in(s) made at the previous identity provider: engineers run `codex mcp login` again"
                );
            }
            for note in checked.notes {
                println!("note: {note}");
            }
        }
        AdminCommand::Grants(command) => grants_command(app, command, now).await?,
        AdminCommand::MasterKey(MasterKeyCommand::Rotate { new_key_file }) => {
            let new = crate::keys::MasterKey::load(Some(&new_key_file), "", std::iter::empty())?;
            let count = crate::secrets::rotate_master_key(db, &app.master_key, &new).await?;
            println!(
                "re-wrapped {count} tenant data keys under master key {}; now set secrets.master_key_file to {}",
                new.id(),
                new_key_file.display()
            );
        }
        AdminCommand::MasterKey(MasterKeyCommand::Generate { .. }) => {
            unreachable!("handled before opening the database")
        }
        AdminCommand::Secret(command) => secret_command(app, command, now).await?,
        AdminCommand::Pki(_) => unreachable!("handled before opening the database"),
        AdminCommand::Audit(AuditCommand::Verify { tenant }) => {
            let known = crate::audit::tenants(db).await?;
            let tenants = match tenant {
                Some(t) => {
                    let t = TenantId::parse(&t)?;
                    anyhow::ensure!(
                        known.iter().any(|k| k == t.as_str()),
                        "no tenant `{t}`: it is neither in the tenants table nor in the audit log"
                    );
                    vec![t]
                }
                None => known
                    .iter()
                    .map(|t| TenantId::parse(t))
                    .collect::<Result<_, _>>()?,
            };
            let mut failed = Vec::new();
            for tenant in tenants {
                match crate::audit::verify(db, &app.audit_key, &tenant).await? {
                    Ok(n) => println!("tenant {tenant}: {n} records verified"),
                    Err(problem) => {
                        println!("{problem}");
                        failed.push(problem);
                    }
                }
            }
            anyhow::ensure!(
                failed.is_empty(),
                "the audit log of {} tenant(s) does not verify",
                failed.len()
            );
        }
        AdminCommand::Audit(AuditCommand::Export { tenant }) => {
            let tenant = TenantId::parse(&tenant)?;
            for entry in crate::audit::all(db, &tenant).await? {
                println!("{}", serde_json::to_string(&entry)?);
            }
        }
        AdminCommand::Runner(RunnerCommand::Add {
            tenant,
            name,
            pool,
            url,
        }) => {
            let tenant = TenantId::parse(&tenant)?;
            let runner = crate::runners::add(db, &tenant, &name, &pool, &url, now).await?;
            println!(
                "registered runner {} (pool {}) at {}; it must present {}",
                runner.name,
                runner.pool,
                runner.url,
                app.dispatcher.identity_of(&runner)
            );
        }
        AdminCommand::Runner(RunnerCommand::List { tenant }) => {
            let tenant = TenantId::parse(&tenant)?;
            println!("{:<24} {:<16} URL", "NAME", "POOL");
            for r in crate::runners::list(db, &tenant).await? {
                println!("{:<24} {:<16} {}", r.name, r.pool, r.url);
            }
        }
        AdminCommand::Runner(RunnerCommand::Remove { tenant, name }) => {
            let tenant = TenantId::parse(&tenant)?;
            crate::runners::remove(db, &tenant, &name).await?;
            println!("removed runner {name}");
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
            approver_vs_requester,
        }) => {
            let tenant = TenantId::parse(&tenant)?;
            let policy = Policy {
                approver_vs_requester,
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
        AdminCommand::Env(EnvCommand::Egress(command)) => egress_command(app, command, now).await?,
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

async fn grants_command(
    app: &App,
    command: GrantsCommand,
    _now: clock::UnixSeconds,
) -> anyhow::Result<()> {
    match command {
        GrantsCommand::List {
            tenant,
            state,
            limit,
        } => {
            let tenant = TenantId::parse(&tenant)?;
            let state = match state {
                Some(s) => Some(GrantState::parse(&s).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown state `{s}` (pending, active, exhausted, expired, revoked, denied)"
                    )
                })?),
                None => None,
            };
            println!(
                "{:<36} {:<10} {:<20} {:<20} APPROVER",
                "ID", "STATE", "ENVIRONMENT", "AGENT"
            );
            for g in grants::store::list(&app.db, &tenant, state, limit).await? {
                println!(
                    "{:<36} {:<10} {:<20} {:<20} {}",
                    g.id,
                    g.state.as_str(),
                    g.environment,
                    g.agent_name,
                    g.approver_name
                        .as_deref()
                        .or(g.approver_sub.as_deref())
                        .unwrap_or("-")
                );
            }
        }
        GrantsCommand::Show { tenant, grant_id } => {
            let tenant = TenantId::parse(&tenant)?;
            let Some(g) = grants::store::get(&app.db, &tenant, &grant_id).await? else {
                anyhow::bail!("no grant `{grant_id}` in tenant {tenant}");
            };
            println!("grant        {}", g.id);
            println!("state        {}", g.state.as_str());
            println!("environment  {}", g.environment);
            println!("agent        {}", g.agent_name);
            println!("purpose      {}", g.purpose);
            println!(
                "ttl / uses   {} s / {} of {}",
                g.ttl_seconds, g.uses, g.max_uses
            );
            println!("expires at   {}", g.expires_at);
            if let Some(sub) = &g.approver_sub {
                println!(
                    "approver     {} (sub {sub}, groups {})",
                    g.approver_name.as_deref().unwrap_or("-"),
                    g.approver_groups.join(",")
                );
                println!(
                    "auth_time    {}",
                    g.auth_time.map_or("-".to_owned(), |t| t.to_string())
                );
            }
            if let Some(reason) = &g.end_reason {
                println!("ended        {reason}");
            }
            if let Some(trace) = g.trace_context.as_deref().and_then(|t| t.split('-').nth(1)) {
                println!("trace id     {trace}  (look it up in Jaeger/Tempo)");
            }
            println!("\ntimeline");
            for e in grants::store::events(&app.db, &tenant, &g.id).await? {
                println!("  {:>3}  {}  {:<10} {}", e.seq, e.at_ms, e.kind, e.detail);
            }
            let leases: Vec<_> = crate::credentials::lease::list(&app.db, &tenant)
                .await?
                .into_iter()
                .filter(|l| l.grant_id == g.id)
                .collect();
            if !leases.is_empty() {
                println!(
                    "
credentials made for it"
                );
                for l in leases {
                    println!(
                        "  {} ({}) {}  {}  attempts {}{}",
                        l.credential,
                        l.engine,
                        l.resource,
                        l.state,
                        l.attempts,
                        l.last_error
                            .map_or(String::new(), |e| format!("  last error: {e}"))
                    );
                }
            }
        }
        GrantsCommand::Revoke { tenant, grant_id } => {
            let tenant = TenantId::parse(&tenant)?;
            let status = grants::revoke_as_admin(app, &tenant, &grant_id).await?;
            println!("grant {} is now {}", status.grant_id, status.state.as_str());
        }
    }
    Ok(())
}

pub(crate) fn write_master_key(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot create {} (it must not exist yet): {e}",
            path.display()
        )
    })?;
    let key = crate::keys::MasterKey::generate();
    file.write_all(key.to_base64().as_bytes())?;
    file.sync_all()?;
    eprintln!(
        "wrote a new master key to {}; set secrets.master_key_file to this path",
        path.display()
    );
    Ok(())
}

/// Egress rules are environment settings, which the audit log does not cover (it records grants
/// and runs): each change is logged here, and every run's egress is in its `exec` records.
async fn egress_command(
    app: &App,
    command: EgressCommand,
    now: clock::UnixSeconds,
) -> anyhow::Result<()> {
    let db = &app.db;
    match command {
        EgressCommand::Add {
            place: at,
            destination,
            allow_private,
            inject_secret,
            header,
            basic_user,
        } => {
            let (tenant, env) = place(&at)?;
            let rule = crate::egress::Rule {
                destination: crate::egress::parse_destination(&destination)?,
                allow_private,
                inject: crate::egress::injection(inject_secret, header.as_deref(), basic_user)?,
            };
            crate::egress::add(db, &tenant, &env, &rule, now).await?;
            let shown = rule.inject.as_ref().map(crate::egress::Injection::shown);
            tracing::info!(tenant = %tenant, environment = %env, destination = %rule.destination, allow_private, credential = ?shown, "admin: egress rule added");
            println!(
                "allowed {tenant}/{env} to reach {}{}{}",
                rule.destination,
                if allow_private {
                    " (private addresses allowed)"
                } else {
                    ""
                },
                shown.map(|s| format!(" with {s}")).unwrap_or_default()
            );
        }
        EgressCommand::List { place: at } => {
            let (tenant, env) = place(&at)?;
            if crate::environments::get(db, &tenant, &env).await?.is_none() {
                anyhow::bail!("no environment `{env}` in tenant {tenant}");
            }
            println!("{:<40} {:<8} CREDENTIAL", "DESTINATION", "PRIVATE");
            for rule in crate::egress::list(db, &tenant, &env).await? {
                println!(
                    "{:<40} {:<8} {}",
                    rule.destination.to_string(),
                    if rule.allow_private {
                        "allowed"
                    } else {
                        "refused"
                    },
                    rule.inject
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), crate::egress::Injection::shown)
                );
            }
        }
        EgressCommand::Remove {
            place: at,
            destination,
        } => {
            let (tenant, env) = place(&at)?;
            let destination = crate::egress::parse_destination(&destination)?;
            crate::egress::remove(db, &tenant, &env, &destination).await?;
            tracing::info!(tenant = %tenant, environment = %env, destination = %destination, "admin: egress rule removed");
            println!("removed {destination} from {tenant}/{env}");
        }
    }
    Ok(())
}

fn place(text: &str) -> anyhow::Result<(TenantId, String)> {
    let (tenant, env) = text
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("`{text}` is not TENANT/ENVIRONMENT"))?;
    Ok((TenantId::parse(tenant)?, env.to_owned()))
}

async fn secret_command(
    app: &App,
    command: SecretCommand,
    now: clock::UnixSeconds,
) -> anyhow::Result<()> {
    match command {
        SecretCommand::Set {
            place: at,
            name,
            kind,
            settings,
            settings_file,
            from_file,
        } => {
            let (tenant, env) = place(&at)?;
            let settings = match settings_file {
                Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
                    anyhow::anyhow!("reading settings from {}: {e}", path.display())
                })?),
                None => settings,
            };
            let spec = crate::credentials::Spec::new(
                crate::credentials::Kind::parse(&kind)?,
                settings.as_deref(),
            )?;
            let mut value = zeroize::Zeroizing::new(Vec::new());
            match from_file {
                Some(path) => {
                    let mut file = std::fs::File::open(&path)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                    std::io::Read::read_to_end(&mut file, &mut value)?;
                }
                None => {
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut value)?;
                    // A file's content is kept byte for byte; a one-line value loses its newline.
                    if spec.kind != crate::credentials::Kind::File && value.last() == Some(&b'\n') {
                        value.pop();
                        if value.last() == Some(&b'\r') {
                            value.pop();
                        }
                    }
                }
            }
            let info = crate::secrets::set_credential(
                &app.db,
                &app.master_key,
                &tenant,
                &env,
                &name,
                &spec,
                &value,
                now,
            )
            .await?;
            println!(
                "stored {tenant}/{env} {} ({}) version {}",
                info.name, spec.kind, info.version
            );
        }
        SecretCommand::List { place: at } => {
            let (tenant, env) = place(&at)?;
            let kinds = environments::get(&app.db, &tenant, &env)
                .await?
                .map(|e| e.credentials)
                .unwrap_or_default();
            println!("{:<32} {:<8} {:>7} SET_AT", "NAME", "KIND", "VERSION");
            for s in crate::secrets::list(&app.db, &tenant, &env).await? {
                let kind = kinds
                    .get(&s.name)
                    .map_or(crate::credentials::Kind::Env, |k| k.kind);
                println!("{:<32} {:<8} {:>7} {}", s.name, kind, s.version, s.set_at);
            }
        }
        SecretCommand::Delete { place: at, name } => {
            let (tenant, env) = place(&at)?;
            crate::secrets::delete(&app.db, &tenant, &env, &name).await?;
            println!("deleted {tenant}/{env} {name}");
        }
    }
    Ok(())
}

fn pki_command(command: &PkiCommand) -> anyhow::Result<()> {
    use custodian_protocol::Identity;
    match command {
        PkiCommand::Init { dir, trust_domain } => {
            crate::pki::init(dir, trust_domain)?;
            println!("created CA for {trust_domain} in {}", dir.display());
        }
        PkiCommand::Issue {
            dir,
            trust_domain,
            gateway,
            runner,
            hosts,
            days,
            out,
        } => {
            let trust_domain = match trust_domain {
                Some(td) => td.clone(),
                None => crate::pki::trust_domain(dir)?,
            };
            let identity = match (gateway, runner) {
                (true, _) => Identity::Gateway { trust_domain },
                (false, Some(runner)) => {
                    let (tenant, name) = runner
                        .split_once('/')
                        .ok_or_else(|| anyhow::anyhow!("--runner takes TENANT/NAME"))?;
                    Identity::Runner {
                        trust_domain,
                        tenant: tenant.to_owned(),
                        name: name.to_owned(),
                    }
                }
                (false, None) => anyhow::bail!("say --gateway or --runner TENANT/NAME"),
            };
            Identity::parse(&identity.to_string())?;
            let (cert, key) = crate::pki::issue(dir, &identity, hosts, *days, out)?;
            println!("issued {identity}: {} {}", cert.display(), key.display());
        }
    }
    Ok(())
}
