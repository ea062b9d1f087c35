//! The engine and the store the benchmark runs on, and everything it creates there.
//!
//! Every container, service and network the bench makes carries the label
//! `registrator-bench.run=<run id>`, every etcd or Consul key lives under `rbench/<run id>`,
//! and every Consul catalog service is named `rbench-<run id>-...`, so the final clean-up finds
//! all of it by label, prefix and name, even after an error half-way.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bollard::models::{
    ContainerCreateBody, EndpointSpec, EndpointSpecModeEnum, NetworkAttachmentConfig,
    NetworkCreateRequest, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec,
    TaskSpecContainerSpec, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListNetworksOptions, ListServicesOptions,
    RemoveContainerOptions, UpdateServiceOptions,
};
use bollard::Docker;
use etcd_client::{Client, DeleteOptions, GetOptions};
use futures::StreamExt;
use tokio::time::Instant;

use crate::consul::Consul;

/// The label on everything the bench creates.
pub const RUN_LABEL: &str = "registrator-bench.run";

/// How many engine requests run at once when creating or removing many containers.
const PARALLEL: usize = 8;

/// The engine, the store, and the identity of this run.
#[derive(Clone)]
pub struct Lab {
    pub docker: Docker,
    pub etcd: Client,
    pub etcd_endpoint: String,
    /// Only when a Consul part runs.
    pub consul: Option<Consul>,
    pub run_id: String,
    pub image: String,
}

/// A lab is known by its run (the engine and store clients have no `Debug`).
impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lab(run {}, etcd {})", self.run_id, self.etcd_endpoint)
    }
}

impl Lab {
    pub async fn connect(
        etcd_endpoint: &str,
        consul_endpoint: Option<&str>,
        image: &str,
    ) -> Result<Lab> {
        let docker = Docker::connect_with_defaults()
            .context("cannot reach the Docker engine (unix socket or DOCKER_HOST)")?
            .negotiate_version()
            .await
            .context("cannot negotiate the Docker API version")?;
        let etcd = tokio::time::timeout(
            Duration::from_secs(10),
            Client::connect([format!("http://{etcd_endpoint}")], None),
        )
        .await
        .map_err(|_| anyhow!("timed out connecting to etcd at {etcd_endpoint}"))?
        .with_context(|| format!("cannot connect to etcd at {etcd_endpoint}"))?;
        let consul = match consul_endpoint {
            Some(endpoint) => Some(Consul::connect(endpoint).await?),
            None => None,
        };
        let nanos = crate::now_ns();
        let run_id = format!(
            "{:08x}",
            (nanos as u64 ^ u64::from(std::process::id())) as u32
        );
        Ok(Lab {
            docker,
            etcd,
            etcd_endpoint: etcd_endpoint.to_string(),
            consul,
            run_id,
            image: image.to_string(),
        })
    }

    /// `rbench/<run id>-<part>`: the etcd prefix of one bridge (or floor) run.
    pub fn prefix(&self, part: &str) -> String {
        format!("rbench/{}-{part}", self.run_id)
    }

    /// `rbench-<run id>-<part>`: the Consul catalog service name of one part's containers.
    pub fn service_name(&self, part: &str) -> String {
        format!("rbench-{}-{part}", self.run_id)
    }

    /// The Consul agent, when a Consul part was asked for.
    pub fn consul(&self) -> Result<&Consul> {
        self.consul
            .as_ref()
            .ok_or_else(|| anyhow!("no Consul connection (internal error)"))
    }

    pub fn run_label(&self) -> String {
        format!("{RUN_LABEL}={}", self.run_id)
    }

    fn labels(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut labels = HashMap::from([(RUN_LABEL.to_string(), self.run_id.clone())]);
        for (k, v) in extra {
            labels.insert((*k).to_string(), (*v).to_string());
        }
        labels
    }

    /// Creates (does not start) `docker run -d --expose 8080 <image> sleep 3600`, with the
    /// label `SERVICE_NAME=<service>` when a service name is given (the Consul parts: a catalog
    /// service name of this run's own).
    pub async fn create_plain(&self, name: &str, service: Option<&str>) -> Result<String> {
        let labels = match service {
            Some(s) => self.labels(&[("SERVICE_NAME", s)]),
            None => self.labels(&[]),
        };
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(vec!["sleep".into(), "3600".into()]),
            exposed_ports: Some(vec!["8080/tcp".into()]),
            labels: Some(labels),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .with_context(|| format!("cannot create container {name}"))?;
        Ok(created.id)
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        self.docker
            .start_container(id, None)
            .await
            .with_context(|| format!("cannot start container {id}"))
    }

    /// Creates and starts `count` plain containers named `<base>-<i>`, a few at a time.
    pub async fn run_many_plain(
        &self,
        base: &str,
        count: usize,
        service: Option<&str>,
    ) -> Result<Vec<String>> {
        let results: Vec<Result<String>> = futures::stream::iter(0..count)
            .map(|i| async move {
                let id = self.create_plain(&format!("{base}-{i}"), service).await?;
                self.start(&id).await?;
                Ok(id)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Force-removes containers, a few at a time; errors are reported, not returned.
    pub async fn remove_containers(&self, ids: &[String]) {
        let failures: Vec<String> = futures::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let options = RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                };
                match self.docker.remove_container(&id, Some(options)).await {
                    Ok(())
                    | Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    }) => None,
                    Err(e) => Some(format!("{id}: {e}")),
                }
            })
            .buffer_unordered(PARALLEL)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        for f in failures {
            crate::log(&format!("warning: cannot remove container {f}"));
        }
    }

    /// The ids of this run's containers (running or not).
    pub async fn own_containers(&self) -> Result<Vec<String>> {
        let filters = HashMap::from([("label".to_string(), vec![self.run_label()])]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .context("cannot list containers")?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// How many containers run on the engine now (this run's and anybody else's).
    pub async fn running_containers(&self) -> Result<usize> {
        Ok(self
            .docker
            .list_containers(None::<ListContainersOptions>)
            .await
            .context("cannot list containers")?
            .len())
    }

    /// An overlay network for the swarm part.
    pub async fn create_overlay(&self, name: &str) -> Result<String> {
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("overlay".into()),
            labels: Some(self.labels(&[])),
            ..Default::default()
        };
        let created = self
            .docker
            .create_network(request)
            .await
            .with_context(|| format!("cannot create overlay network {name}"))?;
        Ok(created.id)
    }

    /// A replicated service with 0 replicas whose task containers carry
    /// `registrator.port=8080`, on `network`, in DNS round-robin mode (no VIP: IPVS is not
    /// needed).
    pub async fn create_service(&self, name: &str, network: &str) -> Result<()> {
        let spec = ServiceSpec {
            name: Some(name.to_string()),
            labels: Some(self.labels(&[])),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(self.image.clone()),
                    command: Some(vec!["sleep".into(), "3600".into()]),
                    labels: Some(self.labels(&[("registrator.port", "8080")])),
                    stop_grace_period: Some(1_000_000_000),
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                    ..Default::default()
                }),
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some(network.to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(0) }),
                ..Default::default()
            }),
            endpoint_spec: Some(EndpointSpec {
                mode: Some(EndpointSpecModeEnum::DNSRR),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.docker
            .create_service(spec, None)
            .await
            .with_context(|| format!("cannot create service {name}"))?;
        Ok(())
    }

    /// Sets a service's replica count (`docker service scale`).
    pub async fn scale_service(&self, name: &str, replicas: i64) -> Result<()> {
        let service = self
            .docker
            .inspect_service(name, None)
            .await
            .with_context(|| format!("cannot inspect service {name}"))?;
        let version = service
            .version
            .and_then(|v| v.index)
            .ok_or_else(|| anyhow!("service {name} has no version"))?;
        let mut spec = service
            .spec
            .ok_or_else(|| anyhow!("service {name} has no spec"))?;
        spec.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(replicas),
            }),
            ..Default::default()
        });
        let options = UpdateServiceOptions {
            version: i32::try_from(version).context("service version out of range")?,
            ..Default::default()
        };
        self.docker
            .update_service(name, spec, options, None)
            .await
            .with_context(|| format!("cannot scale service {name} to {replicas}"))?;
        Ok(())
    }

    /// Deletes every key under this run's prefixes.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let mut etcd = self.etcd.clone();
        etcd.delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .with_context(|| format!("cannot delete etcd prefix {prefix}"))?;
        Ok(())
    }

    /// How many keys there are under `prefix`.
    pub async fn count_keys(&self, prefix: &str) -> Result<i64> {
        let mut etcd = self.etcd.clone();
        let resp = etcd
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .with_context(|| format!("cannot count etcd keys under {prefix}"))?;
        Ok(resp.count())
    }

    /// Removes this run's Consul keys (and the sessions holding them) and catalog services.
    pub async fn clean_up_consul(&self) {
        let Some(consul) = &self.consul else { return };
        if let Err(e) = consul
            .delete_prefix(&format!("rbench/{}-", self.run_id))
            .await
        {
            crate::log(&format!("warning: {e:#}"));
        }
        if let Err(e) = consul
            .deregister_services(&format!("rbench-{}-", self.run_id))
            .await
        {
            crate::log(&format!("warning: {e:#}"));
        }
    }

    /// Removes everything this run made: services, containers, networks, etcd and Consul keys,
    /// Consul catalog services. Best effort: it reports what it could not remove and goes on.
    pub async fn clean_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let label = HashMap::from([("label".to_string(), vec![self.run_label()])]);

        match self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(label.clone()),
                ..Default::default()
            }))
            .await
        {
            Ok(services) => {
                for s in services {
                    let Some(id) = s.id else { continue };
                    if let Err(e) = self.docker.delete_service(&id).await {
                        crate::log(&format!("warning: cannot remove service {id}: {e}"));
                    }
                }
            }
            Err(e) => crate::log(&format!("warning: cannot list services: {e}")),
        }

        // Task containers go away with their service, a moment later; plain ones are removed
        // here. Loop until none is left or the deadline passes.
        loop {
            match self.own_containers().await {
                Ok(ids) if ids.is_empty() => break,
                Ok(ids) => self.remove_containers(&ids).await,
                Err(e) => crate::log(&format!("warning: {e:#}")),
            }
            if Instant::now() >= deadline {
                crate::log("warning: containers of this run are still there after 120 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        match self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(label),
            }))
            .await
        {
            Ok(networks) => {
                for n in networks {
                    let Some(id) = n.id else { continue };
                    // An overlay network stays in use for a moment after its last task.
                    loop {
                        match self.docker.remove_network(&id).await {
                            Ok(())
                            | Err(bollard::errors::Error::DockerResponseServerError {
                                status_code: 404,
                                ..
                            }) => break,
                            Err(e) if Instant::now() >= deadline => {
                                crate::log(&format!("warning: cannot remove network {id}: {e}"));
                                break;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                    }
                }
            }
            Err(e) => crate::log(&format!("warning: cannot list networks: {e}")),
        }

        if let Err(e) = self
            .delete_prefix(&format!("rbench/{}-", self.run_id))
            .await
        {
            crate::log(&format!("warning: {e:#}"));
        }
        self.clean_up_consul().await;
    }
}
