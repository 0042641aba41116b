//! The circuit breakers as Postgres sees them (I13): operators' holds in
//! (`redrive.breaker_holds`), each running process's states out (`redrive.breaker_states`).

use super::{Store, StoreError};
use crate::breaker::{Snapshot, State};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// A row of `redrive.breaker_holds`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hold {
    /// `*` for every group.
    pub consumer_group: String,
    /// `default`, a topic with a breaker of its own, or `*` for every breaker.
    pub breaker: String,
    /// `open` or `closed`.
    pub hold: String,
    pub held_at: DateTime<Utc>,
    pub held_by: String,
    pub reason: Option<String>,
}

impl Hold {
    /// The state it holds.
    pub fn state(&self) -> Option<State> {
        match self.hold.as_str() {
            "open" => Some(State::Open),
            "closed" => Some(State::Closed),
            _ => None,
        }
    }
}

/// The hold that applies to breaker `breaker` of group `group` among `holds`: the one that names the
/// group before one for every group, then the one that names the breaker before one for every
/// breaker.
pub fn hold_for<'a>(holds: &'a [Hold], group: &str, breaker: &str) -> Option<&'a Hold> {
    holds
        .iter()
        .filter(|h| {
            (h.consumer_group == group || h.consumer_group == "*")
                && (h.breaker == breaker || h.breaker == "*")
        })
        .min_by_key(|h| (h.consumer_group == "*", h.breaker == "*"))
}

/// A row of `redrive.breaker_states`: one breaker of one running process.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reported {
    pub consumer_group: String,
    pub breaker: String,
    /// `host-pid` of the process.
    pub process: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Whether an operator's hold keeps it in this state.
    pub held: bool,
    /// Whether the process decides from its own first deliveries (it consumes); one that does not
    /// follows the group's deciding processes.
    pub decides: bool,
    pub since: DateTime<Utc>,
    pub cause: Option<String>,
    pub open_until: Option<DateTime<Utc>>,
    pub reported_at: DateTime<Utc>,
    /// Whether the process stopped reporting (it is gone, or cannot reach Postgres).
    pub stale: bool,
}

/// How long a process may go without reporting before its rows count as stale, and then as gone.
pub const STALE_AFTER_SECONDS: f64 = 30.0;
pub const GONE_AFTER_SECONDS: f64 = 3600.0;

impl Store {
    /// The holds that may apply to group `group`.
    pub async fn breaker_holds(&self, group: &str) -> Result<Vec<Hold>, StoreError> {
        Ok(sqlx::query_as!(
            Hold,
            r#"
            SELECT consumer_group, breaker, hold, held_at, held_by, reason
            FROM redrive.breaker_holds
            WHERE consumer_group IN ($1, '*')
            "#,
            group
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// The breakers that a process of group `group` other than `process`, deciding from its own
    /// calls, reported open within the last [`STALE_AFTER_SECONDS`], not under a hold.
    pub async fn breakers_open(
        &self,
        group: &str,
        process: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar!(
            r#"
            SELECT DISTINCT breaker FROM redrive.breaker_states
            WHERE consumer_group = $1 AND process <> $2 AND decides AND NOT held
              AND state = 'open' AND reported_at >= now() - make_interval(secs => $3)
            "#,
            group,
            process,
            STALE_AFTER_SECONDS,
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Writes what process `process` of group `group` sees of its breakers, and forgets the rows
    /// of the group's processes that have not reported for an hour. `decides`: whether it decides
    /// from first deliveries of its own.
    pub async fn report_breakers(
        &self,
        group: &str,
        process: &str,
        decides: bool,
        breakers: &[Snapshot],
    ) -> Result<(), StoreError> {
        let names: Vec<&str> = breakers.iter().map(|b| b.breaker.as_str()).collect();
        let states: Vec<&str> = breakers.iter().map(|b| b.state.as_str()).collect();
        let held: Vec<bool> = breakers.iter().map(|b| b.held).collect();
        let since: Vec<DateTime<Utc>> = breakers.iter().map(|b| b.since).collect();
        let causes: Vec<Option<String>> = breakers.iter().map(|b| b.cause.clone()).collect();
        let until: Vec<Option<DateTime<Utc>>> = breakers.iter().map(|b| b.open_until).collect();
        sqlx::query!(
            r#"
            WITH gone AS (
                DELETE FROM redrive.breaker_states
                WHERE consumer_group = $1 AND process <> $2
                  AND reported_at < now() - make_interval(secs => $9)
            )
            INSERT INTO redrive.breaker_states AS s
                (consumer_group, breaker, process, state, held, decides, since, cause, open_until,
                 reported_at)
            SELECT $1, b.breaker, $2, b.state, b.held, $10, b.since, b.cause, b.open_until, now()
            FROM unnest($3::text[], $4::text[], $5::bool[], $6::timestamptz[], $7::text[],
                        $8::timestamptz[]) AS b(breaker, state, held, since, cause, open_until)
            ON CONFLICT ON CONSTRAINT breaker_states_pkey DO UPDATE
            SET state = EXCLUDED.state, held = EXCLUDED.held, decides = EXCLUDED.decides,
                since = EXCLUDED.since,
                cause = EXCLUDED.cause, open_until = EXCLUDED.open_until, reported_at = now()
            "#,
            group,
            process,
            &names as &[&str],
            &states as &[&str],
            &held,
            &since,
            &causes as &[Option<String>],
            &until as &[Option<DateTime<Utc>>],
            GONE_AFTER_SECONDS,
            decides,
        )
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Removes the rows of a process that stops.
    pub async fn forget_breakers(&self, group: &str, process: &str) -> Result<(), StoreError> {
        sqlx::query!(
            "DELETE FROM redrive.breaker_states WHERE consumer_group = $1 AND process = $2",
            group,
            process
        )
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Holds breakers open or closed (`redrive.hold_breaker`).
    pub async fn hold_breaker(
        &self,
        hold: State,
        breaker: &str,
        group: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "SELECT redrive.hold_breaker($1, $2, $3, $4)",
            hold.as_str(),
            breaker,
            group,
            reason
        )
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Lifts holds (`redrive.release_breaker`); returns how many.
    pub async fn release_breaker(&self, breaker: &str, group: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar!("SELECT redrive.release_breaker($1, $2)", breaker, group)
                .fetch_one(self.pool())
                .await?
                .unwrap_or(0),
        )
    }

    /// Every hold, and every process's breakers that reported within the last hour.
    pub async fn breakers(&self) -> Result<(Vec<Hold>, Vec<Reported>), StoreError> {
        let mut tx = self.pool().begin().await?;
        let holds = sqlx::query_as!(
            Hold,
            r#"
            SELECT consumer_group, breaker, hold, held_at, held_by, reason
            FROM redrive.breaker_holds
            ORDER BY consumer_group, breaker
            "#
        )
        .fetch_all(&mut *tx)
        .await?;
        let reported = sqlx::query_as!(
            Reported,
            r#"
            SELECT consumer_group, breaker, process, state, held, decides, since, cause, open_until,
                   reported_at, reported_at < now() - make_interval(secs => $1) AS "stale!"
            FROM redrive.breaker_states
            WHERE reported_at >= now() - make_interval(secs => $2)
            ORDER BY consumer_group, breaker, process
            "#,
            STALE_AFTER_SECONDS,
            GONE_AFTER_SECONDS,
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((holds, reported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(group: &str, breaker: &str, state: &str) -> Hold {
        Hold {
            consumer_group: group.into(),
            breaker: breaker.into(),
            hold: state.into(),
            held_at: Utc::now(),
            held_by: "alice".into(),
            reason: None,
        }
    }

    #[test]
    fn the_most_specific_hold_applies() {
        let holds = [
            hold("*", "*", "open"),
            hold("*", "orders", "closed"),
            hold("g1", "*", "closed"),
            hold("g1", "orders", "open"),
        ];
        let state = |g, b| hold_for(&holds, g, b).and_then(Hold::state);
        assert_eq!(state("g1", "orders"), Some(State::Open));
        assert_eq!(state("g1", "default"), Some(State::Closed));
        assert_eq!(state("g2", "orders"), Some(State::Closed));
        assert_eq!(state("g2", "default"), Some(State::Open));
        assert_eq!(hold_for(&holds[1..2], "g2", "default"), None);
    }
}
