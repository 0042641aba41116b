//! The command line. Each subcommand maps to one library function.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// Durable retries, dead-lettering and replay for Kafka consumers, with Postgres as the retry store.
///
/// redrive consumes Kafka topics in a consumer group and POSTs each message to an HTTP handler as a
/// CloudEvent. Failed messages are stored in the `redrive.retry_messages` table before their offsets
/// are committed, retried with backoff, and dead-lettered to a DLQ topic after the last attempt.
#[derive(Debug, Parser)]
#[command(name = "redrive", version, propagate_version = true)]
pub struct Cli {
    /// The TOML configuration file. Every setting can also be set with an environment variable:
    /// REDRIVE_<SECTION>__<FIELD>, for example REDRIVE_POSTGRES__URL or REDRIVE_RETRY__MAX_ATTEMPTS.
    #[arg(
        short,
        long,
        env = "REDRIVE_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the consumer, the retry workers, the DLQ publisher and the /metrics listener.
    ///
    /// Stops on SIGINT or SIGTERM: polling stops, in-flight messages get `shutdown.timeout` to
    /// finish, stored offsets are committed and unfinished claims are released.
    Run(RunArgs),
    /// Apply the embedded database migrations (creates the `redrive` schema).
    ///
    /// Safe to run at any time and from several places at once; `run` refuses a schema older than
    /// it needs.
    Migrate,
    /// Load and validate the configuration, print it with secrets redacted, and exit.
    CheckConfig,
    /// Re-enqueue dead rows: back to pending, due now, with a fresh attempt budget.
    ///
    /// The error history is kept and the audit columns (replay_count, last_replayed_at,
    /// last_replayed_by, last_replay_reason) are set. Running workers pick the rows up at once.
    /// With --to-topic the records are produced back to Kafka instead, and the rows are marked
    /// replayed. Works in chunks of one short transaction each, with a progress bar; Ctrl-C stops
    /// after the current chunk, and every finished chunk stays replayed.
    ///
    /// A row of a topic that keeps key order goes back into its key's line: a dead row that held
    /// its key is due at once, and the rows waiting behind it follow it in order; a row its key had
    /// skipped waits while another row of its key is under way, then goes first.
    ///
    /// Needs [postgres] from the configuration ([kafka] too with --to-topic).
    #[command(after_help = REPLAY_EXAMPLES)]
    Replay(ReplayArgs),
    /// Show row counts by topic and state, due times, the DLQ backlog, the keys waiting behind a
    /// row of theirs (topics with ordering = "key") and the top errors.
    #[command(after_help = STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// Delete dead rows (and rows replayed to a topic) that died longer ago than --older-than.
    ///
    /// Dead rows the DLQ broker has not acknowledged yet are kept unless --include-unpublished is
    /// given. Works in chunks of one short transaction each, with a progress bar; Ctrl-C stops
    /// after the current chunk. Purging a dead row that held its key (ordering = "key") lets the
    /// key's next row go on.
    #[command(after_help = PURGE_EXAMPLES)]
    Purge(PurgeArgs),
    /// See the circuit breakers of every running process, and hold them open or closed.
    ///
    /// Each `redrive run` decides its breakers from its own calls to the handler and reports them
    /// to Postgres every 2 seconds. An operator's hold overrides them in every running process of
    /// the group within 2 seconds, and in processes that start later, until it is released:
    /// `open` keeps the backlog in Kafka and stops the workers' claims (use it for planned
    /// maintenance of the handler's service); `close` keeps messages and retries flowing whatever
    /// the failure rate. The holds live in `redrive.breaker_holds`; `redrive.hold_breaker()` and
    /// `redrive.release_breaker()` do the same from SQL.
    ///
    /// Needs [postgres] from the configuration.
    #[command(subcommand, after_help = BREAKER_EXAMPLES)]
    Breaker(BreakerCommand),
    /// Serve the web console: an overview of what fails, since when and why; the rows under any
    /// filter of the CLI; one message whole; and replay, purge, pause, resume and retry now, each
    /// with a preview first and a reason recorded.
    ///
    /// It listens on 127.0.0.1:8089 by default (`[console] listen`). It refuses any other address
    /// unless `[[console.users]]` are configured, each with a password (HTTP basic
    /// authentication) or a token (`Authorization: Bearer`), and a role: `read-only` or
    /// `operator`. Run it apart from the workers, with a database role of sql/roles.sql that fits:
    /// redrive_readonly for a console that only shows, redrive_operator for one that acts.
    ///
    /// Needs [postgres] and [console] from the configuration; replay to a topic needs [kafka] too.
    #[command(after_help = CONSOLE_EXAMPLES)]
    Console(ConsoleArgs),
}

/// `redrive console`
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// Listen here instead of `console.listen`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
}

const CONSOLE_EXAMPLES: &str = "Examples:
  redrive console -c redrive.toml                 # http://127.0.0.1:8089/, no sign-in
  redrive console -c redrive.toml --listen 0.0.0.0:8089
      # needs [[console.users]], for example:
      #   [[console.users]]
      #   name = \"alice\"
      #   role = \"operator\"
      #   password = \"...at least 12 characters...\"";

/// `redrive breaker …`
#[derive(Debug, Subcommand)]
pub enum BreakerCommand {
    /// The holds, and the state of every breaker of every running process.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Hold breakers open: the consumer pauses its topics and keeps the backlog in Kafka, and the
    /// workers claim nothing, probes included, until the hold is released.
    Open(HoldArgs),
    /// Hold breakers closed: every call goes, whatever the failure rate, until the hold is
    /// released.
    Close(HoldArgs),
    /// Lift holds: the breakers decide from their calls again, starting closed.
    Release(BreakerTarget),
}

/// Which breakers a hold is on.
#[derive(Debug, Clone, Args)]
pub struct BreakerTarget {
    /// The breaker: `default` (topics without a [breaker.topics."…"] entry), a topic that has such
    /// an entry, or `*` for every breaker.
    #[arg(long, value_name = "NAME", default_value = "*")]
    pub breaker: String,
    /// The consumer group, or `*` for every group.
    #[arg(long, value_name = "GROUP", default_value = "*")]
    pub consumer_group: String,
    /// How long to wait for the running processes to report that they took the change; 0 does
    /// not wait.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

/// `redrive breaker open|close`
#[derive(Debug, Clone, Args)]
pub struct HoldArgs {
    #[command(flatten)]
    pub target: BreakerTarget,
    /// Why, kept with the hold (a ticket, a maintenance window).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

const REPLAY_EXAMPLES: &str = "Examples:
  redrive replay --topic orders --error-contains timeout --dead-since 24h --dry-run
  redrive replay --id 01936f6e-2b7c-7d4a-9a51-6f0c1e0b9a2e --reason 'fixed in v1.4.2'
  redrive replay --all --limit 1000
  redrive replay --topic orders --to-topic          (back to each row's original topic)
  redrive replay --topic orders --to-topic orders.v2";

const STATUS_EXAMPLES: &str = "Examples:
  redrive status
  redrive status --window 24h --top 20
  redrive status --exact            (count every row, however long it takes)
  redrive status --json | jq '.groups[] | {consumer_group, dlq_backlog}'";

const BREAKER_EXAMPLES: &str = "Examples:
  redrive breaker status
  redrive breaker open --reason 'SMTP relay maintenance, CHG-118'
  redrive breaker open --breaker orders --consumer-group billing
  redrive breaker release
  psql -c \"SELECT redrive.hold_breaker('open', reason => 'CHG-118')\"";

const PURGE_EXAMPLES: &str = "Examples:
  redrive purge --older-than 30d --dry-run
  redrive purge --older-than 7d --topic orders
  redrive purge --older-than 0s --id 01936f6e-2b7c-7d4a-9a51-6f0c1e0b9a2e";

/// The row filters `replay` and `purge` share. Filters combine with AND; repeated flags of one
/// kind combine with OR.
#[derive(Debug, Clone, Args, Default)]
pub struct FilterArgs {
    /// Only this row (repeatable).
    #[arg(long = "id", value_name = "UUID")]
    pub ids: Vec<Uuid>,
    /// Only rows from this source topic (repeatable).
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,
    /// Only rows of this consumer group (repeatable).
    #[arg(long = "consumer-group", value_name = "GROUP")]
    pub consumer_groups: Vec<String>,
    /// Only rows whose Kafka key is exactly this text.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Only rows whose last error contains this text (ignoring case; no wildcards).
    #[arg(long, value_name = "TEXT")]
    pub error_contains: Option<String>,
    /// Only rows whose last failure was of this kind (repeatable).
    #[arg(long = "error-kind", value_name = "KIND", value_parser = ["retryable", "permanent", "timeout"])]
    pub error_kinds: Vec<String>,
    /// Only rows that died at or after this time: a duration ago ("2h", "1d 12h") or a time
    /// ("2026-11-20", "2026-11-20 14:00", RFC 3339; UTC unless an offset is given).
    #[arg(long, value_name = "WHEN", value_parser = parse_when)]
    pub dead_since: Option<DateTime<Utc>>,
    /// Only rows that died before this time (same forms as --dead-since).
    #[arg(long, value_name = "WHEN", value_parser = parse_when)]
    pub dead_before: Option<DateTime<Utc>>,
    /// Act on at most this many rows, oldest death first.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Print how many rows match and a sample of them; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per transaction.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub chunk_size: u64,
}

/// `redrive replay`
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Replay every dead row that the filters match, even with no filter at all.
    #[arg(long)]
    pub all: bool,
    /// Produce each record back to Kafka instead of re-enqueueing the row: to its original topic,
    /// or to TOPIC when given. The rows are then marked replayed.
    #[arg(long, value_name = "TOPIC", num_args = 0..=1, default_missing_value = "")]
    pub to_topic: Option<String>,
    /// A note kept in last_replay_reason, such as a ticket or a release.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Recorded in last_replayed_by; defaults to the operating-system user.
    #[arg(long, value_name = "NAME")]
    pub by: Option<String>,
    /// Also set the rows' attempt budget (re-enqueue only).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..), conflicts_with = "to_topic")]
    pub max_attempts: Option<i32>,
}

/// `redrive status`
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Count errors of failed attempts over this window.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// How many of the most frequent errors to show.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: i64,
    /// Count every row, reading the whole table: slow on a large one. Without it, status answers
    /// in about a second at any size: a count too large to read quickly is estimated from a
    /// random sample of the table's pages, and shown with a leading "~" ("estimated" in JSON).
    #[arg(long)]
    pub exact: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `redrive purge`
#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only rows that died longer ago than this ("30d", "12h"; "0s" for any age).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Also delete dead rows the DLQ broker has not acknowledged yet (their only copy).
    #[arg(long)]
    pub include_unpublished: bool,
}

/// A point in time: a duration ago ("2h", "1d 12h"), an RFC 3339 time, or a UTC date or date and
/// time ("2026-11-20", "2026-11-20 14:00", "2026-11-20T14:00:00").
pub fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(ago) = humantime::parse_duration(s) {
        let ago = chrono::Duration::from_std(ago).map_err(|_| format!("{s:?} is too long ago"))?;
        return Ok(Utc::now() - ago);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(format!(
        "{s:?} is neither a duration (\"2h\", \"1d 12h\") nor a time (\"2026-11-20\", \"2026-11-20 14:00\", RFC 3339)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn when_takes_durations_dates_and_times() {
        let before = Utc::now();
        let two_hours_ago = parse_when("2h").unwrap();
        let drift = (before - chrono::Duration::hours(2) - two_hours_ago)
            .num_seconds()
            .abs();
        assert!(drift < 5, "2h ago was off by {drift}s");
        assert_eq!(
            parse_when("2026-11-20").unwrap().to_rfc3339(),
            "2026-11-20T00:00:00+00:00"
        );
        assert_eq!(
            parse_when("2026-11-20 14:30").unwrap().to_rfc3339(),
            "2026-11-20T14:30:00+00:00"
        );
        assert_eq!(
            parse_when("2026-11-20T14:30:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2026-11-20T12:30:00+00:00"
        );
        let e = parse_when("yesterday-ish").unwrap_err();
        assert!(e.contains("yesterday-ish") && e.contains("duration"), "{e}");
    }

    #[test]
    fn to_topic_takes_an_optional_name() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            match cli.command {
                Command::Replay(r) => r.to_topic,
                other => panic!("parsed {other:?}"),
            }
        };
        assert_eq!(parse(&["redrive", "replay", "--all"]), None);
        assert_eq!(
            parse(&["redrive", "replay", "--all", "--to-topic"]),
            Some(String::new())
        );
        assert_eq!(
            parse(&["redrive", "replay", "--to-topic", "orders.v2", "--all"]),
            Some("orders.v2".into())
        );
    }
}

/// Which parts of `run` to start; all by default.
#[derive(Debug, Clone, Copy, Args, Default)]
pub struct RunArgs {
    /// Do not consume Kafka (run only retry workers and/or the DLQ publisher).
    #[arg(long)]
    pub no_consumer: bool,
    /// Do not run retry workers.
    #[arg(long)]
    pub no_workers: bool,
    /// Do not publish dead rows to the DLQ topic.
    #[arg(long)]
    pub no_dlq: bool,
    /// Do not serve /metrics, /healthz and /readyz.
    #[arg(long)]
    pub no_http: bool,
}
