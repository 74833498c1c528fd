//! Sign-in at a tenant's IdP with the authorization-code flow and PKCE (S256), for Custodian's own
//! authorization server (`crate::oauth`): the engineer signs in at the company IdP, Custodian
//! redeems the code at the IdP's token endpoint and keeps only who signed in.
//!
//! Guarantees:
//! - Every sign-in has its own PKCE verifier, `state` and `nonce`; the ID token must carry the
//!   nonce, and it is verified exactly as an approval's (signature, `iss`, `aud`, `exp`, `iat`).
//! - When the IdP names itself in the redirect (`iss`, RFC 9207), it must be the tenant's issuer.
//! - The code, the verifier and every IdP token stay in secret types and are dropped here; none
//!   appears in a log line or an error.

use openidconnect::{PkceCodeChallenge, PkceCodeVerifier};
use secrecy::{ExposeSecret, SecretString};

use super::token::TokenResponse;
use super::{Approver, ErrorBody, Oidc, OidcError, client_secret, read_capped, without_url};
use crate::clock::UnixSeconds;
use crate::tenants::IdpSettings;

/// What the sign-in at the IdP needs to be completed later.
pub struct SignInRequest<'a> {
    /// Custodian's callback for the tenant, registered at the IdP.
    pub redirect_uri: &'a str,
    pub state: &'a SecretString,
    pub verifier: &'a SecretString,
    pub nonce: &'a SecretString,
}

impl Oidc {
    /// The IdP's authorization URL for a code + PKCE sign-in.
    pub async fn authorization_url(
        &self,
        idp: &IdpSettings,
        request: &SignInRequest<'_>,
    ) -> Result<url::Url, OidcError> {
        let discovered = self
            .metadata(&idp.issuer, false)
            .await
            .map_err(|f| f.into_error(&idp.issuer))?;
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
            request.verifier.expose_secret().to_owned(),
        ));
        let mut url = discovered.metadata.authorization_endpoint().url().clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &idp.client_id)
            .append_pair("redirect_uri", request.redirect_uri)
            .append_pair("scope", &idp.scopes)
            .append_pair("state", request.state.expose_secret())
            .append_pair("nonce", request.nonce.expose_secret())
            .append_pair("code_challenge", challenge.as_str())
            .append_pair("code_challenge_method", "S256");
        Ok(url)
    }

    /// Redeems `code` at the IdP and returns who signed in. `iss` is the redirect's `iss`
    /// parameter, if the IdP sent one. The reason of a failure is safe to show.
    pub async fn redeem_code(
        &self,
        idp: &IdpSettings,
        code: &SecretString,
        iss: Option<&str>,
        request: &SignInRequest<'_>,
        now: UnixSeconds,
    ) -> Result<Approver, String> {
        if iss.is_some_and(|iss| iss != idp.issuer) {
            return Err("the sign-in came back from another issuer than the tenant's".to_owned());
        }
        let discovered = self
            .metadata(&idp.issuer, false)
            .await
            .map_err(|f| f.reason().to_owned())?;
        let Some(token_url) = discovered.metadata.token_endpoint() else {
            return Err("the identity provider announces no token endpoint".to_owned());
        };
        let secret = client_secret(idp).map_err(|e| e.to_string())?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.expose_secret()),
            ("redirect_uri", request.redirect_uri),
            ("client_id", idp.client_id.as_str()),
            ("code_verifier", request.verifier.expose_secret()),
        ];
        if let Some(secret) = &secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let response = self
            .http
            .post(token_url.url().as_str())
            .form(&form)
            .send()
            .await
            .map_err(|e| format!("token endpoint unreachable: {}", without_url(e)))?;
        drop(form);
        let status = response.status();
        let body = read_capped(response)
            .await
            .map_err(|f| format!("token response unusable: {}", f.reason()))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => format!("the identity provider refused the code ({})", e.describe()),
                Err(_) => format!("the identity provider's token endpoint answered {status}"),
            });
        }
        // From here the body holds tokens: it is parsed and dropped, never logged.
        let tokens: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| "token endpoint answered 200 with a malformed body".to_owned())?;
        drop(body);
        let approver = self.verify(idp, &tokens, Some(request.nonce), now).await;
        drop(tokens);
        approver
    }
}
