//! Throughput benchmarks for BENCHMARKS.md, on the real broker and Postgres (`make bench`).
//!
//! - bare:     the reference for happy: a bare rdkafka loop (receive, no-op, store the offset,
//!   auto-commit), with redrive's consumer settings.
//! - happy:    every handler call succeeds; messages/s until every offset is committed.
//! - happy-ce: happy with the six headers of a CloudEvent in Kafka's binary mode on every message
//!   ([`ce_headers_of`]), as Knative's sources produce them.
//! - happy-keys: happy with `ordering = "key"`, every message of a key of its own (many keys).
//! - happy-fewkeys: happy with `ordering = "key"` and 16 keys in all, so each key's messages go
//!   one after another.
//! - insert-floor: the reference for capture: INSERT of rows as wide, 500 per statement, on one
//!   connection.
//! - capture:  every handler call fails; messages/s until every failure is a row and committed.
//! - capture-ce: capture with a CloudEvent's six headers on every message, as `happy-ce`.
//! - capture-keys: capture with `ordering = "key"` and a key per message: every failure opens a
//!   key line of its own (`redrive.capture_in_lines`); 100,000 messages unless set.
//! - capture-parked: `ordering = "key"` and one key per partition; every handler call fails, so
//!   each partition's first message fails and every later one is parked behind it; messages/s
//!   until every message is a row and committed.
//! - insert-floor-8k, capture-8k: insert-floor and capture with a JSON document of about 8 KiB per
//!   message ([`large_payload`]), over Postgres's TOAST threshold, so each payload is compressed
//!   as it is stored; the floor's table has Postgres's default compression; 100,000 messages
//!   unless set.
//! - claim-floor: the reference for dispatch: claim (UPDATE … SKIP LOCKED, 100 rows) and delete
//!   (one statement per batch), 4 clients.
//! - dispatch: due rows in the table, the handler succeeds; rows/s until the table is empty.
//! - dispatch-ce: dispatch with a CloudEvent's six headers on every row, as `happy-ce`.
//! - retry:    due rows in the table, the handler fails every attempt: each is rescheduled an hour
//!   on; rows/s until every row is rescheduled (a retry storm, the failure completions' path).
//! - dispatch-lines: the same rows in 16 key lines (`ordering = "key"`): each line's first row due,
//!   the others waiting behind it, so each line goes one row at a time; rows/s until the table is
//!   empty.
//! - replay:   dead rows in the table; rows/s of `redrive replay --all` (chunks of 1,000).
//! - purge:    dead rows in the table; rows/s of `redrive purge` (chunks of 1,000).
//! - produce-floor: the reference for dlq: a producer made as redrive makes its DLQ producer
//!   sends records of 1 KiB with ten headers as long as a DLQ record's, up to 10,000
//!   unacknowledged at once; records/s until the broker has acknowledged them all.
//! - dlq:      dead rows in the table, none published; rows/s of the DLQ publisher alone, with
//!   redrive's defaults, until each is on the DLQ topic and marked published
//!   (`BENCH_DLQ_BATCH` sets the rows of a round, `BENCH_DLQ_ROUNDS` the rounds in flight).
//! - storm:    a storm of permanent errors: every handler call fails for good, and the consumer
//!   and the DLQ publisher run together (redrive's defaults, `BENCH_DLQ_ROUNDS` as for dlq);
//!   messages/s until every message is on the DLQ topic and its row is marked published. When
//!   the last offset was committed is printed beside it.
//! - timing:   rows coming due at 1,000/s; how late each is attempted, and the CPU per row of
//!   redrive and Postgres (see `timing.rs`).
//! - timing-defaults: timing with redrive's default workers (32 slots) and pool.
//! - footprint: peak RSS of the `redrive run` binary, with its defaults, consuming 1M messages
//!   through its HTTP handler (see `footprint.rs`).
//! - operators: seconds of `redrive status` and of `redrive replay --dry-run` by a topic, a key and
//!   an error kind at 10M dead and 1M pending rows, beside `redrive status --exact` (see
//!   `operators.rs`).
//! - console: seconds of the web console's pages at 1M dead rows, beside `redrive status` and
//!   `redrive replay --dry-run` on the same table (see `operators.rs`).
//!
//! The handler is an in-process `Handler` (redrive's own cost), and for `happy-http` the HTTP
//! handler against a local endpoint. `happy-http` and the capture cases run with redrive's default
//! of 128 messages in flight (the other consumer cases allow 2,000; `BENCH_MAX_IN_FLIGHT`
//! overrides both, `BENCH_CAPTURE_IN_FLIGHT` the capture batches written at once,
//! `BENCH_CAPTURE_BATCH` the most failures a capture statement writes, `BENCH_CAPTURE_LINGER_MS`
//! how long a capture batch waits to fill, and `BENCH_RETRY_JITTER` the retry policy's jitter).
//! `BENCH_AFTER_MIGRATE_SQL` is SQL run on each fresh database after `migrate`, to price a change
//! of the table before it is built (see `scripts/capture-layouts.sh`). The consumer cases run the
//! consumer alone; with `BENCH_WITH_WORKERS=1` the retry workers run beside it, as in `redrive
//! run`. Usage: `bench [CASE[,CASE…]|all] [N]`; `BENCH_RUNS` rounds (3 unless set) run the cases
//! interleaved, and the median and range of each are printed, with each case's ratio to its
//! reference. Every wait has a deadline; the benchmark counts handler calls in memory, so its own
//! polling does not load what it measures.

mod dlq;
mod footprint;
mod operators;
mod outage;
mod timing;

/// The allocator of the `redrive` binary, so the figures are the binary's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redrive::cli::RunArgs;
use redrive::handler::{Delivery, Handler, HandlerError};
use redrive::store::capture::{Capture, InitialState};
use redrive::{Config, Store};
use sqlx::Connection as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timing::Slots;

const PARTITIONS: i32 = 4;

/// The in-process handler: always succeeds or always fails, and counts its calls in memory so
/// the benchmark can wait for them without loading Postgres or the broker.
#[derive(Clone)]
struct Fixed {
    ok: bool,
    /// Its failures are permanent: each message dies at once.
    permanent: bool,
    calls: Arc<Calls>,
}

impl Fixed {
    fn new(ok: bool) -> Self {
        Self {
            ok,
            permanent: false,
            calls: Arc::default(),
        }
    }

    /// A handler whose every call fails for good.
    fn permanent() -> Self {
        Self {
            permanent: true,
            ..Self::new(false)
        }
    }
}

/// Handler calls, counted in memory, and when the first one came.
#[derive(Default)]
struct Calls {
    count: AtomicUsize,
    first: std::sync::OnceLock<Start>,
}

impl Calls {
    fn hit(&self) {
        self.first.get_or_init(Start::now);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl Handler for Fixed {
    async fn handle(&self, _d: Delivery<'_>) -> Result<(), HandlerError> {
        self.calls.hit();
        match (self.ok, self.permanent) {
            (true, _) => Ok(()),
            (false, false) => Err(HandlerError::retryable("benchmark failure")),
            (false, true) => Err(HandlerError::permanent("benchmark failure")),
        }
    }
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Every case, in the order a round runs them.
const CASES: [&str; 23] = [
    "bare",
    "happy",
    "happy-ce",
    "happy-keys",
    "happy-fewkeys",
    "happy-http",
    "insert-floor",
    "capture",
    "capture-ce",
    "capture-keys",
    "capture-parked",
    "insert-floor-8k",
    "capture-8k",
    "claim-floor",
    "dispatch",
    "dispatch-ce",
    "retry",
    "dispatch-lines",
    "replay",
    "purge",
    "produce-floor",
    "dlq",
    "storm",
];

/// Cases that measure something other than a rate, each printing a table of its own after the
/// rates: `timing` and `timing-defaults` (lateness, N rows: 10,000 unless set), `footprint` (peak
/// RSS of `redrive run`, N messages: 1,000,000 unless set), `operators` (seconds per command),
/// `outage` (the breaker on and off through a 60 s outage of the handler's service) and `console`
/// (seconds per page).
const OWN_TABLES: [&str; 6] = [
    "timing",
    "timing-defaults",
    "footprint",
    "operators",
    "outage",
    "console",
];

/// Each case against its reference: (case, reference, what the reference is).
const RATIOS: [(&str, &str); 20] = [
    ("happy", "bare"),
    ("happy-ce", "happy"),
    ("happy-keys", "bare"),
    ("happy-keys", "happy"),
    ("happy-fewkeys", "happy"),
    ("happy-http", "bare"),
    ("capture", "insert-floor"),
    ("capture-ce", "capture"),
    ("capture-keys", "insert-floor"),
    ("capture-keys", "capture"),
    ("capture-parked", "insert-floor"),
    ("capture-8k", "insert-floor-8k"),
    ("dispatch", "claim-floor"),
    ("dispatch-ce", "dispatch"),
    ("retry", "claim-floor"),
    ("retry", "dispatch"),
    ("dispatch-lines", "dispatch"),
    ("dlq", "produce-floor"),
    ("storm", "capture"),
    ("storm", "dlq"),
];

/// The consumer cases' auto-commit interval (redrive's default is 200 ms). A case ends when its last
/// offset is committed, so it is timed in steps of this interval: at 200 ms, a happy-path run of
/// about a second fell on 0.85, 1.05 or 1.25 s and nothing between. Bare loop and redrive alike.
const COMMIT_INTERVAL_MS: &str = "50";

/// How long any one wait of a case may take before the case fails.
const DEADLINE: Duration = Duration::from_secs(600);

/// Transparent huge pages off, as the `redrive` binary has them, so the in-process figures are the
/// binary's.
#[used]
#[cfg_attr(target_os = "linux", link_section = ".init_array.00101")]
static NO_THP: extern "C" fn() = redrive::support::no_transparent_huge_pages;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // BENCH_TRACES=1: every case with traces exported, to a sink in this process that reads and
    // drops each OTLP request, so the cost measured is redrive's spans and their export.
    let traces = match std::env::var("BENCH_TRACES").as_deref() {
        Ok("1") => {
            let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let endpoint = format!("http://{}", sink.local_addr()?);
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(|_: axum::body::Bytes| async { "{}" }),
            );
            tokio::spawn(async move { axum::serve(sink, app).await });
            let telemetry = redrive::config::TelemetryConfig {
                otlp_endpoint: Some(endpoint),
                ..Default::default()
            };
            eprintln!("bench: traces exported");
            redrive::telemetry::init_tracing_with(Some(&telemetry))
        }
        _ => redrive::telemetry::init_tracing_with(None),
    };
    let result = run_cases().await;
    if let Some(t) = traces {
        t.shutdown();
    }
    result
}

async fn run_cases() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("all");
    // The consumer cases are short at 100,000 messages: the group's join would weigh in. They end
    // when the last offset is committed, in steps of the commit interval: capture and its floor
    // take 500,000, so the step is small beside the run (see COMMIT_INTERVAL_MS).
    let n: Option<usize> = args.get(2).map(|s| s.parse()).transpose()?;
    let size = |case: &str| match (n, case) {
        (Some(n), _) => n,
        (None, "bare" | "happy" | "happy-ce" | "happy-keys" | "happy-fewkeys") => 1_000_000,
        (None, "capture" | "capture-ce" | "capture-parked" | "insert-floor" | "storm") => 500_000,
        (None, "dispatch-lines") => 4_000,
        (None, _) => 100_000,
    };
    let runs: usize = env("BENCH_RUNS", "3").parse()?;
    let kafka = env("REDRIVE_TEST_KAFKA", "127.0.0.1:9092");
    let admin_url = env(
        "REDRIVE_TEST_DATABASE_URL",
        "postgres://redrive:redrive@127.0.0.1:5432/redrive",
    );
    let mut chosen: Vec<&str> = match which {
        "all" => CASES.iter().chain(&OWN_TABLES).copied().collect(),
        list => list.split(',').collect(),
    };
    for case in &chosen {
        anyhow::ensure!(
            CASES.contains(case) || OWN_TABLES.contains(case),
            "unknown case {case:?}: choose from {}, {} or all",
            CASES.join(", "),
            OWN_TABLES.join(", ")
        );
    }
    warn_of_other_databases(&admin_url).await?;
    let own: Vec<&str> = OWN_TABLES
        .into_iter()
        .filter(|c| chosen.contains(c))
        .collect();
    chosen.retain(|c| !OWN_TABLES.contains(c));
    // Rounds interleave the cases, so a machine that slows down mid-run slows every case alike.
    let mut rates: Vec<(&str, Vec<Run>)> = chosen.iter().map(|c| (*c, vec![])).collect();
    for round in 1..=runs {
        for (case, got) in rates.iter_mut() {
            let db = fresh_db(&admin_url).await?;
            let n = size(case);
            let cpu = cpu_seconds();
            let run = match *case {
                "bare" => bare(&kafka, n).await?,
                "insert-floor" => insert_floor(&db, n, Payload::Small).await?,
                "insert-floor-8k" => insert_floor(&db, n, Payload::Large).await?,
                "claim-floor" => claim_floor(&db, n).await?,
                "dispatch" => dispatch(&db, n, None, false).await?,
                "dispatch-ce" => dispatch(&db, n, None, true).await?,
                "retry" => retry(&db, n).await?,
                "dispatch-lines" => dispatch(&db, n, Some(LINES), false).await?,
                "replay" | "purge" => operate(case, &db, n).await?,
                "produce-floor" => dlq::produce_floor(&kafka, n).await?,
                "dlq" => dlq::dlq(&db, &kafka, n).await?,
                "storm" => dlq::storm(&db, &kafka, n).await?,
                _ => consume(case, &db, &kafka, n).await?,
            };
            let cpu = cpu_seconds() - cpu;
            eprintln!(
                "round {round}/{runs}: {case}: {} in {:.2} s, {:.0}/s; \
                 this process's CPU, set-up included: {cpu:.2} s; Postgres CPU while timed: {}",
                run.count,
                run.secs,
                run.rate(),
                run.postgres_per_row().map_or(
                    "not measured (Postgres is not local)".into(),
                    |us| format!(
                        "{:.2} s, {us:.0} µs per row",
                        run.postgres.unwrap_or_default()
                    )
                )
            );
            got.push(run);
        }
    }
    if !rates.is_empty() {
        println!(
            "| case | per run | per second, median [range] of {runs} | this process's CPU per row, µs, median | Postgres CPU per row, µs, median |\n\
             |---|---|---|---|---|"
        );
    }
    for (case, got) in &rates {
        let rates: Vec<f64> = got.iter().map(Run::rate).collect();
        let (lo, mid, hi) = spread(&rates);
        let cpu: Vec<f64> = got.iter().filter_map(Run::postgres_per_row).collect();
        let cpu = if cpu.is_empty() {
            "–".to_string()
        } else {
            format!("{:.0}", spread(&cpu).1)
        };
        let own: Vec<f64> = got.iter().map(Run::own_per_row).collect();
        let own = spread(&own).1;
        let n = size(case);
        println!("| {case} | {n} | {mid:.0} [{lo:.0}–{hi:.0}] | {own:.1} | {cpu} |");
    }
    let median = |case: &str| {
        rates.iter().find(|(c, _)| *c == case).map(|(_, got)| {
            let rates: Vec<f64> = got.iter().map(Run::rate).collect();
            spread(&rates).1
        })
    };
    for (case, reference) in RATIOS {
        if let (Some(a), Some(b)) = (median(case), median(reference)) {
            println!("{case} / {reference}: {:.2}", a / b);
        }
    }
    for case in own {
        match case {
            "timing" => timing::run(&admin_url, n.unwrap_or(10_000), runs, Slots::Bench).await?,
            "timing-defaults" => {
                timing::run(&admin_url, n.unwrap_or(10_000), runs, Slots::Defaults).await?
            }
            "footprint" => footprint::run(&admin_url, &kafka, n.unwrap_or(1_000_000), runs).await?,
            "outage" => outage::run(&admin_url, &kafka, runs).await?,
            "console" => operators::console(&admin_url, runs).await?,
            _ => operators::run(&admin_url, runs).await?,
        }
    }
    Ok(())
}

/// The release build of `redrive`, beside the examples directory this benchmark runs from.
fn redrive_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("redrive"))
        .filter(|bin| bin.exists())
        .ok_or_else(|| anyhow::anyhow!("build redrive first: cargo build --release --bin redrive"))
}

/// CPU time this process has used, user and system, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields 14 and 15 (utime, stime), counted after the command name's closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// CPU time of every Postgres process on this machine, in seconds: the live ones, and the
/// backends that have exited (counted in the postmaster's children's time). `None` when no Postgres
/// runs here.
fn postgres_cpu() -> Option<f64> {
    let mut ticks = 0.0;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !name.ends_with("(postgres") {
            continue;
        }
        found = true;
        // utime, stime, cutime, cstime: fields 14 to 17.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += (11..15)
            .filter_map(|i| fields.get(i)?.parse::<f64>().ok())
            .sum::<f64>();
    }
    found.then_some(ticks / 100.0)
}

/// When a case's timed part began: the clock, and this process's and Postgres's CPU so far.
#[derive(Clone, Copy)]
struct Start {
    at: Instant,
    own: f64,
    postgres: Option<f64>,
}

impl Start {
    fn now() -> Self {
        Start {
            at: Instant::now(),
            own: cpu_seconds(),
            postgres: postgres_cpu(),
        }
    }

    fn finish(self, count: usize) -> Run {
        Run {
            secs: self.at.elapsed().as_secs_f64(),
            count,
            own: cpu_seconds() - self.own,
            postgres: self.postgres.zip(postgres_cpu()).map(|(a, b)| b - a),
        }
    }
}

/// What one run of a case measured.
struct Run {
    secs: f64,
    count: usize,
    /// This process's CPU seconds while the case was timed: redrive's, or the reference's client.
    own: f64,
    /// Postgres's CPU seconds while the case was timed.
    postgres: Option<f64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }

    /// This process's CPU per row (or message), in µs.
    fn own_per_row(&self) -> f64 {
        self.own * 1e6 / self.count as f64
    }

    /// Postgres's CPU per row (or message), in µs.
    fn postgres_per_row(&self) -> Option<f64> {
        self.postgres.map(|p| p * 1e6 / self.count as f64)
    }
}

/// (lowest, median, highest).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Waits until `done` says so, checking every `every`; fails after [`DEADLINE`] with `what`.
async fn wait_for<F, Fut>(what: &str, every: Duration, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + DEADLINE;
    while !done().await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: gave up after {DEADLINE:?}"
        );
        tokio::time::sleep(every).await;
    }
    Ok(())
}

async fn fresh_db(admin_url: &str) -> anyhow::Result<String> {
    let url = redrive::support::recreate_database(admin_url, "redrive_bench").await?;
    redrive::store::migrate::run(&url.clone().into()).await?;
    if let Ok(sql) = std::env::var("BENCH_AFTER_MIGRATE_SQL") {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        sqlx::raw_sql(&sql)
            .execute(&mut c)
            .await
            .map_err(|e| anyhow::anyhow!("BENCH_AFTER_MIGRATE_SQL ({sql}) failed: {e}"))?;
    }
    Ok(url)
}

/// The benchmark's configuration. The retry workers get 400 slots and claims of up to 100 rows: as
/// many rows in flight as the claim floor's 4 clients of 100.
fn config(
    db: &str,
    kafka: &str,
    topic: &str,
    group: &str,
    handler: &str,
) -> anyhow::Result<Config> {
    Config::from_toml(&format!(
        "[postgres]\nurl = \"{db}\"\nmax_connections = 20\n[kafka]\ntopics = [\"{topic}\"]\n\
         \"bootstrap.servers\" = \"{kafka}\"\n\"group.id\" = \"{group}\"\n\"auto.commit.interval.ms\" = {COMMIT_INTERVAL_MS}\n\
         [consumer]\nmax_in_flight = 2000\n[workers]\nconcurrency = 400\nclaim_batch_size = 100\n\
         [retry]\ninitial_delay = \"1h\"\nmax_delay = \"2h\"\n[handler]\nurl = \"{handler}\"\n"
    ))
    .map_err(Into::into)
}

/// More databases than this in the cluster, and the benchmark says so before it starts.
const QUIET_DATABASES: i64 = 30;

/// Says, on stderr, when the cluster holds many databases (the integration tests leave one per
/// test): autovacuum starts a worker in each of them every minute, and its CPU counts as
/// Postgres's in every case's figures, most in `timing` (at 231 databases, 174–237 µs per row
/// against 124–163 with 15).
async fn warn_of_other_databases(admin_url: &str) -> anyhow::Result<()> {
    let mut c = sqlx::PgConnection::connect(admin_url).await?;
    let (all, tests): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE datname LIKE 'redrive\\_test\\_%') FROM pg_database",
    )
    .fetch_one(&mut c)
    .await?;
    if all > QUIET_DATABASES {
        eprintln!(
            "bench: warning: the cluster holds {all} databases ({tests} of them the tests'): \
             autovacuum visits each every minute, and its CPU counts as Postgres's here; \
             `make clean-test-dbs` drops the tests' ones (`make bench` does it first)"
        );
    }
    Ok(())
}

/// The configuration and parts of a redrive that runs only its retry workers, for group "bench".
fn workers_only(db: &str) -> anyhow::Result<(Config, RunArgs)> {
    let config = config(db, "127.0.0.1:1", "bench", "bench", "http://127.0.0.1:1/")?;
    let parts = RunArgs {
        no_consumer: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    Ok((config, parts))
}

async fn produce(kafka: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    produce_keys(kafka, topic, n, None, Payload::Small, false).await
}

/// A case's payloads.
#[derive(Clone, Copy)]
enum Payload {
    /// 1 KiB of `x`, under Postgres's TOAST threshold: stored as it is.
    Small,
    /// [`large_payload`]: about 8 KiB, compressed as it is stored.
    Large,
}

impl Payload {
    /// Message `i`'s payload: the small one is the same for every message, and made once.
    fn of(self, i: usize) -> std::borrow::Cow<'static, [u8]> {
        static SMALL: [u8; 1024] = [b'x'; 1024];
        match self {
            Payload::Small => std::borrow::Cow::Borrowed(&SMALL),
            Payload::Large => std::borrow::Cow::Owned(large_payload(i)),
        }
    }
}

/// An order event of about 8 KiB, as JSON, different for each `i`: 96 lines, each with a SKU
/// and a price drawn from `i`. Its repeated field names compress as an event's do; its numbers
/// and SKUs do not.
fn large_payload(i: usize) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut doc = String::with_capacity(8800);
    let _ = write!(
        doc,
        r#"{{"order_id":"ord-{i:010}","customer":"cust-{:06}","currency":"EUR","lines":["#,
        i % 104_729
    );
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for line in 0..96 {
        // xorshift: cheap, and a different stream for each message
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let _ = write!(
            doc,
            r#"{}{{"line":{line},"sku":"SKU-{:012X}","quantity":{},"unit_price":"{}.{:02}","gift_wrap":{}}}"#,
            if line == 0 { "" } else { "," },
            x >> 16,
            x % 9 + 1,
            x % 500,
            x % 100,
            x.is_multiple_of(3)
        );
    }
    doc.push_str(r#"],"shipping":{"method":"standard","address":{"country":"DE"}}}"#);
    doc.into_bytes()
}

/// The headers of a CloudEvent in Kafka's binary content mode, as Knative's sources write them:
/// six, one of them (`ce_id`) different for each message.
fn ce_headers(i: usize) -> [(&'static str, String); 6] {
    [
        ("ce_specversion", "1.0".into()),
        ("ce_id", format!("order-{i}")),
        ("ce_source", "/apis/v1/namespaces/shop/orders".into()),
        ("ce_type", "com.example.order.created".into()),
        ("ce_time", "2026-12-07T10:00:00.000Z".into()),
        ("content-type", "application/json".into()),
    ]
}

/// [`ce_headers`] for the producer.
fn ce_headers_of(i: usize) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    ce_headers(i)
        .iter()
        .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_str()),
            })
        })
}

/// `n` messages; message `i` has the key `i`, or `i % keys`, and with `ce_headers` the headers of
/// [`ce_headers_of`].
async fn produce_keys(
    kafka: &str,
    topic: &str,
    n: usize,
    keys: Option<usize>,
    payload: Payload,
    ce_headers: bool,
) -> anyhow::Result<()> {
    create_topic(kafka, topic, PARTITIONS).await?;
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    for i in 0..n {
        let key = keys.map_or(i, |k| i % k).to_string();
        let value = payload.of(i);
        let mut record = BaseRecord::to(topic).key(&key).payload(&*value);
        if ce_headers {
            record = record.headers(ce_headers_of(i));
        }
        // With few keys, key `k` goes to partition `k % 4`: each partition gets keys of its own.
        if let Some(k) = keys {
            record = record.partition(((i % k) as i32) % PARTITIONS);
        }
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    p.flush(Duration::from_secs(120))?;
    Ok(())
}

/// Deletes a case's topic: a run of `make bench` writes gigabytes to the broker otherwise.
/// Creates `topic` with `partitions`, and fails with the broker's reason if it refuses.
async fn create_topic(kafka: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics(&[new], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

async fn delete_topic(kafka: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    for r in admin.delete_topics(&[topic], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("deleting topic {t}: {e}"))?;
    }
    Ok(())
}

/// Reads a group's committed offsets with one client, made once per case.
struct Committed {
    client: BaseConsumer,
    topic: String,
}

impl Committed {
    fn new(kafka: &str, group: &str, topic: &str) -> anyhow::Result<Self> {
        let client = ClientConfig::new()
            .set("bootstrap.servers", kafka)
            .set("group.id", group)
            .create()?;
        Ok(Self {
            client,
            topic: topic.to_string(),
        })
    }

    /// Each partition's committed offset (0 where none is committed yet).
    fn by_partition(&self) -> anyhow::Result<Vec<i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(&self.topic, p);
        }
        let got = self
            .client
            .committed_offsets(tpl, Duration::from_secs(10))?;
        Ok(got
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .collect())
    }

    /// Waits until `n` offsets are committed in all. Call once the work is done: it asks the
    /// broker every 20 ms.
    async fn wait_all(&self, case: &str, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = self.by_partition()?;
            if got.iter().sum::<i64>() >= n as i64 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{case}: not every offset was committed within {DEADLINE:?}; committed by partition: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until `calls` reaches `n`, or `task` stops, or the deadline passes.
async fn wait_calls<T>(
    case: &str,
    calls: &Calls,
    n: usize,
    task: &tokio::task::JoinHandle<T>,
) -> anyhow::Result<()> {
    wait_for(
        &format!("{case}: waiting for {n} handler calls"),
        Duration::from_millis(5),
        || {
            let got = calls.count.load(Ordering::Relaxed);
            let stopped = task.is_finished();
            async move {
                anyhow::ensure!(!stopped, "{case}: redrive stopped early after {got} calls");
                Ok(got >= n)
            }
        },
    )
    .await
}

/// The reference for the happy path: what any Kafka consumer pays, with redrive's consumer
/// settings (manual offset store, auto-commit, cooperative-sticky).
async fn bare(kafka: &str, n: usize) -> anyhow::Result<Run> {
    use rdkafka::consumer::StreamConsumer;
    let stamp = chrono::Utc::now().timestamp_millis();
    let (topic, group) = (format!("bench.bare.{stamp}"), format!("bench-bare-{stamp}"));
    produce(kafka, &topic, n).await?;
    let committed = Committed::new(kafka, &group, &topic)?;
    // redrive's own client configuration, so only what redrive does per message differs.
    let props = [
        ("bootstrap.servers", kafka),
        ("group.id", &group),
        ("auto.commit.interval.ms", COMMIT_INTERVAL_MS),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let consumer: StreamConsumer = redrive::kafka::consumer_config(&props)?.create()?;
    consumer.subscribe(&[&topic])?;
    let mut started = None;
    for _ in 0..n {
        let m = tokio::time::timeout(DEADLINE, consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("bare: no message within {DEADLINE:?}"))??;
        started.get_or_insert_with(Start::now);
        std::hint::black_box(rdkafka::Message::payload(&m));
        consumer.store_offset_from_message(&m)?;
    }
    committed.wait_all("bare", n).await?;
    let run = started.expect("n > 0 messages were received").finish(n);
    drop(consumer);
    delete_topic(kafka, &topic).await?;
    Ok(run)
}

/// Produces `n` messages first, then times redrive consuming them all to committed offsets: from
/// the first handler call, as `bare` times from the first message, so that neither counts the
/// group's join.
async fn consume(case: &str, db: &str, kafka: &str, n: usize) -> anyhow::Result<Run> {
    let stamp = chrono::Utc::now().timestamp_millis();
    let (topic, group) = (
        format!("bench.{case}.{stamp}"),
        format!("bench-{case}-{stamp}"),
    );
    let keys = match case {
        "happy-fewkeys" => Some(16),
        "capture-parked" => Some(PARTITIONS as usize),
        _ => None,
    };
    let payload = match case {
        "capture-8k" => Payload::Large,
        _ => Payload::Small,
    };
    produce_keys(kafka, &topic, n, keys, payload, case.ends_with("-ce")).await?;
    let committed = Committed::new(kafka, &group, &topic)?;
    let stub = start_stub().await?;
    let mut config = config(db, kafka, &topic, &group, &format!("http://{stub}/"))?;
    // Through HTTP/1.1 every message in flight holds a connection to the endpoint, which shares
    // these cores: happy-http runs with redrive's default (128), and so do the captures, whose
    // failures give their slots back once the capturer has them. The in-process happy path keeps
    // 2,000.
    if matches!(
        case,
        "happy-keys" | "happy-fewkeys" | "capture-keys" | "capture-parked"
    ) {
        config.retry.default.ordering = redrive::config::OrderingMode::Key;
    }
    // The capture cases measure writing failures, which the breaker exists to stop when they are
    // all of them (I13): it is off for them.
    if case.starts_with("capture") {
        config.breaker.default.enabled = false;
    }
    let in_flight = match case {
        "happy-http" | "capture" | "capture-ce" | "capture-keys" | "capture-parked"
        | "capture-8k" => redrive::config::ConsumerConfig::default().max_in_flight,
        _ => config.consumer.max_in_flight,
    };
    config.consumer.max_in_flight = env("BENCH_MAX_IN_FLIGHT", &in_flight.to_string()).parse()?;
    config.consumer.capture_in_flight = env(
        "BENCH_CAPTURE_IN_FLIGHT",
        &config.consumer.capture_in_flight.to_string(),
    )
    .parse()?;
    config.consumer.capture_batch_size = env(
        "BENCH_CAPTURE_BATCH",
        &config.consumer.capture_batch_size.to_string(),
    )
    .parse()?;
    config.consumer.capture_linger = Duration::from_millis(
        env(
            "BENCH_CAPTURE_LINGER_MS",
            &config.consumer.capture_linger.as_millis().to_string(),
        )
        .parse()?,
    );
    config.retry.default.jitter = env(
        "BENCH_RETRY_JITTER",
        &config.retry.default.jitter.to_string(),
    )
    .parse()?;
    // The retry workers run only with BENCH_WITH_WORKERS, as in `redrive run`: each capture
    // statement's NOTIFY then wakes them to claim.
    let parts = RunArgs {
        no_workers: std::env::var_os("BENCH_WITH_WORKERS").is_none(),
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let (task, calls) = match case {
        "happy-http" => {
            let h = redrive::handler::http::HttpHandler::new(&config.handler)?;
            let task = tokio::spawn(redrive::app::run(config, h, parts, stop.clone()));
            (task, stub.calls.clone())
        }
        _ => {
            let handler = Fixed::new(case.starts_with("happy"));
            let calls = handler.calls.clone();
            let task = tokio::spawn(redrive::app::run(config, handler, parts, stop.clone()));
            (task, calls)
        }
    };
    // A parked message is never handed to the handler: only the first of each key is.
    let handed = if case == "capture-parked" {
        keys.unwrap_or(n)
    } else {
        n
    };
    wait_calls(case, &calls, handed, &task).await?;
    committed.wait_all(case, n).await?;
    let run = calls.first.get().expect("n > 0 calls were made").finish(n);
    stop.cancel();
    task.await??;
    delete_topic(kafka, &topic).await?;
    Ok(run)
}

/// `n` rows of 1 KiB in `state`, in batches of 1,000; with `ce`, each with [`ce_headers`].
async fn seed(store: &Store, n: usize, state: InitialState, ce: bool) -> anyhow::Result<()> {
    for start in (0..n).step_by(1000) {
        let batch: Vec<Capture> = (start..(start + 1000).min(n))
            .map(|i| {
                let mut row = row(i, i.to_string().into_bytes(), state, None);
                if ce {
                    row.message.headers = ce_headers(i)
                        .into_iter()
                        .map(|(k, v)| redrive::Header::new(k, Some(v.into_bytes())))
                        .collect();
                }
                row
            })
            .collect();
        store.capture("bench", &batch).await?;
    }
    Ok(())
}

/// Row `i` of a seeded table: 1 KiB at offset `i` of partition 0 of topic "bench".
fn row(
    i: usize,
    key: Vec<u8>,
    state: InitialState,
    line: Option<redrive::store::capture::Line>,
) -> Capture {
    Capture {
        message: redrive::Message {
            topic: "bench".into(),
            partition: 0,
            offset: i as i64,
            timestamp: None,
            key: Some(key),
            payload: Some(vec![b'x'; 1024]),
            headers: vec![],
        },
        state,
        max_attempts: 5,
        retry_in: Duration::ZERO,
        error: HandlerError::retryable("seeded"),
        line,
        trace: None,
    }
}

/// The key lines of `dispatch-lines`.
const LINES: usize = 16;

/// `n` rows of 1 KiB in `lines` key lines: the first row of each due now, the others waiting
/// behind it in offset order.
async fn seed_lines(store: &Store, n: usize, lines: usize) -> anyhow::Result<()> {
    use redrive::store::capture::{Line, OnDead};
    let row = |i: usize, state| {
        let key = format!("k{}", i % lines).into_bytes();
        let line = Line::of(&key, OnDead::Skip);
        row(i, key, state, Some(line))
    };
    let heads: Vec<Capture> = (0..lines.min(n))
        .map(|i| row(i, InitialState::Pending))
        .collect();
    store.capture("bench", &heads).await?;
    for start in (lines..n).step_by(1000) {
        let batch: Vec<Capture> = (start..(start + 1000).min(n))
            .map(|i| row(i, InitialState::Parked))
            .collect();
        store.capture("bench", &batch).await?;
    }
    Ok(())
}

/// Fills the table with `n` due rows, or with `n` rows in key lines, then times the retry workers
/// emptying it.
async fn dispatch(db: &str, n: usize, lines: Option<usize>, ce: bool) -> anyhow::Result<Run> {
    let store = Store::from_pool(redrive::store::pool_options().connect(db).await?);
    match lines {
        Some(lines) => seed_lines(&store, n, lines).await?,
        None => seed(&store, n, InitialState::Pending, ce).await?,
    }
    sqlx::query("VACUUM ANALYZE redrive.retry_messages, redrive.queue")
        .execute(store.pool())
        .await?;
    let (mut config, parts) = workers_only(db)?;
    if lines.is_some() {
        config.retry.default.ordering = redrive::config::OrderingMode::Key;
    }
    // Every row has been attempted; what is left is the completer deleting the last batches.
    let left = "SELECT count(*) FROM redrive.retry_messages";
    time_workers("dispatch", &store, config, parts, true, n, left).await
}

/// Starts the retry workers with a handler that always succeeds or always fails, and times them
/// until it has been called `n` times and then `left` (a count of rows not finished yet) is 0.
async fn time_workers(
    case: &str,
    store: &Store,
    config: Config,
    parts: RunArgs,
    ok: bool,
    n: usize,
    left: &str,
) -> anyhow::Result<Run> {
    let stop = tokio_util::sync::CancellationToken::new();
    let handler = Fixed::new(ok);
    let calls = handler.calls.clone();
    let started = Start::now();
    let task = tokio::spawn(redrive::app::run(config, handler, parts, stop.clone()));
    wait_calls(case, &calls, n, &task).await?;
    wait_for(
        &format!("{case}: waiting for the last completions"),
        Duration::from_millis(20),
        || async {
            let left: i64 = sqlx::query_scalar(left).fetch_one(store.pool()).await?;
            Ok(left == 0)
        },
    )
    .await?;
    let run = started.finish(n);
    stop.cancel();
    task.await??;
    Ok(run)
}

/// Fills the table with `n` due rows, then times the retry workers failing each once: every
/// attempt is rescheduled an hour on, so none comes due again during the run.
async fn retry(db: &str, n: usize) -> anyhow::Result<Run> {
    let store = Store::from_pool(redrive::store::pool_options().connect(db).await?);
    seed(&store, n, InitialState::Pending, false).await?;
    sqlx::query("VACUUM ANALYZE redrive.retry_messages, redrive.queue")
        .execute(store.pool())
        .await?;
    let (mut config, parts) = workers_only(db)?;
    config.retry.default.initial_delay = Duration::from_secs(3600);
    config.retry.default.max_delay = Duration::from_secs(3600);
    // Every row has been attempted; what is left is the completer writing the last batches.
    let left = "SELECT count(*) FROM redrive.queue WHERE state = 'running' OR attempts < 2";
    let run = time_workers("retry", &store, config, parts, false, n, left).await?;
    let rescheduled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM redrive.retry_messages WHERE state = 'pending' AND attempts = 2 \
         AND next_attempt_at > now() + interval '30 minutes'",
    )
    .fetch_one(store.pool())
    .await?;
    anyhow::ensure!(
        rescheduled == n as i64,
        "retry: {rescheduled} of {n} rows were rescheduled an hour on"
    );
    Ok(run)
}

/// The reference for capture: `n` rows as wide as a captured message (the case's payload, a key, a
/// small jsonb, a text), 500 per INSERT … SELECT FROM unnest, on one connection, into a table of
/// Postgres's defaults.
async fn insert_floor(db: &str, n: usize, payload: Payload) -> anyhow::Result<Run> {
    let mut c = sqlx::PgConnection::connect(db).await?;
    sqlx::query(
        "CREATE TABLE floor_insert (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         topic text, kafka_offset bigint, key bytea, payload bytea, headers jsonb, last_error text)",
    )
    .execute(&mut c)
    .await?;
    // One statement's payloads, made before the clock starts, and sent by every statement: each
    // value is stored (and compressed) on its own, so repeating them costs Postgres the same.
    let payloads: Vec<Vec<u8>> = (0..500).map(|i| payload.of(i).into_owned()).collect();
    let started = Start::now();
    for start in (0..n).step_by(500) {
        let rows = (start..(start + 500).min(n)).collect::<Vec<_>>();
        let offsets: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
        let keys: Vec<Vec<u8>> = rows.iter().map(|i| i.to_string().into_bytes()).collect();
        let payloads = &payloads[..rows.len()];
        sqlx::query(
            "INSERT INTO floor_insert (topic, kafka_offset, key, payload, headers, last_error) \
             SELECT 'bench', o, k, p, '[]'::jsonb, 'benchmark failure' \
             FROM unnest($1::bigint[], $2::bytea[], $3::bytea[]) AS u(o, k, p)",
        )
        .bind(&offsets)
        .bind(&keys)
        .bind(payloads)
        .execute(&mut c)
        .await?;
    }
    Ok(started.finish(n))
}

/// The reference for dispatch: 4 clients each claim 100 due rows (UPDATE … FOR UPDATE SKIP
/// LOCKED … RETURNING the payload) and delete them (one statement per batch), until none is left.
async fn claim_floor(db: &str, n: usize) -> anyhow::Result<Run> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(db)
        .await?;
    sqlx::query(
        "CREATE TABLE floor_claim (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         state text NOT NULL, due timestamptz NOT NULL, payload bytea)",
    )
    .execute(&pool)
    .await?;
    sqlx::query("CREATE INDEX ON floor_claim (due) WHERE state = 'pending'")
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO floor_claim (state, due, payload) SELECT 'pending', now(), \
         convert_to(repeat('x', 1024), 'UTF8') FROM generate_series(1, $1)",
    )
    .bind(n as i64)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE floor_claim")
        .execute(&pool)
        .await?;
    let started = Start::now();
    let clients = (0..4).map(|_| {
        let pool = pool.clone();
        async move {
            let deadline = Instant::now() + DEADLINE;
            loop {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "claim-floor: gave up after {DEADLINE:?}"
                );
                let ids: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                    "UPDATE floor_claim f SET state = 'running' FROM (SELECT id FROM floor_claim \
                     WHERE state = 'pending' AND due <= now() ORDER BY due LIMIT 100 \
                     FOR UPDATE SKIP LOCKED) d WHERE f.id = d.id RETURNING f.id, f.payload",
                )
                .fetch_all(&pool)
                .await?;
                if ids.is_empty() {
                    return anyhow::Ok(());
                }
                let ids: Vec<i64> = ids.into_iter().map(|(id, _)| id).collect();
                sqlx::query("DELETE FROM floor_claim WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&pool)
                    .await?;
            }
        }
    });
    for r in futures::future::join_all(clients).await {
        r?;
    }
    Ok(started.finish(n))
}

/// Replays, or purges, `n` dead rows in chunks of 1,000, as the commands do: each chunk starts
/// where the one before it stopped.
async fn operate(case: &str, db: &str, n: usize) -> anyhow::Result<Run> {
    let store = Store::from_pool(redrive::store::pool_options().connect(db).await?);
    seed(&store, n, InitialState::Dead, false).await?;
    sqlx::query("VACUUM ANALYZE redrive.retry_messages, redrive.queue")
        .execute(store.pool())
        .await?;
    let (mut filter, audit) = (
        redrive::store::find::Filter::default(),
        redrive::store::replay::Audit {
            by: "bench".into(),
            reason: None,
        },
    );
    let started = Start::now();
    let mut done = 0;
    loop {
        let chunk = match case {
            "replay" => store.replay_chunk(&filter, 1000, &audit, None).await?,
            _ => store.purge_chunk(&filter, true, 1000).await?,
        };
        if chunk.selected == 0 {
            break;
        }
        done += chunk.changed as usize;
        filter.start_at(chunk.last_dead_at);
    }
    Ok(started.finish(done))
}

/// The HTTP endpoint for `happy-http`, counting its calls.
struct Stub {
    addr: std::net::SocketAddr,
    calls: Arc<Calls>,
}

impl std::fmt::Display for Stub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

async fn start_stub() -> anyhow::Result<Stub> {
    use axum::routing::post;
    let calls = Arc::<Calls>::default();
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/",
        post(move || {
            counted.hit();
            async { "" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Stub { addr, calls })
}
