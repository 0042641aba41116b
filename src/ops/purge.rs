//! `redrive purge`: deletes dead and replayed rows older than a cutoff (I5).

use super::{chunked, connect, dry_run, explain, plan, print_skipped, Finished};
use crate::cli::PurgeArgs;
use crate::config::PostgresConfig;
use crate::store::find::{Filter, Scope};
use anyhow::bail;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

/// Runs `redrive purge`. Stops between chunks when `stop` is cancelled.
pub async fn run(
    postgres: &PostgresConfig,
    args: &PurgeArgs,
    stop: &CancellationToken,
) -> anyhow::Result<Finished> {
    let mut filter = Filter::from(&args.filter);
    let Some(older_than) = args.older_than else {
        bail!("purge needs --older-than (\"30d\"; \"0s\" for rows of any age), so that no purge deletes recent rows by accident");
    };
    let cutoff = Utc::now() - chrono::Duration::from_std(older_than)?;
    filter.dead_before = Some(filter.dead_before.map_or(cutoff, |b| b.min(cutoff)));
    let store = connect(postgres).await?;
    let plan = plan(
        &store,
        Scope::Finished,
        &filter,
        args.include_unpublished,
        &args.filter,
    )
    .await?;
    let kept = || {
        if plan.matched.unpublished > 0 {
            println!(
                "kept {} matching dead row(s) that the DLQ broker has not acknowledged yet (--include-unpublished deletes them too)",
                plan.matched.unpublished
            );
        }
    };
    if args.filter.dry_run {
        dry_run(
            &store,
            Scope::Finished,
            &filter,
            args.include_unpublished,
            &plan,
            "would delete",
        )
        .await?;
        kept();
        print_skipped(&plan.skipped, "dead or replayed");
        return Ok(Finished::default());
    }
    let total = plan.total;
    let finished = chunked("purge", total, &args.filter, &filter, stop, |n, from| {
        let store = &store;
        async move {
            store
                .purge_chunk(&from, args.include_unpublished, n)
                .await
                .map_err(|e| explain(e, "purge"))
        }
    })
    .await?;
    if finished.interrupted {
        println!(
            "interrupted: deleted {} of {total} row(s); run the same command again to continue",
            finished.done
        );
    } else {
        let before = filter.dead_before.unwrap_or(cutoff);
        println!(
            "deleted {} row(s) that died before {}",
            finished.done,
            before.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    kept();
    print_skipped(&plan.skipped, "dead or replayed");
    Ok(finished)
}
