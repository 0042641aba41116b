//! LISTEN connections that are known to be alive (I7).
//!
//! The retry workers and the DLQ publisher wake on NOTIFY. A LISTEN connection that died without a
//! word (a half-open TCP connection after a network fault or a NAT timeout) would leave them asleep
//! until their fallback timer. So while no notification arrives, a [`Listener`] checks its
//! connection every few seconds with a `SELECT 1` under a deadline, and replaces a connection that
//! does not answer.
//!
//! Each listener has a connection of its own, outside the store's pool: it is held for as long as
//! `run` runs, and must not take a place that capture, claims and completions need (I10).

use super::{Store, StoreError};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::Executor;
use std::time::Duration;
use tokio::time::Instant;

/// How long a listener may go without hearing from Postgres before it checks its connection.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long the check may take before the connection counts as dead.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A LISTEN on one channel, reconnected when its connection dies.
pub struct Listener {
    store: Store,
    channel: &'static str,
    /// `None` after the connection was found dead, until the next reconnect succeeds.
    inner: Option<PgListener>,
    /// When the connection last proved alive: a notification or a check.
    alive_at: Instant,
}

impl Store {
    /// Starts listening on `channel` on a connection of its own.
    pub async fn listen(&self, channel: &'static str) -> Result<Listener, StoreError> {
        let inner = connect(self, channel).await?;
        Ok(Listener {
            store: self.clone(),
            channel,
            inner: Some(inner),
            alive_at: Instant::now(),
        })
    }
}

async fn connect(store: &Store, channel: &'static str) -> Result<PgListener, StoreError> {
    let options = (*store.pool().connect_options()).clone();
    // A pool of one that this listener alone uses: dropping it with a dead connection leaks
    // nothing from the shared pool.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CHECK_TIMEOUT)
        .connect_lazy_with(options);
    let mut listener = PgListener::connect_with(&own).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

impl Listener {
    /// Resolves when there may be something to do: a notification arrived, or the connection was
    /// replaced (notifications may have been missed meanwhile). Cancel-safe, so it can stand in a
    /// `select!` that is restarted often.
    pub async fn wait(&mut self) {
        loop {
            let Some(listener) = self.inner.as_mut() else {
                self.reconnect().await;
                return;
            };
            let quiet_for = CHECK_EVERY.saturating_sub(self.alive_at.elapsed());
            match tokio::time::timeout(quiet_for, listener.try_recv()).await {
                Ok(Ok(Some(_))) => {
                    self.alive_at = Instant::now();
                    return;
                }
                // The connection closed; sqlx says so with `None` or an error.
                Ok(Ok(None)) | Ok(Err(_)) => {
                    tracing::warn!(
                        channel = self.channel,
                        "LISTEN connection lost; reconnecting"
                    );
                    self.inner = None;
                }
                Err(_) => self.check().await,
            }
        }
    }

    /// Asks the quiet connection for `SELECT 1`; drops it when no answer comes in time.
    async fn check(&mut self) {
        let Some(listener) = self.inner.as_mut() else {
            return;
        };
        match tokio::time::timeout(CHECK_TIMEOUT, listener.execute("SELECT 1")).await {
            Ok(Ok(_)) => self.alive_at = Instant::now(),
            Ok(Err(e)) => {
                tracing::warn!(
                    channel = self.channel,
                    "LISTEN connection failed its check; reconnecting: {e}"
                );
                self.inner = None;
            }
            Err(_) => {
                tracing::warn!(
                    channel = self.channel,
                    "LISTEN connection did not answer within {CHECK_TIMEOUT:?}; reconnecting"
                );
                self.inner = None;
            }
        }
    }

    /// One try at a new connection; on failure the next [`Listener::wait`] tries again, a second
    /// later, while the caller goes on with its timers.
    async fn reconnect(&mut self) {
        match connect(&self.store, self.channel).await {
            Ok(l) => {
                tracing::info!(channel = self.channel, "LISTEN connection replaced");
                self.inner = Some(l);
                self.alive_at = Instant::now();
            }
            Err(e) => {
                tracing::warn!(channel = self.channel, "LISTEN reconnect failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
