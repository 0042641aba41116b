//! Startup, signals and bad input: bad configuration names its field, an unreachable Postgres is
//! retried with a clear log line, a missing topic or an old schema is refused clearly, the database
//! password never appears in logs or errors (I8, I9), and a second signal exits at once without
//! losing the message in flight (I1).

use crate::helpers::*;
use redrive::cli::RunArgs;
use redrive::config::PostgresConfig;
use redrive::store::Store;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "s3cr3t-Pa55word";

fn base_config(pg_url: &str) -> String {
    format!("[postgres]\nurl = \"{pg_url}\"\n[kafka]\ntopics = [\"t\"]\n\"group.id\" = \"g\"\n\"bootstrap.servers\" = \"{}\"\n[handler]\nurl = \"http://127.0.0.1:9/\"\n", kafka())
}

async fn run_binary(config: &str, args: &[&str]) -> std::process::Output {
    let file = write_config(config);
    let mut all = vec!["--config", file.0.to_str().unwrap()];
    all.extend_from_slice(args);
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(redrive_bin())
            .args(all)
            .output(),
    )
    .await
    .expect("the command finishes")
    .unwrap()
}

#[tokio::test]
async fn a_bad_config_value_fails_at_startup_naming_the_field() {
    let base = base_config("postgres://redrive:redrive@127.0.0.1:5432/redrive");
    let without_handler = base.replace("[handler]\nurl = \"http://127.0.0.1:9/\"\n", "");
    for (extra, field) in [
        ("[retry]\nmax_attempts = \"lots\"\n", "max_attempts"),
        ("[workers]\nlease = \"a while\"\n", "lease"),
        (
            "[handler]\nurl = \"http://h/\"\npermanent_statuses = [\"4x4\"]\n",
            "handler.permanent_statuses",
        ),
        ("[handler]\nurl = \"ftp://h/\"\n", "handler.url"),
        ("[dlq]\nbatch_sise = 3\n", "batch_sise"),
        ("[kafka]\ntopics = [\"again\"]\n", "duplicate key"),
    ] {
        let out = run_binary(&format!("{without_handler}{extra}"), &["run"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(field),
            "error for {extra:?} does not name {field}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = run_binary(&base, &["check-config"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_pool_too_small_for_what_run_holds_is_refused_naming_the_field() {
    let db = TestDb::new().await;
    let config = base_config(&db.url).replace("[kafka]", "max_connections = 1\n[kafka]");
    let out = run_binary(&config, &["run"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`postgres.max_connections` is 1"),
        "{stderr}"
    );
    // With nothing that holds a connection of its own, one is enough: the run gets past the
    // check and its schema check to "starting", and stops cleanly when told to.
    let flags = ["--no-dlq", "--no-consumer", "--no-workers", "--no-http"];
    let (log, status, _) = run_until_logged_with(&config, "starting", 1, &[], &flags).await;
    assert!(!log.contains("max_connections"), "{log}");
    assert_eq!(status.code(), Some(0), "a clean exit: {log}");
}

/// Runs `redrive run` with this config until its log shows `needle` `times` times, then stops it
/// with SIGTERM; returns the whole log, the exit status and how long the stop took.
async fn run_until_logged(
    config: &str,
    needle: &str,
    times: usize,
) -> (String, std::process::ExitStatus, Duration) {
    run_until_logged_with(config, needle, times, &[], &[]).await
}

/// [`run_until_logged`] with these environment variables set and these flags after `run`.
async fn run_until_logged_with(
    config: &str,
    needle: &str,
    times: usize,
    envs: &[(&str, &str)],
    flags: &[&str],
) -> (String, std::process::ExitStatus, Duration) {
    let file = write_config(config);
    let mut child = tokio::process::Command::new(redrive_bin())
        .args(["--config", file.0.to_str().unwrap(), "run"])
        .args(flags)
        .envs(envs.iter().copied())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = ChildLog::of(&mut child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let what = format!("{times} lines with {needle:?}");
    for _ in 0..times {
        if log
            .until(deadline, &what, |line| line.contains(needle))
            .await
            .is_none()
        {
            panic!(
                "redrive exited before logging {needle:?} {times} times: {:?}",
                log.read
            )
        }
    }
    // Read the rest while it stops: a pipe left full would block its logging, and so its exit.
    let rest = log.rest();
    let stopped = std::time::Instant::now();
    let status = terminate(&mut child).await;
    let took = stopped.elapsed();
    (rest.await.unwrap().join("\n"), status, took)
}

/// A stop waits for the messages in flight; a second signal exits at once (status 130), and the
/// message that was in flight, whose outcome was never stored, is delivered again by the next run.
#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_message_in_flight_comes_again() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("second-signal"), unique("g"));
    create_topic(&topic, 1).await;
    // A handler that takes the request and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_at = hung.local_addr().unwrap();
    let (called, mut was_called) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = hung.accept().await {
            let mut buf = [0u8; 1024];
            if tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
                .await
                .unwrap_or(0)
                > 0
            {
                let _ = called.try_send(());
            }
            held.push(conn);
        }
    });
    let text = |handler: std::net::SocketAddr| {
        format!(
            "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"{topic}\"]\n\"group.id\" = \"{group}\"\n\
             \"bootstrap.servers\" = \"{}\"\n\"session.timeout.ms\" = 6000\n[handler]\nurl = \"http://{handler}/\"\ntimeout = \"300s\"\n\
             [workers]\nlease = \"600s\"\n[shutdown]\ntimeout = \"300s\"\n",
            db.url,
            kafka()
        )
    };
    let file = write_config(&text(hung_at));
    let mut child = tokio::process::Command::new(redrive_bin())
        .args([
            "--config",
            file.0.to_str().unwrap(),
            "run",
            "--no-dlq",
            "--no-http",
        ])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (saw_stop, mut stop_logged) = tokio::sync::mpsc::channel::<()>(1);
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("shutdown requested") {
                let _ = saw_stop.try_send(());
            }
            sink.lock().unwrap().push(line);
        }
    });
    produce(&producer(&kafka()), &topic, None, Some(b"in flight"), &[]).await;
    tokio::time::timeout(Duration::from_secs(60), was_called.recv())
        .await
        .unwrap_or_else(|_| panic!("the handler is called: {:?}", log.lock().unwrap()));

    let pid = child.id().unwrap().to_string();
    let signal = || async {
        tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
    };
    signal().await;
    tokio::time::timeout(Duration::from_secs(30), stop_logged.recv())
        .await
        .unwrap_or_else(|_| panic!("the stop is logged: {:?}", log.lock().unwrap()));
    assert!(
        tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .is_err(),
        "the first signal waits for the message in flight"
    );
    signal().await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the second signal ends the process")
        .unwrap();
    assert_eq!(status.code(), Some(130), "{:?}", log.lock().unwrap());
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("second signal: exiting without finishing")),
        "{:?}",
        log.lock().unwrap()
    );

    // The next run gets the message again: its offset was never stored.
    let stub = Stub::start(|_| (200, vec![])).await;
    let file = write_config(&text(stub.addr));
    let mut next = spawn_redrive(&file.0, &["--no-dlq", "--no-http"]);
    wait_for(
        "the message delivered again",
        Duration::from_secs(60),
        || async { (stub.count() > 0).then_some(()) },
    )
    .await;
    terminate(&mut next).await;
    assert_eq!(stub.all()[0].body.as_ref(), b"in flight");
    assert_eq!(db.count("true").await, 0, "it succeeded: no row");
}

/// A local port where nothing listens: bound, then released.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The test configuration with a broker address where nothing listens.
fn unreachable_broker(db_url: &str) -> (String, String) {
    let broker = format!("127.0.0.1:{}", closed_port());
    (base_config(db_url).replace(&kafka(), &broker), broker)
}

/// `REDRIVE_LOG_FORMAT=json`: every line of the log is one JSON object with a level and fields,
/// the retry line among them, and the password is in none of them.
#[tokio::test]
async fn json_logs_parse_line_by_line_and_never_hold_the_password() {
    let closed = closed_port();
    let url = format!("postgres://redrive:{PASSWORD}@127.0.0.1:{closed}/redrive");
    let (log, status, _) = run_until_logged_with(
        &base_config(&url),
        "postgres is unreachable, retrying",
        2,
        &[("REDRIVE_LOG_FORMAT", "json"), ("REDRIVE_LOG", "info")],
        &[],
    )
    .await;
    assert!(!log.contains(PASSWORD), "the password leaked: {log}");
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events
        .iter()
        .all(|e| e["level"].is_string() && e["timestamp"].is_string()));
    let retry = events
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("postgres is unreachable, retrying"))
        })
        .expect("the retry line");
    assert_eq!(retry["level"], "WARN");
    assert!(
        retry.to_string().contains("redrive:***@127.0.0.1"),
        "{retry}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
}

/// Wrong credentials are not retried: `run` and an operator command fail at once, naming the
/// server (password hidden) and the cause, once. Postgres refused to connect at all with a closed
/// port: the operator command names that, not the pool's timeout.
#[tokio::test]
async fn wrong_credentials_fail_at_once_naming_the_server_and_the_cause_once() {
    let url = format!("postgres://redrive:{PASSWORD}@{}/redrive", postgres_addr());
    let config = base_config(&url);
    for args in [&["run"][..], &["status"]] {
        let out = run_binary(&config, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let error = stderr.lines().last().unwrap_or_default();
        assert!(
            error.starts_with("error: connecting to postgres at postgres://redrive:***@"),
            "{args:?}: {stderr}"
        );
        let cause = "password authentication failed for user \"redrive\"";
        assert_eq!(error.matches(cause).count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");
    }
    let closed = format!(
        "postgres://redrive:redrive@127.0.0.1:{}/redrive",
        closed_port()
    );
    let out = run_binary(&base_config(&closed), &["status"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_postgres_is_retried_with_a_clear_log_line_and_no_password() {
    let closed = closed_port();
    let url = format!("postgres://redrive:{PASSWORD}@127.0.0.1:{closed}/redrive");
    let (log, status, _) =
        run_until_logged(&base_config(&url), "postgres is unreachable, retrying", 3).await;
    assert!(!log.contains(PASSWORD), "the password leaked: {log}");
    assert!(
        log.contains("redrive:***@127.0.0.1"),
        "the log names the server: {log}"
    );
    assert!(
        log.contains("Connection refused"),
        "the log names the cause, not the pool's timeout: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        status.code(),
        Some(0),
        "a stop requested while waiting for postgres is a clean exit: {log}"
    );
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_with_a_clear_log_line() {
    let db = TestDb::new().await;
    let (config, broker) = unreachable_broker(&db.url);
    let (log, status, _) = run_until_logged(&config, "kafka is unreachable, retrying", 2).await;
    assert!(log.contains(&broker), "the log names the broker: {log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        status.code(),
        Some(0),
        "a stop while waiting is a clean exit: {log}"
    );
}

/// A stop that comes while a topic check waits on an unreachable broker does not wait for the
/// check's metadata timeout (10 s): the process exits at once, cleanly.
#[tokio::test]
async fn a_stop_during_a_topic_check_does_not_wait_for_its_timeout() {
    let db = TestDb::new().await;
    let (config, _) = unreachable_broker(&db.url);
    // "starting" is logged just before the first check; against a closed port the check takes
    // its full metadata timeout, so the stop lands while it is under way.
    let (log, status, took) = run_until_logged(&config, "starting", 1).await;
    assert!(
        !log.contains("kafka is unreachable"),
        "the stop came after the first check, not during it: {log}"
    );
    assert!(
        took < Duration::from_secs(5),
        "stopped {took:?} after SIGTERM, waiting on the check's metadata timeout: {log}"
    );
    assert_eq!(status.code(), Some(0), "a clean exit: {log}");
}

/// Captures this thread's tracing output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures this thread's log at DEBUG, without colours, until the guard is dropped.
    ///
    /// A second dispatcher, never dropped, is registered first. While a process has exactly one,
    /// tracing-core asks the thread that first reaches a callsite whether it is wanted, and a thread
    /// of another test, without a subscriber, answers never: that callsite then stays off for this
    /// thread's capture too (tokio-rs/tracing#3611). A test waiting for such a line timed out.
    /// With two, every callsite is asked of every dispatcher.
    fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    /// What was logged so far.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn the_password_stays_out_of_logs_and_errors() {
    let (captured, _guard) = Captured::start();

    let mut wrong = url::Url::parse(&admin_url()).unwrap();
    wrong.set_password(Some(PASSWORD)).unwrap();
    let config = |url: &str| PostgresConfig {
        url: url.to_string().into(),
        max_connections: 1,
        connect_timeout: Duration::from_secs(5),
    };
    let auth_error = Store::connect(&config(wrong.as_str()), &CancellationToken::new())
        .await
        .unwrap_err();
    let migrate_error = redrive::store::migrate::run(&wrong.to_string().into())
        .await
        .unwrap_err();

    let closed = closed_port();
    let unreachable = format!("postgres://redrive:{PASSWORD}@127.0.0.1:{closed}/redrive");
    let stop = CancellationToken::new();
    let connecting = tokio::spawn({
        let (config, stop) = (config(&unreachable), stop.clone());
        async move { Store::connect(&config, &stop).await }
    });
    wait_for("a retry to be logged", Duration::from_secs(30), || async {
        let logs = captured.text();
        logs.contains("postgres is unreachable").then_some(())
    })
    .await;
    stop.cancel();
    let gave_up = connecting.await.unwrap().unwrap_err();

    let logs = captured.text();
    assert!(
        logs.contains("postgres is unreachable"),
        "the retries were logged: {logs}"
    );
    for text in [
        format!("{auth_error:?} {auth_error}"),
        format!("{migrate_error:?} {migrate_error:#}"),
        format!("{gave_up:?} {gave_up}"),
        logs,
    ] {
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
}

/// The error `redrive run` stops with, for a database and one source topic.
async fn startup_error(db_url: &str, topic: &str) -> String {
    let handler = Some("127.0.0.1:9".parse().unwrap());
    let (_stop, app) = spawn_app(
        config(db_url, &[topic], "g", handler, ""),
        RunArgs::default(),
    );
    format!("{:#}", app.await.unwrap().unwrap_err())
}

#[tokio::test]
async fn an_unknown_topic_is_a_clear_startup_error() {
    let db = TestDb::new().await;
    let missing = unique("no-such-topic");
    let error = startup_error(&db.url, &missing).await;
    assert!(
        error.contains(&format!("source topic {missing:?} does not exist")),
        "{error}"
    );

    // The source exists, its DLQ topic does not.
    let source = unique("source");
    create_topic(&source, 1).await;
    let error = startup_error(&db.url, &source).await;
    assert!(
        error.contains(&format!("DLQ topic \"{source}.dlq\" does not exist")),
        "{error}"
    );
}

/// A source topic created a moment after `run` starts (by the same deploy, or on a broker that has
/// just restarted and is still loading its metadata) is waited for, with a log line, instead of
/// stopping the process on the first answer that it does not exist.
#[tokio::test]
async fn a_topic_created_just_after_run_starts_is_waited_for() {
    let (captured, _guard) = Captured::start();
    let db = TestDb::new().await;
    let (topic, group) = (unique("late"), unique("g"));
    let stub = Stub::start(|_| (500, vec![])).await;
    let parts = RunArgs {
        no_workers: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), ""),
        parts,
    );
    // The topic comes after the third check (two seconds in), not before the second.
    wait_for(
        "the third check for the topic",
        Duration::from_secs(30),
        || async {
            let logs = captured.text();
            let said = logs.contains("topic not in the cluster's metadata");
            (said && logs.contains("topic still missing") && logs.contains("attempt=3"))
                .then_some(())
        },
    )
    .await;
    assert!(!app.is_finished(), "run stopped on the missing topic");
    create_topic(&topic, 1).await;
    produce(&producer(&kafka()), &topic, None, Some(b"late"), &[]).await;
    wait_for(
        "the message to be captured",
        Duration::from_secs(60),
        || async { (db.count("true").await == 1).then_some(()) },
    )
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();
}

#[tokio::test]
async fn run_refuses_a_database_without_the_schema_and_says_to_migrate() {
    let db = TestDb::empty().await;
    let error = startup_error(&db.url, "t").await;
    assert!(error.contains("redrive migrate"), "{error}");
    redrive::store::migrate::run(&db.url.clone().into())
        .await
        .unwrap();
    db.store.check_schema().await.unwrap();
    // A second migrate is a no-op.
    assert!(redrive::store::migrate::run(&db.url.clone().into())
        .await
        .unwrap()
        .is_empty());
}

/// A newer build migrated the database: this one still runs (a rolling deploy has old processes,
/// and a rollback goes back to one), and says so, naming both versions.
#[tokio::test]
async fn a_schema_newer_than_this_build_is_used_with_a_warning_naming_both_versions() {
    let db = TestDb::new().await;
    let ours = redrive::store::migrate::required_version();
    sqlx::query(
        "INSERT INTO redrive.refinery_schema_history (version, name, applied_on, checksum) \
         VALUES ($1, 'from_a_newer_build', now()::text, '0')",
    )
    .bind(ours + 1)
    .execute(db.pool())
    .await
    .unwrap();
    let warning = format!(
        "the redrive schema is at version {}, newer than this build of redrive knows ({ours})",
        ours + 1
    );

    let config = base_config(&db.url);
    let flags = ["--no-dlq", "--no-consumer", "--no-workers", "--no-http"];
    let (log, status, _) = run_until_logged_with(&config, "starting", 1, &[], &flags).await;
    assert!(log.contains(&warning), "{log}");
    assert_eq!(status.code(), Some(0), "{log}");

    let out = run_binary(&config, &["status"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&warning), "{stderr}");
}

/// Several `migrate` at once (every replica's init step, a Job run twice): each migration is
/// applied once, by one of them, and every one of them succeeds.
#[tokio::test]
async fn migrations_run_from_several_places_at_once_are_each_applied_once() {
    let db = TestDb::empty().await;
    let url: secrecy::SecretString = db.url.clone().into();
    let runs = futures::future::join_all((0..4).map(|_| redrive::store::migrate::run(&url))).await;
    let mut applied: Vec<i32> = runs
        .into_iter()
        .flat_map(|r| r.expect("every migrate succeeds"))
        .map(|m| m.version)
        .collect();
    applied.sort();
    let all: Vec<i32> = (1..=redrive::store::migrate::required_version()).collect();
    assert_eq!(applied, all, "each migration applied once, in all");
    db.store.check_schema().await.unwrap();
}

#[tokio::test]
async fn migrate_needs_only_the_postgres_section_and_is_idempotent() {
    let db = TestDb::empty().await;
    let config = format!("[postgres]\nurl = \"{}\"\n", db.url);
    let first = run_binary(&config, &["migrate"]).await;
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(stdout.contains("applied V1__retry_table"), "{stdout}");
    assert!(
        stdout.contains("redrive:***@"),
        "the password is redacted: {stdout}"
    );
    let again = run_binary(&config, &["migrate"]).await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("(0 migration(s) applied now)"));
    db.store.check_schema().await.unwrap();
}
