//! The metrics HTTP server: `GET /metrics` (OpenMetrics text) and
//! `GET /healthz` (200 or 503 with a JSON body), HTTP/1.1 by `hyper`.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (more wait in the
//! kernel's backlog), headers within [`HEADER_TIMEOUT`], each connection
//! closed after [`CONNECTION_TIMEOUT`]. Request bodies are never read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::Exporter;

pub const MAX_CONNECTIONS: usize = 16;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running metrics server; stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port) and serves `exporter` on the current tokio runtime.
    pub async fn bind(addr: SocketAddr, exporter: Arc<Exporter>) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, exporter));
        Ok(MetricsServer { addr, task })
    }

    /// The bound address (the port chosen when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, exporter: Arc<Exporter>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "metrics server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ex = exporter.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let ex = ex.clone();
                async move { Ok::<_, Infallible>(route(&ex, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics server: connection"),
                Err(_) => tracing::debug!(%peer, "metrics server: connection timed out"),
            }
        });
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn route(ex: &Exporter, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/");
    if !known {
        return response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("no {path} here: try /metrics or /healthz\n"),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => {
            // The loop refreshes its gauges while it answers; a loop that does
            // not answer still leaves the counters to serve.
            let _ = ex.probe().await;
            response(StatusCode::OK, OPENMETRICS, ex.encode())
        }
        "/healthz" => {
            let h = ex.probe().await;
            let status = if h.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            response(status, "application/json", format!("{}\n", h.detail))
        }
        _ => response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "keyfleet metrics: /metrics (OpenMetrics), /healthz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{AgentMetrics, Health};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    }

    /// Connections that never send a request hold the server's slots only
    /// until the header timeout: a scrape behind them still gets its answer.
    #[tokio::test]
    async fn idle_connections_filling_every_slot_are_dropped_and_a_scrape_gets_through() {
        let (_m, registry) = AgentMetrics::new();
        let (ex, mut probes) = Exporter::new(registry);
        tokio::spawn(async move {
            while let Some(p) = probes.recv().await {
                let _ = p.send(Health {
                    ok: true,
                    detail: serde_json::json!({"status": "ok"}),
                });
            }
        });
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), Arc::new(ex))
            .await
            .unwrap();
        let addr = server.local_addr();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let t = std::time::Instant::now();
        let answer = tokio::time::timeout(HEADER_TIMEOUT * 4, get(addr, "/metrics"))
            .await
            .expect(
                "a scrape behind idle connections is answered once their header timeout passes",
            );
        eprintln!(
            "{} idle connections ahead: /metrics answered after {} ms",
            idle.len(),
            t.elapsed().as_millis()
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("keyfleet_agent_epoch"), "{answer}");
    }
}
