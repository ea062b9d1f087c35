//! The renewal loop behind a [`Leadership`](crate::Leadership), written once for the stores
//! whose leases or sessions a client must renew (etcd, Consul).
//!
//! The timings follow Patroni's rule for the same problem (renew interval + 2 x request
//! timeout <= TTL): renew every TTL/3, retry a failed renewal after [`RETRY_AFTER_FAILURE`],
//! and move the [`LeaseDeadline`] to the *start* of each successful renewal + TTL. The
//! leadership gives up on its own at [`LeaseDeadline::give_up_at`], before the store can have
//! expired the lease, when no renewal succeeded in time.

use std::future::Future;
use std::time::Duration;

use crate::backend::LeaseDeadline;

/// How soon a failed renewal is tried again (sooner than TTL/3, so that a short outage does
/// not cost the leadership).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// What one renewal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// The store renewed the lease or session.
    Renewed,
    /// The lease or session is gone (expired, ended): leadership is lost, for this reason.
    Ended(String),
    /// The store did not answer, or not usefully: try again soon.
    Failed,
}

/// One store's renewal of one lease or session. Each call must be bounded by the store's
/// request timeout.
pub trait Renew: Send {
    /// Renews once.
    fn renew(&mut self) -> impl Future<Output = Renewal> + Send;
}

/// Calls `renew` every TTL/3 (after a failure: every [`RETRY_AFTER_FAILURE`]) until `stop`
/// fires or is dropped (a dropped leadership: the process is gone). Each success moves
/// `deadline`. Reports on `lost` when `renew` says the lease or session ended, or when the
/// deadline passed without a renewal (`store` names the store in that reason); the
/// leadership itself gives up earlier, at the deadline's give-up instant.
pub async fn keep_alive(
    store: &str,
    deadline: LeaseDeadline,
    lost: futures::channel::oneshot::Sender<String>,
    mut stop: futures::channel::oneshot::Receiver<()>,
    mut renew: impl Renew,
) {
    let every = deadline.ttl() / 3;
    let mut wait = every;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            _ = &mut stop => return,
            outcome = renew.renew() => outcome,
        };
        match outcome {
            Renewal::Renewed => {
                deadline.renewed(started);
                wait = every;
            }
            Renewal::Ended(reason) => {
                let _ = lost.send(reason);
                return;
            }
            Renewal::Failed => {
                if tokio::time::Instant::now() >= deadline.at() {
                    let _ = lost.send(format!(
                        "{store} unreachable for longer than the {:?} TTL",
                        deadline.ttl()
                    ));
                    return;
                }
                wait = RETRY_AFTER_FAILURE.min(every);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Fence, FenceToken, Leadership, LEASE_SAFETY_MARGIN};
    use futures::FutureExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Switch(Arc<AtomicBool>);

    impl Renew for Switch {
        async fn renew(&mut self) -> Renewal {
            if self.0.load(Ordering::SeqCst) {
                Renewal::Renewed
            } else {
                Renewal::Failed
            }
        }
    }

    const TTL: Duration = Duration::from_secs(15);

    fn leadership(up: &Arc<AtomicBool>) -> Leadership {
        let deadline = LeaseDeadline::new(tokio::time::Instant::now(), TTL);
        let (lost_tx, lost_rx) = futures::channel::oneshot::channel();
        let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
        tokio::spawn(keep_alive(
            "test",
            deadline.clone(),
            lost_tx,
            stop_rx,
            Switch(up.clone()),
        ));
        let fence = Fence {
            key: "k".into(),
            token: FenceToken::Session("s".into()),
            deadline,
        };
        Leadership::new(
            lost_rx,
            async move {
                let _ = stop_tx.send(());
            }
            .boxed(),
            fence,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_gives_up_before_the_lease_can_expire() {
        let up = Arc::new(AtomicBool::new(true));
        let mut leading = leadership(&up);
        // Renewed at TTL/3 and 2 TTL/3: valid until 2 TTL/3 + TTL - margin.
        tokio::time::sleep(TTL * 2 / 3 + Duration::from_millis(1)).await;
        let last_ok = tokio::time::Instant::now() - Duration::from_millis(1);
        up.store(false, Ordering::SeqCst);
        assert!(leading.fence().valid_for() > TTL - LEASE_SAFETY_MARGIN * 2);
        let reason = leading.lost().await;
        let gave_up = tokio::time::Instant::now();
        assert_eq!(gave_up, last_ok + TTL - LEASE_SAFETY_MARGIN, "{reason}");
        assert!(reason.contains("TTL"), "{reason}");
        assert_eq!(leading.fence().valid_for(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_outage_is_bridged_by_the_retries() {
        let up = Arc::new(AtomicBool::new(true));
        let mut leading = leadership(&up);
        up.store(false, Ordering::SeqCst);
        tokio::time::sleep(TTL / 2).await;
        up.store(true, Ordering::SeqCst);
        let lost = tokio::time::timeout(TTL * 3, leading.lost()).await;
        assert!(lost.is_err(), "renewed once the store answered again");
        assert!(leading.fence().valid_for() > TTL * 2 / 3 - LEASE_SAFETY_MARGIN);
    }
}
