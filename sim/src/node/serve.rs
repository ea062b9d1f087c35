//! Serving the wire protocol: the accept loop and one session per connection.

use super::*;

impl Node {
    pub(super) async fn accept_loop(self, listener: TcpListener) {
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let n = self.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = n.inner.cancel.cancelled() => {}
                                r = n.serve_connection(stream) => {
                                    if let Err(e) = r {
                                        tracing::debug!(me = %n.me(), error = %e, "connection ended");
                                    }
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// One connection: TLS or plain text as `--tlsMode` says (see `crate::tls`), then the
    /// session.
    pub(super) async fn serve_connection(&self, stream: TcpStream) -> Result<(), WireError> {
        let loopback = stream.peer_addr().is_ok_and(|a| a.ip().is_loopback());
        match &self.inner.opts.tls {
            None => self.serve_session(stream, loopback).await,
            Some(tls) => match tls.accept(stream).await? {
                Some(stream) => self.serve_session(stream, loopback).await,
                None => Ok(()),
            },
        }
    }

    async fn serve_session<S>(&self, mut stream: S, loopback: bool) -> Result<(), WireError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let conn_id = self.inner.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let mut session = crate::auth::ClientSession::new(conn_id, loopback);
        let _open = OpenConnection::enter(&self.inner.open_connections);
        let mut next_id = 1i32;
        loop {
            let req = match wire::read_request(&mut stream).await {
                Ok(r) => r,
                Err(WireError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            next_id = next_id.wrapping_add(1);
            // A killed member neither executes nor answers what was already in flight.
            if self.inner.cancel.is_cancelled() {
                return Ok(());
            }
            match req {
                Request::Msg {
                    request_id,
                    body,
                    more_to_come,
                    exhaust_allowed,
                } => {
                    // One reply, or a stream of them (see `exhaust_next`): each streamed
                    // reply answers the previous one's request id.
                    let mut body = body;
                    let mut response_to = request_id;
                    loop {
                        let reply = self.run_command_in(body.clone(), &mut session).await;
                        if self.inner.cancel.is_cancelled() {
                            return Ok(());
                        }
                        if more_to_come {
                            break;
                        }
                        let next = crate::commands::exhaust_next(&body, exhaust_allowed, &reply);
                        let flags = if next.is_some() {
                            wire::FLAG_MORE_TO_COME
                        } else {
                            0
                        };
                        let msg =
                            wire::encode_op_msg_with_flags(next_id, response_to, flags, &reply)?;
                        wire::write_all(&mut stream, &msg).await?;
                        let Some(next) = next else { break };
                        body = next;
                        response_to = next_id;
                        next_id = next_id.wrapping_add(1);
                    }
                }
                Request::Query {
                    request_id,
                    collection,
                    mut query,
                } => {
                    let db = collection
                        .strip_suffix(".$cmd")
                        .unwrap_or(&collection)
                        .to_string();
                    query.insert("$db", db);
                    let reply = self.run_command_in(query, &mut session).await;
                    if self.inner.cancel.is_cancelled() {
                        return Ok(());
                    }
                    let msg = wire::encode_op_reply(next_id, request_id, &reply)?;
                    wire::write_all(&mut stream, &msg).await?;
                }
            }
        }
    }
}

/// Counts a connection as open while it lives.
struct OpenConnection(Arc<AtomicI64>);

impl OpenConnection {
    fn enter(count: &Arc<AtomicI64>) -> OpenConnection {
        count.fetch_add(1, Ordering::Relaxed);
        OpenConnection(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
