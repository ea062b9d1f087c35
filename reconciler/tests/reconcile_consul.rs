//! The reconcile scenarios (tests/scenarios) against the real Consul of the test services.

mod scenarios;

scenarios::suite!(crate::scenarios::Backend::Consul);
