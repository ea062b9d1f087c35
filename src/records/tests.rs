use std::collections::BTreeMap;

use backend_core::Health;

use super::plain::image_base_name;
use super::*;
use crate::container::{NetworkAttachment, PortSpec, PublishedPort};

fn node() -> NodeIdentity {
    NodeIdentity {
        node_id: "node1".into(),
        hostname: "host1".into(),
        address: Some("192.0.2.10".parse().expect("ip")),
    }
}

fn task(labels: &[(&str, &str)]) -> ContainerInfo {
    let mut all: BTreeMap<String, String> = BTreeMap::from([
        (LABEL_TASK_ID.into(), "t1".into()),
        (LABEL_TASK_NAME.into(), "mongo.2.t1".into()),
        (LABEL_SERVICE_NAME.into(), "mongo".into()),
        (LABEL_SERVICE_ID.into(), "svc1".into()),
        (LABEL_NODE_ID.into(), "node1".into()),
        ("app".into(), "db".into()),
    ]);
    for (k, v) in labels {
        all.insert(k.to_string(), v.to_string());
    }
    ContainerInfo {
        id: "c1".into(),
        name: "mongo.2.t1".into(),
        image: "mongo:7".into(),
        running: true,
        labels: all,
        exposed: vec![PortSpec::parse("27017").expect("port")],
        networks: vec![
            NetworkAttachment {
                name: "ingress".into(),
                network_id: String::new(),
                ingress: true,
                ipv4: Some("10.0.0.5".parse().expect("ip")),
                ipv6: None,
            },
            NetworkAttachment {
                name: "mongo-net".into(),
                network_id: String::new(),
                ingress: false,
                ipv4: Some("10.0.1.7".parse().expect("ip")),
                ipv6: None,
            },
        ],
        ..Default::default()
    }
}

fn plain() -> ContainerInfo {
    ContainerInfo {
        id: "c2".into(),
        name: "web-1".into(),
        image: "registry:5000/team/nginx:1.25".into(),
        running: true,
        exposed: vec![PortSpec::parse("80").expect("port")],
        published: vec![PublishedPort {
            container: PortSpec::parse("80").expect("port"),
            host_ip: None,
            host_port: 8080,
        }],
        networks: vec![NetworkAttachment {
            name: "bridge".into(),
            network_id: String::new(),
            ingress: false,
            ipv4: Some("172.17.0.2".parse().expect("ip")),
            ipv6: None,
        }],
        network_mode: "bridge".into(),
        ..Default::default()
    }
}

/// The records of `c` on node1, which must be exactly one.
fn only_record(c: &ContainerInfo, options: &BuildOptions) -> ServiceRecord {
    let mut records = build_records(c, options, &node()).expect("builds");
    assert_eq!(records.len(), 1, "{records:?}");
    records.remove(0)
}

#[test]
fn a_task_gives_one_record_with_its_overlay_address_and_slot() {
    let r = &only_record(&task(&[]), &BuildOptions::default());
    assert_eq!(r.service, "mongo");
    assert_eq!(r.id, "t1");
    assert_eq!(r.ip, "10.0.1.7".parse::<IpAddr>().expect("ip"));
    assert_eq!(r.port, 27017);
    assert_eq!(r.task_slot, Some(2));
    assert_eq!(r.service_id.as_deref(), Some("svc1"));
    assert_eq!(r.node_id, "node1");
    assert_eq!(r.labels, BTreeMap::from([("app".into(), "db".into())]));
}

#[test]
fn the_network_label_beats_the_flag_and_stack_names_are_understood() {
    let mut c = task(&[(LABEL_STACK, "prod"), (LABEL_NETWORK, "backend")]);
    c.networks.push(NetworkAttachment {
        name: "prod_backend".into(),
        network_id: String::new(),
        ingress: false,
        ipv4: None,
        ipv6: Some("fd00::9".parse().expect("ip")),
    });
    let opts = BuildOptions {
        network: Some("mongo-net".into()),
        ..Default::default()
    };
    let r = build_records(&c, &opts, &node()).expect("builds");
    assert_eq!(r[0].ip, "fd00::9".parse::<IpAddr>().expect("ip"));
    assert_eq!(r[0].stack.as_deref(), Some("prod"));
}

#[test]
fn ingress_is_never_used() {
    let mut c = task(&[]);
    c.networks.retain(|n| n.name == "ingress");
    assert!(matches!(
        build_records(&c, &BuildOptions::default(), &node()),
        Err(SkipReason::NoAddress { .. })
    ));
    let opts = BuildOptions {
        network: Some("ingress".into()),
        ..Default::default()
    };
    assert!(matches!(
        build_records(&c, &opts, &node()),
        Err(SkipReason::NetworkNotFound { .. })
    ));
}

#[test]
fn port_label_and_several_ports() {
    let c = task(&[(LABEL_PORT, "28017/udp, 27017")]);
    let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
    let ids: Vec<_> = r.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["t1:27017", "t1:28017:udp"]);
    assert!(r
        .iter()
        .all(|r| r.service == "mongo" && r.task_id.as_deref() == Some("t1")));
}

#[test]
fn a_malformed_port_label_names_the_label() {
    let c = task(&[(LABEL_PORT, "27017,http")]);
    let err = build_records(&c, &BuildOptions::default(), &node()).expect_err("bad port");
    let msg = err.to_string();
    assert!(
        msg.contains(LABEL_PORT) && msg.contains("mongo.2.t1"),
        "{msg}"
    );
    let mut c = task(&[("SERVICE_PORT", "0")]);
    c.exposed.clear();
    assert!(matches!(
        build_records(&c, &BuildOptions::default(), &node()),
        Err(SkipReason::BadPort {
            key: "SERVICE_PORT",
            ..
        })
    ));
}

#[test]
fn a_task_without_any_port_is_skipped_with_advice() {
    let mut c = task(&[]);
    c.exposed.clear();
    let err = build_records(&c, &BuildOptions::default(), &node()).expect_err("no port");
    assert!(err.to_string().contains(LABEL_PORT));
}

#[test]
fn service_name_label_overrides_the_swarm_service() {
    let c = task(&[("SERVICE_NAME", "db")]);
    let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
    assert_eq!(r[0].service, "db");
    let c = task(&[("SERVICE_NAME", "a/b")]);
    assert!(matches!(
        build_records(&c, &BuildOptions::default(), &node()),
        Err(SkipReason::BadName { .. })
    ));
}

#[test]
fn global_service_tasks_have_no_slot() {
    let c = task(&[(LABEL_TASK_NAME, "mongo.node1.t1")]);
    let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
    assert_eq!(r[0].task_slot, None);
    let c = task(&[(LABEL_TASK_NAME, "garbage")]);
    assert!(matches!(
        build_records(&c, &BuildOptions::default(), &node()),
        Err(SkipReason::BadTaskName { .. })
    ));
}

#[test]
fn stopped_paused_and_ignored_containers_give_nothing() {
    let mut c = task(&[]);
    c.paused = true;
    assert!(build_records(&c, &BuildOptions::default(), &node())
        .expect("ok")
        .is_empty());
    let mut c = plain();
    c.running = false;
    assert!(build_records(&c, &BuildOptions::default(), &node())
        .expect("ok")
        .is_empty());
    let mut c = plain();
    c.env.push("SERVICE_IGNORE=1".into());
    assert!(build_records(&c, &BuildOptions::default(), &node())
        .expect("ok")
        .is_empty());
    // A swarm task that has no port but says it is ignored is skipped quietly, not refused.
    let mut c = task(&[]);
    c.labels.remove(LABEL_PORT);
    c.exposed.clear();
    assert!(matches!(
        build_records(&c, &BuildOptions::default(), &node()),
        Err(SkipReason::NoPort { .. })
    ));
    c.labels.insert("SERVICE_IGNORE".into(), "true".into());
    assert!(build_records(&c, &BuildOptions::default(), &node())
        .expect("ignored, not an error")
        .is_empty());
}

#[test]
fn a_plain_container_is_published_as_registrator_does() {
    let mut c = plain();
    c.labels.insert("SERVICE_NAME".into(), "web".into());
    c.labels.insert("SERVICE_TAGS".into(), "prod,v1".into());
    c.env.push("SERVICE_REGION=eu".into());
    c.health = Some(Health::Healthy);
    let r = &only_record(&c, &BuildOptions::default());
    assert_eq!(r.service, "web");
    assert_eq!(r.id, "host1:web-1:80");
    assert_eq!(r.ip, "192.0.2.10".parse::<IpAddr>().expect("ip"));
    assert_eq!(r.port, 8080);
    assert_eq!(r.tags, vec!["prod", "v1"]);
    assert_eq!(r.attrs.get("region").map(String::as_str), Some("eu"));
    assert_eq!(r.task_id, None);
    assert_eq!(r.health, Some(Health::Healthy));
}

#[test]
fn plain_defaults_internal_and_groups() {
    let mut c = plain();
    let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
    assert_eq!(r[0].service, "nginx");

    let internal = BuildOptions {
        internal: true,
        ..Default::default()
    };
    c.exposed.push(PortSpec::parse("53/udp").expect("port"));
    c.env.push("SERVICE_53_NAME=dns".into());
    let r = build_records(&c, &internal, &node()).expect("builds");
    let got: Vec<_> = r
        .iter()
        .map(|r| (r.service.as_str(), r.id.as_str(), r.port))
        .collect();
    assert_eq!(
        got,
        vec![
            ("dns", "host1:web-1:53:udp", 53),
            ("nginx-80", "host1:web-1:80", 80)
        ]
    );
    assert!(r
        .iter()
        .all(|r| r.ip == "172.17.0.2".parse::<IpAddr>().expect("ip")));
    assert!(r[0].tags.contains(&"udp".to_string()));
}

#[test]
fn explicit_mode_publishes_only_named_containers() {
    let opts = BuildOptions {
        explicit: true,
        ..Default::default()
    };
    assert!(build_records(&plain(), &opts, &node())
        .expect("ok")
        .is_empty());
    assert!(build_records(&task(&[]), &opts, &node())
        .expect("ok")
        .is_empty());
    let mut c = plain();
    c.env.push("SERVICE_NAME=web".into());
    assert_eq!(build_records(&c, &opts, &node()).expect("ok").len(), 1);
}

#[test]
fn explicit_ip_and_custom_id() {
    let mut c = plain();
    c.labels.insert("SERVICE_ID".into(), "web-primary".into());
    let opts = BuildOptions {
        host_ip: Some("198.51.100.1".parse().expect("ip")),
        ..Default::default()
    };
    let r = build_records(&c, &opts, &node()).expect("builds");
    assert_eq!(r[0].id, "web-primary");
    assert_eq!(r[0].ip, "198.51.100.1".parse::<IpAddr>().expect("ip"));
}

#[test]
fn image_names() {
    assert_eq!(image_base_name("redis"), "redis");
    assert_eq!(image_base_name("redis:7"), "redis");
    assert_eq!(image_base_name("registry:5000/a/redis:7"), "redis");
    assert_eq!(image_base_name("redis@sha256:abc"), "redis");
}

#[test]
fn check_keys_become_the_check_on_the_published_address_not_attributes() {
    let mut c = plain();
    c.env = vec![
        "SERVICE_CHECK_HTTP=/health".into(),
        "SERVICE_CHECK_INTERVAL=2s".into(),
        "SERVICE_REGION=eu".into(),
    ];
    let r = only_record(&c, &BuildOptions::default());
    let check = r.check.expect("a check");
    // The host port on the node's address: what the agent on the host can reach.
    assert_eq!(check.http.as_deref(), Some("http://192.0.2.10:8080/health"));
    assert_eq!(check.interval.as_deref(), Some("2s"));
    assert_eq!(r.attrs, BTreeMap::from([("region".into(), "eu".into())]));

    let internal = BuildOptions {
        internal: true,
        ..Default::default()
    };
    let r = only_record(&c, &internal);
    let check = r.check.expect("a check");
    assert_eq!(check.http.as_deref(), Some("http://172.17.0.2:80/health"));

    let t = task(&[("SERVICE_27017_CHECK_TCP", "true")]);
    let r = only_record(&t, &BuildOptions::default());
    assert_eq!(
        r.check.and_then(|c| c.tcp).as_deref(),
        Some("10.0.1.7:27017")
    );
}

#[test]
fn a_bad_check_value_leaves_the_check_out_and_is_reported() {
    let mut c = plain();
    c.labels = BTreeMap::from([
        ("SERVICE_CHECK_HTTP".into(), "/health".into()),
        ("SERVICE_CHECK_INTERVAL".into(), "10 seconds".into()),
    ]);
    let built = build(&c, &BuildOptions::default(), &node()).expect("builds");
    assert_eq!(built.records.len(), 1, "the service is still published");
    assert_eq!(built.records[0].check, None);
    assert_eq!(built.bad_checks.len(), 1);
    assert_eq!(built.bad_checks[0].key, "SERVICE_CHECK_INTERVAL");
}

#[test]
fn forced_tags_follow_the_containers_own_and_come_before_udp() {
    let mut c = plain();
    c.env = vec!["SERVICE_TAGS=own".into()];
    c.labels = BTreeMap::from([("team".into(), "blue".into())]);
    let opts = BuildOptions {
        tags: crate::metadata::parse_tags(r#"edge,team-{{index .Config.Labels "team"}}"#)
            .expect("valid"),
        ..Default::default()
    };
    assert_eq!(
        only_record(&c, &opts).tags,
        vec!["own", "edge", "team-blue"]
    );
    c.published[0].container = PortSpec::parse("53/udp").expect("port");
    c.exposed = vec![PortSpec::parse("53/udp").expect("port")];
    assert_eq!(
        only_record(&c, &opts).tags,
        vec!["own", "edge", "team-blue", "udp"]
    );
    let r = only_record(&task(&[]), &opts);
    assert_eq!(r.tags, vec!["edge", "team-"]);
}

#[test]
fn the_ip_label_gives_the_address_when_the_container_sets_it() {
    let opts = BuildOptions {
        ip_label: Some("com.example.ip".into()),
        ..Default::default()
    };
    let mut c = plain();
    assert_eq!(
        only_record(&c, &opts).ip,
        "192.0.2.10".parse::<IpAddr>().expect("ip"),
        "without the label: the host address"
    );
    c.labels
        .insert("com.example.ip".into(), "198.51.100.7/24".into());
    let r = only_record(&c, &opts);
    assert_eq!(r.ip, "198.51.100.7".parse::<IpAddr>().expect("ip"));
    assert_eq!(r.port, 8080, "the port is still the published one");
    let t = task(&[("com.example.ip", "fd00::7")]);
    assert_eq!(
        only_record(&t, &opts).ip,
        "fd00::7".parse::<IpAddr>().expect("ip")
    );
    c.labels.insert("com.example.ip".into(), "not-an-ip".into());
    assert!(matches!(
        build_records(&c, &opts, &node()),
        Err(SkipReason::BadIpLabel { .. })
    ));
}

#[test]
fn ipv6_is_published_on_a_dual_stack_network_when_asked() {
    let mut t = task(&[]);
    t.networks[1].ipv6 = Some("fd00::7".parse().expect("ip"));
    let r = only_record(&t, &BuildOptions::default());
    assert_eq!(
        r.ip,
        "10.0.1.7".parse::<IpAddr>().expect("ip"),
        "IPv4 by default"
    );
    let v6 = BuildOptions {
        ipv6: true,
        ..Default::default()
    };
    assert_eq!(
        only_record(&t, &v6).ip,
        "fd00::7".parse::<IpAddr>().expect("ip")
    );
    // A network without IPv6 still gives its IPv4 address.
    assert_eq!(
        only_record(&task(&[]), &v6).ip,
        "10.0.1.7".parse::<IpAddr>().expect("ip")
    );
    // Plain containers with --internal, too.
    let mut c = plain();
    c.networks[0].ipv6 = Some("fd00::2".parse().expect("ip"));
    let internal_v6 = BuildOptions {
        internal: true,
        ipv6: true,
        ..Default::default()
    };
    assert_eq!(
        only_record(&c, &internal_v6).ip,
        "fd00::2".parse::<IpAddr>().expect("ip")
    );
}

#[test]
fn a_custom_ingress_network_is_never_the_tasks_address() {
    let mut t = task(&[]);
    // `docker network create --ingress mesh`: the first network by name, and not "ingress".
    t.networks = vec![
        NetworkAttachment {
            name: "a-mesh".into(),
            network_id: "n1".into(),
            ipv4: Some("10.255.0.9".parse().expect("ip")),
            ipv6: None,
            ingress: true,
        },
        NetworkAttachment {
            name: "mongo-net".into(),
            network_id: "n2".into(),
            ipv4: Some("10.0.1.7".parse().expect("ip")),
            ipv6: None,
            ingress: false,
        },
    ];
    let r = only_record(&t, &BuildOptions::default());
    assert_eq!(r.ip, "10.0.1.7".parse::<IpAddr>().expect("ip"));
    t.networks.truncate(1);
    assert!(matches!(
        build_records(&t, &BuildOptions::default(), &node()),
        Err(SkipReason::NoAddress { .. })
    ));
}

#[test]
fn a_record_over_the_size_cap_is_refused_naming_its_container() {
    let mut c = plain();
    c.labels
        .insert("blob".into(), "x".repeat(backend_core::RECORD_MAX_BYTES));
    let options = BuildOptions {
        internal: true,
        ..Default::default()
    };
    match build(&c, &options, &node()) {
        Err(e @ SkipReason::TooLarge { .. }) => {
            let text = e.to_string();
            assert!(text.contains("web-1") && text.contains("65536"), "{text}");
        }
        other => panic!("not refused: {other:?}"),
    }
    // Just under the cap it is published.
    c.labels.insert("blob".into(), "x".repeat(1000));
    assert_eq!(only_record(&c, &options).labels["blob"].len(), 1000);
}
