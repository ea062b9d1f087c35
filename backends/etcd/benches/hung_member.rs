//! How fast the etcd client leaves a member that hangs (its connections stay open and answer
//! nothing, as after SIGSTOP or a dropped link):
//!
//!     cargo bench -p backend-etcd --bench hung_member -- [--rounds 5]
//!
//! On a 3-member cluster of real etcd processes on loopback (`PrivateEtcdCluster`), each round
//! SIGSTOPs the member the store's requests and watch go to and measures from then until (a) a
//! publish through the store succeeds, (b) the store's watch delivers a write made through
//! another member. Prints each round and min / median / max on stderr. Needs `etcd` (see
//! `scripts/services`). Results: docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use backend_core::Publisher;
use backend_core::Watcher;
use backend_etcd::EtcdStore;
use common::{publish_within, put_elsewhere, watch_until, View};
use std::time::Duration;
use test_support::contract::unique_layout;
use test_support::PrivateEtcdCluster;
use tokio::time::Instant;

fn rounds() -> Result<usize, String> {
    let mut rounds = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--rounds takes a number above 0")?
            }
            // What `cargo bench` adds.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}; usage: [--rounds N]")),
        }
    }
    Ok(rounds)
}

#[tokio::main]
async fn main() {
    let rounds = match rounds() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("hung_member: {e}");
            std::process::exit(2);
        }
    };
    let cluster = PrivateEtcdCluster::start(3).await;
    let (mut puts, mut watches) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let layout = unique_layout("etcd-measure");
        let prefix = layout.services_prefix();
        let store = EtcdStore::connect(&cluster.endpoints(), layout.clone())
            .await
            .expect("client");
        store
            .open_session(Duration::from_secs(60))
            .await
            .expect("lease");
        let record = test_support::contract::record("m", "r1");
        publish_within(&store, &record).await;
        let mut stream = store.watch_prefix(prefix.clone());
        let mut view = View::default();
        watch_until(&mut stream, &mut view, "the first list", |v| v.restarts > 0).await;
        // The member the store's requests and watch go to.
        let current = store.current_endpoint();
        let frozen = (0..3)
            .find(|&i| current.ends_with(&cluster.endpoint(i)))
            .expect("the store is on a member");
        cluster.freeze(frozen).await;
        let t0 = Instant::now();
        let key = format!("{prefix}m/x");
        let watch = async {
            put_elsewhere(&cluster, &[frozen], &key, "1").await;
            watch_until(&mut stream, &mut view, "the write", |v| {
                v.keys.contains_key(&key)
            })
            .await;
            t0.elapsed()
        };
        let put = async {
            publish_within(&store, &record).await;
            t0.elapsed()
        };
        let (w, p) = tokio::join!(watch, put);
        eprintln!("round {round}: member {frozen} frozen; put after {p:?}, watch after {w:?}");
        puts.push(p);
        watches.push(w);
        cluster.thaw(frozen).await;
        drop(stream);
    }
    for (what, mut v) in [("put", puts), ("watch", watches)] {
        v.sort();
        eprintln!(
            "{what}: min {:?} median {:?} max {:?}",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
}
