//! A development-only OpenID Provider with the device flow, embedded in `custodian dev` so that the
//! gateway uses its real OIDC code path (discovery, JWKS, signed ID tokens) on a laptop.
//!
//! Guarantees:
//! - It can only be started with a [`DevModeOnly`] marker, which only `custodian dev` creates, and it
//!   refuses any address that is not loopback.
//! - It signs ES256 ID tokens with a key generated at start and never written anywhere.
//! - Approval (the page's button or `custodian dev approve CODE`) needs the user code; browser
//!   form posts from another origin are refused.
//! - Sign-in with the authorization-code flow (for `codex mcp login` against `custodian dev`)
//!   requires PKCE S256, redirects only to loopback `http` URIs, and its codes work once within
//!   a minute; the ID token carries the request's nonce.
//!
//! It is not an identity provider for anything real: everyone who can reach the loopback port can
//! approve as the single dev user.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Proof that the caller is `custodian dev`. Only that command constructs it.
pub struct DevModeOnly(());

impl DevModeOnly {
    /// Only for `custodian dev`.
    pub(crate) fn assert_dev_mode() -> Self {
        Self(())
    }
}

/// The client id the dev gateway registers as.
pub const DEV_CLIENT_ID: &str = "custodian-dev";
/// The one user of the dev IdP.
pub const DEV_USER: &str = "dev-approver";
pub const DEV_EMAIL: &str = "approver@custodian.dev";

const DEVICE_CODE_TTL: Duration = Duration::from_secs(600);
const INTERVAL_SECONDS: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Pending,
    Approved { at: i64 },
    Denied,
}

struct DeviceEntry {
    user_code: String,
    client_id: String,
    created: Instant,
    decision: Decision,
}

/// An authorization request waiting for the sign-in button, or a code waiting for redemption.
#[derive(Clone)]
struct CodeEntry {
    redirect_uri: String,
    state: Option<String>,
    nonce: Option<String>,
    challenge: String,
    created: Instant,
}

const CODE_TTL: Duration = Duration::from_secs(60);
const SIGN_IN_TTL: Duration = Duration::from_secs(600);

struct Inner {
    issuer: String,
    key: EncodingKey,
    jwk: serde_json::Value,
    devices: Mutex<HashMap<String, DeviceEntry>>,
    /// Authorization requests by request id, until the button is pressed.
    sign_ins: Mutex<HashMap<String, CodeEntry>>,
    /// Issued authorization codes.
    codes: Mutex<HashMap<String, CodeEntry>>,
}

/// A running dev IdP.
pub struct DevIdp {
    pub issuer: String,
    stop: CancellationToken,
}

impl DevIdp {
    /// Starts the dev IdP on `addr` (loopback only).
    pub async fn start(_: DevModeOnly, addr: SocketAddr) -> anyhow::Result<Self> {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "the dev identity provider only binds to loopback addresses (got {addr})"
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let issuer = format!("http://{}", listener.local_addr()?);
        let key_pair = rcgen::KeyPair::generate()?;
        let key = EncodingKey::from_ec_der(&key_pair.serialize_der());
        let point = key_pair.public_key_raw();
        anyhow::ensure!(
            point.len() == 65 && point[0] == 4,
            "unexpected P-256 public key shape"
        );
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "dev-1",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        let inner = Arc::new(Inner {
            issuer: issuer.clone(),
            key,
            jwk,
            devices: Mutex::new(HashMap::new()),
            sign_ins: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
        });
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/device/auth", post(device_authorization))
            .route("/token", post(token))
            .route("/device", get(device_page))
            .route("/device/approve", post(approve))
            .route("/device/deny", post(deny))
            .route("/authorize", get(authorize))
            .route("/authorize/approve", post(authorize_approve))
            .with_state(inner);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(Self { issuer, stop })
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or(0)
}

fn random(bytes: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut out);
    out
}

/// Eight letters from an alphabet without look-alikes, shown as XXXX-XXXX.
fn user_code() -> String {
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let letters: String = random(8)
        .into_iter()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()] as char)
        .collect();
    format!("{}-{}", &letters[..4], &letters[4..])
}

async fn discovery(State(idp): State<Arc<Inner>>) -> Json<serde_json::Value> {
    let i = &idp.issuer;
    Json(json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/authorize"),
        "token_endpoint": format!("{i}/token"),
        "device_authorization_endpoint": format!("{i}/device/auth"),
        "jwks_uri": format!("{i}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code", "authorization_code"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": true,
        "scopes_supported": ["openid", "email", "profile", "groups"],
        "claims_supported": ["sub", "email", "groups", "auth_time", "amr"],
    }))
}

async fn jwks(State(idp): State<Arc<Inner>>) -> Json<serde_json::Value> {
    Json(json!({ "keys": [idp.jwk] }))
}

#[derive(Deserialize)]
struct DeviceAuthForm {
    client_id: String,
}

async fn device_authorization(
    State(idp): State<Arc<Inner>>,
    Form(form): Form<DeviceAuthForm>,
) -> Response {
    if form.client_id != DEV_CLIENT_ID {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let device_code = URL_SAFE_NO_PAD.encode(random(32));
    let code = user_code();
    idp.devices
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            device_code.clone(),
            DeviceEntry {
                user_code: code.clone(),
                client_id: form.client_id,
                created: Instant::now(),
                decision: Decision::Pending,
            },
        );
    let verification = format!("{}/device", idp.issuer);
    Json(json!({
        "device_code": device_code,
        "user_code": code,
        "verification_uri": verification,
        "verification_uri_complete": format!("{verification}?user_code={code}"),
        "expires_in": DEVICE_CODE_TTL.as_secs(),
        "interval": INTERVAL_SECONDS,
    }))
    .into_response()
}

fn oauth_error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({ "error": code }))).into_response()
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    #[serde(default)]
    device_code: String,
    client_id: String,
    code: Option<String>,
    code_verifier: Option<String>,
    redirect_uri: Option<String>,
}

async fn token(State(idp): State<Arc<Inner>>, Form(form): Form<TokenForm>) -> Response {
    if form.grant_type == "authorization_code" {
        return redeem(&idp, &form);
    }
    if form.grant_type != "urn:ietf:params:oauth:grant-type:device_code" {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let decision = {
        let mut devices = idp.devices.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = devices.get(&form.device_code) else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        };
        if entry.client_id != form.client_id {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        }
        if entry.created.elapsed() > DEVICE_CODE_TTL {
            devices.remove(&form.device_code);
            return oauth_error(StatusCode::BAD_REQUEST, "expired_token");
        }
        let decision = entry.decision;
        if decision != Decision::Pending {
            devices.remove(&form.device_code);
        }
        decision
    };
    let auth_time = match decision {
        Decision::Pending => return oauth_error(StatusCode::BAD_REQUEST, "authorization_pending"),
        Decision::Denied => return oauth_error(StatusCode::BAD_REQUEST, "access_denied"),
        Decision::Approved { at } => at,
    };
    tokens(&idp, &form.client_id, auth_time, None)
}

/// Signed tokens for the dev user.
fn tokens(idp: &Inner, client_id: &str, auth_time: i64, nonce: Option<&str>) -> Response {
    let issued = now();
    let mut claims = json!({
        "iss": idp.issuer, "aud": client_id, "sub": DEV_USER, "email": DEV_EMAIL,
        "email_verified": true, "groups": ["developers"], "iat": issued, "exp": issued + 300,
        "auth_time": auth_time, "amr": ["pwd"],
    });
    if let Some(nonce) = nonce {
        claims["nonce"] = nonce.into();
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("dev-1".to_owned());
    let Ok(id_token) = jsonwebtoken::encode(&header, &claims, &idp.key) else {
        return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error");
    };
    Json(json!({
        "access_token": URL_SAFE_NO_PAD.encode(random(32)),
        "token_type": "Bearer",
        "expires_in": 300,
        "id_token": id_token,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct CodeQuery {
    user_code: Option<String>,
}

async fn device_page(Query(query): Query<CodeQuery>) -> Response {
    let code =
        html_escape::encode_double_quoted_attribute(query.user_code.as_deref().unwrap_or(""))
            .into_owned();
    let page = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Custodian dev sign-in</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:32em;margin:2em auto\">\
         <h1>Custodian dev identity provider</h1>\
         <p>Development only: approving signs you in as <strong>{DEV_EMAIL}</strong>.</p>\
         <form method=\"post\" action=\"/device/approve\"><label>Code <input name=\"user_code\" value=\"{code}\"></label> \
         <button type=\"submit\">Approve</button></form>\
         <form method=\"post\" action=\"/device/deny\"><input type=\"hidden\" name=\"user_code\" value=\"{code}\"> \
         <button type=\"submit\">Deny</button></form></body></html>"
    );
    (
        [
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(page),
    )
        .into_response()
}

#[derive(Deserialize)]
struct DecideForm {
    user_code: String,
}

fn decide(idp: &Inner, headers: &HeaderMap, user_code: &str, decision: Decision) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN)
        && origin.to_str().ok() != Some(idp.issuer.as_str())
    {
        return (StatusCode::FORBIDDEN, "cross-origin form posts are refused").into_response();
    }
    let wanted = user_code.trim().to_ascii_uppercase();
    let mut devices = idp.devices.lock().unwrap_or_else(|e| e.into_inner());
    let entry = devices
        .values_mut()
        .find(|e| e.user_code == wanted && e.decision == Decision::Pending);
    match entry {
        Some(entry) => {
            entry.decision = decision;
            let verb = if decision == Decision::Denied {
                "denied"
            } else {
                "approved"
            };
            Html(format!(
                "<!DOCTYPE html><p>Request {verb}. You can close this page.</p>"
            ))
            .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no pending request with that code").into_response(),
    }
}

async fn approve(
    State(idp): State<Arc<Inner>>,
    headers: HeaderMap,
    Form(form): Form<DecideForm>,
) -> Response {
    decide(
        &idp,
        &headers,
        &form.user_code,
        Decision::Approved { at: now() },
    )
}

async fn deny(
    State(idp): State<Arc<Inner>>,
    headers: HeaderMap,
    Form(form): Form<DecideForm>,
) -> Response {
    decide(&idp, &headers, &form.user_code, Decision::Denied)
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

/// The sign-in page of the authorization-code flow: one button, signing in as the dev user.
async fn authorize(State(idp): State<Arc<Inner>>, Query(q): Query<AuthorizeQuery>) -> Response {
    let loopback = q
        .redirect_uri
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
        .is_some_and(|u| u.scheme() == "http" && super::is_loopback(&u));
    if q.client_id.as_deref() != Some(DEV_CLIENT_ID) || !loopback {
        return (
            StatusCode::BAD_REQUEST,
            "unknown client_id, or a redirect_uri that is not http on loopback",
        )
            .into_response();
    }
    let (Some("code"), Some("S256"), Some(challenge)) = (
        q.response_type.as_deref(),
        q.code_challenge_method.as_deref(),
        q.code_challenge,
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            "response_type=code with PKCE (code_challenge_method=S256) is required",
        )
            .into_response();
    };
    let request = URL_SAFE_NO_PAD.encode(random(16));
    {
        let mut sign_ins = idp.sign_ins.lock().unwrap_or_else(|e| e.into_inner());
        sign_ins.retain(|_, e| e.created.elapsed() < SIGN_IN_TTL);
        sign_ins.insert(
            request.clone(),
            CodeEntry {
                redirect_uri: q.redirect_uri.unwrap_or_default(),
                state: q.state,
                nonce: q.nonce,
                challenge,
                created: Instant::now(),
            },
        );
    }
    let page = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Custodian dev sign-in</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:32em;margin:2em auto\">\
         <h1>Custodian dev identity provider</h1>\
         <p>Development only: this signs you in as <strong>{DEV_EMAIL}</strong>.</p>\
         <form method=\"post\" action=\"/authorize/approve\"><input type=\"hidden\" name=\"request\" value=\"{request}\"> \
         <button type=\"submit\">Sign in</button></form></body></html>"
    );
    (
        [
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(page),
    )
        .into_response()
}

#[derive(Deserialize)]
struct SignInForm {
    request: String,
}

async fn authorize_approve(
    State(idp): State<Arc<Inner>>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN)
        && origin.to_str().ok() != Some(idp.issuer.as_str())
    {
        return (StatusCode::FORBIDDEN, "cross-origin form posts are refused").into_response();
    }
    let entry = idp
        .sign_ins
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&form.request);
    let Some(entry) = entry.filter(|e| e.created.elapsed() < SIGN_IN_TTL) else {
        return (StatusCode::NOT_FOUND, "no such sign-in; start again").into_response();
    };
    let Ok(mut back) = url::Url::parse(&entry.redirect_uri) else {
        return (StatusCode::BAD_REQUEST, "bad redirect_uri").into_response();
    };
    let code = URL_SAFE_NO_PAD.encode(random(32));
    {
        let mut query = back.query_pairs_mut();
        query.append_pair("code", &code);
        if let Some(state) = &entry.state {
            query.append_pair("state", state);
        }
        query.append_pair("iss", &idp.issuer);
    }
    let mut codes = idp.codes.lock().unwrap_or_else(|e| e.into_inner());
    codes.retain(|_, e| e.created.elapsed() < CODE_TTL);
    codes.insert(
        code,
        CodeEntry {
            created: Instant::now(),
            ..entry
        },
    );
    axum::response::Redirect::to(back.as_str()).into_response()
}

/// Redeems an authorization code (single use, PKCE S256, same redirect URI).
fn redeem(idp: &Inner, form: &TokenForm) -> Response {
    let entry = idp
        .codes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(form.code.as_deref().unwrap_or_default());
    let Some(entry) = entry.filter(|e| e.created.elapsed() < CODE_TTL) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let verifier = form.code_verifier.as_deref().unwrap_or_default();
    let challenge =
        URL_SAFE_NO_PAD.encode(<sha2::Sha256 as sha2::Digest>::digest(verifier.as_bytes()));
    if form.client_id != DEV_CLIENT_ID
        || form.redirect_uri.as_deref() != Some(entry.redirect_uri.as_str())
        || challenge != entry.challenge
    {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let signed_in = now() - i64::try_from(entry.created.elapsed().as_secs()).unwrap_or(0);
    tokens(idp, &form.client_id, signed_in, entry.nonce.as_deref())
}
