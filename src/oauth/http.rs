//! The authorization server's HTTP endpoints (mounted by `crate::http::router`).
//!
//! - `GET /.well-known/oauth-authorization-server/t/{tenant}`: RFC 8414 metadata, built from the
//!   URL alone (the same for every well-formed tenant id).
//! - `POST /t/{tenant}/oauth/register`: RFC 7591 registration.
//! - `GET /t/{tenant}/oauth/authorize`: starts a sign-in; answers the consent page (naming the
//!   tenant, the client and where the result goes) and sets the consent cookie.
//! - `POST /t/{tenant}/oauth/consent`: the engineer's Allow (to the tenant's IdP, binding this
//!   browser to the sign-in with a second cookie) or Deny (back to the client).
//! - `GET /t/{tenant}/oauth/callback`: the IdP's redirect back, accepted only from the browser
//!   that allowed the sign-in; redirects to the client.
//! - `POST /t/{tenant}/oauth/token`: code redemption and refresh.
//!
//! Token answers carry `Cache-Control: no-store`; errors are OAuth error bodies. Both cookies are
//! HttpOnly, live as long as a sign-in may take, and are `Secure` with the `__Host-` prefix (hence
//! `Path=/`) when the public URL is https; otherwise their path is the tenant's OAuth endpoints.
//! The consent cookie is `SameSite=Strict` (the form is posted from this site's page); the browser
//! binding is `SameSite=Lax`, since the IdP's redirect back is a cross-site navigation.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use cookie::{Cookie, SameSite};
use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;

use super::flow::{
    self, AuthorizationRequest, CallbackQuery, Consent, Next, RegistrationRequest, Server,
    TokenRequest,
};
use super::{OAuthError, SCOPES, SIGN_IN_TTL_SECONDS};
use crate::app::App;
use crate::tenants::TenantId;

/// Largest registration or token request body read.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// The authorization server's routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/.well-known/oauth-authorization-server/t/{tenant}",
            get(metadata),
        )
        .route("/t/{tenant}/oauth/register", post(register))
        .route("/t/{tenant}/oauth/authorize", get(authorize))
        .route("/t/{tenant}/oauth/consent", post(consent))
        .route("/t/{tenant}/oauth/callback", get(callback))
        .route("/t/{tenant}/oauth/token", post(token))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
}

fn server(app: &App) -> Server<'_> {
    Server {
        db: &app.db,
        oidc: &app.oidc,
        master_key: &app.master_key,
        public_url: &app.config.server.public_url,
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::InvalidClient(_) => StatusCode::UNAUTHORIZED,
            Self::TemporarilyUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(e) => {
                return crate::http::error::HttpError::internal("OAuth request failed", e)
                    .into_response();
            }
            _ => StatusCode::BAD_REQUEST,
        };
        let body = json!({ "error": self.code(), "error_description": self.to_string() });
        (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
    }
}

fn tenant_id(tenant: &str) -> Result<TenantId, OAuthError> {
    TenantId::parse(tenant).map_err(|_| {
        OAuthError::InvalidRequest("sign-in is not available at this endpoint".to_owned())
    })
}

async fn metadata(State(app): State<Arc<App>>, Path(tenant): Path<String>) -> Response {
    let tenant = match tenant_id(&tenant) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let issuer = super::issuer(&app.config.server.public_url, tenant.as_str());
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/oauth/authorize"),
        "token_endpoint": format!("{issuer}/oauth/token"),
        "registration_endpoint": format!("{issuer}/oauth/register"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": SCOPES,
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": false,
    }))
    .into_response()
}

async fn register(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let result = async {
        let tenant = tenant_id(&tenant)?;
        let request: RegistrationRequest = serde_json::from_slice(&body).map_err(|e| {
            OAuthError::InvalidClientMetadata(format!("the registration is not valid JSON: {e}"))
        })?;
        flow::register(&server(&app), &tenant, request, app.clock.now()).await
    }
    .await;
    match result {
        Ok(registration) => (StatusCode::CREATED, Json(registration)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A page for errors that must not be redirected to an unverified redirect URI.
fn error_page(error: &OAuthError) -> Response {
    if let OAuthError::Store(_) = error {
        return crate::http::error::HttpError::internal("sign-in failed", error).into_response();
    }
    let text = html_escape::encode_text(&error.to_string()).into_owned();
    (
        StatusCode::BAD_REQUEST,
        [(header::CACHE_CONTROL, "no-store")],
        Html(format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign-in failed</title></head>\
             <body><h1>Sign-in failed</h1><p>{}: {text}</p></body></html>",
            error.code()
        )),
    )
        .into_response()
}

/// The consent page's policy: as the approval page's, but its form may be posted. `form-action`
/// is left out because browsers also apply it to the redirect that follows the post (to the IdP,
/// or to the client's loopback URI); nothing on the page runs script, and every value is escaped.
const CONSENT_CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'";

/// The two cookies of a sign-in: the consent token, and the browser binding.
#[derive(Clone, Copy)]
enum Kind {
    Consent,
    Browser,
}

/// Names, paths and flags of a tenant's sign-in cookies.
struct Cookies {
    secure: bool,
    tenant: String,
    /// The tenant's authorization server (its endpoints are below).
    issuer: String,
    path: String,
}

impl Cookies {
    fn new(public_url: &url::Url, tenant: &TenantId) -> Self {
        let issuer = super::issuer(public_url, tenant.as_str());
        let path = url::Url::parse(&issuer)
            .map(|u| format!("{}/oauth", u.path()))
            .unwrap_or_else(|_| "/".to_owned());
        Self {
            secure: public_url.scheme() == "https",
            tenant: tenant.to_string(),
            issuer,
            path,
        }
    }

    fn name(&self, kind: Kind) -> String {
        let kind = match kind {
            Kind::Consent => "consent",
            Kind::Browser => "sign-in",
        };
        let prefix = if self.secure { "__Host-" } else { "" };
        format!("{prefix}custodian-{kind}-{}", self.tenant)
    }

    /// `Set-Cookie` for `value`; an empty value removes the cookie.
    fn set(&self, kind: Kind, value: &str) -> Option<HeaderValue> {
        let same_site = match kind {
            Kind::Consent => SameSite::Strict,
            Kind::Browser => SameSite::Lax,
        };
        let max_age = if value.is_empty() {
            0
        } else {
            SIGN_IN_TTL_SECONDS
        };
        let cookie = Cookie::build((self.name(kind), value.to_owned()))
            .http_only(true)
            .secure(self.secure)
            .same_site(same_site)
            .path(if self.secure { "/" } else { self.path.as_str() })
            .max_age(cookie::time::Duration::seconds(max_age))
            .build();
        HeaderValue::from_str(&cookie.to_string()).ok()
    }

    /// The value of the `kind` cookie this browser sent.
    fn get(&self, headers: &HeaderMap, kind: Kind) -> Option<String> {
        let name = self.name(kind);
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(Cookie::split_parse)
            .filter_map(Result::ok)
            .find(|c| c.name() == name)
            .map(|c| c.value().to_owned())
    }
}

fn with_cookie(mut response: Response, cookie: Option<HeaderValue>) -> Response {
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

fn go(next: Result<Next, OAuthError>, cookies: &Cookies) -> Response {
    match next {
        Ok(Next::SignIn { url, browser }) => with_cookie(
            redirect(&url),
            cookies.set(Kind::Browser, browser.expose_secret()),
        ),
        Ok(Next::Client(url)) => redirect(&url),
        Ok(Next::Consent(consent)) => with_cookie(
            consent_page(&consent, cookies),
            cookies.set(Kind::Consent, consent.token.expose_secret()),
        ),
        Err(e) => error_page(&e),
    }
}

fn redirect(url: &url::Url) -> Response {
    let mut response = Redirect::to(url.as_str()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// The consent page: server-rendered, no scripts, every value escaped, not frameable.
fn consent_page(consent: &Consent, cookies: &Cookies) -> Response {
    let client = consent.client_name.as_deref().unwrap_or("(no name given)");
    let action = format!("{}/oauth/consent", cookies.issuer);
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Allow this sign-in?</title></head>\
         <body><h1>Allow this sign-in to Custodian?</h1>\
         <p>Tenant: <strong>{tenant}</strong></p>\
         <p>Application: <strong>{client}</strong> (the name it gave itself; not verified)</p>\
         <p>It receives access to Custodian as you at <strong>http://{redirect}</strong> on this computer, \
         after you sign in at your company's identity provider.</p>\
         <p>Allow only if you started this sign-in yourself just now (for example with <code>codex mcp login</code>).</p>\
         <form method=\"post\" action=\"{action}\"><input type=\"hidden\" name=\"consent\" value=\"{token}\">\
         <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button> \
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form></body></html>",
        tenant = text(&consent.tenant_name),
        client = text(client),
        redirect = text(&consent.redirect_to),
        action = attr(&action),
        token = attr(consent.token.expose_secret()),
    );
    crate::http::approve::with_page_headers(Html(html).into_response(), CONSENT_CSP)
}

async fn authorize(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    Query(request): Query<AuthorizationRequest>,
) -> Response {
    let tenant = match tenant_id(&tenant) {
        Ok(tenant) => tenant,
        Err(e) => return error_page(&e),
    };
    let next = flow::authorize(&server(&app), &tenant, request, app.clock.now()).await;
    go(next, &Cookies::new(&app.config.server.public_url, &tenant))
}

/// The consent page's form.
#[derive(Debug, Deserialize)]
struct ConsentForm {
    consent: Option<String>,
    decision: Option<String>,
}

async fn consent(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    form: Result<Form<ConsentForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let tenant = match tenant_id(&tenant) {
        Ok(tenant) => tenant,
        Err(e) => return error_page(&e),
    };
    let Ok(Form(form)) = form else {
        return error_page(&OAuthError::InvalidRequest(
            "send the consent page's form".to_owned(),
        ));
    };
    let allow = match form.decision.as_deref() {
        Some("allow") => true,
        Some("deny") => false,
        _ => {
            return error_page(&OAuthError::InvalidRequest(
                "decision must be allow or deny".to_owned(),
            ));
        }
    };
    let cookies = Cookies::new(&app.config.server.public_url, &tenant);
    let cookie = cookies.get(&headers, Kind::Consent);
    let next = flow::answer_consent(
        &server(&app),
        &tenant,
        (form.consent.as_deref(), cookie.as_deref()),
        allow,
        app.clock.now(),
    )
    .await;
    let answered = next.is_ok();
    let response = go(next, &cookies);
    if answered {
        with_cookie(response, cookies.set(Kind::Consent, ""))
    } else {
        response
    }
}

async fn callback(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let tenant = match tenant_id(&tenant) {
        Ok(tenant) => tenant,
        Err(e) => return error_page(&e),
    };
    let cookies = Cookies::new(&app.config.server.public_url, &tenant);
    let browser = cookies.get(&headers, Kind::Browser);
    let next = flow::finish_sign_in(
        &server(&app),
        &tenant,
        query,
        browser.as_deref(),
        app.clock.now(),
    )
    .await;
    let response = go(next, &cookies);
    if browser.is_some() {
        with_cookie(response, cookies.set(Kind::Browser, ""))
    } else {
        response
    }
}

async fn token(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    form: Result<Form<TokenRequest>, axum::extract::rejection::FormRejection>,
) -> Response {
    let result = async {
        let tenant = tenant_id(&tenant)?;
        let Form(request) = form.map_err(|_| {
            OAuthError::InvalidRequest(
                "send the token request as application/x-www-form-urlencoded".to_owned(),
            )
        })?;
        let server = server(&app);
        let now = app.clock.now();
        match request.grant_type.as_deref() {
            Some("authorization_code") => flow::redeem_code(&server, &tenant, &request, now).await,
            Some("refresh_token") => flow::refresh(&server, &tenant, &request, now).await,
            _ => Err(OAuthError::UnsupportedGrantType(
                "grant_type must be authorization_code or refresh_token".to_owned(),
            )),
        }
    }
    .await;
    match result {
        Ok(issued) => (
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
            ],
            Json(json!({
                "access_token": issued.access_token.expose_secret(),
                "token_type": "Bearer",
                "expires_in": issued.expires_in,
                "refresh_token": issued.refresh_token.expose_secret(),
                "scope": issued.scope,
            })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_host_prefixed_and_secure_behind_https() {
        let acme = TenantId::parse("acme").unwrap();
        let https = Cookies::new(
            &url::Url::parse("https://custodian.example.com").unwrap(),
            &acme,
        );
        let consent = https.set(Kind::Consent, "token").unwrap();
        let consent = consent.to_str().unwrap();
        for part in [
            "__Host-custodian-consent-acme=token",
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/;",
        ] {
            assert!(format!("{consent};").contains(part), "{part}: {consent}");
        }
        let browser = https.set(Kind::Browser, "b").unwrap();
        assert!(browser.to_str().unwrap().contains("SameSite=Lax"));
        let http = Cookies::new(
            &url::Url::parse("http://127.0.0.1:8080/base/").unwrap(),
            &acme,
        );
        let consent = http.set(Kind::Consent, "token").unwrap();
        let consent = consent.to_str().unwrap();
        assert!(
            consent.starts_with("custodian-consent-acme=token"),
            "{consent}"
        );
        assert!(consent.contains("Path=/base/t/acme/oauth"), "{consent}");
        assert!(!consent.contains("Secure"), "{consent}");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("other=1; custodian-consent-acme=abc"),
        );
        assert_eq!(http.get(&headers, Kind::Consent).as_deref(), Some("abc"));
        assert_eq!(http.get(&headers, Kind::Browser), None);
    }
}
