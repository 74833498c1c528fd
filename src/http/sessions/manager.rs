//! rmcp's in-memory session manager, made safe to run on several replicas that share sessions.
//!
//! A session is served by whichever replica a request reaches; a replica that does not hold it
//! re-creates it from the database (rmcp's session store, see [`super::Sessions`]). Each replica
//! then runs its own session worker, and rmcp's SSE event ids (`<index>/<request>` counters of one
//! worker) would mean different streams on different workers.
//!
//! Guarantees:
//! - Session ids carry 256 random bits (43 base64url characters) from the OS-seeded CSPRNG.
//! - Every SSE event id handed out names the worker that produced it (a random tag per worker)
//!   and, on the answer stream of a request, that request's JSON-RPC id. A `Last-Event-ID` from
//!   another worker (another replica, or this one before the session was re-created) never
//!   resumes another stream: for a request's stream the client gets a JSON-RPC error for that
//!   request saying its answer was lost (so the client's call ends instead of reconnecting
//!   forever), for the standalone stream a fresh standalone stream.
//! - A session being re-created here is not reported as held until rmcp has replayed its
//!   handshake (`initialize`, then `notifications/initialized`) into the new worker. rmcp
//!   serializes concurrent re-creations of one session, but only for requests that find it
//!   missing; one that found it already present sent its message to the new worker before the
//!   handshake, and the worker quit (two requests of one client, e.g. its SSE stream and a call,
//!   reaching a replica together). Such a request now waits for the re-creation instead.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::{Stream, StreamExt};
use rand::RngCore;
use rmcp::model::{
    ClientJsonRpcMessage, ClientNotification, ErrorData, RequestId, ServerJsonRpcMessage,
};
use rmcp::transport::streamable_http_server::SessionId;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::session::{
    RestoreOutcome, ServerSseMessage, SessionManager,
};

/// Random bytes in a session id.
const SESSION_ID_BYTES: usize = 32;

/// What a request's answer stream carries when it was resumed where it cannot continue.
const LOST_ANSWER: &str = "the gateway replica answering this request stopped before it answered; \
its outcome is unknown: send it again (check grant_status before repeating a run)";

type SseStream = Pin<Box<dyn Stream<Item = ServerSseMessage> + Send + Sync + 'static>>;

/// [`LocalSessionManager`] with replica-safe session and event ids (see the module docs).
#[derive(Debug, Default)]
pub struct ReplicaSessionManager {
    inner: LocalSessionManager,
    /// The tag of this replica's worker for each session it holds.
    tags: Mutex<HashMap<SessionId, String>>,
    /// Sessions re-created here whose handshake has not been replayed yet.
    restoring: Mutex<HashSet<SessionId>>,
}

/// A parsed `Last-Event-ID` of ours: `<worker tag>.<request id or empty>.<rmcp's id>`.
struct EventId<'a> {
    tag: &'a str,
    request: Option<RequestId>,
    inner: &'a str,
}

impl<'a> EventId<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let mut parts = text.splitn(3, '.');
        let (tag, request, inner) = (parts.next()?, parts.next()?, parts.next()?);
        let request = match request {
            "" => None,
            encoded => {
                let json = URL_SAFE_NO_PAD.decode(encoded).ok()?;
                Some(serde_json::from_slice(&json).ok()?)
            }
        };
        Some(Self {
            tag,
            request,
            inner,
        })
    }
}

/// Rewrites rmcp's event ids on `stream` to name `tag` and `request`.
fn tagged(
    stream: impl Stream<Item = ServerSseMessage> + Send + Sync + 'static,
    tag: String,
    request: Option<&RequestId>,
) -> SseStream {
    let request = request
        .map(|id| URL_SAFE_NO_PAD.encode(serde_json::to_vec(id).expect("ids serialize")))
        .unwrap_or_default();
    Box::pin(stream.map(move |mut message| {
        if let Some(id) = message.event_id.take() {
            message.event_id = Some(format!("{tag}.{request}.{id}"));
        }
        message
    }))
}

fn random_tag() -> String {
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl ReplicaSessionManager {
    pub fn new(inner: LocalSessionManager) -> Self {
        Self {
            inner,
            tags: Mutex::default(),
            restoring: Mutex::default(),
        }
    }

    /// The in-memory manager (its session map).
    pub fn local(&self) -> &LocalSessionManager {
        &self.inner
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, String>> {
        self.tags.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn restoring(&self) -> std::sync::MutexGuard<'_, HashSet<SessionId>> {
        self.restoring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker for `id` in this replica's memory, with a fresh tag.
    async fn spawn_worker(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<<Self as SessionManager>::Transport>, LocalSessionManagerError> {
        let outcome = self.inner.restore_session(id.clone()).await?;
        if matches!(outcome, RestoreOutcome::Restored(_)) {
            self.tags().insert(id, random_tag());
        }
        Ok(outcome)
    }

    fn tag(&self, id: &SessionId) -> String {
        // A session without a tag has no worker here; rmcp's own call fails on it right after.
        self.tags().get(id).cloned().unwrap_or_default()
    }
}

impl SessionManager for ReplicaSessionManager {
    type Error = LocalSessionManagerError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let mut bytes = [0u8; SESSION_ID_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        let id: SessionId = URL_SAFE_NO_PAD.encode(bytes).into();
        match self.spawn_worker(id.clone()).await? {
            RestoreOutcome::Restored(transport) => Ok((id, transport)),
            // 256 random bits do not collide; refuse rather than share a worker if they did.
            _ => Err(LocalSessionManagerError::SessionNotFound(id)),
        }
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        // Not yet: the request goes to rmcp's restore, which waits for the one under way.
        if self.restoring().contains(id) {
            return Ok(false);
        }
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.tags().remove(id);
        self.restoring().remove(id);
        self.inner.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let request = match &message {
            ClientJsonRpcMessage::Request(request) => Some(request.id.clone()),
            _ => None,
        };
        let stream = self.inner.create_stream(id, message).await?;
        Ok(tagged(stream, self.tag(id), request.as_ref()))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        let handshake_done = matches!(
            &message,
            ClientJsonRpcMessage::Notification(n)
                if matches!(n.notification, ClientNotification::InitializedNotification(_))
        );
        let accepted = self.inner.accept_message(id, message).await;
        if handshake_done {
            // The replayed handshake is queued ahead of anything else sent to the worker.
            self.restoring().remove(id);
        }
        accepted
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let stream = self.inner.create_standalone_stream(id).await?;
        Ok(tagged(stream, self.tag(id), None))
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let tag = self.tag(id);
        let stream: SseStream = match EventId::parse(&last_event_id) {
            Some(event) if !tag.is_empty() && event.tag == tag => {
                let stream = self.inner.resume(id, event.inner.to_owned()).await?;
                tagged(stream, tag, event.request.as_ref())
            }
            // Another worker's request stream: its answer is gone with that worker.
            Some(EventId {
                request: Some(request),
                ..
            }) => {
                let error = ServerJsonRpcMessage::error(
                    ErrorData::internal_error(LOST_ANSWER, None),
                    Some(request),
                );
                Box::pin(futures::stream::once(async move {
                    ServerSseMessage::from_message(error)
                }))
            }
            // Another worker's standalone stream, or an id rmcp made (the priming `0`).
            _ => tagged(self.inner.create_standalone_stream(id).await?, tag, None),
        };
        Ok(stream)
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        // rmcp restores one session at a time: one still marked here is a restore that failed
        // before its handshake, whose worker is of no use. It is replaced.
        let failed = self.restoring().remove(&id);
        if failed {
            self.tags().remove(&id);
            let _ = self.inner.close_session(&id).await;
        }
        let outcome = self.spawn_worker(id.clone()).await?;
        if matches!(outcome, RestoreOutcome::Restored(_)) {
            self.restoring().insert(id);
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip_and_name_their_request() {
        let stream = futures::stream::iter([ServerSseMessage::priming(
            "0/3",
            std::time::Duration::from_secs(1),
        )]);
        let request = RequestId::String("a.b/c".into());
        let out = futures::executor::block_on(
            tagged(stream, "t1".into(), Some(&request)).collect::<Vec<_>>(),
        );
        let id = out[0].event_id.clone().unwrap();
        let parsed = EventId::parse(&id).unwrap();
        assert_eq!((parsed.tag, parsed.inner), ("t1", "0/3"));
        assert_eq!(parsed.request, Some(request));
        assert!(EventId::parse("0").is_none());
    }

    #[tokio::test]
    async fn a_restored_session_is_held_only_once_its_handshake_was_replayed() {
        let manager = ReplicaSessionManager::default();
        let id: SessionId = "restored-elsewhere".to_owned().into();
        let outcome = manager.restore_session(id.clone()).await.unwrap();
        assert!(matches!(outcome, RestoreOutcome::Restored(_)));
        assert!(
            !manager.has_session(&id).await.unwrap(),
            "reported before its handshake was replayed: a concurrent request would reach the worker first"
        );
        let initialized = ClientJsonRpcMessage::notification(
            ClientNotification::InitializedNotification(Default::default()),
        );
        manager.accept_message(&id, initialized).await.unwrap();
        assert!(manager.has_session(&id).await.unwrap());
        drop(outcome);

        // A restore that failed before its handshake leaves nothing that blocks the next one.
        let stuck: SessionId = "restore-failed".to_owned().into();
        let first = manager.restore_session(stuck.clone()).await.unwrap();
        drop(first);
        let again = manager.restore_session(stuck.clone()).await.unwrap();
        assert!(matches!(again, RestoreOutcome::Restored(_)));
    }

    #[tokio::test]
    async fn session_ids_carry_256_random_bits() {
        let manager = ReplicaSessionManager::default();
        let (a, _) = manager.create_session().await.unwrap();
        let (b, _) = manager.create_session().await.unwrap();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(manager.has_session(&a).await.unwrap());
        manager.close_session(&a).await.unwrap();
        assert!(!manager.has_session(&a).await.unwrap() && manager.tags().len() == 1);
    }
}
