//! `custodian admin sign-ins …`: who holds access to a tenant through `codex mcp login`, and
//! revoking it. Lists show engineers and clients, never a token.

use clap::Subcommand;

use crate::clock::UnixSeconds;
use crate::oauth;
use crate::store::Db;
use crate::tenants::TenantId;

#[derive(Debug, Subcommand)]
pub enum SignInCommand {
    /// List a tenant's sign-ins (OAuth sessions): engineer, client, when, state.
    List {
        tenant: String,
        /// Include revoked and expired sign-ins.
        #[arg(long)]
        all: bool,
    },
    /// Revoke sign-ins by their id, or every live one of an engineer (IdP subject or verified
    /// email); their access and refresh tokens stop working on the next request.
    Revoke { tenant: String, who: String },
}

pub async fn run(db: &Db, command: SignInCommand, now: UnixSeconds) -> anyhow::Result<()> {
    match command {
        SignInCommand::List { tenant, all } => {
            let tenant = TenantId::parse(&tenant)?;
            println!(
                "{:<21} {:<32} {:<24} {:<12} {:<12} STATE",
                "ID", "ENGINEER", "CLIENT", "SIGNED IN", "LAST REFRESH"
            );
            for f in oauth::list_families(db, &tenant).await? {
                let state = match (&f.revoked_at, &f.revoke_reason) {
                    (Some(at), reason) => format!(
                        "revoked at {at} ({})",
                        reason.as_deref().unwrap_or("by an admin")
                    ),
                    (None, _) if f.expires_at < now => "expired".to_owned(),
                    (None, _) => format!("active until {}", f.expires_at),
                };
                if !all && (f.revoked_at.is_some() || f.expires_at < now) {
                    continue;
                }
                let engineer = f.email.as_deref().unwrap_or(&f.subject);
                let client = f.client_name.as_deref().unwrap_or(&f.client_id);
                println!(
                    "{:<21} {:<32} {:<24} {:<12} {:<12} {state}",
                    f.id, engineer, client, f.created_at, f.last_used_at
                );
            }
        }
        SignInCommand::Revoke { tenant, who } => {
            let tenant = TenantId::parse(&tenant)?;
            let revoked =
                oauth::revoke_families(db, &tenant, &who, "revoked by an admin", now).await?;
            anyhow::ensure!(
                revoked > 0,
                "no live sign-in `{}` in tenant {tenant}",
                who.chars().take(80).collect::<String>()
            );
            println!("revoked {revoked} sign-in(s) of {who}");
        }
    }
    Ok(())
}
