//! The in-memory store keeps the backend contract (test-support's `contract`), the same suite
//! the etcd and Consul backends run against their real stores, here with paused time: TTLs,
//! backoffs and the contract's timeouts all run on tokio's clock.

test_support::memory_suite!(|cluster: &MemoryCluster, layout| cluster.client(layout));
