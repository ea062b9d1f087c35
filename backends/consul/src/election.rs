//! Leader election on Consul: a session with a TTL and a lock on the key (`?acquire=`), as
//! `consul lock` does; plain values beside it.

use std::time::Duration;

use backend_core::keepalive::keep_alive;
use backend_core::{
    BackendError, Coordinator, Fence, FenceToken, Leadership, LeaseDeadline, Result,
};
use futures::FutureExt;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::client::{consul_index, expect_success, Client, REQUEST_TIMEOUT};
use crate::kv::{encode_key, list, next_index};
use crate::session::{SessionRenewal, MIN_TTL};
use crate::watch::WATCH_WAIT;
use crate::{ConsulStore, STORE};

/// Whether a lock key is held by a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockState {
    Free,
    Held,
}

impl Client {
    /// Tries to acquire `key` for `session`; `Ok(true)` when it holds the lock.
    pub(crate) async fn try_acquire(
        &self,
        key: &str,
        session: &str,
        holder: &str,
    ) -> Result<bool, BackendError> {
        let path = format!("/v1/kv/{}?acquire={session}", encode_key(key));
        let what = format!("acquire the lock {key}");
        let resp = self
            .send(
                self.request(Method::PUT, &path).body(holder.to_string()),
                &what,
            )
            .await?;
        if !resp.status().is_success() {
            expect_success(resp, &what).await?;
            return Ok(false);
        }
        let text = resp.text().await.unwrap_or_default();
        Ok(text.trim() == "true")
    }

    /// Waits (blocking query) until `key` changes or `wait` passes, and says whether it is
    /// held by a session now.
    pub(crate) async fn wait_for_free_lock(
        &self,
        key: &str,
        index: &mut u64,
    ) -> Result<LockState, BackendError> {
        #[derive(Deserialize)]
        struct Pair {
            #[serde(rename = "Session")]
            session: Option<String>,
        }
        let mut path = format!("/v1/kv/{}", encode_key(key));
        if *index > 0 {
            path.push_str(&format!("?index={index}&wait={}s", WATCH_WAIT.as_secs()));
        }
        let timeout = WATCH_WAIT + WATCH_WAIT / 16 + REQUEST_TIMEOUT;
        let resp = self
            .send(
                self.request(Method::GET, &path).timeout(timeout),
                &format!("watch the lock {key}"),
            )
            .await?;
        *index = next_index(*index, consul_index(&resp));
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(LockState::Free);
        }
        let pairs: Vec<Pair> = resp.json().await.unwrap_or_default();
        if pairs.first().and_then(|p| p.session.as_ref()).is_none() {
            return Ok(LockState::Free);
        }
        // Held: the next call blocks on the new index.
        Ok(LockState::Held)
    }
}

impl Coordinator for ConsulStore {
    /// A session with a TTL and a lock on `key` (`?acquire=`), as `consul lock` does.
    async fn campaign(&self, key: String, holder: String, ttl: Duration) -> Result<Leadership> {
        let created_at = tokio::time::Instant::now();
        let session = self
            .client
            .create_session(&format!("swarm-registrator leader {holder}"), ttl)
            .await?;
        let (lost_tx, lost_rx) = futures::channel::oneshot::channel();
        let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
        let renewal = SessionRenewal::new(self.client.clone(), session.clone());
        // Consul invalidates a session no sooner than its TTL after the last renewal it
        // handled (in practice up to twice that), never before the request started.
        let deadline = LeaseDeadline::new(created_at, ttl.max(MIN_TTL));
        tokio::spawn(keep_alive(
            "Consul",
            deadline.clone(),
            lost_tx,
            stop_rx,
            renewal,
        ));
        let mut index = 0u64;
        let acquired = async {
            loop {
                if self.client.try_acquire(&key, &session, &holder).await? {
                    return Ok::<(), BackendError>(());
                }
                // Held by someone else: block until it is free (an error ends the campaign;
                // the caller retries with backoff).
                while self.client.wait_for_free_lock(&key, &mut index).await? == LockState::Held {}
            }
        };
        if let Err(e) = acquired.await {
            // The session is of no use now (it would otherwise be renewed for ever).
            let _ = stop_tx.send(());
            let destroy = format!("/v1/session/destroy/{session}");
            let _ = self
                .client
                .send(
                    self.client.request(Method::PUT, &destroy),
                    "destroy session",
                )
                .await;
            return Err(e);
        }
        tracing::info!(store = STORE, %key, %holder, %session, "elected leader");
        let fence = Fence {
            key: key.clone(),
            token: FenceToken::Session(session.clone()),
            deadline,
        };
        let this = self.client.clone();
        let resign = async move {
            let _ = stop_tx.send(());
            let release = format!("/v1/kv/{}?release={session}", encode_key(&key));
            let _ = this
                .send(this.request(Method::PUT, &release), "release lock")
                .await;
            let destroy = format!("/v1/session/destroy/{session}");
            let _ = this
                .send(this.request(Method::PUT, &destroy), "destroy session")
                .await;
        }
        .boxed();
        Ok(Leadership::new(lost_rx, resign, fence))
    }

    /// A KV transaction: `check-session` of the lock key for the leader's session, then `set`.
    async fn put_value_fenced(
        &self,
        fence: &Fence,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), BackendError> {
        let FenceToken::Session(session) = &fence.token else {
            return Err(BackendError::Rejected {
                store: STORE,
                detail: format!("KV write {key}: the fence is not a Consul session"),
                source: None,
            });
        };
        self.client
            .fenced_set(&fence.key, session, key, &value)
            .await
    }

    async fn put_value(&self, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        let what = format!("KV write {key}");
        let resp = self
            .client
            .send(self.client.request(Method::PUT, &path).body(value), &what)
            .await?;
        expect_success(resp, &what).await
    }

    async fn delete_value(&self, key: &str) -> Result<(), BackendError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        let what = format!("KV delete {key}");
        let resp = self
            .client
            .send(self.client.request(Method::DELETE, &path), &what)
            .await?;
        expect_success(resp, &what).await
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        // One key, not `?recurse`: Consul filters a recursive read down to what the token may
        // read, but refuses a read of one key it may not (403), which names the key.
        let (entries, _) = list(
            &self.client,
            self.client
                .request(Method::GET, &format!("/v1/kv/{}", encode_key(key))),
            &format!("KV read {key}"),
        )
        .await?;
        Ok(entries.into_iter().find(|e| e.key == key).map(|e| e.value))
    }
}
