//! The floor: the least work that turns a Docker `start` event into an etcd record.
//!
//! Run as its own process (`registrator-bench floor ...`, started by the bench), on the same
//! runtime shape as the bridge (tokio, 2 worker threads): subscribe to container `start`
//! events; for each, one inspect (bollard) and one put with a lease (etcd-client, the same
//! connection every time). Nothing else: no diffing, no batching, no logging. Events are
//! handled one after the other, as the bridge does.
//!
//! With `early` it also acts on the `network connect` event that precedes every `start`, as
//! the bridge does: the inspect sent then is answered when the start completes (the engine
//! holds the container's lock while starting it), so the event's delivery is off the path.
//! Each container is put once, when an inspect first finds it running.
//!
//! For every event it prints one JSON line on stdout with the time spent in each step, which
//! the bench uses to show where the time goes.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use bollard::models::EventMessageTypeEnum;
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use etcd_client::{Client, PutOptions};
use futures::StreamExt;

use crate::now_ns;

/// Long enough for any run, so the agent never renews it (nothing off the measured path); the
/// bench deletes the keys itself at the end.
const LEASE_TTL_SECS: i64 = 900;

/// One handled event, as printed on stdout.
#[derive(Debug, Clone, Default)]
pub struct FloorTiming {
    pub container_id: String,
    /// When the agent received the event.
    pub recv_ns: i64,
    pub inspect_ns: i64,
    pub put_ns: i64,
    /// When the put was acknowledged.
    pub done_ns: i64,
}

impl FloorTiming {
    pub fn parse(line: &str) -> Option<FloorTiming> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(FloorTiming {
            container_id: v.get("id")?.as_str()?.to_string(),
            recv_ns: v.get("recv_ns")?.as_i64()?,
            inspect_ns: v.get("inspect_ns")?.as_i64()?,
            put_ns: v.get("put_ns")?.as_i64()?,
            done_ns: v.get("done_ns")?.as_i64()?,
        })
    }
}

/// The agent's main: runs until killed.
pub fn main(etcd_endpoint: &str, prefix: &str, early: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(run(etcd_endpoint, prefix, early))
}

async fn run(etcd_endpoint: &str, prefix: &str, early: bool) -> Result<()> {
    let docker = Docker::connect_with_defaults()
        .context("cannot reach the Docker engine")?
        .negotiate_version()
        .await
        .context("cannot negotiate the Docker API version")?;
    let mut etcd = Client::connect([format!("http://{etcd_endpoint}")], None)
        .await
        .context("cannot connect to etcd")?;
    let lease = etcd
        .lease_grant(LEASE_TTL_SECS, None)
        .await
        .context("cannot grant a lease")?
        .id();

    let filters = if early {
        HashMap::from([
            (
                "type".to_string(),
                vec!["container".to_string(), "network".to_string()],
            ),
            (
                "event".to_string(),
                vec!["start".to_string(), "connect".to_string()],
            ),
        ])
    } else {
        HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["start".to_string()]),
        ])
    };
    let mut published = HashSet::new();
    let since = now_ns() as f64 / 1e9;
    let mut events = docker.events(Some(EventsOptions {
        since: Some(format!("{since:.9}")),
        until: None,
        filters: Some(filters),
    }));
    println!("{{\"ready\":true}}");
    std::io::stdout().flush().ok();

    while let Some(item) = events.next().await {
        let recv_ns = now_ns();
        let msg = item.context("the Docker event stream failed")?;
        let is_network = msg.typ == Some(EventMessageTypeEnum::NETWORK);
        let Some(actor) = msg.actor else { continue };
        let id = if is_network {
            actor.attributes.and_then(|mut a| a.remove("container"))
        } else {
            actor.id
        };
        let Some(id) = id else { continue };
        if early && published.contains(&id) {
            continue;
        }
        let t0 = Instant::now();
        let c = match docker.inspect_container(&id, None).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("inspect {id}: {e}");
                continue;
            }
        };
        let inspect_ns = t0.elapsed().as_nanos() as i64;
        if early && !c.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            continue;
        }
        let name = c.name.unwrap_or_default();
        let ip = c
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|n| n.into_values().find_map(|e| e.ip_address))
            .unwrap_or_default();
        let value = serde_json::json!({
            "service": "floor",
            "id": id,
            "ip": ip,
            "port": 8080,
            "protocol": "tcp",
            "container_id": id,
            "name": name.trim_start_matches('/'),
        })
        .to_string();
        let t1 = Instant::now();
        etcd.put(
            format!("{prefix}/services/floor/{id}"),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| anyhow!("put failed: {e}"))?;
        let put_ns = t1.elapsed().as_nanos() as i64;
        if early {
            published.insert(id.clone());
        }
        let done_ns = now_ns();
        println!(
            "{{\"id\":\"{id}\",\"recv_ns\":{recv_ns},\"inspect_ns\":{inspect_ns},\"put_ns\":{put_ns},\"done_ns\":{done_ns}}}"
        );
        std::io::stdout().flush().ok();
    }
    Ok(())
}
