//! Consul sessions: created with `Behavior: delete` (the keys a session holds go with it),
//! asked after, and kept alive for a leader.

use std::time::Duration;

use backend_core::keepalive::{Renew, Renewal};
use backend_core::BackendError;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::client::{successful, Client};
use crate::STORE;

/// Consul refuses session TTLs below 10 s.
pub const MIN_TTL: Duration = backend_core::StoreKind::Consul.min_session_ttl();

impl Client {
    /// Creates a session: `Behavior: delete` (its keys go with it), no lock delay.
    pub(crate) async fn create_session(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<String, BackendError> {
        let body = json!({
            "Name": name,
            "TTL": format!("{}s", ttl.as_secs().max(MIN_TTL.as_secs())),
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let resp = self
            .send(
                self.request(Method::PUT, "/v1/session/create").json(&body),
                "create session",
            )
            .await?;
        let resp = successful(resp, "create session").await?;
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created = resp.json().await.map_err(|e| BackendError::Rejected {
            store: STORE,
            detail: format!("create session: unreadable answer: {e}"),
            source: Some(Box::new(e)),
        })?;
        Ok(created.id)
    }

    /// Whether Consul still knows the session (`/v1/session/info` answers `null` or `[]` for
    /// one it does not).
    pub(crate) async fn session_exists(&self, id: &str) -> Result<bool, BackendError> {
        let resp = self
            .send(
                self.request(Method::GET, &format!("/v1/session/info/{id}")),
                "session info",
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        let resp = successful(resp, "session info").await?;
        let sessions: Option<Vec<serde_json::Value>> = self.decode(resp, "session info").await?;
        Ok(sessions.is_some_and(|s| !s.is_empty()))
    }
}

/// The renewal of a lock session, for [`keep_alive`](backend_core::keepalive::keep_alive): the
/// session is lost when Consul no longer knows it (404).
pub(crate) struct SessionRenewal {
    store: Client,
    session: String,
    path: String,
}

impl SessionRenewal {
    pub(crate) fn new(store: Client, session: String) -> SessionRenewal {
        SessionRenewal {
            path: format!("/v1/session/renew/{session}"),
            store,
            session,
        }
    }
}

impl Renew for SessionRenewal {
    async fn renew(&mut self) -> Renewal {
        let store = &self.store;
        match store
            .send(store.request(Method::PUT, &self.path), "renew session")
            .await
        {
            Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                Renewal::Ended(format!("session {} was ended", self.session))
            }
            Ok(resp) if resp.status().is_success() => Renewal::Renewed,
            _ => Renewal::Failed,
        }
    }
}
