//! Requests to the token endpoint (through the `oauth2` crate) and what is said of their failures.

use std::time::Duration;

use oauth2::basic::{BasicClient, BasicErrorResponse, BasicRequestTokenError};
use oauth2::{AuthType, ClientId, ClientSecret, RefreshToken, Scope, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretString};

use super::{ClientAuth, Settings, Stored, Tokens};
use crate::oidc::printable;

/// A token the endpoint answered with.
pub(super) struct Minted {
    pub(super) access_token: SecretString,
    pub(super) expires_in: Option<Duration>,
    pub(super) refresh_token: Option<SecretString>,
}

/// One request to the token endpoint.
pub(super) async fn request(
    tokens: &Tokens,
    settings: &Settings,
    stored: &Stored,
) -> Result<Minted, String> {
    let token_url = TokenUrl::new(settings.token_url.clone()).map_err(|e| e.to_string())?;
    let mut client = BasicClient::new(ClientId::new(settings.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(match settings.client_auth {
            ClientAuth::Basic => AuthType::BasicAuth,
            ClientAuth::Post => AuthType::RequestBody,
        });
    if let Some(secret) = &stored.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
    }
    let scopes: Vec<Scope> = settings
        .scope
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(|s| Scope::new(s.to_owned()))
        .collect();
    let extra: Vec<(&str, &String)> = [
        ("audience", settings.audience.as_ref()),
        ("resource", settings.resource.as_ref()),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect();
    let answer = match &stored.refresh_token {
        None => {
            let mut request = client.exchange_client_credentials().add_scopes(scopes);
            for (name, value) in &extra {
                request = request.add_extra_param(*name, (*value).clone());
            }
            request.request_async(&tokens.http).await
        }
        Some(refresh) => {
            let refresh = RefreshToken::new(refresh.expose_secret().to_owned());
            let mut request = client.exchange_refresh_token(&refresh).add_scopes(scopes);
            for (name, value) in &extra {
                request = request.add_extra_param(*name, (*value).clone());
            }
            request.request_async(&tokens.http).await
        }
    };
    let answer = answer.map_err(describe)?;
    Ok(Minted {
        access_token: SecretString::from(answer.access_token().secret().as_str()),
        expires_in: answer.expires_in(),
        refresh_token: answer
            .refresh_token()
            .map(|t| SecretString::from(t.secret().as_str())),
    })
}

/// What went wrong at the token endpoint, without anything it or we sent.
fn describe(error: BasicRequestTokenError<reqwest::Error>) -> String {
    use oauth2::RequestTokenError;
    match error {
        RequestTokenError::ServerResponse(answer) => describe_refusal(&answer),
        RequestTokenError::Request(e) => format!(
            "the token endpoint could not be reached: {}",
            printable(&crate::error_chain(&e.without_url()), 300)
        ),
        RequestTokenError::Parse(..) => {
            "the token endpoint's answer is not a token response".to_owned()
        }
        RequestTokenError::Other(text) => {
            format!(
                "the token endpoint answered unexpectedly: {}",
                printable(&text, 200)
            )
        }
    }
}

fn describe_refusal(answer: &BasicErrorResponse) -> String {
    let code = printable(answer.error().as_ref(), 64);
    match answer.error_description() {
        Some(d) if !d.trim().is_empty() => {
            format!("the token endpoint refused: {code} ({})", printable(d, 200))
        }
        _ => format!("the token endpoint refused: {code}"),
    }
}
