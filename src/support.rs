//! Helpers that `redrive-demo`, `redrive-chaos` and the benchmarks share. Not part of the library's API.

use anyhow::Context;
use sqlx::Connection;

/// Drops (if it exists) and creates the database `name` on the server of `admin_url`, and returns
/// its URL. A plain DROP first, which also stops an autovacuum worker in it; then, if sessions of
/// an earlier run are still connected, DROP … WITH (FORCE).
pub async fn recreate_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connecting to postgres")?;
    let drop = format!("DROP DATABASE IF EXISTS {name}");
    if sqlx::query(&drop).execute(&mut admin).await.is_err() {
        sqlx::query(&format!("{drop} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("dropping the database {name}"))?;
    }
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating the database {name}"))?;
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(name);
    Ok(url.to_string())
}

/// A binary built beside the running one (`redrive` beside `redrive-demo`).
pub fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        anyhow::bail!(
            "{} is missing: build it with `cargo build --bins`",
            path.display()
        );
    }
    Ok(path)
}
