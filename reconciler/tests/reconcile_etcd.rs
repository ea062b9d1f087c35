//! The reconcile scenarios (tests/scenarios) against the real etcd of the test services.

mod scenarios;

scenarios::suite!(crate::scenarios::Backend::Etcd);
