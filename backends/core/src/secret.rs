//! A secret (an ACL token, a password) and where it came from. Its value is never printed.

use std::path::Path;

/// A secret value, trimmed of surrounding whitespace, with its source for error messages
/// (`CONSUL_HTTP_TOKEN`, `--consul-token-file /run/secrets/token`). `Debug` shows the source
/// only.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    source: String,
}

impl Secret {
    pub fn new(value: impl Into<String>, source: impl Into<String>) -> Secret {
        Secret {
            value: value.into().trim().to_string(),
            source: source.into(),
        }
    }

    /// Reads a secret from a file (a Docker secret); `flag` names the option that gave the
    /// path, for the source.
    pub fn from_file(path: &Path, flag: &str) -> std::io::Result<Secret> {
        let value = std::fs::read_to_string(path)?;
        Ok(Secret::new(value, format!("{flag} {}", path.display())))
    }

    /// The value, to send to the store and nowhere else.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Where the secret came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<redacted> from {})", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_never_printed_and_are_trimmed() {
        let s = Secret::new("  s3cret\n", "CONSUL_HTTP_TOKEN");
        assert_eq!(s.expose(), "s3cret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("CONSUL_HTTP_TOKEN"), "{shown}");
    }
}
