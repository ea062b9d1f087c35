//! The bridge's scenarios (tests/scenarios) against the real etcd of the test services.

mod common;
mod scenarios;

scenarios::suite!(crate::common::Backend::Etcd);
