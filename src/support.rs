//! Helpers that the `redrive` binary, `redrive-demo`, `redrive-chaos` and the benchmarks share. Not
//! part of the library's API.

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

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` is set, which
/// leaves the choice to mimalloc. mimalloc asks for huge pages on its arena, and every 2 MiB of it
/// that is touched is then resident: `redrive run` peaked about 15 MiB higher with them, and ran no
/// faster (BENCHMARKS.md, footprint). Pages already faulted in stay as they are, and mimalloc's
/// start-up touches its arena, so a binary runs this as a constructor before mimalloc's own (see
/// `main.rs`): it neither allocates nor panics.
pub extern "C" fn no_transparent_huge_pages() {
    // SAFETY: getenv reads a NUL-terminated literal and allocates nothing; PR_SET_THP_DISABLE takes
    // plain integers and fails only on kernels without it, where there is nothing to turn off.
    #[cfg(target_os = "linux")]
    unsafe {
        if libc::getenv(c"MIMALLOC_ALLOW_THP".as_ptr()).is_null() {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}
