//! The bridge's scenarios (tests/scenarios) against the real Consul of the test services.

mod common;
mod scenarios;

scenarios::suite!(crate::common::Backend::Consul);
