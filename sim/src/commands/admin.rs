//! Administrative commands: sessions, server parameters, `_isSelf` (the command a member
//! sends to a host of a new config to learn whether that host is itself), and the server's
//! self-description: serverStatus, getCmdLineOpts, getLog, hostInfo.

use bson::{doc, Bson, DateTime, Document};

use crate::error::ServerError;
use crate::node::Node;

/// endSessions, killSessions, refreshSessions: there are no server-side sessions to end.
pub(super) fn sessions() -> Document {
    doc! {}
}

/// getParameter: the feature compatibility version the drivers ask for.
pub(super) fn get_parameter() -> Document {
    doc! {"featureCompatibilityVersion": {"version": "7.0"}}
}

impl Node {
    /// `_isSelf`: this process's instance id, compared by the asking member with its own.
    pub(super) fn cmd_is_self(&self) -> Document {
        doc! {"id": self.inner.instance_id}
    }
}

/// The startup warnings mongod 7.0 logs (and `getLog: "startupWarnings"` returns), as JSON
/// log lines: without access control, the warning of src/mongo/db/startup_warnings_mongod.cpp
/// (id 22120).
fn startup_warnings(auth: bool) -> Vec<String> {
    if auth {
        return Vec::new();
    }
    let t = DateTime::now().try_to_rfc3339_string().unwrap_or_default();
    vec![format!(
        "{{\"t\":{{\"$date\":\"{t}\"}},\"s\":\"W\",  \"c\":\"CONTROL\",  \"id\":22120,   \"ctx\":\"initandlisten\",\"msg\":\"Access control is not enabled for the database. Read and write access to data and configuration is unrestricted\",\"tags\":[\"startupWarnings\"]}}"
    )]
}

impl Node {
    /// The command line this member would have as mongod (`getCmdLineOpts`).
    fn command_line(&self) -> (Vec<Bson>, Document) {
        let o = &self.inner.opts;
        let mut argv = vec![Bson::from("mongod")];
        let mut net = doc! {"port": self.inner.port as i32};
        if o.bind_ip.is_unspecified() {
            argv.push("--bind_ip_all".into());
            net.insert("bindIpAll", true);
        } else {
            argv.extend(["--bind_ip".into(), o.bind_ip.to_string().into()]);
            net.insert("bindIp", o.bind_ip.to_string());
        }
        argv.extend(["--port".into(), Bson::from(self.inner.port.to_string())]);
        let mut parsed = doc! {"net": net};
        if let Some(set) = &o.set_name {
            argv.extend(["--replSet".into(), set.clone().into()]);
            parsed.insert("replication", doc! {"replSet": set.clone()});
        }
        let mut security = Document::new();
        if o.security.authorization {
            argv.push("--auth".into());
            security.insert("authorization", "enabled");
        }
        if o.security.key_file.is_some() {
            argv.extend(["--keyFile".into(), "<keyFile>".into()]);
            security.insert("keyFile", "<keyFile>");
        }
        if !security.is_empty() {
            parsed.insert("security", security);
        }
        (argv, parsed)
    }

    pub(super) fn cmd_get_cmd_line_opts(&self) -> Document {
        let (argv, parsed) = self.command_line();
        doc! {"argv": argv, "parsed": parsed}
    }

    /// getLog: `"*"` lists the logs; `"startupWarnings"` and `"global"` return the startup
    /// warnings (the simulator keeps no other log lines in memory).
    pub(super) fn cmd_get_log(&self, body: &Document) -> Result<Document, ServerError> {
        match body.get_str("getLog") {
            Ok("*") => Ok(doc! {"names": ["global", "startupWarnings"]}),
            Ok("startupWarnings") | Ok("global") => {
                let lines = startup_warnings(self.inner.opts.security.enabled());
                Ok(doc! {"totalLinesWritten": lines.len() as i32, "log": lines})
            }
            Ok(other) => Err(ServerError::bad_value(format!("No log named '{other}'"))),
            Err(_) => Err(ServerError::type_mismatch(
                "Argument to getLog must be of type String",
            )),
        }
    }

    pub(super) fn cmd_host_info(&self) -> Document {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as i32)
            .unwrap_or(1);
        let mem_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<i64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(0);
        doc! {
            "system": {
                "currentTime": DateTime::now(),
                "hostname": crate::node::hostname(),
                "cpuAddrSize": 64,
                "memSizeMB": mem_mb,
                "memLimitMB": mem_mb,
                "numCores": cores,
                "cpuArch": std::env::consts::ARCH,
                "numaEnabled": false,
            },
            "os": {"type": "Linux", "name": "replset-sim", "version": ""},
            "extra": {},
        }
    }

    /// serverStatus with its `host`, `version`, `process`, `uptime*`, `connections` and
    /// `repl` sections (the latter is hello's replica-set view, as on mongod).
    pub(super) async fn cmd_server_status(&self) -> Result<Document, ServerError> {
        let hello = self.cmd_hello("hello", &doc! {}, 0).await?;
        let (uptime, term) = {
            let st = self.lock();
            (st.started.elapsed(), st.term())
        };
        let mut repl = Document::new();
        for k in [
            "topologyVersion",
            "hosts",
            "passives",
            "arbiters",
            "setName",
            "setVersion",
            "isWritablePrimary",
            "secondary",
            "primary",
            "me",
            "electionId",
            "lastWrite",
            "isreplicaset",
            "info",
        ] {
            if let Some(v) = hello.get(k) {
                repl.insert(k, v.clone());
            }
        }
        repl.insert("rbid", 1);
        let current = self
            .inner
            .open_connections
            .load(std::sync::atomic::Ordering::Relaxed) as i32;
        let created = self
            .inner
            .connections
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut d = doc! {
            "host": self.me(),
            "version": super::VERSION,
            "process": "mongod",
            "pid": std::process::id() as i64,
            "uptime": uptime.as_secs_f64().floor(),
            "uptimeMillis": uptime.as_millis() as i64,
            "uptimeEstimate": uptime.as_secs() as i64,
            "localTime": DateTime::now(),
            "connections": {
                "current": current,
                "available": 838_860 - current,
                "totalCreated": created,
                "active": 1,
            },
        };
        if self.inner.opts.set_name.is_some() {
            repl.insert("term", term);
            d.insert("repl", repl);
        }
        Ok(d)
    }
}
