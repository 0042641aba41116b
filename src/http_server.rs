//! The small HTTP listener of `redrive run`: `/metrics` (Prometheus text), `/healthz` (the process
//! is alive) and `/readyz` (Postgres answers; the body also names each breaker's state, which does
//! not change readiness: a process whose handler is down is still healthy, I13).

use crate::breaker::{Breakers, State as BreakerState};
use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    store: Store,
    breakers: Arc<Breakers>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    crate::telemetry::metrics();
    let app = Router::new()
        .route("/metrics", get(|| async { crate::telemetry::render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state((store, breakers));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {listen} (`http.listen`)"))?;
    tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn ready(State((store, breakers)): State<(Store, Arc<Breakers>)>) -> (StatusCode, String) {
    readiness(store.ping().await, &breakers)
}

/// Ready when Postgres answers, whatever the breakers say; the body lists them.
fn readiness(postgres: bool, breakers: &Breakers) -> (StatusCode, String) {
    let (status, mut body) = match postgres {
        true => (StatusCode::OK, "ready\n".to_string()),
        false => (
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres is unreachable\n".to_string(),
        ),
    };
    for b in breakers.all() {
        let state = b.state();
        let note = match state {
            BreakerState::Closed => "",
            BreakerState::Open => " (the handler is failing: consumption paused, only probes sent)",
            BreakerState::HalfOpen => " (probing the handler)",
        };
        body.push_str(&format!("breaker {}: {}{note}\n", b.name(), state.as_str()));
    }
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerConfig;

    #[test]
    fn an_open_breaker_is_reported_and_leaves_the_process_ready() {
        let breakers = Breakers::new(&BreakerConfig::default(), "g");
        let (status, body) = readiness(true, &breakers);
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ready\nbreaker default: closed\n")
        );
        breakers
            .all()
            .next()
            .unwrap()
            .hold(Some(BreakerState::Open), "an operator", false);
        let (status, body) = readiness(true, &breakers);
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("breaker default: open (the handler is failing"),
            "{body}"
        );
        assert_eq!(
            readiness(false, &breakers).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
