//! `scale`'s engine calls against the real Docker engine of the test services (swarm mode):
//! changing the replica count keeps every other field of the spec, the healthcheck included
//! (a typed model that dropped it would start a rolling update without it).

use replset_reconciler::engine_api::Engine;
use serde_json::json;

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn changing_the_replicas_keeps_the_rest_of_the_spec() {
    let name = format!("engine-api-{:08x}", rand::random::<u32>());
    docker(&[
        "service",
        "create",
        "-d",
        "--name",
        &name,
        "--replicas",
        "0",
        "--health-cmd",
        "true",
        "--health-interval",
        "7s",
        "--label",
        "kept=yes",
        "local/busybox",
        "sleep",
        "1000",
    ]);
    let engine = Engine::from_env().expect("DOCKER_HOST");
    let before = engine.inspect_service(&name).await.expect("inspect");
    let mut spec = before["Spec"].clone();
    spec["Mode"]["Replicated"]["Replicas"] = json!(2);
    let version = before["Version"]["Index"].as_u64().expect("a version");
    let id = before["ID"].as_str().expect("an id");
    engine
        .update_service(id, version, &spec)
        .await
        .expect("update");
    let after = engine.inspect_service(&name).await.expect("inspect");
    let mut expected = before["Spec"].clone();
    expected["Mode"]["Replicated"]["Replicas"] = json!(2);
    assert_eq!(after["Spec"], expected, "only the replicas changed");
    assert_eq!(
        after["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"],
        json!(["CMD-SHELL", "true"])
    );
    // A stale version is refused with the engine's message.
    let stale = engine.update_service(id, version, &spec).await;
    assert!(stale.is_err(), "{stale:?}");
    docker(&["service", "rm", &name]);
}
