//! replset-reconciler: keeps a MongoDB replica set equal to a swarm service's tasks.
//!
//! The heart is [`plan::plan_next_step`], a pure function from what was observed of the set
//! and what the records in the store ask for, to the one next step that is safe under
//! MongoDB's rules (see `../shared/DESIGN.md`, "Safety rules for the reconciler"). Observing
//! the set and applying a step are the loop's job; the decision is here, tested on its own.

pub mod controller;
pub mod duration;
pub mod metrics;
pub mod model;
pub mod mongo;
pub mod plan;
pub mod records;

pub use model::{ConfigView, Desired, MemberConfig, MemberState, MemberStatus, Observation};
pub use plan::{plan_next_step, Blocked, Change, Note, Plan, PlanContext, Step, Wait};
