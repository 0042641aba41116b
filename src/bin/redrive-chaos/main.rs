//! `redrive-chaos`: redrive's own fault-injection suite (`make chaos`; a short run is part of
//! `make test`).
//!
//! It runs several `redrive run` processes (the HTTP handler) and one process with a library
//! handler, all in one consumer group, against a multi-partition topic on a Postgres and a broker
//! of their own. While it produces, it injects faults: SIGKILLs, a SIGTERM, frozen processes
//! (SIGSTOP/SIGCONT), a Postgres restart and a broker restart, next to poison input (NUL error
//! bodies, header names that are not UTF-8, records too large for the DLQ topic, a panicking
//! handler). Then it waits for the system to settle and checks what must hold (see [`verify`]).

mod stub;
mod verify;
mod workers;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use workers::{Fault, Worker};

#[derive(Parser)]
// A later option wins, so scripts/chaos.sh's presets can be overridden from its command line.
#[command(about = "redrive's fault-injection suite", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the suite: workers, messages, faults, then the checks. Exit 1 if any check fails.
    Run(Options),
    /// One worker process with the library handler (used by `run`).
    Worker {
        /// The redrive configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
pub struct Options {
    /// Messages to produce.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// How long messages are produced and faults injected.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between faults.
    #[arg(long, default_value = "7s", value_parser = humantime::parse_duration)]
    fault_every: Duration,
    /// The faults to inject, in order, cycled (e.g. `--faults kill` for kills only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,postgres,freeze,broker,term,kill,kill,freeze,kill,kill"
    )]
    faults: Vec<FaultKind>,
    /// Static group membership: each worker keeps its own `group.instance.id` across restarts, so a
    /// restarted worker takes its partitions back without a rebalance.
    #[arg(long)]
    static_membership: bool,
    /// `redrive run` processes (one library-handler process runs besides them).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Partitions of the source topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// How long the system may take to settle once the faults stop.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    settle_within: Duration,
    /// The chaos broker.
    #[arg(long, env = "CHAOS_KAFKA", default_value = "127.0.0.1:9192")]
    kafka: String,
    /// The chaos Postgres (a role that may create databases).
    #[arg(
        long,
        env = "CHAOS_POSTGRES",
        default_value = "postgres://redrive:redrive@127.0.0.1:5499/redrive"
    )]
    postgres: String,
    /// Where worker logs and the report go.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Keep each key's order (`ordering = "key"`, `on_dead = "skip"`), and check that the messages
    /// of each key first succeed in the order they were produced.
    #[arg(long)]
    key_order: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    redrive::telemetry::init_tracing();
    match Cli::parse().command {
        Cmd::Run(o) => {
            let report = run(&o).await?;
            println!("{}", report.summary());
            println!(
                "chaos: duplicates by the fault that caused them: {:?}",
                report.duplicates_after
            );
            std::fs::write(o.out.join("duplicates.csv"), &report.duplicates_csv)?;
            std::fs::write(
                o.out.join("report.json"),
                serde_json::to_string_pretty(&report.json())?,
            )?;
            if !report.failures.is_empty() {
                for f in &report.failures {
                    eprintln!("FAILED: {f}");
                }
                anyhow::bail!(
                    "{} check(s) failed; worker logs in {}",
                    report.failures.len(),
                    o.out.display()
                );
            }
            Ok(())
        }
        Cmd::Worker { config } => {
            let config = redrive::Config::load(Some(&config))?;
            let handler = stub::Library(redrive::handler::http::HttpHandler::new(&config.handler)?);
            let shutdown = redrive::shutdown::on_signals()?;
            redrive::app::run(config, handler, Default::default(), shutdown).await
        }
    }
}

async fn run(o: &Options) -> anyhow::Result<verify::Report> {
    std::fs::create_dir_all(&o.out)?;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let topic = format!("chaos-{}", &run_id[20..]);
    let db_url = redrive::support::recreate_database(&o.postgres, "redrive_chaos").await?;
    redrive::store::migrate::run(&db_url.clone().into()).await?;
    create_topics(&o.kafka, &topic, o.partitions).await?;
    let (handler, calls) = stub::start().await?;
    let config_path = o.out.join("redrive.toml");
    std::fs::write(
        &config_path,
        worker_config(&db_url, &o.kafka, &topic, handler, o.key_order),
    )?;

    let mut workers = start_workers(o, &config_path)?;
    let started = Instant::now();
    let producing = tokio::spawn(produce(
        o.kafka.clone(),
        topic.clone(),
        o.messages,
        o.duration,
    ));
    let mut faults = Vec::new();
    let mut exits = Vec::new();
    let mut peak_rss = 0;
    let mut next_fault = Instant::now() + o.fault_every;
    let mut plan = o.faults.iter().cycle();
    // Each message is tried ten times, a minute each, one batch after another, so a broker that
    // takes none of them (one came back from a restart unable to hand out producer ids) would hold
    // the run for hours. Ten minutes past the settling time is room for one message's ten tries.
    let produced_by = o.duration + o.settle_within + Duration::from_secs(600);
    while started.elapsed() < o.duration || !producing.is_finished() {
        if started.elapsed() >= produced_by {
            producing.abort();
            anyhow::bail!(
                "the run's {} messages were not all produced within {produced_by:?} (--duration, \
                 --settle-within and 10 minutes): the broker at {} is not taking them; the \
                 warnings above name each send that failed",
                o.messages,
                o.kafka
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        watch(&mut workers, &mut exits, &mut peak_rss)?;
        if Instant::now() >= next_fault && started.elapsed() < o.duration {
            let what = plan.next().copied().unwrap_or(FaultKind::Kill);
            let n = faults.len();
            let victim = n % workers.len();
            faults.push(inject(what, &mut workers[victim..], &mut exits).await?);
            next_fault = Instant::now() + o.fault_every;
        }
    }
    let produced = producing.await??;
    let quiet_at = Instant::now();
    let settled = verify::settle(&db_url, &o.kafka, &topic, &calls, o.settle_within, || {
        watch(&mut workers, &mut exits, &mut peak_rss)
    })
    .await?;
    let settle_time = quiet_at.elapsed();
    for w in &mut workers {
        if let Err(e) = w.terminate().await {
            exits.push(format!("at the end: {e:#}"));
        }
    }
    let calls = calls.lock().unwrap().clone();
    verify::check(verify::Inputs {
        db_url: &db_url,
        kafka: &o.kafka,
        topic: &topic,
        produced: &produced,
        calls: &calls,
        faults: &faults,
        exits: &exits,
        settled,
        settle_time,
        peak_rss,
        key_order: o.key_order,
    })
    .await
}

/// A fault the suite can inject.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FaultKind {
    /// SIGKILL a worker, then start it again.
    Kill,
    /// SIGSTOP a worker for longer than its session timeout, then SIGCONT.
    Freeze,
    /// SIGTERM a worker, wait for it to exit, then start it again.
    Term,
    /// Restart the Postgres cluster.
    Postgres,
    /// Restart the broker.
    Broker,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Freeze => "freeze",
            FaultKind::Term => "term",
            FaultKind::Postgres => "postgres",
            FaultKind::Broker => "broker",
        }
    }
}

fn start_workers(o: &Options, config: &std::path::Path) -> anyhow::Result<Vec<Worker>> {
    let redrive = redrive::support::sibling_binary("redrive")?;
    let me = std::env::current_exe()?;
    let config = config.to_str().context("a UTF-8 path")?;
    let mut workers: Vec<Worker> = (0..o.workers)
        .map(|n| {
            Worker::new(
                &format!("run-{n}"),
                &redrive,
                &["--config", config, "run"],
                &o.out,
            )
        })
        .collect();
    workers.push(Worker::new(
        "library",
        &me,
        &["worker", "--config", config],
        &o.out,
    ));
    for w in &mut workers {
        if o.static_membership {
            let id = format!("chaos-{}", w.name);
            w.set_env("REDRIVE_KAFKA__GROUP_INSTANCE_ID", &id);
        }
        w.start()?;
    }
    Ok(workers)
}

/// Notes (and restarts) processes that exited on their own, and samples their memory.
fn watch(
    workers: &mut [Worker],
    exits: &mut Vec<String>,
    peak_rss: &mut u64,
) -> anyhow::Result<()> {
    for w in workers.iter_mut() {
        if let Some(status) = w.exited() {
            exits.push(format!("{} exited on its own with {status}", w.name));
            w.start()?;
        }
        *peak_rss = (*peak_rss).max(w.peak_rss().unwrap_or(0));
    }
    Ok(())
}

/// Does one fault; `workers` starts with the process it is done to.
async fn inject(
    what: FaultKind,
    workers: &mut [Worker],
    exits: &mut Vec<String>,
) -> anyhow::Result<Fault> {
    let from = Instant::now();
    let w = &mut workers[0];
    let label = match what {
        FaultKind::Kill => {
            w.kill_and_restart().await?;
            format!("SIGKILL {}", w.name)
        }
        FaultKind::Freeze => {
            w.freeze().await?;
            format!("SIGSTOP/SIGCONT {}", w.name)
        }
        FaultKind::Term => {
            if let Err(e) = w.terminate().await {
                exits.push(format!("{e:#}"));
            }
            w.start()?;
            format!("SIGTERM {}", w.name)
        }
        FaultKind::Postgres => {
            workers::service("postgres.sh", "restart").await?;
            "Postgres restart".to_string()
        }
        FaultKind::Broker => {
            workers::service("kafka.sh", "restart").await?;
            "broker restart".to_string()
        }
    };
    tracing::warn!("chaos: {label}");
    Ok(Fault {
        kind: what.as_str(),
        what: label,
        from,
        to: Instant::now(),
    })
}

async fn create_topics(kafka: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let max = stub::DLQ_MAX_BYTES.to_string();
    let dlq = format!("{topic}.dlq");
    let topics = [
        NewTopic::new(topic, partitions, TopicReplication::Fixed(1)),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)).set("max.message.bytes", &max),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// Produces `n` messages evenly over `over`; returns each one's (partition, offset) by index.
async fn produce(
    kafka: String,
    topic: String,
    n: usize,
    over: Duration,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let producer = producer(&kafka)?;
    let chunk = (n / (over.as_millis() as usize / 100).max(1)).max(1);
    let mut out = Vec::with_capacity(n);
    let start = Instant::now();
    for (c, first) in (0..n).step_by(chunk).enumerate() {
        let sends = (first..(first + chunk).min(n)).map(|i| {
            let m = stub::message(&topic, i);
            let (producer, kafka) = (&producer, &kafka);
            async move { produce_one(producer, kafka, &m).await }
        });
        for r in futures::future::join_all(sends).await {
            out.push(r?);
        }
        let due = start + Duration::from_millis(100 * (c as u64 + 1));
        tokio::time::sleep_until(due.into()).await;
    }
    Ok(out)
}

/// The run's idempotent producer. A message that it has not delivered within a minute fails
/// (`message.timeout.ms`), and is sent again by [`produce_one`].
fn producer(kafka: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "1048576")
        .set("message.timeout.ms", "60000")
        .create()?)
}

/// Produces one message, sending it again when librdkafka gives it up: its idempotent producer
/// can time out the messages in flight when the broker restarts under it, long before
/// `message.timeout.ms`, and it can also stop delivering to a partition whose leader it lost
/// track of during the restart: one run's messages timed out twice in a row, five minutes
/// each, against a broker that served everyone else. So each new try goes through a producer of
/// its own, which asks the broker afresh. A copy the broker did take is then a second record of
/// the message, which the verification tolerates: it knows each message by the position this
/// returns, and counts the other copy's handling as a duplicate.
async fn produce_one(
    p: &FutureProducer,
    kafka: &str,
    m: &redrive::Message,
) -> anyhow::Result<(i32, i64)> {
    let mut fresh = None;
    let mut tries = 0;
    loop {
        let through = fresh.as_ref().unwrap_or(p);
        match redrive::kafka::produce(through, &m.topic, m, &[]).await {
            Ok(position) => return Ok(position),
            Err(e) if tries < 10 => {
                tries += 1;
                tracing::warn!(
                    "chaos: producing a message failed ({e}); sending it again through a new producer"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                fresh = Some(producer(kafka)?);
            }
            Err(e) => return Err(e).context("producing, 10 times"),
        }
    }
}

fn worker_config(
    db_url: &str,
    kafka: &str,
    topic: &str,
    handler: std::net::SocketAddr,
    key_order: bool,
) -> String {
    let ordering = if key_order {
        "ordering = \"key\"\non_dead = \"skip\""
    } else {
        ""
    };
    format!(
        r#"
[postgres]
url = "{db_url}"
max_connections = 8

[kafka]
topics = ["{topic}"]
"bootstrap.servers" = "{kafka}"
"group.id" = "{topic}"
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 1000

[handler]
url = "http://{handler}/"
timeout = "5s"

[retry]
max_attempts = {max}
initial_delay = "{initial}ms"
multiplier = 2.0
jitter = 0.0
{ordering}

[workers]
lease = "10s"
max_idle = "5s"

[dlq]
topic = "{{topic}}.dlq"

[http]
listen = "127.0.0.1:0"

[shutdown]
timeout = "5s"
"#,
        max = stub::MAX_ATTEMPTS,
        initial = stub::INITIAL_DELAY_MS,
    )
}
