//! The reconciler's metrics and health, served by `ops-http` on `--metrics-addr`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub set: String,
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub set: String,
    pub step: &'static str,
    /// The server's error code, or `none` for no answer.
    pub code: String,
}

/// What the reconciler counts.
#[derive(Debug)]
pub struct Metrics {
    /// Steps the server accepted, by kind (initiate, add, grant_vote, revoke_vote, move_host,
    /// remove).
    pub steps_applied: Family<StepLabels, Counter>,
    /// Steps refused by the server (by code) or left without an answer.
    pub steps_refused: Family<RefusedLabels, Counter>,
    /// From the first step after a converged state to converged again.
    pub converge_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            steps_applied: Family::default(),
            steps_refused: Family::default(),
            // 100 ms to about 30 min.
            converge_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 15)),
        }
    }
}

impl Metrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("replset_reconciler");
        r.register(
            "steps_applied",
            "Steps the server accepted",
            self.steps_applied.clone(),
        );
        r.register(
            "steps_refused",
            "Steps the server refused (by code) or did not answer",
            self.steps_refused.clone(),
        );
        r.register(
            "converge_seconds",
            "Time from the first step after convergence to convergence",
            self.converge_seconds.clone(),
        );
    }
}

/// `/healthz`: healthy while the records' watch is connected.
#[derive(Debug, Default)]
pub struct Health {
    pub watch_connected: AtomicBool,
}

impl Health {
    pub fn check(&self) -> Result<(), String> {
        if self.watch_connected.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the watch of the records is not connected".into())
        }
    }
}
