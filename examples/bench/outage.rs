//! The outage case (I13): the handler's service is down for `BENCH_OUTAGE_SECONDS` (60 unless set)
//! while messages arrive at 1,000 a second, then it comes back. Run with the breaker on (redrive's
//! default) and off, with redrive's default retry policy (5 attempts, 1 s doubling: a row dies
//! about 15 s after its first failure), its default `max_in_flight` and workers, in one process.
//! Printed: what the outage cost (calls made to the service while it was down, rows written, rows
//! dead: each one a DLQ record an operator must replay) and how long it took to drain after the
//! service came back (every offset committed and no row left to retry; read every 500 ms from the
//! broker and from the small `redrive.queue` table).

use super::{
    config, create_topic, delete_topic, fresh_db, spread, Committed, DEADLINE, PARTITIONS,
};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::ClientConfig;
use redrive::cli::RunArgs;
use redrive::handler::{Delivery, Handler, HandlerError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages produced per second during the outage.
const RATE: usize = 1_000;

/// A service that answers 503 while it is down.
#[derive(Clone, Default)]
struct Service {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Handler for Service {
    async fn handle(&self, _d: Delivery<'_>) -> Result<(), HandlerError> {
        if self.down.load(Ordering::Relaxed) {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Err(HandlerError::retryable("HTTP 503 Service Unavailable"))
        } else {
            Ok(())
        }
    }
}

/// One run's figures.
struct Figures {
    produced: usize,
    calls: usize,
    rows: i64,
    dead: i64,
    drain: f64,
    dead_after: i64,
}

/// Runs the case `runs` times with the breaker on and off, and prints medians and ranges.
pub async fn run(admin_url: &str, kafka: &str, runs: usize) -> anyhow::Result<()> {
    let seconds: u64 = super::env("BENCH_OUTAGE_SECONDS", "60").parse()?;
    let mut on = vec![];
    let mut off = vec![];
    for round in 1..=runs {
        for (breaker, got) in [(true, &mut on), (false, &mut off)] {
            let f = once(admin_url, kafka, breaker, seconds).await?;
            eprintln!(
                "round {round}/{runs}: outage, breaker {}: {} produced, {} calls while down, \
                 {} rows written, {} dead at recovery, {} dead in the end, drained in {:.1} s",
                if breaker { "on" } else { "off" },
                f.produced,
                f.calls,
                f.rows,
                f.dead,
                f.dead_after,
                f.drain
            );
            got.push(f);
        }
    }
    println!(
        "\nOutage: the service down for {seconds} s while {RATE} messages/s arrive, then back; \
         median [range] of {runs}:\n\n\
         | measure | breaker on (default) | breaker off |\n|---|---|---|"
    );
    let row = |what: &str, pick: &dyn Fn(&Figures) -> f64, digits: usize| {
        let cell = |got: &[Figures]| {
            let v: Vec<f64> = got.iter().map(pick).collect();
            let (lo, mid, hi) = spread(&v);
            format!("{mid:.digits$} [{lo:.digits$}–{hi:.digits$}]")
        };
        println!("| {what} | {} | {} |", cell(&on), cell(&off));
    };
    row(
        "messages produced during the outage",
        &|f| f.produced as f64,
        0,
    );
    row(
        "calls to the service while it was down",
        &|f| f.calls as f64,
        0,
    );
    row("rows written to Postgres", &|f| f.rows as f64, 0);
    row(
        "rows dead when it came back (DLQ records)",
        &|f| f.dead as f64,
        0,
    );
    row("rows dead in the end", &|f| f.dead_after as f64, 0);
    row("drain after it came back, s", &|f| f.drain, 1);
    Ok(())
}

async fn once(
    admin_url: &str,
    kafka: &str,
    breaker: bool,
    seconds: u64,
) -> anyhow::Result<Figures> {
    let db = fresh_db(admin_url).await?;
    let pool = sqlx::PgPool::connect(&db).await?;
    let stamp = chrono::Utc::now().timestamp_millis();
    let (topic, group) = (
        format!("bench.outage.{stamp}"),
        format!("bench-outage-{stamp}"),
    );
    create_topic(kafka, &topic, PARTITIONS).await?;

    let mut config = config(&db, kafka, &topic, &group, "http://127.0.0.1:1/")?;
    config.retry.default = redrive::config::RetryPolicy::default();
    config.consumer.max_in_flight = redrive::config::ConsumerConfig::default().max_in_flight;
    config.workers = redrive::config::WorkersConfig::default();
    config.breaker.default.enabled = breaker;
    let parts = RunArgs {
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let service = Service::default();
    service.down.store(true, Ordering::SeqCst);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(redrive::app::run(
        config,
        service.clone(),
        parts,
        stop.clone(),
    ));

    // The outage: RATE messages a second, in tenths.
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("linger.ms", "5")
        .create()?;
    let payload = vec![b'x'; 1024];
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut produced = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let due =
            (started.elapsed().as_millis() as usize * RATE / 1000).min(seconds as usize * RATE);
        while produced < due {
            let key = produced.to_string();
            let record = BaseRecord::to(&topic).key(&key).payload(&payload);
            p.send(record).map_err(|(e, _)| e)?;
            produced += 1;
        }
        anyhow::ensure!(!task.is_finished(), "redrive stopped during the outage");
    }
    p.flush(Duration::from_secs(60))?;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let rows = count("SELECT count(*) FROM redrive.retry_messages").await?;
    let dead = count("SELECT count(*) FROM redrive.retry_messages WHERE state = 'dead'").await?;
    let calls = service.calls.load(Ordering::SeqCst);

    // The service is back.
    service.down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    let committed = Committed::new(kafka, &group, &topic)?;
    loop {
        let all = committed.by_partition()?.iter().sum::<i64>() >= produced as i64;
        if all && count("SELECT count(*) FROM redrive.queue").await? == 0 {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < DEADLINE,
            "outage: not drained within {DEADLINE:?} of the service coming back"
        );
        anyhow::ensure!(!task.is_finished(), "redrive stopped while draining");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain = back.elapsed().as_secs_f64();
    let dead_after =
        count("SELECT count(*) FROM redrive.retry_messages WHERE state = 'dead'").await?;
    stop.cancel();
    task.await??;
    pool.close().await;
    delete_topic(kafka, &topic).await?;
    Ok(Figures {
        produced,
        calls,
        rows,
        dead,
        drain,
        dead_after,
    })
}
