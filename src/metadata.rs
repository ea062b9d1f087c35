//! Registrator's `SERVICE_*` metadata, read from a container's environment and labels.
//!
//! The rules are Registrator's, so that its users' containers behave the same here:
//!
//! * any `SERVICE_<KEY>=value` in the environment or the labels sets metadata `<key>`
//!   (lower-cased); a label beats the same variable in the environment;
//! * `SERVICE_<port>_<KEY>` applies to that exposed port only and beats the unscoped
//!   `SERVICE_<KEY>`, wherever each comes from.
//!
//! Well-known keys: `name`, `id`, `tags`, `ignore`, (this project's addition, for swarm
//! tasks) `port`, and the `check_*` keys of Registrator's Consul health checks ([`CHECK_KEYS`],
//! read by [`Metadata::check`]). Every other key is an attribute, published in the record's
//! `attrs`.
//!
//! Registrator keeps the check keys among a service's attributes, but its Consul adapter, the
//! only one that reads them, turns them into the check and publishes no attribute at all. Here
//! they become the record's `check` and are not repeated as attributes (nor as Consul meta).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use backend_core::ServiceCheck;

/// The keys of Registrator's Consul checks, lower-cased: never attributes.
pub const CHECK_KEYS: [&str; 10] = [
    "check_http",
    "check_https",
    "check_tcp",
    "check_script",
    "check_ttl",
    "check_cmd",
    "check_interval",
    "check_timeout",
    "check_initial_status",
    "check_deregister_after",
];

/// Registrator's check interval when `SERVICE_CHECK_INTERVAL` is not set.
pub const DEFAULT_CHECK_INTERVAL: &str = "10s";

/// A `SERVICE_CHECK_*` value that cannot make a check: the service is published without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label or variable {key}={value:?} {problem}; publishing the service without this check")]
pub struct BadCheck {
    /// The key as the container wrote it (`SERVICE_CHECK_INTERVAL`, `SERVICE_80_CHECK_HTTP`).
    pub key: String,
    pub value: String,
    pub problem: &'static str,
}

/// Metadata for one port of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    values: BTreeMap<String, String>,
    /// Keys that came from a port-scoped `SERVICE_<port>_<KEY>`.
    from_port: BTreeSet<String>,
    /// The port collected for.
    port: String,
}

impl Metadata {
    /// Collects the metadata for `port` (the exposed port number as text, or `""` for none).
    /// `env` holds `KEY=value` strings as Docker reports them.
    pub fn collect<'a>(
        env: impl IntoIterator<Item = &'a str>,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        port: &str,
    ) -> Metadata {
        let mut meta = Metadata {
            port: port.to_string(),
            ..Metadata::default()
        };
        // The environment first, then labels, so that a label overrides the environment.
        for kv in env {
            if let Some((k, v)) = kv.split_once('=') {
                meta.add(k, v, port);
            }
        }
        for (k, v) in labels {
            meta.add(k, v, port);
        }
        meta
    }

    fn add(&mut self, key: &str, value: &str, port: &str) {
        let Some(rest) = key.strip_prefix("SERVICE_") else {
            return;
        };
        let rest = rest.to_ascii_lowercase();
        if let Some((scope, key)) = rest.split_once('_') {
            if !scope.is_empty() && scope.bytes().all(|b| b.is_ascii_digit()) {
                if scope == port && !key.is_empty() {
                    self.values.insert(key.to_string(), value.to_string());
                    self.from_port.insert(key.to_string());
                }
                return;
            }
        }
        if rest.is_empty() || self.from_port.contains(&rest) {
            return;
        }
        self.values.insert(rest, value.to_string());
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Whether `key` was set by a port-scoped variable.
    pub fn from_port(&self, key: &str) -> bool {
        self.from_port.contains(key)
    }

    /// `SERVICE_TAGS`, split on commas, blanks dropped.
    pub fn tags(&self) -> Vec<String> {
        self.get("tags")
            .map(|t| {
                t.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the port (or the whole container) is to be ignored: any non-empty value.
    pub fn ignored(&self) -> bool {
        self.get("ignore").is_some_and(|v| !v.is_empty())
    }

    /// The attributes: every key but the well-known ones.
    pub fn attrs(&self) -> BTreeMap<String, String> {
        self.values
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "name" | "id" | "tags" | "ignore" | "port"))
            .filter(|(k, _)| !CHECK_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The key as the container wrote it: `SERVICE_<KEY>` or `SERVICE_<port>_<KEY>`.
    fn written_key(&self, key: &str) -> String {
        let upper = key.to_ascii_uppercase();
        if self.from_port(key) {
            format!("SERVICE_{}_{upper}", self.port)
        } else {
            format!("SERVICE_{upper}")
        }
    }

    /// The Consul check of the instance published at `ip:port`, by Registrator's rules: the
    /// first of `check_http` (a path), `check_https`, `check_script`, `check_ttl` and
    /// `check_tcp` that is set makes the check; `check_interval` (default 10s),
    /// `check_timeout`, `check_initial_status` and `check_deregister_after` shape it. In a
    /// script, `$SERVICE_IP` and `$SERVICE_PORT` become the published address and port.
    /// `None` when no check is asked for; an error names the value that cannot be used.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<Option<ServiceCheck>, BadCheck> {
        let bad = |key: &str, problem: &'static str| BadCheck {
            key: self.written_key(key),
            value: self.get(key).unwrap_or_default().to_string(),
            problem,
        };
        let set = |key: &str| self.get(key).filter(|v| !v.is_empty());
        let address = SocketAddr::new(ip, port);
        let mut check = ServiceCheck::default();
        let kind = if let Some(path) = set("check_http") {
            check.http = Some(format!("http://{address}{path}"));
            "check_http"
        } else if let Some(path) = set("check_https") {
            check.http = Some(format!("https://{address}{path}"));
            "check_https"
        } else if set("check_cmd").is_some() {
            return Err(bad(
                "check_cmd",
                "is not supported (it needs Registrator's check-cmd helper); use SERVICE_CHECK_SCRIPT",
            ));
        } else if let Some(script) = set("check_script") {
            let script = script
                .replace("$SERVICE_IP", &ip.to_string())
                .replace("$SERVICE_PORT", &port.to_string());
            check.script = Some(script);
            "check_script"
        } else if let Some(ttl) = set("check_ttl") {
            if !go_duration(ttl) {
                return Err(bad("check_ttl", DURATION_PROBLEM));
            }
            check.ttl = Some(ttl.to_string());
            "check_ttl"
        } else if set("check_tcp").is_some() {
            check.tcp = Some(address.to_string());
            "check_tcp"
        } else {
            return Ok(None);
        };
        if let Some(path) = check.http.as_ref().and(set(kind)) {
            if !path.starts_with('/') {
                return Err(bad(kind, "is not a path; write it like /health"));
            }
        }
        let duration = |key: &str| match set(key) {
            Some(v) if go_duration(v) => Ok(Some(v.to_string())),
            Some(_) => Err(bad(key, DURATION_PROBLEM)),
            None => Ok(None),
        };
        if check.ttl.is_none() {
            check.interval =
                Some(duration("check_interval")?.unwrap_or_else(|| DEFAULT_CHECK_INTERVAL.into()));
            check.timeout = duration("check_timeout")?;
        }
        check.deregister_after = duration("check_deregister_after")?;
        if let Some(status) = set("check_initial_status") {
            if !matches!(status, "passing" | "warning" | "critical") {
                return Err(bad(
                    "check_initial_status",
                    "is not a check status; write passing, warning or critical",
                ));
            }
            check.initial_status = Some(status.to_string());
        }
        check.source = self.written_key(kind);
        Ok(Some(check))
    }
}

const DURATION_PROBLEM: &str = "is not a duration; write it like 10s, 500ms or 1m30s";

/// Whether `s` is a non-negative Go duration, as Consul parses it: `0`, or numbers (with an
/// optional fraction) each followed by a unit of `ns`, `us`, `µs`, `ms`, `s`, `m` or `h`.
pub fn go_duration(s: &str) -> bool {
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return true;
    }
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let number = &rest[..number_end];
        let digits = number.bytes().filter(u8::is_ascii_digit).count();
        if digits == 0 || number.matches('.').count() > 1 {
            return false;
        }
        rest = &rest[number_end..];
        let Some(unit) = ["ns", "us", "µs", "μs", "ms", "s", "m", "h"]
            .into_iter()
            .find(|u| rest.starts_with(u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// One tag of `--tags`: text with Registrator's Go-template placeholders, filled in from each
/// container. The placeholders understood are the ones Registrator's users write in tags:
/// `{{.ID}}`, `{{.Name}}` (Docker's name, with its leading `/`), `{{.Config.Image}}`,
/// `{{.Config.Hostname}}` and `{{index .Config.Labels "<label>"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate(Vec<TagPart>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum TagPart {
    Text(String),
    Id,
    Name,
    Image,
    Hostname,
    Label(String),
}

/// A `--tags` placeholder this program does not fill in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported placeholder {{{{{0}}}}} in --tags; use {{{{.ID}}}}, {{{{.Name}}}}, {{{{.Config.Image}}}}, {{{{.Config.Hostname}}}} or {{{{index .Config.Labels \"<label>\"}}}}")]
pub struct TagTemplateError(pub String);

impl TagTemplate {
    pub fn parse(s: &str) -> Result<TagTemplate, TagTemplateError> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(TagPart::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| TagTemplateError(after.to_string()))?;
            let action = after[..end].trim();
            let words: Vec<&str> = action.split_whitespace().collect();
            parts.push(match words.as_slice() {
                [".ID"] => TagPart::Id,
                [".Name"] => TagPart::Name,
                [".Config.Image"] => TagPart::Image,
                [".Config.Hostname"] => TagPart::Hostname,
                ["index", ".Config.Labels", key]
                    if key.len() >= 2 && key.starts_with('"') && key.ends_with('"') =>
                {
                    TagPart::Label(key[1..key.len() - 1].to_string())
                }
                _ => return Err(TagTemplateError(action.to_string())),
            });
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(TagPart::Text(rest.to_string()));
        }
        Ok(TagTemplate(parts))
    }

    /// The tag for one container (its id, Docker name, image, hostname and labels).
    pub fn render(&self, c: &crate::container::ContainerInfo) -> String {
        self.0
            .iter()
            .map(|p| match p {
                TagPart::Text(t) => t.clone(),
                TagPart::Id => c.id.clone(),
                TagPart::Name => format!("/{}", c.name),
                TagPart::Image => c.image.clone(),
                TagPart::Hostname => c.hostname.clone(),
                TagPart::Label(k) => c.label(k).unwrap_or_default().to_string(),
            })
            .collect()
    }
}

/// `--tags`: comma-separated, blanks dropped, each a [`TagTemplate`].
pub fn parse_tags(s: &str) -> Result<Vec<TagTemplate>, TagTemplateError> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(TagTemplate::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(env: &[&str], labels: &[(&str, &str)], port: &str) -> Metadata {
        Metadata::collect(env.iter().copied(), labels.iter().copied(), port)
    }

    #[test]
    fn label_beats_env() {
        let label = [("SERVICE_NAME", "from-label")];
        let m = meta(&["SERVICE_NAME=from-env"], &label, "80");
        assert_eq!(m.get("name"), Some("from-label"));
    }

    #[test]
    fn port_scoped_beats_unscoped_in_any_order() {
        let label = [("SERVICE_NAME", "generic")];
        let m = meta(&["SERVICE_80_NAME=web"], &label, "80");
        assert_eq!(m.get("name"), Some("web"));
        assert!(m.from_port("name"));
        let m = meta(&["SERVICE_NAME=generic", "SERVICE_80_NAME=web"], &[], "80");
        assert_eq!(m.get("name"), Some("web"));
    }

    #[test]
    fn other_ports_scopes_are_ignored() {
        let m = meta(&["SERVICE_443_NAME=tls", "SERVICE_NAME=web"], &[], "80");
        assert_eq!(m.get("name"), Some("web"));
        assert!(!m.from_port("name"));
    }

    #[test]
    fn tags_attrs_and_ignore() {
        let m = meta(
            &[
                "SERVICE_TAGS=a, b,,c",
                "SERVICE_REGION=eu",
                "PATH=/bin",
                "SERVICE_=x",
            ],
            &[("SERVICE_80_IGNORE", "true"), ("other", "x")],
            "80",
        );
        assert_eq!(m.tags(), vec!["a", "b", "c"]);
        assert!(m.ignored());
        assert_eq!(
            m.attrs(),
            BTreeMap::from([("region".to_string(), "eu".to_string())])
        );
        assert!(!meta(&["SERVICE_IGNORE="], &[], "80").ignored());
    }

    #[test]
    fn values_may_contain_equals_signs() {
        let m = meta(&["SERVICE_CHECK_SCRIPT=a=b"], &[], "");
        assert_eq!(m.get("check_script"), Some("a=b"));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn http_check_on_the_published_address_with_registrator_defaults() {
        let m = meta(
            &["SERVICE_CHECK_HTTP=/health", "SERVICE_REGION=eu"],
            &[("SERVICE_CHECK_TIMEOUT", "2s")],
            "8080",
        );
        let check = m
            .check(ip("127.0.0.1"), 32768)
            .expect("valid")
            .expect("a check");
        assert_eq!(
            check,
            ServiceCheck {
                http: Some("http://127.0.0.1:32768/health".into()),
                interval: Some("10s".into()),
                timeout: Some("2s".into()),
                source: "SERVICE_CHECK_HTTP".into(),
                ..ServiceCheck::default()
            }
        );
        assert_eq!(
            m.attrs(),
            BTreeMap::from([("region".to_string(), "eu".to_string())]),
            "check keys are not attributes"
        );
        let https = meta(&["SERVICE_CHECK_HTTPS=/"], &[], "443");
        let check = https
            .check(ip("fd00::5"), 443)
            .expect("valid")
            .expect("a check");
        assert_eq!(check.http.as_deref(), Some("https://[fd00::5]:443/"));
    }

    #[test]
    fn port_scoped_check_keys_and_the_other_kinds() {
        let m = meta(
            &["SERVICE_80_CHECK_TCP=true", "SERVICE_CHECK_INTERVAL=5s"],
            &[("SERVICE_CHECK_INITIAL_STATUS", "passing")],
            "80",
        );
        let check = m
            .check(ip("10.0.0.2"), 80)
            .expect("valid")
            .expect("a check");
        assert_eq!(check.tcp.as_deref(), Some("10.0.0.2:80"));
        assert_eq!(check.interval.as_deref(), Some("5s"));
        assert_eq!(check.initial_status.as_deref(), Some("passing"));
        assert_eq!(check.source, "SERVICE_80_CHECK_TCP");
        // Another port's check is not this port's.
        let other = meta(&["SERVICE_80_CHECK_TCP=true"], &[], "443");
        assert_eq!(other.check(ip("10.0.0.2"), 443), Ok(None));

        let script = meta(
            &["SERVICE_CHECK_SCRIPT=nc -z $SERVICE_IP $SERVICE_PORT"],
            &[("SERVICE_CHECK_DEREGISTER_AFTER", "1m30s")],
            "6379",
        );
        let check = script
            .check(ip("10.0.0.3"), 6379)
            .expect("valid")
            .expect("a check");
        assert_eq!(check.script.as_deref(), Some("nc -z 10.0.0.3 6379"));
        assert_eq!(check.deregister_after.as_deref(), Some("1m30s"));

        let ttl = meta(
            &["SERVICE_CHECK_TTL=30s", "SERVICE_CHECK_INTERVAL=5s"],
            &[],
            "",
        );
        let check = ttl
            .check(ip("10.0.0.3"), 1)
            .expect("valid")
            .expect("a check");
        assert_eq!(check.ttl.as_deref(), Some("30s"));
        assert_eq!(check.interval, None, "a TTL check has no interval");

        // Registrator's order: HTTP before TCP.
        let both = meta(&["SERVICE_CHECK_TCP=true", "SERVICE_CHECK_HTTP=/"], &[], "");
        let check = both
            .check(ip("10.0.0.3"), 80)
            .expect("valid")
            .expect("a check");
        assert!(check.http.is_some() && check.tcp.is_none());
        // Only modifiers: no check.
        let none = meta(&["SERVICE_CHECK_INTERVAL=5s"], &[], "");
        assert_eq!(none.check(ip("10.0.0.3"), 80), Ok(None));
        assert!(none.attrs().is_empty());
    }

    #[test]
    fn malformed_check_values_name_the_key_as_written() {
        let m = meta(
            &[
                "SERVICE_8080_CHECK_HTTP=/health",
                "SERVICE_8080_CHECK_INTERVAL=often",
            ],
            &[],
            "8080",
        );
        let err = m.check(ip("127.0.0.1"), 1).expect_err("a bad interval");
        assert_eq!(err.key, "SERVICE_8080_CHECK_INTERVAL");
        assert_eq!(err.value, "often");
        assert!(err.to_string().contains("10s"), "{err}");
        for (env, key) in [
            (["SERVICE_CHECK_HTTP=health", ""], "SERVICE_CHECK_HTTP"),
            (
                ["SERVICE_CHECK_TCP=1", "SERVICE_CHECK_TIMEOUT=-1s"],
                "SERVICE_CHECK_TIMEOUT",
            ),
            (["SERVICE_CHECK_TTL=1d", ""], "SERVICE_CHECK_TTL"),
            (["SERVICE_CHECK_CMD=/bin/true", ""], "SERVICE_CHECK_CMD"),
            (
                ["SERVICE_CHECK_TCP=1", "SERVICE_CHECK_INITIAL_STATUS=ok"],
                "SERVICE_CHECK_INITIAL_STATUS",
            ),
            (
                ["SERVICE_CHECK_TCP=1", "SERVICE_CHECK_DEREGISTER_AFTER=soon"],
                "SERVICE_CHECK_DEREGISTER_AFTER",
            ),
        ] {
            let m = meta(&env, &[], "80");
            assert_eq!(
                m.check(ip("127.0.0.1"), 80).map_err(|e| e.key),
                Err(key.to_string())
            );
        }
    }

    #[test]
    fn go_durations() {
        for good in [
            "0",
            "10s",
            "1m30s",
            "500ms",
            "1.5h",
            "2us",
            "3µs",
            "+5s",
            ".5s",
            "1h2m3s4ms",
        ] {
            assert!(go_duration(good), "{good}");
        }
        for bad in [
            "", "10", "s", "-1s", "1d", "1.2.3s", "10 s", "5sec", "1m-1s", ".s",
        ] {
            assert!(!go_duration(bad), "{bad}");
        }
    }

    #[test]
    fn tag_templates_fill_in_registrators_placeholders() {
        let c = crate::container::ContainerInfo {
            id: "c0ffee".into(),
            name: "web-1".into(),
            image: "nginx:1.25".into(),
            hostname: "a1b2".into(),
            labels: BTreeMap::from([("team".into(), "blue".into())]),
            ..Default::default()
        };
        let tags = parse_tags(
            r#"edge, id-{{.ID}},{{ .Name }},{{.Config.Image}}@{{.Config.Hostname}},t={{index .Config.Labels "team"}},x={{index .Config.Labels "none"}}"#,
        )
        .expect("valid");
        let rendered: Vec<String> = tags.iter().map(|t| t.render(&c)).collect();
        assert_eq!(
            rendered,
            vec![
                "edge",
                "id-c0ffee",
                "/web-1",
                "nginx:1.25@a1b2",
                "t=blue",
                "x="
            ]
        );
        for bad in [
            "{{.Node.Hostname}}",
            "{{.ID",
            "{{index .Config.Labels team}}",
            "{{printf \"x\"}}",
        ] {
            let err = parse_tags(bad).expect_err(bad);
            assert!(err.to_string().contains("--tags"), "{err}");
        }
    }
}
