//! The approval page a human opens from the agent's message: what is being asked, by which agent,
//! for what, and a link to sign in at the IdP. Server-rendered, no scripts, every value escaped,
//! not frameable, never cached. The sign-in link is rendered only when it is an https URL (plain
//! http only to loopback), never `javascript:` or another scheme. Unknown ids get a bare 404.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};

use super::error::HttpError;
use crate::app::App;
use crate::environments;
use crate::grants::{Grant, GrantId, GrantState, store};
use crate::oidc::link_is_safe;
use crate::tenants::{self, TenantId};

/// `GET /approve/{id}`.
pub async fn page(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match render(&app, &id).await {
        Ok(Some(html)) => with_safe_headers(Html(html).into_response()),
        Ok(None) => with_safe_headers(
            (
                StatusCode::NOT_FOUND,
                Html("<!DOCTYPE html><title>Not found</title><p>Not found.</p>"),
            )
                .into_response(),
        ),
        Err(e) => HttpError::internal("rendering the approval page failed", &e).into_response(),
    }
}

fn with_safe_headers(response: Response) -> Response {
    with_page_headers(
        response,
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    )
}

/// The headers of a server-rendered page: `csp`, not frameable, never cached, no referrer.
pub(crate) fn with_page_headers(mut response: Response, csp: &'static str) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, csp),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn render(app: &App, id: &str) -> Result<Option<String>, crate::store::StoreError> {
    let Some(id) = GrantId::parse(id) else {
        return Ok(None);
    };
    let Some(grant) = store::get_by_id(&app.db, id.as_str()).await? else {
        return Ok(None);
    };
    let tenant_name = tenants::get(&app.db, &grant.tenant_id)
        .await?
        .map(|t| t.display_name)
        .unwrap_or_else(|| grant.tenant_id.clone());
    let secrets = match TenantId::parse(&grant.tenant_id) {
        Ok(tenant) => environments::get(&app.db, &tenant, &grant.environment)
            .await?
            .map(|e| e.secret_names)
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    Ok(Some(html(&grant, &tenant_name, &secrets)))
}

fn html(grant: &Grant, tenant: &str, secrets: &[String]) -> String {
    let rows = [
        ("Tenant", tenant.to_owned()),
        ("Environment", grant.environment.clone()),
        ("Requested by (agent token)", grant.agent_name.clone()),
        ("Purpose", grant.purpose.clone()),
        (
            "Secrets the commands receive",
            if secrets.is_empty() {
                "(none)".to_owned()
            } else {
                secrets.join(", ")
            },
        ),
        (
            "Lifetime once approved",
            format!("{} seconds", grant.ttl_seconds),
        ),
        ("Commands allowed", grant.max_uses.to_string()),
    ];
    let mut table = String::new();
    for (label, value) in rows {
        table.push_str(&format!(
            "<tr><th>{}</th><td>{}</td></tr>\n",
            text(label),
            text(&value)
        ));
    }
    let action = match grant.state {
        GrantState::Pending => {
            let code = grant.user_code.as_deref().unwrap_or("");
            // Only an https link (plain http on loopback) is ever linked; anything else the IdP
            // sent is left out (requests refuse such links, so this guards older rows).
            let link = [
                grant.verification_uri_complete.as_deref(),
                grant.verification_uri.as_deref(),
            ]
            .into_iter()
            .flatten()
            .find(|link| link_is_safe(link));
            let sign_in = match link {
                Some(link) => format!(
                    "<p><a class=\"go\" href=\"{}\" rel=\"noreferrer noopener\">Sign in to approve</a></p>",
                    attr(link)
                ),
                None => "<p>Open your identity provider's device sign-in page to enter it.</p>"
                    .to_owned(),
            };
            format!(
                "<p>If you expected this request, confirm the code <code class=\"code\">{}</code> at your identity provider and sign in:</p>\n{sign_in}\n<p class=\"small\">If you did not expect it, do nothing: the request expires by itself.</p>",
                text(code),
            )
        }
        state => format!(
            "<p>This request is <strong>{}</strong>{}.</p>",
            state.as_str(),
            grant
                .end_reason
                .as_deref()
                .map(|r| format!(": {}", text(r)))
                .unwrap_or_default()
        ),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\n<title>Approve access: {env}</title>\n<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em}}th{{text-align:left;padding-right:1em;vertical-align:top}}td,th{{padding:.3em}}.code{{font-size:1.6em;letter-spacing:.1em}}.go{{display:inline-block;padding:.6em 1.2em;background:#1a5fb4;color:#fff;text-decoration:none;border-radius:4px}}.small{{color:#555;font-size:.9em}}</style>\n</head><body>\n<h1>An agent asks for access</h1>\n<table>\n{table}</table>\n{action}\n</body></html>\n",
        env = text(&grant.environment),
    )
}
