//! Access tokens minted by this replica, cached per grant (memory only, never past the grant).

use secrecy::SecretString;
use std::collections::HashMap;
use std::sync::Mutex;

use super::endpoint::Minted;
use crate::oidc::HttpClient;

/// Identifies a cached access token: never shared between grants. A client secret's version is
/// part of it (a new secret mints new tokens); a refresh token's is not, because every refresh
/// that the IdP rotates stores a new version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) tenant: String,
    pub(super) grant: String,
    pub(super) name: String,
    pub(super) version: Option<i64>,
}

struct Cached {
    token: SecretString,
    until_ms: i64,
}

/// Access tokens minted by this replica, per grant, and the HTTP client that mints them.
pub struct Tokens {
    pub(super) http: HttpClient,
    cache: Mutex<HashMap<Key, Cached>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokens {
    pub fn new() -> Self {
        Self {
            http: HttpClient(crate::oidc::http_client()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How many tokens are cached (expired ones excluded): for tests and metrics.
    pub fn cached(&self, now_ms: i64) -> usize {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.until_ms > now_ms);
        cache.len()
    }

    pub(super) fn get(&self, key: &Key, now_ms: i64) -> Option<SecretString> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.until_ms > now_ms);
        cache.get(key).map(|c| c.token.clone())
    }

    pub(super) fn put(&self, key: Key, token: SecretString, until_ms: i64, now_ms: i64) {
        if until_ms <= now_ms {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.until_ms > now_ms);
        cache.insert(key, Cached { token, until_ms });
    }
}

/// Until when a token may be reused: its expiry minus a margin (a run must not start with a
/// token about to expire), never past the grant's end; `None`: not at all.
pub(super) fn reusable_until(minted: &Minted, now_ms: i64, grant_end_ms: i64) -> i64 {
    let Some(lifetime) = minted.expires_in else {
        return now_ms;
    };
    let lifetime = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 2);
    let margin = (lifetime / 2).min(60_000);
    (now_ms + lifetime - margin).min(grant_end_ms)
}
