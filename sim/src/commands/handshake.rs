//! The handshake: `hello` (and its legacy names `isMaster`/`ismaster`) and `buildInfo`, and
//! the streaming (exhaust) form of an awaitable hello that drivers' monitors use.

use bson::{doc, Bson, DateTime, Document};
use std::time::Duration;
use tokio::time::Instant;

use crate::config::number;
use crate::error::ServerError;
use crate::node::{MemberState, Node};

use super::{MAX_WIRE_VERSION, VERSION};

impl Node {
    pub(super) async fn cmd_hello(
        &self,
        name: &str,
        body: &Document,
        conn_id: i64,
    ) -> Result<Document, ServerError> {
        // Awaitable hello: wait for a topology change or maxAwaitTimeMS.
        if let (Ok(tv), Some(wait)) = (
            body.get_document("topologyVersion"),
            body.get("maxAwaitTimeMS").and_then(number),
        ) {
            let same_process = tv.get_object_id("processId").ok() == Some(self.inner.instance_id);
            let counter = tv.get("counter").and_then(number);
            if same_process {
                if let Some(counter) = counter {
                    let deadline = Instant::now() + Duration::from_millis(wait.max(0) as u64);
                    self.wait_until(Some(deadline), |st| {
                        (st.topology_counter != counter).then_some(())
                    })
                    .await;
                }
            }
        }
        let st = self.lock();
        let legacy = name != "hello";
        let mut d = Document::new();
        // A standalone is always writable (mongod's hello says so).
        let primary = st.state == MemberState::Primary || self.inner.opts.set_name.is_none();
        if legacy {
            d.insert("ismaster", primary);
        } else {
            d.insert("isWritablePrimary", primary);
        }
        d.insert(
            "topologyVersion",
            doc! {"processId": self.inner.instance_id, "counter": st.topology_counter},
        );
        let cfg = st.config().filter(|_| st.state != MemberState::Removed);
        match (cfg, &self.inner.opts.set_name) {
            (Some(cfg), _) => {
                let list = |f: &dyn Fn(&crate::config::MemberConfig) -> bool| {
                    cfg.members
                        .iter()
                        .filter(|m| f(m))
                        .map(|m| Bson::String(m.host.clone()))
                        .collect::<Vec<_>>()
                };
                d.insert(
                    "hosts",
                    list(&|m| !m.arbiter_only && !m.hidden && m.priority > 0.0),
                );
                let passives = list(&|m| !m.arbiter_only && !m.hidden && m.priority == 0.0);
                if !passives.is_empty() {
                    d.insert("passives", passives);
                }
                let arbiters = list(&|m| m.arbiter_only);
                if !arbiters.is_empty() {
                    d.insert("arbiters", arbiters);
                }
                d.insert("setName", cfg.set_name.clone());
                d.insert("setVersion", cfg.version as i32);
                d.insert("secondary", st.state == MemberState::Secondary);
                if st.state == MemberState::Arbiter {
                    d.insert("arbiterOnly", true);
                }
                if let Some(p) = &st.primary_host {
                    d.insert("primary", p.clone());
                }
                if let Some(m) = cfg.member_by_host(&self.me()) {
                    if m.hidden {
                        d.insert("hidden", true);
                    }
                    if m.priority == 0.0 && !m.arbiter_only {
                        d.insert("passive", true);
                    }
                    if !m.tags.is_empty() {
                        d.insert("tags", m.tags.clone());
                    }
                }
                d.insert("me", self.me());
                if let Some(id) = st.election_id {
                    d.insert("electionId", id);
                }
                let applied = st.last_applied();
                d.insert(
                    "lastWrite",
                    doc! {
                        "opTime": applied.to_document(),
                        "lastWriteDate": applied.date(),
                        "majorityOpTime": st.commit_point.to_document(),
                        "majorityWriteDate": st.commit_point.date(),
                    },
                );
            }
            (None, Some(_)) => {
                d.insert("secondary", false);
                d.insert("isreplicaset", true);
                d.insert("info", "Does not have a valid replica set config");
            }
            (None, None) => {}
        }
        d.insert("maxBsonObjectSize", 16 * 1024 * 1024);
        d.insert("maxMessageSizeBytes", crate::wire::MAX_MESSAGE_SIZE as i32);
        d.insert("maxWriteBatchSize", 100_000);
        d.insert("localTime", DateTime::now());
        d.insert("logicalSessionTimeoutMinutes", 30);
        d.insert("connectionId", conn_id as i32);
        d.insert("minWireVersion", 0);
        d.insert("maxWireVersion", MAX_WIRE_VERSION);
        d.insert("readOnly", false);
        if body.get_bool("helloOk").unwrap_or(false) {
            d.insert("helloOk", true);
        }
        Ok(d)
    }
}

pub(super) fn build_info() -> Document {
    doc! {
        "version": VERSION,
        "gitVersion": "replset-sim",
        "versionArray": [7, 0, 14, 0],
        "bits": 64,
        "debug": false,
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "storageEngines": ["devnull"],
        "javascriptEngine": "none",
        "modules": ["replset-sim"],
    }
}

/// The streaming hello protocol (the drivers' server-monitoring spec, "Streaming protocol";
/// the server's exhaust handling in `service_state_machine.cpp` and `hello` in
/// `repl/replication_info.cpp`): a request with the OP_MSG `exhaustAllowed` flag that is an
/// awaitable hello (it names `topologyVersion` and `maxAwaitTimeMS`) and succeeds is answered
/// with `moreToCome`, and the server goes on answering on its own, each time as if the client
/// had sent the same hello again with the `topologyVersion` of the previous reply: so each
/// reply comes when the topology changes or `maxAwaitTimeMS` has passed. The stream ends with
/// a reply without `moreToCome` (an error), or when the client closes the connection.
///
/// Returns the body of the next, implicit, request when `reply` to `body` continues a stream.
pub(crate) fn exhaust_next(
    body: &Document,
    exhaust_allowed: bool,
    reply: &Document,
) -> Option<Document> {
    if !exhaust_allowed {
        return None;
    }
    let name = body.keys().next()?;
    if !matches!(name.as_str(), "hello" | "isMaster" | "ismaster") {
        return None;
    }
    if !body.contains_key("topologyVersion") || !body.contains_key("maxAwaitTimeMS") {
        return None;
    }
    if reply.get("ok").and_then(crate::config::float) != Some(1.0) {
        return None;
    }
    let tv = reply.get_document("topologyVersion").ok()?;
    let mut next = body.clone();
    next.insert("topologyVersion", tv.clone());
    Some(next)
}
