//! The allow-list: which requests the proxy forwards to the engine, and why it refuses the
//! others.
//!
//! A rule is a method, a path pattern and, optionally, the query parameters it may carry. The
//! proxy forwards reads only: every rule is `GET` (or `HEAD`, a GET without the body: the
//! docker CLI pings with it), and a request that asks for a connection upgrade (the engine's
//! attach and exec streams hijack the connection) is refused whatever its path. The path may start with an API version, `/v1.41/info` as well as `/info`, as
//! the engine accepts both.
//!
//! A pattern's segments are literal (`containers`) or a placeholder (`{id}`), which matches
//! one container id or name: what the engine accepts as a name,
//! `[a-zA-Z0-9][a-zA-Z0-9_.-]*`. A placeholder never matches `..`, an empty segment or an
//! escaped character (`%2F`), so no path can step out of the pattern it matched.

use std::fmt;

/// The requests the bridge makes (src/engine.rs), and `/_ping`, which clients such as the
/// docker CLI send first. Each with the query parameters bollard sends for it and the few a
/// person listing or inspecting by hand adds.
pub const BRIDGE_RULES: &[&str] = &[
    "GET /_ping",
    "HEAD /_ping",
    "GET /version",
    "GET /info",
    "GET /containers/json?all,limit,size,filters",
    "GET /containers/{id}/json?size",
    "GET /networks/{id}?verbose,scope",
    "GET /events?since,until,filters",
];

/// One allowed kind of request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    text: String,
    method: &'static str,
    segments: Vec<Segment>,
    /// The query parameters it allows; `None`: any.
    query: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Name,
}

/// A rule that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error(
        "allow rule {rule:?}: write it as \"GET /path\", e.g. \"GET /containers/{{id}}/logs\""
    )]
    Form { rule: String },
    #[error("allow rule {rule:?}: the proxy forwards reads only; {method} cannot be allowed (only GET or HEAD)")]
    Method { rule: String, method: String },
    #[error("allow rule {rule:?}: segment {segment:?} is neither a plain name nor a placeholder such as {{id}}")]
    Segment { rule: String, segment: String },
}

impl Rule {
    /// Parses `GET /path/{placeholder}/more[?param,param]` (or `HEAD ...`). The query
    /// parameters named after `?` are allowed; `?*` allows any; without `?`, none.
    pub fn parse(text: &str) -> Result<Rule, RuleError> {
        let form = || RuleError::Form {
            rule: text.to_string(),
        };
        let (method, target) = text.trim().split_once(' ').ok_or_else(form)?;
        let target = target.trim();
        let method = match method {
            "GET" => "GET",
            "HEAD" => "HEAD",
            _ => {
                return Err(RuleError::Method {
                    rule: text.to_string(),
                    method: method.to_string(),
                })
            }
        };
        let (path, query) = match target.split_once('?') {
            Some((path, "*")) => (path, None),
            Some((path, params)) => (
                path,
                Some(
                    params
                        .split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(String::from)
                        .collect(),
                ),
            ),
            None => (target, Some(Vec::new())),
        };
        let path = path.strip_prefix('/').ok_or_else(form)?;
        let segments = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') && s.ends_with('}') && s.len() > 2 {
                    Ok(Segment::Name)
                } else if is_name(s) || s == "_ping" {
                    Ok(Segment::Literal(s.to_string()))
                } else {
                    Err(RuleError::Segment {
                        rule: text.to_string(),
                        segment: s.to_string(),
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shown_query = match &query {
            None => "?*".to_string(),
            Some(params) if params.is_empty() => String::new(),
            Some(params) => format!("?{}", params.join(",")),
        };
        Ok(Rule {
            text: format!("{method} /{path}{shown_query}"),
            method,
            segments,
            query,
        })
    }

    fn matches(&self, method: &str, segments: &[&str]) -> bool {
        self.method == method
            && self.segments.len() == segments.len()
            && self
                .segments
                .iter()
                .zip(segments)
                .all(|(rule, s)| match rule {
                    Segment::Literal(l) => l == s,
                    Segment::Name => is_name(s),
                })
    }

    /// The first query parameter of `query` this rule does not allow.
    fn refused_param<'q>(&self, query: Option<&'q str>) -> Option<&'q str> {
        let allowed = self.query.as_ref()?;
        query?
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').map_or(p, |(name, _)| name))
            .find(|name| !allowed.iter().any(|a| a == name))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A container id or name as the engine accepts it.
fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `/v1.41/info` -> `/info`; a path without a version is returned as it is.
fn strip_version(path: &str) -> &str {
    let Some(rest) = path.strip_prefix("/v") else {
        return path;
    };
    let (version, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => return path,
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let valid = match version.split_once('.') {
        Some((major, minor)) => numeric(major) && numeric(minor),
        None => numeric(version),
    };
    if valid {
        tail
    } else {
        path
    }
}

/// What the allow-list says of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward,
    Refuse(Refusal),
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request asks for a connection upgrade (attach, exec, a WebSocket).
    Upgrade,
    /// The method and path match no rule.
    NotAllowed,
    /// The path matches a rule that does not allow this query parameter.
    Parameter { rule: String, param: String },
}

/// The rules the proxy forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    rules: Vec<Rule>,
}

impl AllowList {
    /// The bridge's rules ([`BRIDGE_RULES`]) and `extra`.
    pub fn for_bridge(extra: &[Rule]) -> AllowList {
        let mut rules: Vec<Rule> = BRIDGE_RULES
            .iter()
            .map(|r| Rule::parse(r).expect("the built-in rules parse"))
            .collect();
        rules.extend(extra.iter().cloned());
        AllowList { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Decides on a request: its method, its path (with or without the API version) and its
    /// raw query; `upgrade` when it carries `Upgrade` or `Connection: upgrade`.
    pub fn decide(&self, method: &str, path: &str, query: Option<&str>, upgrade: bool) -> Decision {
        if upgrade {
            return Decision::Refuse(Refusal::Upgrade);
        }
        let Some(unversioned) = strip_version(path).strip_prefix('/') else {
            return Decision::Refuse(Refusal::NotAllowed);
        };
        let segments: Vec<&str> = unversioned.split('/').collect();
        let Some(rule) = self.rules.iter().find(|r| r.matches(method, &segments)) else {
            return Decision::Refuse(Refusal::NotAllowed);
        };
        match rule.refused_param(query) {
            Some(param) => Decision::Refuse(Refusal::Parameter {
                rule: rule.to_string(),
                param: param.to_string(),
            }),
            None => Decision::Forward,
        }
    }

    /// The rules as one line, for logs and refusals.
    pub fn summary(&self) -> String {
        self.rules
            .iter()
            .map(Rule::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The request's path without its API version, the key under which refusals are logged once.
pub fn unversioned_path(path: &str) -> &str {
    strip_version(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge() -> AllowList {
        AllowList::for_bridge(&[])
    }

    fn decide(list: &AllowList, method: &str, target: &str) -> Decision {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        list.decide(method, path, query, false)
    }

    #[test]
    fn the_requests_of_the_bridge_are_forwarded_with_or_without_a_version() {
        let list = bridge();
        for target in [
            "/v1.41/version",
            "/version",
            "/v1.41/info",
            "/_ping",
            "/v1.41/containers/json?all=false&size=false",
            "/v1.53/containers/json",
            "/v1.41/containers/0123abcdef/json?size=false",
            "/containers/my-app.1_x/json",
            "/v1.41/networks/9vzbyfzkmp0f4mfgyo0fpxguh",
            "/networks/ingress?verbose=false",
            "/v1.41/events?since=1700000000.000000000&filters=%7B%22type%22%3A%5B%22container%22%5D%7D",
            "/v1/info",
        ] {
            assert_eq!(decide(&list, "GET", target), Decision::Forward, "{target}");
        }
        // The docker CLI pings with HEAD first.
        assert_eq!(decide(&list, "HEAD", "/_ping"), Decision::Forward);
    }

    #[test]
    fn writes_and_other_reads_are_refused() {
        let list = bridge();
        for (method, target) in [
            ("POST", "/v1.41/containers/create"),
            ("POST", "/containers/abc/exec"),
            ("POST", "/containers/abc/start"),
            ("DELETE", "/v1.41/containers/abc?force=1"),
            ("HEAD", "/info"),
            ("OPTIONS", "/_ping"),
            ("PUT", "/containers/abc/archive"),
            ("GET", "/v1.41/swarm"),
            ("GET", "/secrets"),
            ("GET", "/containers/abc/logs"),
            ("GET", "/containers/abc/archive?path=/etc/shadow"),
            ("GET", "/containers/abc/export"),
            ("GET", "/images/json"),
            ("GET", "/"),
            ("GET", ""),
            ("GET", "/containers"),
            ("GET", "/containers/json/extra"),
        ] {
            assert_eq!(
                decide(&list, method, target),
                Decision::Refuse(Refusal::NotAllowed),
                "{method} {target}"
            );
        }
    }

    #[test]
    fn a_placeholder_matches_one_name_and_nothing_that_steps_out() {
        let list = bridge();
        for target in [
            "/containers/../json",
            "/containers/./json",
            "/containers//json",
            "/containers/%2e%2e/json",
            "/containers/a%2Fb/json",
            "/containers/.hidden/json",
            "/containers/a/b/json",
            "/v1.41/../swarm",
            "/vx.1/info",
            "/v1./info",
        ] {
            assert_eq!(
                decide(&list, "GET", target),
                Decision::Refuse(Refusal::NotAllowed),
                "{target}"
            );
        }
    }

    #[test]
    fn a_parameter_the_rule_does_not_name_is_refused() {
        let list = bridge();
        assert_eq!(
            decide(&list, "GET", "/info?x=1"),
            Decision::Refuse(Refusal::Parameter {
                rule: "GET /info".into(),
                param: "x".into()
            })
        );
        assert_eq!(
            decide(&list, "GET", "/events?since=1&follow"),
            Decision::Refuse(Refusal::Parameter {
                rule: "GET /events?since,until,filters".into(),
                param: "follow".into()
            })
        );
        // Empty pieces are not parameters.
        assert_eq!(decide(&list, "GET", "/info?"), Decision::Forward);
        assert_eq!(
            decide(&list, "GET", "/containers/json?&all=1&"),
            Decision::Forward
        );
    }

    #[test]
    fn an_upgrade_is_refused_whatever_the_path() {
        let list = bridge();
        assert_eq!(
            list.decide("GET", "/v1.41/info", None, true),
            Decision::Refuse(Refusal::Upgrade)
        );
    }

    #[test]
    fn extra_rules_extend_the_list() {
        let logs = Rule::parse("GET /containers/{id}/logs?*").expect("parses");
        let list = AllowList::for_bridge(&[logs]);
        assert_eq!(
            decide(&list, "GET", "/v1.41/containers/c1/logs?tail=10&follow=1"),
            Decision::Forward
        );
        let top = Rule::parse("GET /containers/{id}/top").expect("parses");
        let list = AllowList::for_bridge(&[top]);
        assert_eq!(
            decide(&list, "GET", "/containers/c1/top"),
            Decision::Forward
        );
        assert!(matches!(
            decide(&list, "GET", "/containers/c1/top?ps_args=aux"),
            Decision::Refuse(Refusal::Parameter { .. })
        ));
        let tasks = Rule::parse("GET /tasks?filters").expect("parses");
        let list = AllowList::for_bridge(&[tasks]);
        assert_eq!(decide(&list, "GET", "/tasks?filters=x"), Decision::Forward);
        assert!(matches!(
            decide(&list, "GET", "/tasks?x=1"),
            Decision::Refuse(Refusal::Parameter { .. })
        ));
        assert!(
            list.summary().ends_with("GET /tasks?filters"),
            "{}",
            list.summary()
        );
    }

    #[test]
    fn rules_that_would_allow_a_write_or_do_not_parse_are_errors() {
        assert!(matches!(
            Rule::parse("POST /containers/create"),
            Err(RuleError::Method { .. })
        ));
        assert!(matches!(
            Rule::parse("/containers/json"),
            Err(RuleError::Form { .. })
        ));
        assert!(matches!(
            Rule::parse("GET containers/json"),
            Err(RuleError::Form { .. })
        ));
        assert!(matches!(
            Rule::parse("GET /containers/../json"),
            Err(RuleError::Segment { .. })
        ));
        assert!(matches!(
            Rule::parse("GET /containers/*"),
            Err(RuleError::Segment { .. })
        ));
        let err = Rule::parse("DELETE /containers/{id}")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("only GET"), "{err}");
        assert!(Rule::parse("HEAD /containers/{id}/json").is_ok());
    }

    #[test]
    fn refusals_are_keyed_without_the_version() {
        assert_eq!(
            unversioned_path("/v1.41/containers/create"),
            "/containers/create"
        );
        assert_eq!(unversioned_path("/containers/create"), "/containers/create");
        assert_eq!(unversioned_path("/v1.41"), "/v1.41");
    }
}
