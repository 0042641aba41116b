//! Test helpers: a fresh database per test, Kafka topics on the real broker, an HTTP stub that
//! records deliveries, a TCP proxy that can cut Postgres off, and condition waits with deadlines.

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redrive::store::Store;
use redrive::Config;
use sqlx::{Connection, PgPool};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The Postgres URL whose role may create databases.
pub fn admin_url() -> String {
    std::env::var("REDRIVE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://redrive:redrive@127.0.0.1:5432/redrive".into())
}

/// The real broker's bootstrap address.
/// A status's key lines as (key, head offset, head state, needs an operator, rows waiting), to
/// compare whole.
pub fn key_lines_shown(
    lines: &[redrive::store::status::KeyLine],
) -> Vec<(&str, i64, &str, bool, i64)> {
    lines
        .iter()
        .map(|l| {
            (
                l.key.as_deref().unwrap(),
                l.head_offset,
                l.head_state.as_str(),
                l.needs_operator,
                l.waiting,
            )
        })
        .collect()
}

pub fn kafka() -> String {
    std::env::var("REDRIVE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A fresh, migrated database.
pub struct TestDb {
    pub url: String,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> Self {
        let db = Self::empty().await;
        redrive::store::migrate::run(&db.url.clone().into())
            .await
            .expect("migrate");
        db
    }

    /// A fresh database without the redrive schema.
    pub async fn empty() -> Self {
        let name = unique("redrive_test").replace('-', "_");
        let mut admin = sqlx::PgConnection::connect(&admin_url())
            .await
            .expect("postgres is running (make services)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let mut url = url::Url::parse(&admin_url()).unwrap();
        url.set_path(&name);
        let pool = redrive::store::pool_options()
            .max_connections(5)
            .connect(url.as_str())
            .await
            .unwrap();
        TestDb {
            url: url.to_string(),
            store: Store::from_pool(pool),
        }
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// Captures rows for group "g", the group the store tests use.
    pub async fn seed(&self, rows: &[redrive::store::capture::Capture]) {
        self.store.capture("g", rows).await.unwrap();
    }

    /// Claims up to 10 due rows of group "g" for `lease`.
    pub async fn claim(&self, lease: Duration) -> Vec<redrive::store::claim::Claimed> {
        self.store.claim("g", 10, lease, "w").await.unwrap().rows
    }

    /// Rows of `redrive.messages` (where a row being attempted is `running`) matching `filter`.
    pub async fn count(&self, filter: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM redrive.messages WHERE {filter}"
        ))
        .fetch_one(self.pool())
        .await
        .unwrap()
    }

    /// Asserts that the queue holds exactly the rows that `retry_messages` says are pending, each
    /// in its own group, and that a waiting one is due when the row says.
    pub async fn assert_queue_in_step(&self) {
        let astray: Vec<String> = sqlx::query_scalar(
            "SELECT coalesce(r.id, q.id)::text || ': ' || coalesce(r.state, 'no row') || ', queue '
                    || coalesce(q.state, 'none')
             FROM (SELECT * FROM redrive.retry_messages WHERE state = 'pending') r
             FULL JOIN redrive.queue q ON q.id = r.id
             WHERE r.id IS NULL OR q.id IS NULL OR q.consumer_group <> r.consumer_group
                OR (q.state = 'pending' AND q.next_attempt_at <> r.next_attempt_at)",
        )
        .fetch_all(self.pool())
        .await
        .unwrap();
        assert!(astray.is_empty(), "queue out of step: {astray:?}");
    }
}

/// A configuration for tests: fast timings, the given topics and handler.
pub fn config(
    db_url: &str,
    topics: &[&str],
    group: &str,
    handler: Option<SocketAddr>,
    extra: &str,
) -> Config {
    let topics = topics
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let handler = handler
        .map(|a| format!("url = \"http://{a}/\""))
        .unwrap_or_default();
    let text = format!(
        r#"
[postgres]
url = "{db_url}"
max_connections = 5

[kafka]
topics = [{topics}]
"bootstrap.servers" = "{kafka}"
"group.id" = "{group}"
"auto.commit.interval.ms" = 100
"session.timeout.ms" = 6000

[handler]
{handler}
timeout = "5s"

[workers]
lease = "30s"
max_idle = "60s"

[shutdown]
timeout = "5s"

[http]
listen = "127.0.0.1:0"
{extra}
"#,
        kafka = kafka()
    );
    Config::from_toml(&text).expect("test config")
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]).await
}

/// Creates a topic with topic-level settings (`max.message.bytes`, …).
pub async fn create_topic_with(name: &str, partitions: i32, settings: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in settings {
        topic = topic.set(k, v);
    }
    for r in admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.max.bytes", "16777216")
        .create()
        .unwrap()
}

/// Produces one record and returns its offset.
pub async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
) -> i64 {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header { key: k, value: *v });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(h);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(v) = payload {
        record = record.payload(v);
    }
    p.send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap()
        .offset
}

/// Reads `n` records from the start of a topic as redrive reads them: header names as bytes.
pub async fn read_topic_raw(topic: &str, n: usize, limit: Duration) -> Vec<redrive::Message> {
    read_records(&kafka(), topic, n, limit, redrive::Message::from_kafka).await
}

/// Reads `n` records from the start of a topic.
pub async fn read_topic(
    bootstrap: &str,
    topic: &str,
    n: usize,
    limit: Duration,
) -> Vec<OwnedMessage> {
    read_records(bootstrap, topic, n, limit, |m| m.detach()).await
}

/// Reads `n` records from the start of a topic through `keep`, in a group of its own.
async fn read_records<T>(
    bootstrap: &str,
    topic: &str,
    n: usize,
    limit: Duration,
    keep: impl Fn(&BorrowedMessage<'_>) -> T,
) -> Vec<T> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Ok(m) => out.push(keep(&m.unwrap())),
            Err(_) => panic!(
                "only {} of {n} records arrived on {topic} within {limit:?}",
                out.len()
            ),
        }
    }
    out
}

/// The group's committed offset for a partition, if any.
pub fn committed(group: &str, topic: &str, partition: i32) -> Option<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
    match got.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request the stub received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: chrono::DateTime<chrono::Utc>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn attempt(&self) -> u32 {
        self.header(redrive::handler::http::ATTEMPT_HEADER)
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// A status, extra response headers and a body.
type Response = (u16, Vec<(&'static str, String)>, Vec<u8>);
type Responder = Arc<dyn Fn(&Received) -> Response + Send + Sync>;

/// An HTTP handler stub: answers with `respond` and records every request.
#[derive(Clone)]
pub struct Stub {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Stub {
    pub async fn start(
        respond: impl Fn(&Received) -> (u16, Vec<(&'static str, String)>) + Send + Sync + 'static,
    ) -> Self {
        Self::start_with_body(move |r| {
            let (status, headers) = respond(r);
            (status, headers, Vec::new())
        })
        .await
    }

    /// Like [`Stub::start`], with a response body as well.
    pub async fn start_with_body(
        respond: impl Fn(&Received) -> Response + Send + Sync + 'static,
    ) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let respond: Responder = Arc::new(respond);
        let sink = received.clone();
        let app = Router::new()
            .route(
                "/",
                post(move |headers: HeaderMap, body: Bytes| {
                    let (sink, respond) = (sink.clone(), respond.clone());
                    async move {
                        let r = Received {
                            at: chrono::Utc::now(),
                            headers,
                            body,
                        };
                        let (status, extra, body) = respond(&r);
                        sink.lock().unwrap().push(r);
                        let mut h = HeaderMap::new();
                        for (k, v) in extra {
                            h.insert(k, v.parse().unwrap());
                        }
                        (StatusCode::from_u16(status).unwrap(), h, body)
                    }
                }),
            )
            .layer(DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Stub { addr, received }
    }

    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// A TCP proxy in front of Postgres that can cut every connection and refuse new ones, or freeze
/// the connections it has: they stay open and forward nothing, as half-open connections do.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    refused: Arc<AtomicUsize>,
}

/// Copies one direction of a proxied connection; while `frozen`, holds what it read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let (o, c, f, r) = (open.clone(), conns.clone(), frozen.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    r.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: the client sees the connection close
                }
                let flag = Arc::new(AtomicBool::new(false));
                f.lock().unwrap().push(flag.clone());
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(target).await {
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = outbound.into_split();
                        tokio::join!(pump(ir, ow, flag.clone()), pump(or, iw, flag));
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            open,
            conns,
            frozen,
            refused,
        }
    }

    /// The database URL rewritten to go through the proxy.
    pub fn url(&self, db_url: &str) -> String {
        let mut u = url::Url::parse(db_url).unwrap();
        u.set_port(Some(self.addr.port())).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.to_string()
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Freezes every connection open now; new connections work.
    pub fn freeze_existing(&self) {
        for f in self.frozen.lock().unwrap().drain(..) {
            f.store(true, Ordering::SeqCst);
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Connections dropped while cut, since the start.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

/// The Postgres server's address from the admin URL.
pub fn postgres_addr() -> SocketAddr {
    let u = url::Url::parse(&admin_url()).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

/// Reads a Prometheus counter's value from the process-wide recorder.
pub fn counter(name_and_labels: &str) -> f64 {
    redrive::telemetry::metrics()
        .render()
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Runs `redrive run` in this process until the returned token is cancelled.
pub fn spawn_app(
    config: Config,
    parts: redrive::cli::RunArgs,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let token = tokio_util::sync::CancellationToken::new();
    let handler = redrive::handler::http::HttpHandler::new(&config.handler).unwrap();
    let t = token.clone();
    let task = tokio::spawn(async move { redrive::app::run(config, handler, parts, t).await });
    (token, task)
}

/// Starts the `redrive` binary with a config file and `run` flags, quietly.
pub fn spawn_redrive(config: &std::path::Path, run_flags: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(redrive_bin())
        .args(["--config", config.to_str().unwrap(), "run"])
        .args(run_flags)
        .env("REDRIVE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A child's piped stderr, read a line at a time, keeping every line read.
pub struct ChildLog {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    /// Every line read so far.
    pub read: Vec<String>,
}

impl ChildLog {
    /// Takes the child's stderr, which must be piped.
    pub fn of(child: &mut tokio::process::Child) -> Self {
        use tokio::io::AsyncBufReadExt;
        let stderr = child.stderr.take().expect("stderr is piped");
        ChildLog {
            lines: tokio::io::BufReader::new(stderr).lines(),
            read: Vec::new(),
        }
    }

    /// Reads until a line for which `found` is true and returns it, or `None` when the child
    /// closed its stderr first. Panics at `deadline`, naming `what` and the lines read.
    pub async fn until(
        &mut self,
        deadline: tokio::time::Instant,
        what: &str,
        mut found: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let (lines, read) = (&mut self.lines, &mut self.read);
        let reading = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                read.push(line.clone());
                if found(&line) {
                    return Some(line);
                }
            }
            None
        };
        match tokio::time::timeout_at(deadline, reading).await {
            Ok(line) => line,
            Err(_) => panic!("timed out waiting for {what} in the log: {:#?}", self.read),
        }
    }

    /// Reads the rest on a task of its own, so a full pipe never blocks the child's logging (and
    /// so its exit); the task returns every line, those read before included.
    pub fn rest(mut self) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.read.push(line);
            }
            self.read
        })
    }
}

/// Sends SIGTERM, as an orchestrator would, and waits (bounded) for the exit.
pub async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child
        .id()
        .expect("the process is still running")
        .to_string();
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("redrive stops within 30s of SIGTERM")
        .unwrap()
}

/// Path of the `redrive` binary built with the tests.
pub fn redrive_bin() -> &'static str {
    env!("CARGO_BIN_EXE_redrive")
}

/// Writes a config file for the binary.
pub fn write_config(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(text)
}

pub mod tempfile_path {
    /// A file removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn with(text: &str) -> Self {
            let p = std::env::temp_dir().join(format!("{}.toml", super::unique("redrive-test")));
            std::fs::write(&p, text).unwrap();
            TempPath(p)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The output of one `redrive` command.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "redrive failed:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A config file with only `[postgres]`.
pub fn ops_config(url: &str) -> tempfile_path::TempPath {
    write_config(&format!("[postgres]\nurl = \"{url}\"\n"))
}

/// Runs `redrive --config <config> <args>` to the end.
pub async fn redrive(config: &std::path::Path, args: &[&str]) -> Ran {
    let out = tokio::process::Command::new(redrive_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("REDRIVE_LOG", "warn")
        .output()
        .await
        .unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The retry table's size in pages.
pub async fn table_pages(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT pg_relation_size('redrive.retry_messages') / current_setting('block_size')::bigint",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A transaction as `redrive status` opens one, the retry rows it sees, and its snapshot exported
/// (`pg_export_snapshot()`); it holds the table's lock from its first read.
pub async fn exporting(pool: &PgPool) -> (sqlx::Transaction<'static, sqlx::Postgres>, i64, String) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM redrive.retry_messages")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    (tx, seen, snapshot)
}

/// A DLQ publisher of group `g`'s dead rows to `{topic}.dlq` on the cluster at `bootstrap`, in
/// rounds of up to 100 rows and 16 MiB, each acknowledged within `publish_timeout`.
pub fn dlq_publisher(
    db: &TestDb,
    bootstrap: String,
    publish_timeout: Duration,
) -> redrive::dlq::DlqPublisher {
    dlq_publisher_with(db, &[("bootstrap.servers", &bootstrap)], publish_timeout)
}

/// A DLQ publisher's [`run`](redrive::dlq::DlqPublisher::run) in a task of its own.
pub struct Publishing {
    stop: tokio_util::sync::CancellationToken,
    running: tokio::task::JoinHandle<Result<(), redrive::store::StoreError>>,
}

impl Publishing {
    pub fn start(publisher: redrive::dlq::DlqPublisher) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn(publisher.run(stop.clone()));
        Self { stop, running }
    }

    /// Waits until group "g"'s outbox is empty, then stops the publisher and waits for its end.
    pub async fn stop_once_published(self, db: &TestDb, limit: Duration) {
        wait_for("every dead row to leave the outbox", limit, || async {
            (db.store.outbox_backlog("g").await.unwrap() == 0).then_some(())
        })
        .await;
        self.stop.cancel();
        self.running.await.unwrap().unwrap();
    }
}

/// [`dlq_publisher`] with these producer properties.
pub fn dlq_publisher_with(
    db: &TestDb,
    props: &[(&str, &str)],
    publish_timeout: Duration,
) -> redrive::dlq::DlqPublisher {
    let props = props
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let settings = redrive::kafka::producer_config(&props, publish_timeout);
    redrive::dlq::DlqPublisher::new(
        db.store.clone(),
        settings,
        "g",
        "{topic}.dlq",
        100,
        16 << 20,
    )
    .unwrap()
}

/// A store of redrive's own pool options on one connection, so each statement runs where the one
/// before it ran; and its pool.
pub async fn on_one_connection(db: &TestDb) -> (sqlx::PgPool, redrive::store::Store) {
    let pool = redrive::store::pool_options()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    (pool.clone(), redrive::store::Store::from_pool(pool))
}

/// What `work` returns, and the rows it read of the queue and of the message table, by sequential
/// scans and through indexes. The statistics are read once `flushed`'s backend has reported them
/// (it does so before it answers, when told to).
pub async fn read_by<T>(
    db: &TestDb,
    flushed: &sqlx::PgPool,
    work: impl std::future::Future<Output = T>,
) -> (T, (i64, i64)) {
    let read_so_far = async || -> (i64, i64) {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(flushed)
            .await
            .unwrap();
        sqlx::query_as(
            "SELECT (SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables
                     WHERE relid = 'redrive.queue'::regclass),
                    (SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables
                     WHERE relid = 'redrive.retry_messages'::regclass)",
        )
        .fetch_one(db.pool())
        .await
        .unwrap()
    };
    let before = read_so_far().await;
    let done = work.await;
    let after = read_so_far().await;
    (done, (after.0 - before.0, after.1 - before.1))
}

/// Vacuums and analyzes the message table until its visibility map covers every page, as
/// autovacuum leaves a table in service. A vacuum leaves a page unmarked while a transaction that
/// could still miss its rows is open, such as a connection of another test starting up in this
/// cluster. Index-only scans then read the table too, and the planner, told so by
/// `relallvisible`, may choose another plan. So the vacuum is repeated until it has marked them
/// all, for up to a minute.
pub async fn vacuum_until_all_visible(db: &TestDb) {
    wait_for(
        "a vacuum to mark every page of redrive.retry_messages all-visible",
        Duration::from_secs(60),
        || async {
            sqlx::query("VACUUM ANALYZE redrive.retry_messages")
                .execute(db.pool())
                .await
                .unwrap();
            let (pages, visible): (i32, i32) = sqlx::query_as(
                "SELECT relpages, relallvisible FROM pg_class
                 WHERE oid = 'redrive.retry_messages'::regclass",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            (visible >= pages).then_some(())
        },
    )
    .await
}

/// A pool of one connection that plans every statement once for any arguments, as psql may after
/// five calls of the same statement.
pub async fn generic_plans(db: &TestDb) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|c, _| {
            Box::pin(async move {
                sqlx::query("SET plan_cache_mode = force_generic_plan")
                    .execute(c)
                    .await
                    .map(|_| ())
            })
        })
        .connect(&db.url)
        .await
        .unwrap()
}

/// Each index's scans and the entries they read, and (as `sequential`) the sequential scans and
/// the rows they read, of the message table, once `flushed`'s backend has reported its
/// statistics (it does so before it answers, when told to).
pub async fn index_reads(
    db: &TestDb,
    flushed: &sqlx::PgPool,
) -> std::collections::HashMap<String, (i64, i64)> {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(flushed)
        .await
        .unwrap();
    sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT indexrelname::text, idx_scan, idx_tup_read FROM pg_stat_user_indexes
         WHERE relid = 'redrive.retry_messages'::regclass
         UNION ALL
         SELECT 'sequential', seq_scan, seq_tup_read FROM pg_stat_user_tables
         WHERE relid = 'redrive.retry_messages'::regclass",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .into_iter()
    .map(|(name, n, read)| (name, (n, read)))
    .collect()
}
