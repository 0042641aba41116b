//! `redrive purge`: deletes dead and replayed rows older than a cutoff (I5).

use super::{chunked, connect, explain, print_sample, print_skipped, Finished};
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
    let matched = store
        .count_matching(Scope::Finished, &filter, args.include_unpublished)
        .await
        .map_err(|e| explain(e, "counting rows to purge"))?;
    let skipped = store
        .outside_scope(Scope::Finished, &filter.ids)
        .await
        .map_err(|e| explain(e, "looking up --id rows"))?;
    let total = args
        .filter
        .limit
        .map_or(matched.eligible as u64, |l| l.min(matched.eligible as u64));
    let kept = || {
        if matched.unpublished > 0 {
            println!(
                "kept {} matching dead row(s) that the DLQ broker has not acknowledged yet (--include-unpublished deletes them too)",
                matched.unpublished
            );
        }
    };
    if args.filter.dry_run {
        let sample = store
            .sample_matching(
                Scope::Finished,
                &filter,
                args.include_unpublished,
                10.min(total as i64),
            )
            .await
            .map_err(|e| explain(e, "reading rows to purge"))?;
        print_sample("would delete", total as i64, &sample);
        kept();
        print_skipped(&skipped, "dead or replayed");
        return Ok(Finished {
            done: 0,
            interrupted: false,
        });
    }
    let finished = chunked(
        "purge",
        total,
        args.filter.chunk_size,
        args.filter.limit,
        stop,
        |n| {
            let (store, filter) = (&store, &filter);
            async move {
                store
                    .purge_chunk(filter, args.include_unpublished, n)
                    .await
                    .map_err(|e| explain(e, "purge"))
            }
        },
    )
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
    print_skipped(&skipped, "dead or replayed");
    Ok(finished)
}
