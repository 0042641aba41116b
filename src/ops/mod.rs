//! The operator commands: `redrive replay`, `redrive purge` and `redrive status`. The SQL is in
//! [`crate::store`]; this module turns command-line arguments into filters, runs chunked work with
//! a progress display and a clean stop on Ctrl-C, and prints the results.

pub mod breaker;
pub mod purge;
pub mod replay;
pub mod status;

use crate::cli::FilterArgs;
use crate::store::find::{Filter, Matched, Sample, Scope, Skipped};
use crate::store::purge::Chunk;
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use indicatif::{ProgressBar, ProgressStyle};
use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The exit status of a command stopped by SIGINT or SIGTERM.
pub const INTERRUPTED: u8 = 130;

/// How a chunked command ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Finished {
    /// Rows changed.
    pub done: u64,
    /// Whether it stopped early on a signal.
    pub interrupted: bool,
}

impl From<&FilterArgs> for Filter {
    fn from(a: &FilterArgs) -> Self {
        Filter {
            ids: a.ids.clone(),
            topics: a.topics.clone(),
            consumer_groups: a.consumer_groups.clone(),
            key: a.key.clone(),
            error_contains: a.error_contains.clone(),
            error_kinds: a.error_kinds.clone(),
            dead_since: a.dead_since,
            dead_before: a.dead_before,
        }
    }
}

/// What a replay or purge is about to act on.
#[derive(Debug)]
pub struct Plan {
    /// Rows the filters match, and those held back.
    pub matched: Matched,
    /// Rows named by `--id` that are outside the command's states.
    pub skipped: Vec<Skipped>,
    /// Rows the command will act on: the eligible ones, up to `--limit`.
    pub total: u64,
}

/// Counts what the filters select, and the `--id` rows the command must leave alone.
pub async fn plan(
    store: &Store,
    scope: Scope,
    filter: &Filter,
    with_unpublished: bool,
    args: &FilterArgs,
) -> anyhow::Result<Plan> {
    let matched = store
        .count_matching(scope, filter, with_unpublished)
        .await
        .map_err(|e| explain(e, "counting the matching rows"))?;
    let skipped = store
        .outside_scope(scope, &filter.ids)
        .await
        .map_err(|e| explain(e, "looking up the --id rows"))?;
    let eligible = matched.eligible as u64;
    Ok(Plan {
        matched,
        skipped,
        total: args.limit.map_or(eligible, |l| l.min(eligible)),
    })
}

/// Prints a dry run: how many rows `what` ("would replay"), the oldest ten of them.
pub async fn dry_run(
    store: &Store,
    scope: Scope,
    filter: &Filter,
    with_unpublished: bool,
    plan: &Plan,
    what: &str,
) -> anyhow::Result<()> {
    let sample = store
        .sample_matching(scope, filter, with_unpublished, 10.min(plan.total as i64))
        .await
        .map_err(|e| explain(e, "reading the matching rows"))?;
    print_sample(what, plan.total as i64, &sample);
    Ok(())
}

/// Runs `step` on chunks of at most `chunk_size` rows of `filter` until no row is left, `limit`
/// rows are done or `stop` is cancelled; a chunk that has started always finishes. Each chunk gets
/// the filter from where the one before it stopped ([`Filter::start_at`]), so a command's walk
/// over the table is one walk, not one per chunk. Shows a progress bar on a terminal and a line
/// every few seconds otherwise.
pub async fn chunked<F, Fut>(
    verb: &str,
    total: u64,
    args: &FilterArgs,
    filter: &Filter,
    stop: &CancellationToken,
    mut step: F,
) -> anyhow::Result<Finished>
where
    F: FnMut(i64, Filter) -> Fut,
    Fut: Future<Output = anyhow::Result<Chunk>>,
{
    let mut filter = filter.clone();
    let (chunk_size, limit) = (args.chunk_size, args.limit);
    let total = limit.map_or(total, |l| l.min(total));
    let bar = progress_bar(verb, total);
    let mut done = 0u64;
    let mut last_line = Instant::now();
    let interrupted = loop {
        let want = limit.map_or(chunk_size, |l| l.saturating_sub(done).min(chunk_size));
        if want == 0 {
            break false;
        }
        if stop.is_cancelled() {
            break true;
        }
        let chunk = match step(want as i64, filter.clone()).await {
            Ok(chunk) => chunk,
            Err(e) => {
                bar.abandon();
                return Err(e.context(format!(
                    "stopped after {done} of {total} rows; the chunks before this one are kept"
                )));
            }
        };
        if chunk.selected == 0 {
            break false;
        }
        done += chunk.changed;
        filter.start_at(chunk.last_dead_at);
        bar.set_position(done.min(total));
        if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!("{verb}: {done} of {total} rows");
            last_line = Instant::now();
        }
    };
    bar.finish_and_clear();
    Ok(Finished { done, interrupted })
}

fn progress_bar(verb: &str, total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:40}] {human_pos}/{human_len} rows  {per_sec}  eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(verb.to_string());
    bar
}

/// Connects for one operator command: fails at once, naming the server (password redacted), when
/// Postgres is unreachable, then checks the schema version.
pub async fn connect(postgres: &crate::config::PostgresConfig) -> anyhow::Result<crate::Store> {
    let store = crate::Store::connect_once(postgres).await?;
    store
        .check_schema()
        .await
        .map_err(|e| explain(e, "reading the schema version"))?;
    Ok(store)
}

/// Turns a store error into one that says what to do, for the errors operators meet: a role
/// without the privilege, and a schema that was never migrated.
pub fn explain(e: StoreError, what: &str) -> anyhow::Error {
    if let StoreError::Sql(sqlx::Error::Database(db)) = &e {
        match db.code().as_deref() {
            Some("42501") => {
                return anyhow::anyhow!(
                    "{what} is not allowed for this database role: {}. Grant it the redrive_operator role (sql/roles.sql); nothing was changed by the refused statement",
                    db.message()
                )
            }
            Some("42P01") | Some("42883") | Some("3F000") => {
                return anyhow::anyhow!(
                    "{what} needs the redrive schema at the current version ({}): run `redrive migrate`",
                    db.message()
                )
            }
            _ => {}
        }
    }
    anyhow::Error::new(e).context(format!("{what} failed"))
}

/// Prints a dry run: the count, then a sample of the rows.
pub fn print_sample(what: &str, count: i64, sample: &[Sample]) {
    println!("dry run: {what} {count} row(s); nothing was changed");
    if sample.is_empty() {
        return;
    }
    let mut table = table(&[
        "id",
        "group",
        "topic",
        "partition",
        "offset",
        "state",
        "key",
        "attempts",
        "dead at",
        "last error",
    ]);
    for s in sample {
        table.add_row(vec![
            s.id.to_string(),
            s.consumer_group.clone(),
            s.topic.clone(),
            s.partition.to_string(),
            s.offset.to_string(),
            s.state.clone(),
            s.key.as_deref().map(|k| clip(k, 24)).unwrap_or_default(),
            s.attempts.to_string(),
            s.dead_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            s.last_error
                .as_deref()
                .map(|e| clip(e, 60))
                .unwrap_or_default(),
        ]);
    }
    println!("{table}");
    if (sample.len() as i64) < count {
        println!("(the {} oldest of {count} shown)", sample.len());
    }
}

/// Reports the rows named by `--id` that the command left alone.
pub fn print_skipped(skipped: &[Skipped], wanted: &str) {
    for s in skipped {
        match &s.state {
            Some(state) => println!("skipped {}: not {wanted} (state {state})", s.id),
            None => println!("skipped {}: no such row", s.id),
        }
    }
}

/// A table in the house style.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

/// At most `max` characters of one line of `s`, with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or_default();
    if line.chars().count() <= max && line.len() == s.len() {
        return line.to_string();
    }
    let cut: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// A count as shown: a leading `~` when it is an estimate.
pub fn count(n: i64, estimated: bool) -> String {
    if estimated {
        format!("~{n}")
    } else {
        n.to_string()
    }
}

/// A time, with how far it is from `now` ("… (3m ago)", "… (in 20s)").
pub fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else {
        return "-".into();
    };
    let secs = (t - now).num_seconds();
    let distance = humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()));
    let relative = if secs == 0 {
        "now".to_string()
    } else if secs < 0 {
        format!("{distance} ago")
    } else {
        format!("in {distance}")
    };
    format!("{} ({relative})", t.format("%Y-%m-%d %H:%M:%S"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_long_and_multi_line_text() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("0123456789abc", 10), "012345678…");
        assert_eq!(clip("first\nsecond", 10), "first…");
        assert_eq!(clip("ééééé", 3), "éé…");
    }

    #[tokio::test]
    async fn chunked_stops_at_the_limit_when_empty_and_when_told() {
        // 25 rows in chunks of 10 with a limit of 22: chunks of 10, 10, 2.
        let mut asked = Vec::new();
        let stop = CancellationToken::new();
        let all = |n: u64| -> anyhow::Result<Chunk> {
            Ok(Chunk {
                selected: n,
                changed: n,
                last_dead_at: None,
            })
        };
        let args = |limit| FilterArgs {
            chunk_size: 10,
            limit,
            ..FilterArgs::default()
        };
        let filter = Filter::default();
        let r = chunked("test", 25, &args(Some(22)), &filter, &stop, |n, _| {
            asked.push(n);
            async move { all(n as u64) }
        })
        .await
        .unwrap();
        assert_eq!(asked, vec![10, 10, 2]);
        assert_eq!(
            r,
            Finished {
                done: 22,
                interrupted: false
            }
        );

        // No limit: it stops when a chunk selects nothing.
        let mut left = 15u64;
        let r = chunked("test", 15, &args(None), &filter, &stop, |n, _| {
            let got = left.min(n as u64);
            left -= got;
            async move { all(got) }
        })
        .await
        .unwrap();
        assert_eq!(
            r,
            Finished {
                done: 15,
                interrupted: false
            }
        );

        // Cancelled after the first chunk: that chunk counts, no other starts.
        let mut calls = 0;
        let r = chunked("test", 100, &args(None), &filter, &stop.clone(), |n, _| {
            calls += 1;
            stop.cancel();
            async move { all(n as u64) }
        })
        .await
        .unwrap();
        assert_eq!(
            (calls, r),
            (
                1,
                Finished {
                    done: 10,
                    interrupted: true
                }
            )
        );
    }

    #[tokio::test]
    async fn each_chunk_starts_where_the_one_before_it_stopped() {
        // Three chunks whose newest rows died at 10:00, 09:00 and 11:00, then none: each chunk
        // gets the filter's own conditions, from the latest of the filter's start and the newest
        // death taken so far, so a start never moves back.
        let at = |h: u32| {
            Some(
                chrono::NaiveDate::from_ymd_opt(2026, 12, 7)
                    .unwrap()
                    .and_hms_opt(h, 0, 0)
                    .unwrap()
                    .and_utc(),
            )
        };
        let filter = Filter {
            topics: vec!["orders".into()],
            dead_since: at(8),
            ..Filter::default()
        };
        let args = FilterArgs {
            chunk_size: 10,
            ..FilterArgs::default()
        };
        let newest = [at(10), at(9), at(11)];
        let mut given = Vec::new();
        let r = chunked(
            "test",
            30,
            &args,
            &filter,
            &CancellationToken::new(),
            |n, f| {
                let last = newest.get(given.len()).copied().flatten();
                given.push(f);
                let selected = if last.is_some() { n as u64 } else { 0 };
                async move {
                    Ok(Chunk {
                        selected,
                        changed: selected,
                        last_dead_at: last,
                    })
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(r.done, 30);
        let since: Vec<_> = given.iter().map(|f| f.dead_since).collect();
        assert_eq!(since, vec![at(8), at(10), at(10), at(11)]);
        assert!(given.iter().all(|f| f.topics == ["orders"]));
    }
}
