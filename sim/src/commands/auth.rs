//! Authentication and authorization: SCRAM (saslStart / saslContinue), users and roles, and
//! the per-command authorization check. Not implemented yet: every command runs without
//! authentication (see docs/replset-sim.md).
