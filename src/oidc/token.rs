//! Polling the token endpoint (RFC 8628 §3.4–3.5), verifying the ID token, and reading the
//! approver's claims from the ID token or, when it lacks them, from userinfo.

use std::collections::HashMap;
use std::time::Duration;

use openidconnect::core::{
    CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm, CoreTokenType,
};
use openidconnect::{
    AccessToken, AdditionalClaims, ClaimsVerificationError, ClientId, EmptyExtraTokenFields,
    IdTokenFields, OAuth2TokenResponse, SignatureVerificationError, StandardTokenResponse,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::{
    Approver, CLOCK_SKEW_SECONDS, ErrorBody, Fault, Oidc, PollOutcome, client_secret, read_capped,
    without_url,
};
use crate::clock::UnixSeconds;
use crate::tenants::IdpSettings;

/// An ID token issued longer ago than this is not accepted as a fresh approval.
const MAX_TOKEN_AGE_SECONDS: i64 = 600;
/// Waits before the 2nd and 3rd userinfo attempt when the endpoint fails transiently (the tokens
/// cannot be fetched again: the device code is spent).
const USERINFO_RETRIES: [Duration; 2] = [Duration::from_millis(300), Duration::from_secs(1)];

/// Every claim beyond the standard ones, so that the approver and groups claims are configurable.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub(super) struct OtherClaims(HashMap<String, Value>);
impl AdditionalClaims for OtherClaims {}

pub(super) type TokenResponse = StandardTokenResponse<
    IdTokenFields<
        OtherClaims,
        EmptyExtraTokenFields,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >,
    CoreTokenType,
>;

type IdTokenClaims = openidconnect::IdTokenClaims<OtherClaims, CoreGenderClaim>;

impl Oidc {
    /// Polls the token endpoint once for `device_code`.
    pub async fn poll(
        &self,
        idp: &IdpSettings,
        device_code: &SecretString,
        now: UnixSeconds,
    ) -> PollOutcome {
        let discovered = match self.metadata(&idp.issuer, false).await {
            Ok(d) => d,
            Err(fault) => return PollOutcome::Unavailable(fault.reason().to_owned()),
        };
        let secret = match client_secret(idp) {
            Ok(secret) => secret,
            Err(e) => return PollOutcome::Unavailable(e.to_string()),
        };
        let Some(token_url) = discovered.metadata.token_endpoint() else {
            return PollOutcome::Rejected("the IdP announces no token endpoint".to_owned());
        };
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code.expose_secret()),
            ("client_id", idp.client_id.as_str()),
        ];
        if let Some(secret) = &secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let response = match self
            .http
            .post(token_url.url().as_str())
            .form(&form)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return PollOutcome::Unavailable(format!(
                    "token endpoint unreachable: {}",
                    without_url(e)
                ));
            }
        };
        let status = response.status();
        let body = match read_capped(response).await {
            Ok(b) => b,
            Err(fault) => {
                return PollOutcome::Unavailable(format!(
                    "token response unusable: {}",
                    fault.reason()
                ));
            }
        };
        if status.is_server_error() {
            return PollOutcome::Unavailable(format!("token endpoint answered {status}"));
        }
        if !status.is_success() {
            return match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) if e.error == "authorization_pending" => PollOutcome::Pending,
                Ok(e) if e.error == "slow_down" => PollOutcome::SlowDown,
                Ok(e) if e.error == "access_denied" => PollOutcome::Denied,
                Ok(e) if e.error == "expired_token" => PollOutcome::Expired,
                Ok(e) => PollOutcome::Rejected(format!(
                    "the identity provider refused the device code ({})",
                    e.code()
                )),
                Err(_) => PollOutcome::Unavailable(format!(
                    "token endpoint answered {status} without an OAuth error"
                )),
            };
        }
        // From here the body holds tokens: it is parsed and dropped, never logged.
        let tokens: TokenResponse = match serde_json::from_slice(&body) {
            Ok(t) => t,
            Err(_) => {
                return PollOutcome::Unavailable(
                    "token endpoint answered 200 with a malformed body".to_owned(),
                );
            }
        };
        drop(body);
        let outcome = match self.verify(idp, &tokens, None, now).await {
            Ok(approver) => PollOutcome::Approved(approver),
            Err(reason) => PollOutcome::Rejected(reason),
        };
        drop(tokens);
        outcome
    }

    /// Verifies the ID token and builds the approver from it (and userinfo when needed). With
    /// `nonce` (authorization-code sign-in), the ID token must carry exactly that nonce.
    pub(super) async fn verify(
        &self,
        idp: &IdpSettings,
        tokens: &TokenResponse,
        nonce: Option<&SecretString>,
        now: UnixSeconds,
    ) -> Result<Approver, String> {
        let Some(id_token) = tokens.extra_fields().id_token() else {
            return Err("the identity provider returned no ID token".to_owned());
        };
        let mut refreshed = false;
        let (claims, userinfo_url) = loop {
            let discovered = self
                .metadata(&idp.issuer, refreshed)
                .await
                .map_err(|f| f.reason().to_owned())?;
            let verifier = openidconnect::core::CoreIdTokenVerifier::new_public_client(
                ClientId::new(idp.client_id.clone()),
                discovered.metadata.issuer().clone(),
                discovered.metadata.jwks().clone(),
            )
            .set_allowed_algs([
                CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
                CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
                CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
                CoreJwsSigningAlgorithm::RsaSsaPssSha256,
                CoreJwsSigningAlgorithm::EcdsaP256Sha256,
                CoreJwsSigningAlgorithm::EcdsaP384Sha384,
                CoreJwsSigningAlgorithm::EdDsa,
            ]);
            // The device flow carries no nonce; a code sign-in must return the one it sent.
            let nonce_check = |got: Option<&openidconnect::Nonce>| match nonce {
                None => Ok(()),
                Some(sent) => {
                    let same: bool = got
                        .map(|n| n.secret().as_bytes())
                        .unwrap_or_default()
                        .ct_eq(sent.expose_secret().as_bytes())
                        .into();
                    if same {
                        Ok(())
                    } else {
                        Err("the nonce differs from the one sent".to_owned())
                    }
                }
            };
            match id_token.claims(&verifier, nonce_check) {
                Ok(claims) => {
                    let userinfo = discovered
                        .metadata
                        .userinfo_endpoint()
                        .map(|u| u.url().to_string());
                    break (claims.clone(), userinfo);
                }
                Err(ClaimsVerificationError::SignatureVerification(
                    SignatureVerificationError::NoMatchingKey,
                )) if !refreshed => refreshed = true,
                Err(e) => return Err(format!("the ID token does not verify: {e}")),
            }
        };
        check_times(&claims, now)?;
        let id_claims = claim_map(&claims);
        let userinfo = match userinfo_url {
            Some(url) if lacks_claims(idp, &id_claims) => Some(
                self.userinfo(&url, tokens.access_token(), claims.subject().as_str())
                    .await
                    .map_err(|reason| {
                        format!(
                            "the ID token lacks the approver's email or groups and the identity provider's userinfo endpoint did not supply them: {reason}"
                        )
                    })?,
            ),
            _ => None,
        };
        Ok(approver_from(idp, &claims, &id_claims, userinfo.as_ref()))
    }

    /// The userinfo claims for the access token, checked to be about `subject` (OIDC Core 5.3.2).
    async fn userinfo(
        &self,
        url: &str,
        access_token: &AccessToken,
        subject: &str,
    ) -> Result<Map<String, Value>, String> {
        let mut waits = USERINFO_RETRIES.iter();
        let body = loop {
            match self.userinfo_once(url, access_token).await {
                Ok(body) => break body,
                Err(Fault::Transient(reason)) => match waits.next() {
                    Some(wait) => tokio::time::sleep(*wait).await,
                    None => return Err(reason),
                },
                Err(Fault::Config(reason)) => return Err(reason),
            }
        };
        let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(&body) else {
            return Err("it answered with something that is not a JSON object".to_owned());
        };
        if claims.get("sub").and_then(Value::as_str) != Some(subject) {
            return Err(
                "its answer is about another subject than the ID token (sub differs); its claims were not used"
                    .to_owned(),
            );
        }
        Ok(claims)
    }

    async fn userinfo_once(&self, url: &str, access_token: &AccessToken) -> Result<Vec<u8>, Fault> {
        let response = self
            .http
            .get(url)
            .bearer_auth(access_token.secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| Fault::Transient(format!("unreachable: {}", without_url(e))))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Fault::of_status(status, format!("it answered {status}")));
        }
        let json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if !json {
            return Err(Fault::Config(
                "it answered without application/json (signed or encrypted userinfo is not supported; register the client for plain JSON userinfo)"
                    .to_owned(),
            ));
        }
        read_capped(response).await
    }
}

/// `iat` neither in the future nor stale; `auth_time`, when present, not in the future.
fn check_times(claims: &IdTokenClaims, now: UnixSeconds) -> Result<(), String> {
    let issued = claims.issue_time().timestamp();
    if issued > now + CLOCK_SKEW_SECONDS {
        return Err("the ID token was issued in the future (iat)".to_owned());
    }
    if issued < now - MAX_TOKEN_AGE_SECONDS {
        return Err("the ID token is too old to approve with (iat)".to_owned());
    }
    if let Some(at) = claims.auth_time().map(|t| t.timestamp())
        && at > now + CLOCK_SKEW_SECONDS
    {
        return Err(format!(
            "the ID token says the approver signed in {} s in the future (auth_time); the identity provider's clock or token is wrong",
            at - now
        ));
    }
    Ok(())
}

/// Every claim of the verified ID token as JSON (standard and additional ones alike).
fn claim_map(claims: &IdTokenClaims) -> Map<String, Value> {
    match serde_json::to_value(claims) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// Whether the ID token lacks a claim the policy may need, so that userinfo should be asked.
fn lacks_claims(idp: &IdpSettings, id_claims: &Map<String, Value>) -> bool {
    let name_claim = match idp.approver_claim.as_str() {
        "sub" => None,
        claim => Some(claim),
    };
    ["email", idp.groups_claim.as_str()]
        .into_iter()
        .chain(name_claim)
        .any(|claim| !id_claims.contains_key(claim))
}

/// The approver, from the ID token's claims first and userinfo's second. An email and its
/// `email_verified` always come from the same place.
fn approver_from(
    idp: &IdpSettings,
    claims: &IdTokenClaims,
    id_claims: &Map<String, Value>,
    userinfo: Option<&Map<String, Value>>,
) -> Approver {
    let sources: Vec<&Map<String, Value>> = std::iter::once(id_claims).chain(userinfo).collect();
    let first = |claim: &str| sources.iter().find_map(|s| s.get(claim));
    let subject = claims.subject().to_string();
    let (email, verified) = sources
        .iter()
        .find_map(|s| {
            let email = s.get("email")?.as_str()?;
            let verified = s.get("email_verified").is_some_and(is_true);
            Some((email.to_owned(), verified))
        })
        .map_or((None, false), |(e, v)| (Some(e), v));
    let shown_email = email.as_ref().map(|e| {
        if verified {
            e.clone()
        } else {
            format!("{e} (unverified)")
        }
    });
    let name = match idp.approver_claim.as_str() {
        "sub" => Some(subject.clone()),
        "email" => shown_email,
        claim => first(claim).and_then(Value::as_str).map(str::to_owned),
    };
    let groups = match first(&idp.groups_claim) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    };
    Approver {
        subject,
        name,
        email: email.filter(|_| verified),
        groups,
        auth_time: claims.auth_time().map(|t| t.timestamp()),
        acr: claims.auth_context_ref().map(|a| a.to_string()),
        amr: claims
            .auth_method_refs()
            .map(|list| list.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default(),
    }
}

/// `true`, or the string `"true"` some providers send.
fn is_true(value: &Value) -> bool {
    matches!(value, Value::Bool(true)) || value.as_str() == Some("true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(approver_claim: &str) -> IdpSettings {
        IdpSettings {
            issuer: "https://idp.example.com".into(),
            client_id: "custodian".into(),
            client_secret: None,
            scopes: "openid email".into(),
            approver_claim: approver_claim.into(),
            groups_claim: "groups".into(),
        }
    }

    fn id_token(extra: Value) -> IdTokenClaims {
        let mut claims = json!({
            "iss": "https://idp.example.com", "aud": "custodian", "sub": "u1",
            "iat": 1_000, "exp": 2_000, "auth_time": 990,
        });
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(claims).unwrap()
    }

    fn approver(idp: &IdpSettings, claims: &IdTokenClaims, userinfo: Option<Value>) -> Approver {
        let userinfo = userinfo.map(|u| u.as_object().unwrap().clone());
        approver_from(idp, claims, &claim_map(claims), userinfo.as_ref())
    }

    #[test]
    fn claims_missing_from_the_id_token_come_from_userinfo() {
        let idp = settings("email");
        let bare = id_token(json!({}));
        assert!(lacks_claims(&idp, &claim_map(&bare)));
        let found = approver(
            &idp,
            &bare,
            Some(
                json!({"sub": "u1", "email": "a@example.com", "email_verified": true, "groups": ["ops"]}),
            ),
        );
        assert_eq!(found.email.as_deref(), Some("a@example.com"));
        assert_eq!(found.name.as_deref(), Some("a@example.com"));
        assert_eq!(found.groups, ["ops"]);
        assert_eq!(found.auth_time, Some(990));
        // A complete ID token needs no userinfo, and wins over it.
        let full =
            id_token(json!({"email": "b@example.com", "email_verified": true, "groups": "one"}));
        assert!(!lacks_claims(&idp, &claim_map(&full)));
        let found = approver(&idp, &full, Some(json!({"sub": "u1", "groups": ["other"]})));
        assert_eq!(found.email.as_deref(), Some("b@example.com"));
        assert_eq!(found.groups, ["one"]);
        // A custom approver claim (here a standard one) is looked up the same way.
        let idp = settings("preferred_username");
        let named = id_token(json!({"preferred_username": "bee"}));
        assert_eq!(approver(&idp, &named, None).name.as_deref(), Some("bee"));
        assert!(lacks_claims(&idp, &claim_map(&bare)));
    }

    #[test]
    fn an_email_counts_only_when_verified_where_it_came_from() {
        let idp = settings("email");
        // In the ID token without email_verified: not verified, even if userinfo says so.
        let unmarked = id_token(json!({"email": "a@example.com", "groups": []}));
        let found = approver(
            &idp,
            &unmarked,
            Some(json!({"sub": "u1", "email_verified": true})),
        );
        assert_eq!(found.email, None);
        assert_eq!(found.name.as_deref(), Some("a@example.com (unverified)"));
        for verified in [json!(false), json!("false"), json!(null)] {
            let found = approver(
                &idp,
                &id_token(json!({})),
                Some(json!({"sub": "u1", "email": "a@example.com", "email_verified": verified})),
            );
            assert_eq!(found.email, None, "{verified}");
        }
        let found = approver(
            &idp,
            &id_token(json!({})),
            Some(json!({"sub": "u1", "email": "a@example.com", "email_verified": "true"})),
        );
        assert_eq!(found.email.as_deref(), Some("a@example.com"));
    }

    #[test]
    fn issue_and_sign_in_times_are_checked_against_the_clock() {
        let claims = id_token(json!({}));
        assert!(check_times(&claims, 1_010).is_ok());
        assert!(
            check_times(&claims, 1_000 - 61)
                .unwrap_err()
                .contains("(iat)")
        );
        assert!(
            check_times(&claims, 1_000 + 601)
                .unwrap_err()
                .contains("too old")
        );
        let ahead = id_token(json!({"auth_time": 1_100}));
        assert!(check_times(&ahead, 1_000 + 41).is_ok());
        let refused = check_times(&ahead, 1_010).unwrap_err();
        assert!(
            refused.contains("90 s in the future (auth_time)"),
            "{refused}"
        );
    }
}
