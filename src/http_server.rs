//! The small HTTP listener of `redrive run`: `/metrics` (Prometheus text), `/healthz` (the process
//! is alive) and `/readyz` (Postgres answers).

use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// Serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    store: Store,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let metrics = crate::telemetry::metrics();
    let app = Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(store);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {listen} (`http.listen`)"))?;
    tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn ready(State(store): State<Store>) -> (StatusCode, &'static str) {
    if store.ping().await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "postgres is unreachable\n")
    }
}
