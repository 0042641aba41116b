//! Embedded refinery migrations (`migrations/V*__*.sql`) and the check that `redrive run` makes
//! before it starts: the schema must be at least as new as the newest migration of this build.
//!
//! Migrations are applied over a tokio-postgres connection (refinery's driver) under an advisory
//! lock, so two `redrive migrate` runs at once apply each migration once.

use super::{Store, StoreError};
use crate::config::redact_url;
use secrecy::{ExposeSecret, SecretString};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records applied migrations.
pub const HISTORY_TABLE: &str = "redrive.refinery_schema_history";

/// The newest migration version this build carries.
pub fn required_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// A migration that was applied.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Its version number (`V1` → 1).
    pub version: i32,
    /// Its name (`V1__retry_table` → `retry_table`).
    pub name: String,
}

/// Applies every pending migration and returns those it applied.
pub async fn run(url: &SecretString) -> anyhow::Result<Vec<Applied>> {
    run_to(url, None).await
}

/// Applies the pending migrations up to `version` (all of them when `None`) and returns those it
/// applied. A schema left at an older version is what an older redrive made: the upgrade tests
/// fill one with rows and migrate it the rest of the way.
pub async fn run_to(url: &SecretString, version: Option<i32>) -> anyhow::Result<Vec<Applied>> {
    use anyhow::Context;
    let shown = redact_url(url.expose_secret());
    let (mut client, connection) =
        tokio_postgres::connect(url.expose_secret(), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to postgres at {shown}"))?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute("SELECT pg_advisory_lock(hashtext('redrive.migrate')); CREATE SCHEMA IF NOT EXISTS redrive;")
        .await
        .context("locking the schema for migration")?;
    let report = embedded::migrations::runner()
        .set_target(version.map_or(refinery::Target::Latest, refinery::Target::Version))
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(&mut client)
        .await
        .context("applying migrations")?;
    // Fresh statistics, so the planner picks the partial indexes from the first claim on, rather
    // than scanning a table it has never measured. (A schema left before V8 has no queue.)
    client
        .batch_execute(
            "ANALYZE redrive.retry_messages; \
             DO $$ BEGIN IF to_regclass('redrive.queue') IS NOT NULL THEN ANALYZE redrive.queue; END IF; END $$",
        )
        .await
        .context("analyzing the retry table and the queue")?;
    client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('redrive.migrate'))")
        .await
        .ok();
    drop(client);
    driver.abort();
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| Applied {
            version: m.version(),
            name: m.name().to_string(),
        })
        .collect())
}

impl Store {
    /// The newest applied migration, or `None` when the schema was never migrated.
    pub async fn schema_version(&self) -> Result<Option<i32>, StoreError> {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(HISTORY_TABLE)
            .fetch_one(self.pool())
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let version: Option<i32> =
            sqlx::query_scalar(&format!("SELECT max(version)::int4 FROM {HISTORY_TABLE}"))
                .fetch_one(self.pool())
                .await?;
        Ok(version)
    }

    /// Refuses a schema older than this build needs, with the command that fixes it. A newer one
    /// is allowed, with a warning: a newer build migrated it, and this one may be the build a
    /// rolling deploy has not replaced yet, or one rolled back to. Its statements work as long as
    /// the newer migrations only added to what it uses.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let required = required_version();
        match self.schema_version().await? {
            None => Err(StoreError::Schema(format!(
                "the database has no redrive schema (version {required} is needed): run `redrive migrate` first"
            ))),
            Some(v) if v < required => Err(StoreError::Schema(format!(
                "the redrive schema is at version {v}, older than the version {required} this redrive needs: run `redrive migrate`"
            ))),
            Some(v) if v > required => {
                tracing::warn!(
                    schema = v,
                    this_build = required,
                    "the redrive schema is at version {v}, newer than this build of redrive knows \
                     ({required}): a newer build migrated it. If statements fail here, replace \
                     this process with that build (see Upgrading in the README)"
                );
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }
}
