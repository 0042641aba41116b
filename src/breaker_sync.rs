//! A process's breakers and Postgres (I13): the operators' holds come in, the states go out.
//!
//! Each process that consumes decides its breakers from its own first deliveries, as every such
//! process sees the same failing service. Postgres adds three things: a hold
//! (`redrive breaker open|close`) that every running process of the group takes within [`EVERY`];
//! the states of every process in one place (`redrive breaker status`, `redrive status`); and, for
//! a process that runs only retry workers and so makes no first deliveries to judge by, the states
//! of the group's consuming processes to follow. None of it is on the path of a message: when
//! Postgres is away, the breakers go on as they were.

use crate::breaker::{Breakers, State};
use crate::store::breakers::hold_for;
use crate::store::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a process reads the holds and reports its states. It also reports on every change.
pub const EVERY: Duration = Duration::from_secs(2);

/// How long a stopping process waits to remove its rows.
const FORGET_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes the holds that apply to `group` now.
///
/// A process that does not `decide` (it runs no consumer, so it makes no first deliveries to judge
/// the service by) also follows the group's deciding processes: it holds a breaker open while one
/// of them reports the same breaker open, and when none does any more, it goes half-open, so that
/// its own probes (due rows) find out whether the service is back, as a deciding process's do.
pub async fn apply_holds(
    store: &Store,
    breakers: &Breakers,
    group: &str,
    process: &str,
    decides: bool,
) -> Result<(), StoreError> {
    let holds = store.breaker_holds(group).await?;
    let open = match decides {
        true => vec![],
        false => store.breakers_open(group, process).await?,
    };
    for b in breakers.all() {
        let held = hold_for(&holds, group, b.name()).and_then(|h| h.state());
        let follows = open.iter().any(|n| n == b.name());
        match (held, follows) {
            (Some(h), _) if b.forced() != Some(h) || b.followed() => {
                b.hold(Some(h), "an operator", false)
            }
            (None, true) if b.forced() != Some(State::Open) || !b.followed() => {
                b.hold(Some(State::Open), "the group's consuming processes", true)
            }
            (None, false) if b.followed() => {
                b.probe_after_hold("the group's consuming processes are no longer open")
            }
            (None, false) if b.forced().is_some() => b.hold(None, "an operator", false),
            _ => {}
        }
    }
    Ok(())
}

/// Reads the holds and reports the states every [`EVERY`] and on every change, until `token` is
/// cancelled; then removes this process's rows. `decides`: whether this process consumes.
pub async fn run(
    store: Store,
    breakers: Arc<Breakers>,
    group: String,
    process: String,
    decides: bool,
    token: CancellationToken,
) {
    let mut changes = breakers.watch();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let result = tokio::select! {
            _ = token.cancelled() => break,
            _ = tick.tick() => match apply_holds(&store, &breakers, &group, &process, decides).await {
                Ok(()) => report(&store, &breakers, &group, &process, decides).await,
                Err(e) => Err(e),
            },
            changed = changes.changed() => match changed {
                Ok(()) => report(&store, &breakers, &group, &process, decides).await,
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
    decides: bool,
) -> Result<(), StoreError> {
    let snapshots: Vec<_> = breakers.all().map(|b| b.snapshot()).collect();
    store
        .report_breakers(group, process, decides, &snapshots)
        .await
}
