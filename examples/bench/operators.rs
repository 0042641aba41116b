//! The operators case: `redrive status` and `redrive replay --dry-run` of a small topic, of the
//! newest deaths' topic, of one key and of one error kind, on a table of 10M dead and 1M pending
//! rows, run as an operator runs them (the release binary, a new process each time), beside
//! `redrive status --exact`, which reads every row. Each round starts with a status from a cold
//! cache, when the benchmark may restart Postgres and drop the page cache (as root, against the
//! cluster `scripts/postgres.sh` manages).
//!
//! The table is loaded in SQL (generate_series) into its own database, once: a later run finds it
//! by the marker it leaves and reuses it. `BENCH_OPS_DEAD` and `BENCH_OPS_PENDING` change its size.

use super::{env, redrive_binary, spread, DEADLINE};
use sqlx::Connection as _;
use std::time::Instant;

/// The database the table lives in, kept between runs.
const DB: &str = "redrive_bench_ops";

/// Rows inserted per statement while loading.
const STEP: i64 = 1_000_000;

/// The dead rows of the topic `small`, which the dry run selects.
const SMALL: i64 = 1_000;

/// The dead rows of the topic `recent`: the table's newest deaths, as an incident's topic is.
/// Walking the deaths from the oldest to find them would read every other row first.
const RECENT: i64 = 20_000;

/// One command as timed: its label, its arguments and the goal it must meet, in seconds.
struct Command {
    label: &'static str,
    args: &'static [&'static str],
    goal: Option<f64>,
}

const COMMANDS: [Command; 6] = [
    Command {
        label: "redrive status",
        args: &["status"],
        goal: Some(1.0),
    },
    Command {
        label: "redrive status --exact (reference: every row read)",
        args: &["status", "--exact"],
        goal: None,
    },
    Command {
        label: "redrive replay --dry-run --topic small",
        args: &["replay", "--dry-run", "--topic", "small"],
        goal: Some(0.5),
    },
    Command {
        label: "redrive replay --dry-run --topic recent (the newest deaths)",
        args: &["replay", "--dry-run", "--topic", "recent"],
        goal: Some(0.5),
    },
    Command {
        label: "redrive replay --dry-run --key 12345 (one key's deaths)",
        args: &["replay", "--dry-run", "--key", "12345"],
        goal: Some(0.5),
    },
    Command {
        label: "redrive replay --dry-run --error-kind permanent (one kind's deaths)",
        args: &["replay", "--dry-run", "--error-kind", "permanent"],
        goal: Some(0.5),
    },
];

/// Loads the table if needed, then times each command `runs` times, interleaved, and prints
/// their medians and how far `status`'s estimates were from the exact counts.
pub async fn run(admin_url: &str, runs: usize) -> anyhow::Result<()> {
    let dead: i64 = env("BENCH_OPS_DEAD", "10000000").parse()?;
    let pending: i64 = env("BENCH_OPS_PENDING", "1000000").parse()?;
    let url = load(admin_url, DB, dead, pending).await?;
    let bin = redrive_binary()?;
    let mut secs: Vec<Vec<f64>> = vec![vec![]; COMMANDS.len()];
    let mut cold = Vec::new();
    let mut cold_skipped = None;
    for round in 1..=runs {
        // First a status with nothing in memory, as after a restart, or after hours of other work
        // that pushed the table out of the caches.
        match chill(admin_url).await {
            Ok(()) => {
                let started = Instant::now();
                redrive(&bin, &url, &["status"]).await?;
                let took = started.elapsed().as_secs_f64();
                eprintln!("round {round}/{runs}: operators: redrive status, cold: {took:.3} s");
                cold.push(took);
            }
            Err(why) => cold_skipped = Some(why),
        }
        for (c, got) in COMMANDS.iter().zip(secs.iter_mut()) {
            let started = Instant::now();
            redrive(&bin, &url, c.args).await?;
            let took = started.elapsed().as_secs_f64();
            eprintln!("round {round}/{runs}: operators: {}: {took:.3} s", c.label);
            got.push(took);
        }
    }
    println!(
        "\nOperators at {dead} dead and {pending} pending rows (plus {SMALL} dead rows of topic \
         small and {RECENT} of topic recent):\n\n| command | seconds, median [range] of {runs} | goal |\n|---|---|---|"
    );
    for (c, got) in COMMANDS.iter().zip(&secs) {
        let (lo, mid, hi) = spread(got);
        let goal = c.goal.map_or("–".into(), |g| format!("≤ {g} s"));
        println!("| {} | {mid:.3} [{lo:.3}–{hi:.3}] | {goal} |", c.label);
    }
    match cold_skipped {
        None => {
            let (lo, mid, hi) = spread(&cold);
            println!(
                "| redrive status, cold (Postgres restarted, the page cache dropped) | \
                 {mid:.3} [{lo:.3}–{hi:.3}] | ≤ 1 s |"
            );
        }
        Some(why) => println!("\nstatus from a cold cache: not measured ({why})"),
    }
    let estimated = json(&bin, &url, &["status", "--json"]).await?;
    let exact = json(&bin, &url, &["status", "--json", "--exact"]).await?;
    println!(
        "\nstatus's estimates against --exact: the largest error of a (group, topic) count is \
         {:.1} %",
        worst_error(&estimated, &exact) * 100.0
    );
    Ok(())
}

/// Empties the caches the table could be read from: restarts the Postgres cluster that
/// `scripts/postgres.sh` manages (its shared buffers), then drops the kernel's page cache. Only
/// as root, against that cluster on this machine; otherwise says why not.
async fn chill(admin_url: &str) -> Result<(), String> {
    let port = env("REDRIVE_PG_PORT", "5432");
    let ours = url::Url::parse(admin_url).is_ok_and(|u| {
        matches!(u.host_str(), Some("127.0.0.1" | "localhost"))
            && u.port().unwrap_or(5432).to_string() == port
    });
    if !ours {
        return Err("the database is not the cluster scripts/postgres.sh manages".into());
    }
    let drop_caches = "/proc/sys/vm/drop_caches";
    let mut caches = std::fs::OpenOptions::new()
        .write(true)
        .open(drop_caches)
        .map_err(|e| format!("dropping the page cache needs root: {drop_caches}: {e}"))?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");
    let restart = tokio::process::Command::new(script)
        .arg("restart")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, restart)
        .await
        .map_err(|_| format!("{script} restart ran past {DEADLINE:?}"))?
        .map_err(|e| format!("{script} restart: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{script} restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Written pages leave the cache only once they are on disk.
    let synced = tokio::process::Command::new("sync").status().await;
    if !synced.is_ok_and(|s| s.success()) {
        return Err("sync failed".into());
    }
    use std::io::Write as _;
    caches
        .write_all(b"3")
        .map_err(|e| format!("{drop_caches}: {e}"))
}

/// Runs the redrive binary against `url`; fails with its output when it fails or hangs.
async fn redrive(bin: &std::path::Path, url: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .env("REDRIVE_POSTGRES__URL", url)
        .env("REDRIVE_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .map_err(|_| anyhow::anyhow!("redrive {args:?} ran past {DEADLINE:?}"))??;
    anyhow::ensure!(
        out.status.success(),
        "redrive {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

async fn json(
    bin: &std::path::Path,
    url: &str,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&redrive(bin, url, args).await?)?)
}

/// The largest relative error of an estimated (group, topic, state) count of `estimated` against
/// the same count of `exact`, over counts that are not zero.
fn worst_error(estimated: &serde_json::Value, exact: &serde_json::Value) -> f64 {
    let rows = |v: &serde_json::Value| v["topics"].as_array().cloned().unwrap_or_default();
    let mut worst = 0.0_f64;
    for (e, x) in rows(estimated).iter().zip(rows(exact).iter()) {
        for state in ["pending", "running", "paused", "dead", "replayed"] {
            let (e, x) = (
                e[state].as_f64().unwrap_or(0.0),
                x[state].as_f64().unwrap_or(0.0),
            );
            if x > 0.0 {
                worst = worst.max((e - x).abs() / x);
            }
        }
    }
    worst
}

/// The database with the table, loaded unless an earlier run left it as this run wants it.
async fn load(admin_url: &str, db: &str, dead: i64, pending: i64) -> anyhow::Result<String> {
    let spec = format!("{dead} dead, {pending} pending, {SMALL} small, {RECENT} recent, v2");
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(db);
    let url = url.to_string();
    if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
        let got: Option<String> = sqlx::query_scalar("SELECT spec FROM bench_loaded")
            .fetch_optional(&mut c)
            .await
            .ok()
            .flatten();
        if got.as_deref() == Some(spec.as_str()) {
            eprintln!("operators: reusing the table in {db} ({spec})");
            // A newer build may bring migrations (indexes) of its own.
            redrive::store::migrate::run(&url.clone().into()).await?;
            return Ok(url);
        }
    }
    let url = redrive::support::recreate_database(admin_url, db).await?;
    redrive::store::migrate::run(&url.clone().into()).await?;
    let mut c = sqlx::PgConnection::connect(&url).await?;
    let started = Instant::now();
    for (what, sql, total) in [
        ("dead", DEAD_ROWS, dead),
        ("pending", PENDING_ROWS, pending),
    ] {
        for from in (0..total).step_by(STEP as usize) {
            let to = (from + STEP).min(total);
            sqlx::query(sql).bind(from).bind(to).execute(&mut c).await?;
            eprintln!(
                "operators: loading {db}: {to} of {total} {what} rows ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    for (topic, rows, kind, ids_from, every) in [
        ("small", SMALL, "permanent", 2_000_000_000_i64, 60.0),
        ("recent", RECENT, "retryable", 3_000_000_000, 1.0),
    ] {
        sqlx::query(TOPIC_ROWS)
            .bind(rows)
            .bind(topic)
            .bind(kind)
            .bind(ids_from)
            .bind(every)
            .execute(&mut c)
            .await?;
    }
    eprintln!(
        "operators: VACUUM ANALYZE ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    sqlx::query("VACUUM ANALYZE redrive.retry_messages, redrive.queue")
        .execute(&mut c)
        .await?;
    sqlx::query("CREATE TABLE bench_loaded (spec text NOT NULL)")
        .execute(&mut c)
        .await?;
    sqlx::query("INSERT INTO bench_loaded VALUES ($1)")
        .bind(&spec)
        .execute(&mut c)
        .await?;
    eprintln!(
        "operators: loaded in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(url)
}

/// Dead rows `$1` to `$2`: two groups, ten topics `big-N`, twenty error texts, deaths spread over
/// 30 days, every one published to the DLQ.
const DEAD_ROWS: &str = r#"
INSERT INTO redrive.retry_messages (
    id, consumer_group, topic, "partition", kafka_offset, key, payload, state, attempts,
    max_attempts, next_attempt_at, last_error, error_kind, error_history, first_failed_at,
    updated_at, dead_at, dlq_published_at, dlq_topic)
SELECT lpad(to_hex(i), 32, '0')::uuid, 'group-' || (i % 2), 'big-' || (i % 10), (i / 10 % 8)::int,
       i, convert_to(i::text, 'UTF8'), convert_to(repeat('x', 100), 'UTF8'), 'dead', 5, 5, t,
       'error ' || (i % 20), 'retryable',
       jsonb_build_array(jsonb_build_object('at', t, 'attempt', 5, 'kind', 'retryable',
                                            'error', 'error ' || (i % 20))),
       t - interval '1 hour', t, t, t, 'dlq'
FROM generate_series($1::bigint, $2::bigint - 1) AS s(i),
     LATERAL (SELECT now() - (i % 2592000) * interval '1 second' AS t) AS x
"#;

/// Pending rows `$1` to `$2` (numbered after the dead ones): half of each group's due within the
/// last day, half due within the next.
const PENDING_ROWS: &str = r#"
INSERT INTO redrive.retry_messages (
    id, consumer_group, topic, "partition", kafka_offset, key, payload, state, attempts,
    max_attempts, next_attempt_at, last_error, error_kind, error_history, first_failed_at,
    updated_at)
SELECT lpad(to_hex(j), 32, '0')::uuid, 'group-' || (i % 2), 'big-' || (i % 10), (i / 10 % 8)::int,
       j, convert_to(i::text, 'UTF8'), convert_to(repeat('x', 100), 'UTF8'), 'pending', 1, 5,
       now() + (CASE WHEN i / 2 % 2 = 0 THEN -1 ELSE 1 END) * (i % 86400) * interval '1 second',
       'error ' || (i % 20), 'retryable',
       jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 1, 'kind', 'retryable',
                                            'error', 'error ' || (i % 20))),
       now() - interval '1 hour', now()
FROM generate_series($1::bigint, $2::bigint - 1) AS s(i),
     LATERAL (SELECT i + 1000000000 AS j) AS x
"#;

/// `$1` dead rows of the topic `$2`, in both groups, with error kind `$3` and ids from `$4` on,
/// one dying every `$5` seconds up to now: the table's newest deaths.
const TOPIC_ROWS: &str = r#"
INSERT INTO redrive.retry_messages (
    id, consumer_group, topic, "partition", kafka_offset, key, payload, state, attempts,
    max_attempts, next_attempt_at, last_error, error_kind, error_history, first_failed_at,
    updated_at, dead_at, dlq_published_at, dlq_topic)
SELECT lpad(to_hex(j), 32, '0')::uuid, 'group-' || (i % 2), $2, 0, i,
       convert_to(i::text, 'UTF8'), convert_to(repeat('x', 100), 'UTF8'), 'dead', 5, 5, t,
       $2 || ' error', $3,
       jsonb_build_array(jsonb_build_object('at', t, 'attempt', 5, 'kind', $3,
                                            'error', $2 || ' error')),
       t - interval '1 hour', t, t, t, 'dlq'
FROM generate_series(0::bigint, $1::bigint - 1) AS s(i),
     LATERAL (SELECT i + $4::bigint AS j, now() - make_interval(secs => i * $5::float8) AS t) AS x
"#;

/// The console case: its pages on a table of `BENCH_CONSOLE_DEAD` dead rows (1,000,000 unless set)
/// and a tenth as many pending, loaded as the operators case loads its own, in a database of its
/// own (`BENCH_CONSOLE_DB`, `redrive_bench_console` unless set: with `redrive_bench_ops` and
/// `BENCH_CONSOLE_DEAD=10000000`, the operators case's table is reused). The console runs in this
/// process on a loopback port; each page is one GET of a fresh connection, beside `redrive status`
/// and `redrive replay --dry-run`, which read the same rows.
pub async fn console(admin_url: &str, runs: usize) -> anyhow::Result<()> {
    use redrive::console::{router, Console};
    let dead: i64 = env("BENCH_CONSOLE_DEAD", "1000000").parse()?;
    let db = env("BENCH_CONSOLE_DB", "redrive_bench_console");
    let url = load(admin_url, &db, dead, dead / 10).await?;
    let store = redrive::Store::from_pool(
        redrive::store::pool_options()
            .max_connections(4)
            .connect(&url)
            .await?,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let console = Console::new(
        store.clone(),
        redrive::config::ConsoleConfig::default(),
        Err("not needed".into()),
        stop.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router(console))
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
    });
    let old: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM redrive.retry_messages WHERE state = 'dead' ORDER BY id LIMIT 1 OFFSET 1000",
    )
    .fetch_one(store.pool())
    .await?;
    let pages: Vec<(String, String)> = vec![
        ("overview, last 24 h".into(), "/".into()),
        ("overview, last 30 days".into(), "/?window=30d".into()),
        ("messages, no filter".into(), "/messages".into()),
        (
            "messages, topic small (1,000 rows)".into(),
            "/messages?topic=small".into(),
        ),
        (
            "messages, topic big-3, error \"error 13\", dead".into(),
            "/messages?topic=big-3&error=error+13&state=dead".into(),
        ),
        (
            "messages, a page deep in the table (keyset)".into(),
            format!("/messages?state=dead&before={old}"),
        ),
        (
            "messages, key 12345 (every state: the dead rows' key index, and every pending row)"
                .into(),
            "/messages?key=12345".into(),
        ),
        (
            "messages, topic small, pending (it has none)".into(),
            "/messages?topic=small&state=pending".into(),
        ),
        (
            "messages, topic nothing (every state, no row)".into(),
            "/messages?topic=nothing".into(),
        ),
        ("messages, waiting".into(), "/messages?state=waiting".into()),
        (
            "messages, key 12345, dead (the key's index, schema V26)".into(),
            "/messages?key=12345&state=dead".into(),
        ),
        ("a message".into(), format!("/messages/{old}")),
    ];
    let bin = redrive_binary()?;
    let cli: [(&str, &[&str]); 2] = [
        ("redrive status (reference for the overview)", &["status"]),
        (
            "redrive replay --dry-run --topic small (reference for a filter)",
            &["replay", "--dry-run", "--topic", "small"],
        ),
    ];
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let mut secs: Vec<Vec<f64>> = vec![vec![]; pages.len() + cli.len()];
    for round in 1..=runs {
        for (i, (label, path)) in pages.iter().enumerate() {
            let started = Instant::now();
            let r = tokio::time::timeout(DEADLINE, http.get(format!("{base}{path}")).send())
                .await
                .map_err(|_| anyhow::anyhow!("GET {path} ran past {DEADLINE:?}"))??;
            anyhow::ensure!(r.status().is_success(), "GET {path}: {}", r.status());
            r.bytes().await?;
            let took = started.elapsed().as_secs_f64();
            eprintln!("round {round}/{runs}: console: {label}: {took:.3} s");
            secs[i].push(took);
        }
        for (i, (label, args)) in cli.iter().enumerate() {
            let started = Instant::now();
            redrive(&bin, &url, args).await?;
            secs[pages.len() + i].push(started.elapsed().as_secs_f64());
            eprintln!("round {round}/{runs}: console: {label}");
        }
    }
    stop.cancel();
    println!(
        "\nThe console at {dead} dead and {} pending rows (plus {SMALL} dead rows of topic \
         small and {RECENT} of topic recent):\n\n| page | seconds, median [range] of {runs} |\n|---|---|",
        dead / 10
    );
    let labels = pages
        .iter()
        .map(|(l, _)| l.as_str())
        .chain(cli.iter().map(|(l, _)| *l));
    for (label, got) in labels.zip(&secs) {
        let (lo, mid, hi) = spread(got);
        println!("| {label} | {mid:.3} [{lo:.3}–{hi:.3}] |");
    }
    Ok(())
}
