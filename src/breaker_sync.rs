//! A process's breakers and Postgres (I13): the operators' holds come in, the states go out.
//!
//! Each process decides its breakers from its own calls, as every process sees the same failing
//! service. Postgres adds two things only an operator needs: a hold (`redrive breaker open|close`)
//! that every running process of the group takes within [`EVERY`], and the states of every process
//! in one place (`redrive breaker status`, `redrive status`). Neither is on the path of a message:
//! when Postgres is away, the breakers go on deciding alone and the holds stay as they were.

use crate::breaker::Breakers;
use crate::store::breakers::hold_for;
use crate::store::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a process reads the holds and reports its states. It also reports on every change.
pub const EVERY: Duration = Duration::from_secs(2);

/// How long a stopping process waits to remove its rows.
const FORGET_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes the holds that apply to `group` now. Returns whether any breaker's hold changed.
pub async fn apply_holds(
    store: &Store,
    breakers: &Breakers,
    group: &str,
) -> Result<bool, StoreError> {
    let holds = store.breaker_holds(group).await?;
    let mut changed = false;
    for b in breakers.all() {
        let hold = hold_for(&holds, group, b.name()).and_then(|h| h.state());
        if b.forced() != hold {
            b.force(hold);
            changed = true;
        }
    }
    Ok(changed)
}

/// Reads the holds and reports the states every [`EVERY`] and on every change, until `token` is
/// cancelled; then removes this process's rows.
pub async fn run(
    store: Store,
    breakers: Arc<Breakers>,
    group: String,
    process: String,
    token: CancellationToken,
) {
    let mut changes = breakers.watch();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => break,
            _ = tick.tick() => match apply_holds(&store, &breakers, &group).await {
                Ok(_) => report(&store, &breakers, &group, &process).await,
                Err(e) => Err(e),
            },
            changed = changes.changed() => match changed {
                Ok(()) => report(&store, &breakers, &group, &process).await,
                Err(_) => break,
            },
        };
        match result {
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("breaker holds and states: postgres did not answer ({e}); the breakers decide alone until it does");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!("breaker holds and states: postgres answers again");
            }
            _ => {}
        }
    }
    match tokio::time::timeout(FORGET_TIMEOUT, store.forget_breakers(&group, &process)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("removing this process's breaker states failed: {e}"),
        Err(_) => tracing::debug!("removing this process's breaker states timed out"),
    }
}

async fn report(
    store: &Store,
    breakers: &Breakers,
    group: &str,
    process: &str,
) -> Result<(), StoreError> {
    let snapshots: Vec<_> = breakers.all().map(|b| b.snapshot()).collect();
    store.report_breakers(group, process, &snapshots).await
}
