//! The renewal loop behind a [`Leadership`](crate::Leadership), written once for the stores
//! whose leases or sessions a client must renew (etcd, Consul).

use std::future::Future;
use std::time::Duration;

/// What one renewal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// The store renewed the lease or session.
    Renewed,
    /// The lease or session is gone (expired, ended): leadership is lost, for this reason.
    Ended(String),
    /// The store did not answer, or not usefully: try again at the next turn.
    Failed,
}

/// One store's renewal of one lease or session.
pub trait Renew: Send {
    /// Renews once.
    fn renew(&mut self) -> impl Future<Output = Renewal> + Send;
}

/// Calls `renew` every TTL/3 until `stop` fires or is dropped (a dropped leadership: the
/// process is gone). Reports on `lost` when `renew` says the lease or session ended, or when
/// no renewal succeeded for longer than `ttl` (`store` names the store in that reason).
pub async fn keep_alive(
    store: &str,
    ttl: Duration,
    lost: futures::channel::oneshot::Sender<String>,
    mut stop: futures::channel::oneshot::Receiver<()>,
    mut renew: impl Renew,
) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        match renew.renew().await {
            Renewal::Renewed => last_ok = tokio::time::Instant::now(),
            Renewal::Ended(reason) => {
                let _ = lost.send(reason);
                return;
            }
            Renewal::Failed => {
                if last_ok.elapsed() > ttl {
                    let _ = lost.send(format!(
                        "{store} unreachable for longer than the {}s TTL",
                        ttl.as_secs()
                    ));
                    return;
                }
            }
        }
    }
}
