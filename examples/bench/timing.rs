//! The timing case: rows come due at 1,000 a second, one every millisecond, and the retry workers
//! (in-process, no-op handler) attempt each as it comes due. Each row carries its due time in its
//! payload, so the handler records how late it was called, in memory. Printed: the percentiles of
//! lateness, the worst (a stall shows there), the earliest (never below zero: a row is never
//! attempted early), and the CPU that redrive and Postgres spent per row. `timing` runs the retry
//! workers with the benchmark's 400 slots; `timing-defaults` with redrive's own defaults (32 slots,
//! 10 connections), as a user who sets nothing runs them.

use super::{cpu_seconds, fresh_db, postgres_cpu, spread, wait_for, workers_only, DEADLINE};
use redrive::handler::{Delivery, Handler, HandlerError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Rows coming due per second.
const RATE: i64 = 1_000;

/// When the first row comes due, after the rows are written: time for the workers to start.
const LEAD: Duration = Duration::from_secs(3);

/// Records how late each call came, in microseconds.
#[derive(Clone, Default)]
struct Lateness(Arc<Mutex<Vec<i64>>>);

impl Lateness {
    fn len(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or_default()
    }
}

impl Handler for Lateness {
    async fn handle(&self, d: Delivery<'_>) -> Result<(), HandlerError> {
        let now = chrono::Utc::now().timestamp_micros();
        let due: i64 = d
            .message
            .payload
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())
            .ok_or_else(|| HandlerError::permanent("no due time in the payload"))?;
        if let Ok(mut v) = self.0.lock() {
            v.push(now - due);
        }
        Ok(())
    }
}

/// One run's figures: lateness percentiles in ms, and CPU per row in µs.
struct Figures {
    p50: f64,
    p99: f64,
    p999: f64,
    worst: f64,
    earliest: f64,
    redrive_cpu: f64,
    postgres_cpu: Option<f64>,
}

/// Which workers' configuration a run uses.
#[derive(Clone, Copy)]
pub enum Slots {
    /// The benchmark's: 400 slots, 20 connections (`config` in main.rs).
    Bench,
    /// redrive's defaults for `[workers]` and the pool.
    Defaults,
}

impl Slots {
    fn case(self) -> &'static str {
        match self {
            Slots::Bench => "timing",
            Slots::Defaults => "timing-defaults",
        }
    }
}

/// Runs the case `runs` times with `n` rows each and prints the medians and ranges.
pub async fn run(admin_url: &str, n: usize, runs: usize, slots: Slots) -> anyhow::Result<()> {
    let mut got = vec![];
    let case = slots.case();
    for round in 1..=runs {
        let f = once(admin_url, n, slots).await?;
        eprintln!(
            "round {round}/{runs}: {case}: lateness p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, \
             worst {:.2} ms, earliest {:.2} ms; CPU per row: redrive {:.0} µs, Postgres {}",
            f.p50,
            f.p99,
            f.p999,
            f.worst,
            f.earliest,
            f.redrive_cpu,
            f.postgres_cpu
                .map_or("not measured".into(), |c| format!("{c:.0} µs"))
        );
        got.push(f);
    }
    println!(
        "\nTiming ({case}): {n} rows coming due at {RATE}/s, median [range] of {runs}:\n\n\
         | measure | value | goal |\n|---|---|---|"
    );
    let row = |what: &str, unit: &str, goal: &str, pick: &dyn Fn(&Figures) -> Option<f64>| {
        let v: Vec<f64> = got.iter().filter_map(pick).collect();
        if v.is_empty() {
            println!("| {what} | not measured | {goal} |");
        } else {
            let (lo, mid, hi) = spread(&v);
            println!("| {what} | {mid:.2} [{lo:.2}–{hi:.2}] {unit} | {goal} |");
        }
    };
    row("lateness p50", "ms", "–", &|f| Some(f.p50));
    row("lateness p99", "ms", "≤ 10 ms", &|f| Some(f.p99));
    row("lateness p99.9", "ms", "–", &|f| Some(f.p999));
    row("worst lateness (a stall)", "ms", "≤ 50 ms", &|f| {
        Some(f.worst)
    });
    row("earliest", "ms", "≥ 0 (never early)", &|f| {
        Some(f.earliest)
    });
    row("redrive CPU per row", "µs", "–", &|f| {
        Some(f.redrive_cpu)
    });
    row("Postgres CPU per row", "µs", "≤ 150 µs", &|f| {
        f.postgres_cpu
    });
    Ok(())
}

/// One run: `n` rows due one per millisecond from [`LEAD`] on, attempted by the workers.
async fn once(admin_url: &str, n: usize, slots: Slots) -> anyhow::Result<Figures> {
    let db = fresh_db(admin_url).await?;
    let pool = sqlx::PgPool::connect(&db).await?;
    // Each payload is the row's due time in µs since the epoch, as text.
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind)
        SELECT gen_random_uuid(), 'bench', 'bench', 0, i,
               convert_to((extract(epoch FROM due) * 1000000)::bigint::text, 'UTF8'),
               'pending', 1, 5, due, 'seeded', 'retryable'
        FROM generate_series(0, $1 - 1) AS i,
             LATERAL (SELECT now() + make_interval(secs => $2 + i::float8 / $3) AS due) AS d
        "#,
    )
    .bind(n as i64)
    .bind(LEAD.as_secs_f64())
    .bind(RATE as f64)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE redrive.retry_messages, redrive.queue")
        .execute(&pool)
        .await?;
    let (mut config, parts) = workers_only(&db)?;
    if let Slots::Defaults = slots {
        let defaults = redrive::Config::from_toml(&format!(
            "[postgres]\nurl = \"{db}\"\n[kafka]\ntopics = [\"bench\"]\n\
             \"bootstrap.servers\" = \"127.0.0.1:1\"\n\"group.id\" = \"bench\"\n"
        ))?;
        config.workers = defaults.workers;
        config.postgres.max_connections = defaults.postgres.max_connections;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let handler = Lateness::default();
    let (cpu, pg) = (cpu_seconds(), postgres_cpu());
    let task = tokio::spawn(redrive::app::run(
        config,
        handler.clone(),
        parts,
        stop.clone(),
    ));
    // Counted in memory, checked every 50 ms: the wait costs Postgres nothing.
    wait_for(
        "timing: waiting for every row to be attempted",
        Duration::from_millis(50),
        || {
            let (got, stopped) = (handler.len(), task.is_finished());
            async move {
                anyhow::ensure!(!stopped, "timing: redrive stopped early after {got} calls");
                Ok(got >= n)
            }
        },
    )
    .await?;
    let (cpu, pg) = (
        cpu_seconds() - cpu,
        postgres_cpu().zip(pg).map(|(b, a)| b - a),
    );
    stop.cancel();
    tokio::time::timeout(DEADLINE, task).await???;
    let mut late = handler.0.lock().map(|v| v.clone()).unwrap_or_default();
    late.sort_unstable();
    let pick = |q: f64| late[((late.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Ok(Figures {
        p50: pick(0.5),
        p99: pick(0.99),
        p999: pick(0.999),
        worst: pick(1.0),
        earliest: pick(0.0),
        // Both include the set-up while the first rows were not yet due: a few ms of CPU.
        redrive_cpu: cpu * 1e6 / n as f64,
        postgres_cpu: pg.map(|p| p * 1e6 / n as f64),
    })
}
