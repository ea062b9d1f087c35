//! replset-reconciler: keeps a MongoDB replica set equal to a swarm service's tasks.
//!
//! The heart is [`plan::plan_next_step`], a pure function from what was observed of the set
//! and what the records in the store ask for, to the one next step that is safe under
//! MongoDB's rules (see `docs/reconciler.md`, "Safety rules"). Around it, in the shape of
//! kube-runtime's controller: [`reconcile::reconcile`] observes, plans, applies one step and
//! says when to look again; [`controller::Controller`] follows the records, campaigns for each
//! set's leadership and runs the loop while leading; [`events`] is where every decision is
//! logged and counted.

pub mod commands;
pub mod controller;
pub mod engine_api;
pub mod events;
pub mod metrics;
pub mod model;
pub mod mongo;
pub mod plan;
pub mod reconcile;
pub mod records;
pub mod status;

pub use controller::{Controller, ControllerConfig, Records};
pub use model::{
    Committed, ConfigView, Desired, MemberConfig, MemberState, MemberStatus, Observation, OpTime,
    Persisted,
};
pub use plan::{plan_next_step, Blocked, Change, KnownSet, Note, Plan, PlanContext, Step, Wait};
pub use reconcile::{error_policy, reconcile, Action, Context, ReconcileError, SetState};
