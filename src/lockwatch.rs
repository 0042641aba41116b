//! The lock watch: names the session that holds up a statement of this process.
//!
//! A transaction left open (an operator's UPDATE in `psql`, say) keeps what it locked until it ends,
//! and Postgres makes every statement that needs it wait, without a limit. redrive goes around the
//! rows held for its completions and claims (schema V16, `store::complete`), but other statements
//! still wait: a capture behind a key line's lock that such a transaction holds, say. Every
//! [`EVERY`] this looks for statements of this process (its connections' `application_name`) that
//! have waited on a lock for longer than [`AFTER`], and logs who holds them up and how to end it,
//! again every [`REPEAT`] while it lasts. `redrive_lock_waits{group}` is how many wait now.
//!
//! It has a connection of its own, so a pool whose every connection waits does not hide the cause.
//! In the normal case its statement reads `pg_stat_activity` and finds nothing;
//! `pg_blocking_pids`, which takes the lock manager's state, is asked only about statements that
//! already waited.

use crate::store::Store;
use sqlx::Connection;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the watch looks.
pub const EVERY: Duration = Duration::from_secs(5);
/// How long a statement waits on a lock before the watch names who holds it.
pub const AFTER: Duration = Duration::from_secs(5);
/// How often a wait that goes on is logged again.
const REPEAT: Duration = Duration::from_secs(60);

/// One statement of this process waiting on a session that holds what it needs.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Wait {
    /// The waiting backend.
    pub waiter: i32,
    /// Seconds it has waited.
    pub waited: f64,
    /// The start of the waiting statement.
    pub statement: String,
    /// The backend that holds the lock.
    pub holder: i32,
    /// Its user, application, address and state, where this role may see them.
    pub holder_user: Option<String>,
    pub holder_application: Option<String>,
    pub holder_address: Option<String>,
    pub holder_state: Option<String>,
    /// Seconds its transaction has been open, where this role may see it.
    pub holder_open_for: Option<f64>,
}

/// The statements of sessions named `application` that have waited on a lock for longer than
/// `after`, each with a session that holds it.
pub async fn waits(
    conn: &mut sqlx::PgConnection,
    application: &str,
    after: Duration,
) -> Result<Vec<Wait>, sqlx::Error> {
    sqlx::query_as::<_, Wait>(
        r#"
        SELECT w.pid AS waiter, extract(epoch FROM now() - w.query_start)::float8 AS waited,
               left(regexp_replace(coalesce(w.query, ''), '\s+', ' ', 'g'), 120) AS statement,
               b.pid AS holder, b.usename::text AS holder_user,
               b.application_name AS holder_application, host(b.client_addr) AS holder_address,
               b.state AS holder_state,
               extract(epoch FROM now() - b.xact_start)::float8 AS holder_open_for
        FROM pg_stat_activity w
        CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocking(pid)
        JOIN pg_stat_activity b ON b.pid = blocking.pid
        WHERE w.application_name = $1 AND w.state = 'active' AND w.wait_event_type = 'Lock'
          AND w.query_start < now() - make_interval(secs => $2)
        ORDER BY w.pid, b.pid
        "#,
    )
    .bind(application)
    .bind(after.as_secs_f64())
    .fetch_all(conn)
    .await
}

/// Watches until `shutdown`, logging each wait when first seen and every [`REPEAT`] after; the
/// gauge carries `group`, as the other gauges of the process do.
pub async fn run(store: Store, group: String, shutdown: CancellationToken) {
    let gauge = metrics::gauge!("redrive_lock_waits", "group" => group);
    gauge.set(0.0);
    let options = (*store.pool().connect_options()).clone();
    // A pool made elsewhere may have no name to find its sessions by; the watch then only waits,
    // since a service that ends stops `run`.
    let Some(application) = options.get_application_name().map(str::to_string) else {
        shutdown.cancelled().await;
        return;
    };
    let mut conn: Option<sqlx::PgConnection> = None;
    let mut logged: HashMap<(i32, i32), Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
        }
        // A look, bounded, and given up at a stop: a Postgres that does not answer must not hold
        // the exit up. An unreachable one is reported by the parts that need it.
        let look = async {
            if conn.is_none() {
                conn = Some(sqlx::PgConnection::connect_with(&options).await?);
            }
            match conn.as_mut() {
                Some(c) => waits(c, &application, AFTER).await,
                None => Ok(Vec::new()),
            }
        };
        let looked = tokio::select! {
            _ = shutdown.cancelled() => break,
            looked = tokio::time::timeout(EVERY, look) => looked,
        };
        let found = match looked {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!("the lock watch could not look: {e}");
                conn = None;
                continue;
            }
            Err(_) => {
                tracing::debug!("the lock watch got no answer within {EVERY:?}");
                conn = None;
                continue;
            }
        };
        let waiting: std::collections::HashSet<i32> = found.iter().map(|w| w.waiter).collect();
        gauge.set(waiting.len() as f64);
        let now = Instant::now();
        logged.retain(|pair, _| found.iter().any(|w| (w.waiter, w.holder) == *pair));
        for w in &found {
            let last = logged.get(&(w.waiter, w.holder));
            if last.is_some_and(|at| now.duration_since(*at) < REPEAT) {
                continue;
            }
            logged.insert((w.waiter, w.holder), now);
            log(w);
        }
    }
    // Closed for a clean end on the server, but not waited for long: it may not answer.
    if let Some(c) = conn {
        let _ = tokio::time::timeout(Duration::from_secs(1), c.close()).await;
    }
}

fn log(w: &Wait) {
    let seen = |v: &Option<String>| {
        v.clone()
            .unwrap_or_else(|| "not visible to this role".into())
    };
    let open_for = w
        .holder_open_for
        .map_or("an unknown time".to_string(), |s| {
            humantime::format_duration(Duration::from_secs(s as u64)).to_string()
        });
    tracing::warn!(
        waiting_pid = w.waiter,
        statement = %w.statement,
        holder_pid = w.holder,
        holder_user = %seen(&w.holder_user),
        holder_application = %w.holder_application.as_deref().map_or("not visible to this role", |a| if a.is_empty() { "none" } else { a }),
        holder_address = %seen(&w.holder_address),
        holder_state = %seen(&w.holder_state),
        "a statement of this process has waited {} for a lock that another session holds: \
         postgres pid {}, its transaction open for {open_for}. The statement waits until that \
         transaction ends: end it with COMMIT or ROLLBACK, or SELECT pg_terminate_backend({})",
        humantime::format_duration(Duration::from_secs(w.waited as u64)),
        w.holder,
        w.holder,
    );
}
