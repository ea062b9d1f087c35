//! Registrator's `SERVICE_*` metadata, read from a container's environment and labels.
//!
//! The rules are Registrator's, so that its users' containers behave the same here:
//!
//! * any `SERVICE_<KEY>=value` in the environment or the labels sets metadata `<key>`
//!   (lower-cased); a label beats the same variable in the environment;
//! * `SERVICE_<port>_<KEY>` applies to that exposed port only and beats the unscoped
//!   `SERVICE_<KEY>`, wherever each comes from.
//!
//! Well-known keys: `name`, `id`, `tags`, `ignore`, and (this project's addition, for swarm
//! tasks) `port`. Every other key is an attribute, published in the record's `attrs`.

use std::collections::{BTreeMap, BTreeSet};

/// Metadata for one port of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    values: BTreeMap<String, String>,
    /// Keys that came from a port-scoped `SERVICE_<port>_<KEY>`.
    from_port: BTreeSet<String>,
}

impl Metadata {
    /// Collects the metadata for `port` (the exposed port number as text, or `""` for none).
    /// `env` holds `KEY=value` strings as Docker reports them.
    pub fn collect<'a>(
        env: impl IntoIterator<Item = &'a str>,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        port: &str,
    ) -> Metadata {
        let mut meta = Metadata::default();
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
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
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
}
