//! `make demo`: the Knative seed experiment, end to end, on a real Kafka broker and Postgres.
//!
//! `redrive-demo run` starts a handler that answers 500 for values divisible by 3 and 200 otherwise,
//! runs the real `redrive` binary against it, produces `{"value":1}` … `{"value":10}`, and prints the
//! timeline of deliveries, the dead rows (queried with SQL) and the DLQ records with their headers.
//! `redrive-demo handler` runs only the handler (the docker-compose service).

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clap::{Parser, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The demo's handler and scenario.
#[derive(Parser)]
#[command(
    name = "redrive-demo",
    about = "The Knative seed experiment, end to end"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole experiment and print the timeline (what `make demo` does).
    Run {
        /// Kafka bootstrap servers.
        #[arg(long, env = "REDRIVE_DEMO_KAFKA", default_value = "127.0.0.1:9092")]
        kafka: String,
        /// A Postgres URL whose role may create databases; the demo uses a fresh `redrive_demo`.
        #[arg(
            long,
            env = "REDRIVE_DEMO_DATABASE_URL",
            default_value = "postgres://redrive:redrive@127.0.0.1:5432/redrive"
        )]
        database_url: String,
        /// Stop before the fix and the replay, and serve the web console on ADDR with the dead
        /// rows in it, until Ctrl-C (`make console-demo`).
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8089")]
        console: Option<SocketAddr>,
    },
    /// Serve only the handler: 500 when value % 3 == 0, 200 otherwise.
    Handler {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

/// One POST the handler received.
#[derive(Debug, Clone)]
struct Delivery {
    at: Duration,
    value: i64,
    attempt: u32,
    status: u16,
}

type Log = Arc<Mutex<Vec<Delivery>>>;

/// Set once "the bug is fixed": from then on the handler answers 200 to every value.
type Fixed = Arc<std::sync::atomic::AtomicBool>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    redrive::telemetry::init_tracing();
    match Cli::parse().command {
        Cmd::Handler { listen } => {
            let (addr, _log) = start_handler(listen, Fixed::default()).await?;
            println!("demo handler listening on http://{addr}/ (500 when value % 3 == 0)");
            std::future::pending::<()>().await;
            Ok(())
        }
        Cmd::Run {
            kafka,
            database_url,
            console,
        } => run(&kafka, &database_url, console).await,
    }
}

async fn start_handler(listen: SocketAddr, fixed: Fixed) -> anyhow::Result<(SocketAddr, Log)> {
    let log: Log = Arc::default();
    let started = Instant::now();
    let sink = log.clone();
    let app = Router::new().route(
        "/",
        post(move |headers: HeaderMap, body: Bytes| {
            let (sink, fixed) = (sink.clone(), fixed.clone());
            async move {
                let value = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["value"].as_i64())
                    .unwrap_or(-1);
                let attempt = headers
                    .get(redrive::handler::http::ATTEMPT_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0);
                let broken = !fixed.load(std::sync::atomic::Ordering::SeqCst);
                let status = if broken && value % 3 == 0 { 500 } else { 200 };
                let at = started.elapsed();
                sink.lock().unwrap().push(Delivery {
                    at,
                    value,
                    attempt,
                    status,
                });
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, log))
}

async fn run(kafka: &str, admin_url: &str, console: Option<SocketAddr>) -> anyhow::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
    let topic = format!("demo.values.{stamp}");
    let dlq = format!("{topic}.dlq");
    let db_url = redrive::support::recreate_database(admin_url, "redrive_demo").await?;
    create_topics(kafka, &[&topic, &dlq]).await?;
    let fixed = Fixed::default();
    let (addr, log) = start_handler("127.0.0.1:0".parse()?, fixed.clone()).await?;
    let dir = std::env::temp_dir().join(format!("redrive-demo-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("redrive.toml");
    std::fs::write(&config, demo_config(&db_url, kafka, &topic, addr))?;
    println!("== redrive demo: topic {topic}, DLQ {dlq}, handler http://{addr}/");
    println!(
        "   policy: 4 attempts (3 retries), exponential 1s, 2s, 4s; values divisible by 3 fail\n"
    );

    let redrive = redrive::support::sibling_binary("redrive")?;
    let status = tokio::process::Command::new(&redrive)
        .arg("--config")
        .arg(&config)
        .arg("migrate")
        .status()
        .await?;
    if !status.success() {
        bail!("`redrive migrate` failed");
    }
    let logfile = std::fs::File::create(dir.join("redrive.log"))?;
    let mut child = tokio::process::Command::new(&redrive)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stderr(logfile)
        .kill_on_drop(true)
        .spawn()?;
    produce_values(kafka, &topic).await?;
    println!("   produced {{\"value\":1}} … {{\"value\":10}}; waiting for the retries and the DLQ records (about 10 s)…\n");
    let dlq_records = read_dlq(kafka, &dlq, 3, Duration::from_secs(90)).await;
    wait_for_deliveries(&log, 7 + 3 * 4, Duration::from_secs(30)).await;
    let failed_phase = log.lock().unwrap().clone();
    print_timeline(&failed_phase);
    print_dead_rows(&db_url).await?;
    let dlq_records = dlq_records?;
    print_dlq(&dlq_records);

    // The operator's side: look, fix the cause, replay.
    let ops = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&redrive);
        c.arg("--config").arg(&config).args(args);
        c
    };
    println!("== redrive status");
    let out = ops(&["status"]).output().await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if let Some(listen) = console {
        return serve_console(&redrive, &config, listen, child).await;
    }
    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    println!(
        "\n== The handler is fixed; redrive replay --topic {topic} --reason \"handler fixed\""
    );
    let out = ops(&["replay", "--topic", &topic, "--reason", "handler fixed"])
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    wait_for_deliveries(&log, 7 + 3 * 5, Duration::from_secs(30)).await;
    let store = redrive::Store::from_pool(redrive::store::pool_options().connect(&db_url).await?);
    let left = wait_for_empty_table(&store, Duration::from_secs(30)).await?;
    let replayed: Vec<Delivery> = log.lock().unwrap()[failed_phase.len()..].to_vec();
    for d in &replayed {
        println!(
            "   {:>6.2}s  value={} attempt={} -> {}",
            d.at.as_secs_f64(),
            d.value,
            d.attempt,
            d.status
        );
    }
    println!("   rows left in redrive.retry_messages: {left}\n");

    // SIGTERM, as an orchestrator would; redrive drains and commits before it exits.
    let pid = child.id().context("redrive exited early")?;
    tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await?;
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .context("redrive did not stop")??;
    println!(
        "redrive exited with {exit}; its log is {}",
        dir.join("redrive.log").display()
    );
    check(
        &failed_phase,
        &replayed,
        left,
        dlq_records.len(),
        exit.success(),
    )?;
    println!(
        "\nThe web console: `make console-demo` runs the demo again, stops before the fix, and serves\n\
         its dead rows at http://127.0.0.1:8089/ until Ctrl-C; replay them from there."
    );
    Ok(())
}

/// `--console`: serves `redrive console` on the demo's data until Ctrl-C or SIGTERM, then stops it
/// and `redrive run`.
async fn serve_console(
    redrive: &std::path::Path,
    config: &std::path::Path,
    listen: SocketAddr,
    mut run: tokio::process::Child,
) -> anyhow::Result<()> {
    let mut console = tokio::process::Command::new(redrive)
        .arg("--config")
        .arg(config)
        .arg("console")
        .arg("--listen")
        .arg(listen.to_string())
        .env("REDRIVE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://{listen}/");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if let Some(exit) = console.try_wait()? {
            bail!("`redrive console` exited with {exit}");
        }
        if Instant::now() >= deadline {
            bail!("`redrive console` did not answer on {url} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("\n== The web console serves the dead rows 3, 6 and 9 at {url}");
    println!("   replay them there (Messages, Replay…); Ctrl-C stops the console and redrive.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        exit = console.wait() => bail!("`redrive console` exited with {}", exit?),
    }
    for child in [&mut console, &mut run] {
        if let Some(pid) = child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    println!("stopped the console and redrive");
    Ok(())
}

/// Waits (bounded) until the retry table is empty; returns how many rows are left.
async fn wait_for_empty_table(store: &redrive::Store, limit: Duration) -> anyhow::Result<i64> {
    let deadline = Instant::now() + limit;
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM redrive.retry_messages")
            .fetch_one(store.pool())
            .await?;
        if left == 0 || Instant::now() >= deadline {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn demo_config(db_url: &str, kafka: &str, topic: &str, handler: SocketAddr) -> String {
    format!(
        r#"[postgres]
url = "{db_url}"

[kafka]
topics = ["{topic}"]
"bootstrap.servers" = "{kafka}"
"group.id" = "redrive-demo"

[retry]
max_attempts = 4
backoff = "exponential"
initial_delay = "1s"
multiplier = 2.0
jitter = 0.0

[handler]
url = "http://{handler}/"
timeout = "5s"

[workers]
lease = "30s"

[dlq]
topic = "{{topic}}.dlq"

[http]
listen = "127.0.0.1:0"

[shutdown]
timeout = "10s"
"#
    )
}

async fn create_topics(kafka: &str, names: &[&str]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        result.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

async fn produce_values(kafka: &str, topic: &str) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()?;
    for value in 1..=10 {
        let payload = format!("{{\"value\":{value}}}");
        let key = format!("value-{value}");
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing value {value}: {e}"))?;
    }
    Ok(())
}

/// A DLQ record: value and headers as text.
struct DlqRecord {
    value: String,
    headers: Vec<(String, String)>,
}

async fn read_dlq(
    kafka: &str,
    topic: &str,
    want: usize,
    limit: Duration,
) -> anyhow::Result<Vec<DlqRecord>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set(
            "group.id",
            format!("redrive-demo-dlq-reader-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while out.len() < want {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| {
                format!(
                    "only {} of {want} DLQ records arrived within {limit:?}",
                    out.len()
                )
            })??;
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(DlqRecord {
            value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            headers,
        });
    }
    Ok(out)
}

async fn wait_for_deliveries(log: &Log, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if log.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_timeline(deliveries: &[Delivery]) {
    println!("== Timeline of deliveries (seconds since the handler started)");
    for d in deliveries {
        println!(
            "  {:>7.2}s  value={:<2} attempt={}  -> {}",
            d.at.as_secs_f64(),
            d.value,
            d.attempt,
            d.status
        );
    }
    println!("\n== Gaps between attempts of the failing values");
    for v in [3, 6, 9] {
        let times: Vec<f64> = deliveries
            .iter()
            .filter(|d| d.value == v)
            .map(|d| d.at.as_secs_f64())
            .collect();
        let gaps: Vec<String> = times
            .windows(2)
            .map(|w| format!("{:.1}s", w[1] - w[0]))
            .collect();
        println!(
            "  value={v}: {} deliveries, gaps {}",
            times.len(),
            gaps.join(", ")
        );
    }
    println!();
}

async fn print_dead_rows(db_url: &str) -> anyhow::Result<()> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::PgConnection::connect(db_url).await?;
    let sql = "SELECT payload_text, attempts, last_error, dead_at, dlq_published_at IS NOT NULL AS published \
               FROM redrive.dead_messages ORDER BY kafka_offset";
    println!("== Dead rows: {sql}");
    for row in sqlx::query(sql).fetch_all(&mut conn).await? {
        let payload: Option<String> = row.get(0);
        let attempts: i32 = row.get(1);
        let error: Option<String> = row.get(2);
        let published: bool = row.get(4);
        println!(
            "  payload={}  attempts={attempts}  dlq_published={published}  last_error={}",
            payload.unwrap_or_default(),
            error.unwrap_or_default()
        );
    }
    println!();
    Ok(())
}

fn print_dlq(records: &[DlqRecord]) {
    println!("== DLQ records");
    for r in records {
        println!("  value={}", r.value);
        for (k, v) in &r.headers {
            println!("      {k}: {v}");
        }
    }
    println!();
}

/// The experiment's expectations; the demo fails loudly when redrive misbehaves.
fn check(
    deliveries: &[Delivery],
    replayed: &[Delivery],
    left: i64,
    dlq: usize,
    clean_exit: bool,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for v in 1..=10 {
        let attempts: Vec<u32> = deliveries
            .iter()
            .filter(|d| d.value == v)
            .map(|d| d.attempt)
            .collect();
        let want: Vec<u32> = if v % 3 == 0 {
            vec![1, 2, 3, 4]
        } else {
            vec![1]
        };
        if attempts != want {
            problems.push(format!(
                "value {v}: attempts {attempts:?}, expected {want:?}"
            ));
        }
    }
    let mut again: Vec<(i64, u32, u16)> = replayed
        .iter()
        .map(|d| (d.value, d.attempt, d.status))
        .collect();
    again.sort();
    if again != [(3, 1, 200), (6, 1, 200), (9, 1, 200)] {
        problems.push(format!(
            "after the replay: (value, attempt, status) {again:?}, expected 3, 6 and 9 once each, attempt 1, 200"
        ));
    }
    if left != 0 {
        problems.push(format!("{left} rows left in the table after the replay"));
    }
    if dlq != 3 {
        problems.push(format!("{dlq} DLQ records, expected 3"));
    }
    if !clean_exit {
        problems.push("redrive did not exit cleanly on SIGTERM".into());
    }
    if problems.is_empty() {
        println!("OK: 3, 6 and 9 were delivered 4 times with growing gaps and dead-lettered, the others once;");
        println!(
            "    after the fix, the replay delivered 3, 6 and 9 once more and they succeeded."
        );
        Ok(())
    } else {
        bail!(
            "the demo did not go as expected:\n  {}",
            problems.join("\n  ")
        )
    }
}
