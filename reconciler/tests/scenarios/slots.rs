//! Safety rule 13 against the real store: a record never takes the slot of a member the set
//! sees up, whatever its `started_at`; once that member is down the record is followed, as a
//! rescheduled task's is (rule 5).

use replset_reconciler::metrics::RefusalLabels;
use replset_sim::{Cluster, NodeOptions};
use test_support::contract::mongo_task_record;
use test_support::wait_for;

use super::{installed, latest, latest_members, wait_latest, Backend, Harness, CONVERGE};

/// How many records were refused because their slot's member is up.
fn slots_held(h: &Harness) -> u64 {
    h.metrics
        .records_ignored
        .get_or_create(&RefusalLabels {
            reason: "slot_held",
        })
        .get()
}

impl Harness {
    /// A record claiming `slot` at `host` under its own key, for a task that "started" long
    /// after every real one: what a writer of the store other than the slot's bridge could put
    /// there.
    async fn publish_claim(&self, slot: u64, host: &str) {
        let mut r = mongo_task_record(slot, host).expect("host:port");
        r.id = format!("claim{slot}");
        r.task_id = Some(r.id.clone());
        r.started_at = Some("2099-01-01T00:00:00.5Z".into());
        self.store
            .put_value(&self.layout.service_key(&r.service, &r.id), r.to_json())
            .await;
    }
}

pub async fn a_newer_record_never_takes_the_slot_of_a_live_member(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let h = Harness::start(b, cluster.set_name()).await;
    super::set_of_three(&cluster, &h).await;
    let before = latest_members(&cluster);

    // Slot 2 is claimed for a mongod outside the set, slot 3 for a member of another set (a
    // host that, once asked, answers with another setName and would block the whole set).
    let outsider = cluster.add_member().await.expect("a member");
    let outsider_host = cluster.host(outsider).expect("host").to_string();
    let other = Cluster::start_with(
        1,
        NodeOptions {
            set_name: Some("other".into()),
            ..NodeOptions::default()
        },
    )
    .await
    .expect("another set");
    other.initiate().await.expect("initiate the other set");
    h.publish_claim(2, &outsider_host).await;
    h.publish_claim(3, other.host(0).expect("host")).await;
    wait_for("both claims refused", CONVERGE, || async {
        match slots_held(&h) {
            2 => Ok(()),
            n => Err(format!("{n} refused")),
        }
    })
    .await;

    // The set goes on as if the claims did not exist: a fourth member is added (nothing is
    // blocked by the other set's name), and members 2 and 3 keep their hosts in every config.
    let fourth = cluster.add_member().await.expect("a member");
    h.publish(4, cluster.host(fourth).expect("host")).await;
    wait_latest(&cluster, "a fourth member", 4, 3).await;
    // (The first configs, before the set had three members, lack them.)
    for config in installed(&cluster) {
        let members = config.members();
        for id in [2, 3] {
            if let Some(at) = members.get(&id) {
                assert_eq!(Some(at), before.get(&id), "config {}", config.version);
            }
        }
    }
    // Each refusal was reported once, not at every reconcile.
    assert_eq!(slots_held(&h), 2);

    // Member 2 goes down: now the claim is a rescheduled task's, and member 2 moves to it.
    cluster.kill(1).expect("kill");
    wait_for("member 2 at the claimed host", CONVERGE, || async {
        let members = latest_members(&cluster);
        match latest(&cluster) {
            Some((_, voters, 4))
                if voters.len() == 3 && members.get(&2) == Some(&outsider_host) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?} {members:?}")),
        }
    })
    .await;
    assert_eq!(latest_members(&cluster).get(&3), before.get(&3));
    drop(other);
}
