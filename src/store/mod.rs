//! All SQL lives under this module, one statement per small `async fn`.
//!
//! - [`migrate`]: the embedded refinery migrations and the schema version check.
//! - [`capture`]: failed messages into the table, idempotently (I2).
//! - [`claim`]: batch claims with a lease, and the rescue of expired leases (I3).
//! - [`complete`]: fenced, batched completions (I3).
//! - [`outbox`]: dead rows the DLQ broker has not acknowledged yet (I4).
//! - [`listen`]: LISTEN connections of their own, checked while idle and replaced when dead.
//! - [`find`]: the row filters of `replay` and `purge` (`redrive.find()`).
//! - [`replay`]: dead rows back to pending, or their records back to Kafka, in chunks.
//! - [`purge`]: deleting dead and replayed rows, in chunks (I5).
//! - [`safe`]: error texts cleaned of what Postgres refuses (NUL) and bounded (I10).
//! - [`breakers`]: operators' breaker holds and each process's breaker states (I13).
//! - [`status`]: counts, due times, the DLQ backlog and top errors for `redrive status`.

/// The [`crate::message::Message`] of a row that a `query!` read with its source columns (`id`,
/// `topic`, `partition`, `kafka_offset`, `kafka_timestamp`, `key`, `payload`, and `headers` as
/// text: `headers::text AS "headers!"`, parsed with no `serde_json::Value` between), as a
/// `Result`: malformed headers (written by hand) are a [`StoreError::BadRow`], which fails only that
/// row, never the batch it was read with (I10).
macro_rules! stored_message {
    ($r:ident) => {
        match crate::message::Message::headers_from_text(&$r.headers) {
            Ok(headers) => Ok(crate::message::Message {
                headers,
                topic: $r.topic,
                partition: $r.partition,
                offset: $r.kafka_offset,
                timestamp: $r.kafka_timestamp,
                key: $r.key,
                payload: $r.payload,
            }),
            Err(e) => Err(crate::store::StoreError::BadRow {
                id: $r.id,
                problem: format!("its stored headers cannot be read: {e}"),
            }),
        }
    };
}

pub mod breakers;
pub mod capture;
pub mod claim;
pub mod complete;
pub mod console;
pub mod find;
pub mod listen;
pub mod migrate;
pub mod outbox;
pub mod purge;
pub mod replay;
pub mod safe;
pub mod status;

use crate::config::{redact_url, PostgresConfig};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A pooled connection idle this long is pinged before a statement uses it; one used more recently
/// was pinged as it came back to the pool.
pub const RECHECK_IDLE: Duration = Duration::from_secs(1);

/// Errors from the store. Connection trouble is transient; the rest is not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A query failed. Shown as the error itself, without the chain of its sources, each of
    /// which says it again.
    #[error("postgres: {}", cause(.0))]
    Sql(sqlx::Error),
    /// Connecting failed for a reason that waiting does not change: wrong credentials, a
    /// database that does not exist, a setting in the URL that cannot work.
    #[error("connecting to postgres at {at}: {cause}")]
    Refused { at: String, cause: String },
    /// The schema is missing or older than this build needs.
    #[error("{0}")]
    Schema(String),
    /// A stored row could not be read back (for example malformed headers written by hand).
    #[error("row {id}: {problem}")]
    BadRow { id: uuid::Uuid, problem: String },
    /// Startup was cancelled while Postgres was still unreachable.
    #[error("gave up connecting to postgres at {0}: shutting down")]
    Cancelled(String),
}

impl StoreError {
    /// Whether trying again may succeed: the connection, not the statement, was the problem.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sql(e) => is_transient(e),
            StoreError::Cancelled(_) => true,
            StoreError::Schema(_) | StoreError::BadRow { .. } | StoreError::Refused { .. } => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Sql(e)
    }
}

/// What went wrong, once: a database error's own message (sqlx's text adds "error returned from
/// database" before it, and its source says it again).
pub fn cause(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_string(),
        e => e.to_string(),
    }
}

/// Opens one connection and closes it again, within `within`: the cause of a failure, which a
/// pool hides behind its own timeout (a refused connection, an unknown host, wrong credentials).
async fn probe(options: &PgConnectOptions, within: Duration) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    match tokio::time::timeout(within, sqlx::PgConnection::connect_with(options)).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {}", humantime::format_duration(within)),
        ))),
    }
}

/// Options for a pool of redrive's own. Each of its connections:
/// - plans every statement with the values it is given and the tables' sizes as they are
///   (`plan_cache_mode = force_custom_plan`). Left to itself, Postgres keeps a statement's plan
///   for good after five runs when, at that moment, that plan costs no more than planning anew:
///   on tables still small, or analyzed while nearly empty, that is a plan that scans them whole,
///   kept while they grow by thousands of rows a second until autovacuum analyzes them again
///   (schema V18). The claim keeps its one plan per connection (its own setting, schema V7),
///   whose index paths hold at any size (V17), and so do the completion of successes and the
///   release of key lines (V20), which run with every success, and the capture in key lines
///   (V21);
/// - compiles no statement to machine code (`jit = off`). redrive's statements are short index
///   walks whose plans, made for a batch of 1,000 rows, can look costly enough for JIT: a
///   replay's chunk then spent 0.6 s compiling and 0.05 s running.
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new().after_connect(|conn, _| Box::pin(session_settings(conn)))
}

/// The settings of every session of redrive's own: see [`pool_options`].
async fn session_settings(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    for setting in ["SET plan_cache_mode = force_custom_plan", "SET jit = off"] {
        sqlx::Executor::execute(&mut *conn, setting).await?;
    }
    Ok(())
}

/// Sets `conn` up as [`Store::snapshot_reader`] describes: its settings, then a read-only
/// transaction in `snapshot`.
async fn begin_in_snapshot(
    conn: &mut sqlx::PgConnection,
    snapshot: &str,
) -> Result<(), sqlx::Error> {
    session_settings(conn).await?;
    sqlx::Executor::execute(
        &mut *conn,
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    )
    .await?;
    // A lock that the exporting transaction holds is granted to it again at once, but this
    // reader queues behind any request that conflicts with it, such as a migration's ALTER
    // TABLE, which in turn waits for that transaction: a wait that lasts as long as the
    // exporting transaction waits for this reader. So the reader does not wait.
    sqlx::Executor::execute(&mut *conn, "SET LOCAL lock_timeout = '100ms'").await?;
    // The command takes a literal, not a parameter: `snapshot_reader` lets only an id through.
    let import = format!("SET TRANSACTION SNAPSHOT '{snapshot}'");
    // Postgres's error names the snapshot ("invalid snapshot identifier").
    sqlx::Executor::execute(&mut *conn, import.as_str()).await?;
    Ok(())
}

/// The retry store: a connection pool to the database that holds the `redrive` schema.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Wraps an existing pool (tests, and library users with a pool of their own). Build it from
    /// [`pool_options`], so its statements are planned for the tables as they are, and none is
    /// compiled.
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for the statements in the submodules.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A read-only transaction on a connection of its own, outside the pool, that sees what the
    /// transaction which exported `snapshot` (`SELECT pg_export_snapshot()`) sees, while that
    /// transaction is still open: a read beside that transaction's, whose numbers agree with its.
    /// The connection has the pool's settings; the caller ends the transaction, and closes the
    /// connection rather than drops it (Postgres logs a connection lost in a transaction).
    /// Its statements wait at most 100 ms for a lock, then fail (see `begin_in_snapshot`).
    /// Fails when the snapshot is unknown or its transaction has ended.
    pub async fn snapshot_reader(&self, snapshot: &str) -> Result<sqlx::PgConnection, StoreError> {
        use sqlx::ConnectOptions;
        // An id is hex digits and dashes; nothing else is put in the statement that imports it.
        if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(sqlx::Error::Protocol(format!(
                "{snapshot:?} is not a snapshot id (pg_export_snapshot() gives one)"
            ))
            .into());
        }
        // As long as the pool would wait for one of its own connections.
        let within = self.pool.options().get_acquire_timeout();
        let options = self.pool.connect_options();
        let connect = options.connect();
        let mut conn = tokio::time::timeout(within, connect).await.map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no connection within {}",
                    humantime::format_duration(within)
                ),
            ))
        })??;
        match begin_in_snapshot(&mut conn, snapshot).await {
            Ok(()) => Ok(conn),
            Err(e) => {
                // Closed, not dropped: Postgres logs a connection lost in a transaction.
                let _ = sqlx::Connection::close(conn).await;
                Err(e.into())
            }
        }
    }

    /// Connects, retrying with backoff while Postgres is unreachable, and logging each failure
    /// with the password redacted. Wrong credentials or a missing database fail at once.
    pub async fn connect(
        config: &PostgresConfig,
        shutdown: &CancellationToken,
    ) -> Result<Self, StoreError> {
        let shown = redact_url(config.url.expose_secret());
        let mut options = PgConnectOptions::from_str(config.url.expose_secret())?;
        // Named, so a DBA sees whose sessions these are and the lock watch finds its own; a name
        // in the URL (or PGAPPNAME) is kept.
        if options.get_application_name().is_none() {
            // Postgres keeps 63 bytes of it.
            let name: String = format!("redrive {}", crate::dispatcher::worker_id())
                .chars()
                .take(60)
                .collect();
            options = options.application_name(&name);
        }
        let pool = pool_options()
            .max_connections(config.max_connections)
            .acquire_timeout(config.connect_timeout)
            // The pool pings each connection as it comes back. Pinging it again as it is taken out
            // cost every statement a second round trip; only a connection idle for a while (which
            // a restarted server or a proxy may have closed meanwhile) is pinged again.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < RECHECK_IDLE {
                        return Ok(true);
                    }
                    Ok(sqlx::Connection::ping(conn).await.is_ok())
                })
            })
            .connect_lazy_with(options.clone());
        let mut delay = Duration::from_millis(250);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let error = match probe(&options, config.connect_timeout).await {
                Ok(()) => return Ok(Self { pool }),
                Err(e) if !is_transient(&e) => {
                    let cause = cause(&e);
                    return Err(StoreError::Refused { at: shown, cause });
                }
                Err(e) => cause(&e),
            };
            tracing::warn!(
                postgres = %shown, attempt, retry_in = %humantime::format_duration(delay),
                "postgres is unreachable, retrying: {error}"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Err(StoreError::Cancelled(shown)),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Connects once, for a short-lived command: an unreachable server is an error at once, naming
    /// the server with its password redacted.
    pub async fn connect_once(config: &PostgresConfig) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(config.url.expose_secret())?;
        if let Err(e) = probe(&options, config.connect_timeout).await {
            let at = redact_url(config.url.expose_secret());
            anyhow::bail!("connecting to postgres at {at}: {}", cause(&e));
        }
        let pool = pool_options()
            .max_connections(2)
            .acquire_timeout(config.connect_timeout)
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    /// Whether the database answers: `/readyz`.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// Whether an error may go away by itself: I/O, timeouts, a server starting or shutting down.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            // 08: connection exceptions; 57P0x: admin shutdown / cannot connect now; 53: resources;
            // 40001 and 40P01: a serialization failure or a deadlock, which the same statement
            // survives when it runs again (key lines lock rows and lines in more than one order).
            let code = db.code().unwrap_or_default();
            code.starts_with("08")
                || code.starts_with("57P0")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
        }
        _ => false,
    }
}
