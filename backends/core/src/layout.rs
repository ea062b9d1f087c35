//! The key layout: a public contract, documented in `docs/key-layout.md`.
//!
//! ```text
//! <prefix>/services/<service>/<instance-id>   one ServiceRecord (JSON) per published instance
//! <prefix>/nodes/<node-id>                    one NodeRecord (JSON) per running bridge
//! <prefix>/replsets/<set>/uri                 mongodb:// connection string (plain text)
//! <prefix>/replsets/<set>/status              replica-set status (JSON)
//! <prefix>/replsets/<set>/leader              the reconciler leader's lock
//! ```
//!
//! The same logical layout is used in etcd and in Consul KV. Keys never start with `/`
//! (Consul rejects a leading slash; etcd users expect `registrator/...` with `etcdctl get
//! --prefix registrator/`).

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "registrator";

/// Builds and parses the keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    prefix: String,
}

/// The parts of a `<prefix>/services/<service>/<instance-id>` key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub service: String,
    pub id: String,
}

impl KeyLayout {
    /// A layout under `prefix`; leading and trailing slashes are dropped, an empty prefix becomes
    /// [`DEFAULT_PREFIX`].
    pub fn new(prefix: &str) -> Self {
        let trimmed = prefix.trim_matches('/');
        let prefix = if trimmed.is_empty() {
            DEFAULT_PREFIX.to_string()
        } else {
            trimmed.to_string()
        };
        KeyLayout { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/services/`: every service record is below it.
    pub fn services_prefix(&self) -> String {
        format!("{}/services/", self.prefix)
    }

    /// `<prefix>/services/<service>/`: every instance of one service.
    pub fn service_prefix(&self, service: &str) -> String {
        format!("{}/services/{}/", self.prefix, service)
    }

    /// `<prefix>/services/<service>/<id>`.
    pub fn service_key(&self, service: &str, id: &str) -> String {
        format!("{}/services/{}/{}", self.prefix, service, id)
    }

    /// `<prefix>/nodes/`.
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `<prefix>/nodes/<node-id>`.
    pub fn node_key(&self, node_id: &str) -> String {
        format!("{}/nodes/{}", self.prefix, node_id)
    }

    /// `<prefix>/replsets/<set>/uri`.
    pub fn replset_uri_key(&self, set: &str) -> String {
        format!("{}/replsets/{}/uri", self.prefix, set)
    }

    /// `<prefix>/replsets/<set>/status`.
    pub fn replset_status_key(&self, set: &str) -> String {
        format!("{}/replsets/{}/status", self.prefix, set)
    }

    /// `<prefix>/replsets/<set>/identity`: what the reconciler remembers of the set
    /// ([`crate::SetIdentity`]).
    pub fn replset_identity_key(&self, set: &str) -> String {
        format!("{}/replsets/{}/identity", self.prefix, set)
    }

    /// `<prefix>/replsets/<set>/leader`.
    pub fn replset_leader_key(&self, set: &str) -> String {
        format!("{}/replsets/{}/leader", self.prefix, set)
    }

    /// Splits a service key into service and instance id; `None` for any other key. The
    /// instance id may itself contain `/`-free characters only (see [`valid_segment`]).
    pub fn parse_service_key(&self, key: &str) -> Option<ServiceKey> {
        let rest = key.strip_prefix(&self.services_prefix())?;
        let (service, id) = rest.split_once('/')?;
        if service.is_empty() || id.is_empty() || id.contains('/') {
            return None;
        }
        Some(ServiceKey {
            service: service.to_string(),
            id: id.to_string(),
        })
    }
}

/// Whether `s` can be one segment of a key: non-empty, no `/`, no control characters, and not
/// `.` or `..` (which some HTTP stacks normalise away in Consul's `/v1/kv/<key>` paths).
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.chars().any(char::is_control)
}

/// The longest replica-set name taken, in bytes: a name is a key segment of every
/// `replsets/<set>/...` key and the value of `replicaSet=` in the published URI.
pub const MAX_SET_NAME_LEN: usize = 64;

/// Why a name cannot be a replica set's (from `--replset`, or a record's
/// `registrator.replset` label).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replica set name {name:?} {problem}; use letters, digits, '.', '_' and '-' (at most {MAX_SET_NAME_LEN})")]
pub struct SetNameError {
    pub name: String,
    pub problem: &'static str,
}

/// Checks a replica set's name. The name becomes one segment of `<prefix>/replsets/<set>/...`
/// (where `rs0/leader` would land under the election keys of `rs0`), mongod's `--replSet`,
/// and `replicaSet=<set>` in the published connection string (where `&`, `?`, `#` or `%`
/// would change the URI's meaning). So it is a [`valid_segment`] made only of ASCII letters,
/// digits, `.`, `_` and `-`, not `.` or `..`, and at most [`MAX_SET_NAME_LEN`] bytes.
pub fn check_set_name(name: &str) -> Result<(), SetNameError> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_SET_NAME_LEN {
        Some("is too long")
    } else if name == "." || name == ".." {
        Some("is a relative path segment")
    } else if name.contains('/') {
        Some("contains '/', which would make it a key of another set")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("contains a character other than a letter, a digit, '.', '_' or '-'")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(SetNameError {
            name: name.to_string(),
            problem,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let l = KeyLayout::new("/registrator/");
        assert_eq!(
            l.service_key("mongo", "abc"),
            "registrator/services/mongo/abc"
        );
        assert_eq!(l.node_key("n1"), "registrator/nodes/n1");
        assert_eq!(l.replset_uri_key("rs0"), "registrator/replsets/rs0/uri");
        assert_eq!(l.services_prefix(), "registrator/services/");
    }

    #[test]
    fn empty_prefix_is_the_default() {
        assert_eq!(KeyLayout::new("").prefix(), DEFAULT_PREFIX);
        assert_eq!(KeyLayout::new("/").prefix(), DEFAULT_PREFIX);
    }

    #[test]
    fn nested_prefixes_are_kept() {
        let l = KeyLayout::new("prod/eu/registrator");
        assert_eq!(l.service_key("s", "i"), "prod/eu/registrator/services/s/i");
    }

    #[test]
    fn parse_round_trips_and_rejects_other_keys() {
        let l = KeyLayout::new("p");
        let key = l.service_key("web", "host:web-1:80:udp");
        assert_eq!(
            l.parse_service_key(&key),
            Some(ServiceKey {
                service: "web".into(),
                id: "host:web-1:80:udp".into()
            })
        );
        assert_eq!(l.parse_service_key("p/nodes/n1"), None);
        assert_eq!(l.parse_service_key("p/services/web"), None);
        assert_eq!(l.parse_service_key("p/services/web/"), None);
        assert_eq!(l.parse_service_key("p/services/web/a/b"), None);
        assert_eq!(l.parse_service_key("other/services/web/a"), None);
    }

    #[test]
    fn set_names_are_key_segments_and_uri_values() {
        for good in ["rs0", "my-set_2.eu", &"a".repeat(MAX_SET_NAME_LEN)] {
            assert_eq!(check_set_name(good), Ok(()), "{good}");
        }
        let long = "a".repeat(MAX_SET_NAME_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "rs0/leader",
            "rs0/",
            "a b",
            "rs0&w=0",
            "rs0?x",
            "a%2F",
            "a\nb",
            "ränge",
            &long,
        ] {
            let e = check_set_name(bad).expect_err(bad);
            assert_eq!(e.name, bad);
            assert!(e.to_string().contains("use letters, digits"), "{e}");
        }
        // The name the error shows is escaped: a newline cannot forge a log line.
        let e = check_set_name("a\nb").expect_err("a newline");
        assert!(e.to_string().contains(r#""a\nb""#), "{e}");
    }

    #[test]
    fn segments() {
        assert!(valid_segment("mongo_rs-0.x"));
        assert!(!valid_segment(""));
        assert!(!valid_segment("a/b"));
        assert!(!valid_segment(".."));
        assert!(!valid_segment("a\nb"));
    }
}
