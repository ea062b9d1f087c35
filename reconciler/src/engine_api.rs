//! The few Docker Engine API calls of `replset-reconciler scale`, made on the raw JSON.
//!
//! A service update must send the whole spec back. Decoding it into a typed model and encoding
//! it again loses every field the model does not know or spells differently (bollard's model
//! reads a container spec's healthcheck as `HealthCheck`, while the engine writes
//! `Healthcheck`): the spec written back then differs from the deployed one, and swarm starts
//! a rolling update of every task, without the healthcheck that paces it. So the spec is read
//! and written as JSON, and only `Mode.Replicated.Replicas` is changed, as `docker service
//! scale` does.
//!
//! HTTP/1.0 over the engine's socket (`DOCKER_HOST=unix://...`, default
//! `/var/run/docker.sock`) or TCP (`DOCKER_HOST=tcp://host:port`, no TLS): one request per
//! connection, the body read until the engine closes it.

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The API version asked for: the oldest the project supports (Docker 20.10).
const API: &str = "/v1.41";

/// Why a call to the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineApiError {
    #[error(
        "DOCKER_HOST={0} is not supported by scale: use unix:///path/to/docker.sock or \
         tcp://host:port (no TLS), or run it on a manager with the socket mounted"
    )]
    UnsupportedHost(String),
    #[error("cannot reach the Docker engine at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the Docker engine answered {path} with {status}: {message}")]
    Status {
        path: String,
        status: u16,
        message: String,
    },
    #[error("the Docker engine's answer to {path} is not HTTP with JSON: {detail}")]
    Malformed { path: String, detail: String },
}

/// Where the engine listens.
#[derive(Debug, Clone)]
pub enum Engine {
    Unix(String),
    Tcp(String),
}

impl Engine {
    /// From `DOCKER_HOST`, as the docker CLI reads it.
    pub fn from_env() -> Result<Engine, EngineApiError> {
        match std::env::var("DOCKER_HOST") {
            Err(_) => Ok(Engine::Unix("/var/run/docker.sock".into())),
            Ok(h) if h.is_empty() => Ok(Engine::Unix("/var/run/docker.sock".into())),
            Ok(h) => {
                if let Some(path) = h.strip_prefix("unix://") {
                    Ok(Engine::Unix(path.to_string()))
                } else if let Some(addr) = h.strip_prefix("tcp://") {
                    Ok(Engine::Tcp(addr.trim_end_matches('/').to_string()))
                } else {
                    Err(EngineApiError::UnsupportedHost(h))
                }
            }
        }
    }

    fn address(&self) -> &str {
        match self {
            Engine::Unix(a) | Engine::Tcp(a) => a,
        }
    }

    /// `GET /services/<name>`: the service as the engine has it.
    pub async fn inspect_service(&self, name: &str) -> Result<Value, EngineApiError> {
        self.call("GET", &format!("/services/{name}"), None).await
    }

    /// `POST /services/<id>/update?version=<version>` with `spec`.
    pub async fn update_service(
        &self,
        id: &str,
        version: u64,
        spec: &Value,
    ) -> Result<Value, EngineApiError> {
        let body = spec.to_string();
        self.call(
            "POST",
            &format!("/services/{id}/update?version={version}"),
            Some(&body),
        )
        .await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Value, EngineApiError> {
        let connect = |source| EngineApiError::Connect {
            address: self.address().to_string(),
            source,
        };
        let raw = match self {
            Engine::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(connect)?;
                exchange(s, method, path, body).await.map_err(connect)?
            }
            Engine::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await.map_err(connect)?;
                exchange(s, method, path, body).await.map_err(connect)?
            }
        };
        parse_response(path, &raw)
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {API}{path} HTTP/1.0\r\nHost: docker\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    Ok(raw)
}

/// The JSON body of an HTTP/1.0 answer; an error with the engine's `message` otherwise.
fn parse_response(path: &str, raw: &[u8]) -> Result<Value, EngineApiError> {
    let malformed = |detail: &str| EngineApiError::Malformed {
        path: path.to_string(),
        detail: detail.to_string(),
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| malformed("headers not UTF-8"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status code"))?;
    let body = &raw[split + 4..];
    let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))?
    };
    if (200..300).contains(&status) {
        Ok(value)
    } else {
        Err(EngineApiError::Status {
            path: path.to_string(),
            status,
            message: value["message"].as_str().unwrap_or_default().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_answer_is_read_and_an_error_keeps_the_engines_message() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ID\":\"abc\"}\n";
        assert_eq!(
            parse_response("/x", ok).ok(),
            Some(serde_json::json!({"ID": "abc"}))
        );
        let err = b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"service mongo not found\"}";
        let e = parse_response("/services/mongo", err).expect_err("404");
        assert!(e.to_string().contains("service mongo not found"), "{e}");
        assert!(parse_response("/x", b"garbage").is_err());
    }
}
