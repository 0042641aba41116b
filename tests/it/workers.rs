//! The retry workers: never early, prompt when due (I7), Retry-After capped (I6), unfinished claims
//! released at shutdown, no row attempted twice across processes (SKIP LOCKED), and a row that
//! another session holds locked named in the log with the session that holds it.

use crate::helpers::*;
use crate::store::pending;
use chrono::{DateTime, Utc};
use redrive::breaker::Breakers;
use redrive::completer::completer;
use redrive::config::{BreakerConfig, RetryConfig, WorkersConfig};
use redrive::dispatcher::Dispatcher;
use redrive::handler::{Delivery, Handler, HandlerError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Offsets attempted and when.
type Calls = Arc<Mutex<Vec<(i64, DateTime<Utc>)>>>;

/// A library handler that records when each offset was attempted, and can hang forever.
#[derive(Clone, Default)]
struct Recorder {
    calls: Calls,
    hang: bool,
}

impl Handler for Recorder {
    async fn handle(&self, d: Delivery<'_>) -> Result<(), HandlerError> {
        self.calls
            .lock()
            .unwrap()
            .push((d.message.offset, Utc::now()));
        if self.hang {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

impl Recorder {
    fn called(&self, offset: i64) -> Option<DateTime<Utc>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, at)| *at)
    }
}

fn workers() -> WorkersConfig {
    WorkersConfig {
        max_idle: Duration::from_secs(3600),
        ..WorkersConfig::default()
    }
}

/// Starts retry workers and their completer for group "g".
fn start<H: Handler>(
    db: &TestDb,
    handler: H,
    retry: RetryConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let (completer, complete) = completer(db.store.clone(), "g", &workers());
    let d = Dispatcher::new(
        db.store.clone(),
        Arc::new(handler),
        complete,
        "g",
        retry,
        workers(),
        Duration::from_secs(30),
        Arc::new(Breakers::new(&BreakerConfig::default(), "g")),
    );
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move {
        let c = tokio::spawn(completer.run());
        d.run(t, Duration::from_millis(300)).await.unwrap();
        c.await.unwrap();
    });
    (token, task)
}

#[tokio::test]
async fn a_row_is_not_attempted_before_it_is_due_and_promptly_once_it_is() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    // The fallback wake-up is an hour away: only NOTIFY and the due-time timer can wake the worker.
    let (stop, task) = start(&db, recorder.clone(), RetryConfig::default());

    // Row 3 is due at once, so a claim runs while row 1 is not yet due: it must leave row 1.
    db.seed(&[
        pending("t", 1, Duration::from_millis(800), 3),
        pending("t", 3, Duration::ZERO, 3),
    ])
    .await;
    let due: DateTime<Utc> = sqlx::query_scalar(
        "SELECT next_attempt_at FROM redrive.retry_messages WHERE kafka_offset = 1",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let at = wait_for(
        "the due row to be attempted",
        Duration::from_secs(30),
        || async { recorder.called(1) },
    )
    .await;
    assert!(at >= due, "attempted at {at}, before next_attempt_at {due}");

    // The worker is idle now; a row due at once must wake it (NOTIFY), long before the fallback.
    db.seed(&[pending("t", 2, Duration::ZERO, 3)]).await;
    wait_for(
        "an idle worker to pick up a due row",
        Duration::from_secs(20),
        || async { recorder.called(2) },
    )
    .await;
    wait_for(
        "successes to delete their rows",
        Duration::from_secs(20),
        || async { (db.count("true").await == 0).then_some(()) },
    )
    .await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_releases_the_claims_of_attempts_that_did_not_finish() {
    let db = TestDb::new().await;
    let recorder = Recorder {
        hang: true,
        ..Default::default()
    };
    let (stop, task) = start(&db, recorder.clone(), RetryConfig::default());
    db.seed(&[pending("t", 1, Duration::ZERO, 3)]).await;
    wait_for("the attempt to start", Duration::from_secs(20), || async {
        recorder.called(1)
    })
    .await;
    assert_eq!(db.count("state = 'running' AND attempts = 2").await, 1);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("shutdown is bounded")
        .unwrap();
    assert_eq!(
        db.count(
            "state = 'pending' AND attempts = 1 AND locked_by IS NULL AND next_attempt_at <= now()"
        )
        .await,
        1,
        "the unfinished attempt is handed back, due now, with its attempt returned"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_up_to_its_cap() {
    let db = TestDb::new().await;
    let stub = Stub::start(|r| {
        let wait = if r.header("ce-id").unwrap().ends_with("offset:1") {
            "3600"
        } else {
            "1"
        };
        (503, vec![("retry-after", wait.to_string())])
    })
    .await;
    let config = config(&db.url, &["t"], "g", Some(stub.addr), "[retry]\ninitial_delay = \"60s\"\nmax_delay = \"1h\"\nretry_after_max = \"5s\"\njitter = 0.0");
    let handler = redrive::handler::http::HttpHandler::new(&config.handler).unwrap();
    let (stop, task) = start(&db, handler, config.retry.clone());
    db.seed(&[
        pending("t", 1, Duration::ZERO, 5),
        pending("t", 2, Duration::ZERO, 5),
    ])
    .await;
    let delays: HashMap<i64, f64> = wait_for(
        "both rows to be rescheduled",
        Duration::from_secs(20),
        || async {
            let rows: Vec<(i64, f64)> = sqlx::query_as(
                "SELECT kafka_offset, extract(epoch FROM next_attempt_at - updated_at)::float8
             FROM redrive.retry_messages WHERE state = 'pending' AND attempts = 2",
            )
            .fetch_all(db.pool())
            .await
            .unwrap();
            (rows.len() == 2).then(|| rows.into_iter().collect())
        },
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    assert!(
        (4.0..=6.0).contains(&delays[&1]),
        "Retry-After 3600 capped at 5s, got {}",
        delays[&1]
    );
    assert!(
        (0.0..=2.0).contains(&delays[&2]),
        "Retry-After 1 replaces the 60s backoff, got {}",
        delays[&2]
    );
}

#[tokio::test]
async fn two_processes_with_four_workers_each_attempt_every_row_exactly_once() {
    const ROWS: i64 = 10_000;
    let db = TestDb::new().await;
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|&o| pending("t", o, Duration::ZERO, 3))
            .collect();
        db.seed(&batch).await;
    }
    let stub = Stub::start(|_| (200, vec![])).await;
    let file = write_config(&format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"t\"]\n\"group.id\" = \"g\"\n\
         [handler]\nurl = \"http://{}/\"\n[workers]\nconcurrency = 4\nclaim_batch_size = 4\n",
        db.url, stub.addr
    ));
    let spawn = || spawn_redrive(&file.0, &["--no-consumer", "--no-dlq", "--no-http"]);
    let (mut a, mut b) = (spawn(), spawn());
    wait_for(
        "every row to be processed",
        Duration::from_secs(300),
        || async { (db.count("true").await == 0).then_some(()) },
    )
    .await;
    for child in [&mut a, &mut b] {
        let status = terminate(child).await;
        assert!(status.success(), "a worker process exited with {status}");
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in stub.all() {
        *seen.entry(r.header("ce-id").unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len() as i64, ROWS, "every row was attempted");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows attempted more than once: {twice:?}");
}

/// An operator's transaction left open on a row holds up the completion of its attempt (and the
/// completions after it). The lock watch names that session in the log, with how to end it; once
/// it ends, the completion goes through.
#[tokio::test]
async fn a_row_held_locked_by_another_session_is_named_in_the_log_with_that_session() {
    use sqlx::Connection;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 3)]).await;
    let mut operator = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut open = operator.begin().await.unwrap();
    // A row lock on the message alone: the claim (which locks the queue's row) takes the row, and
    // the completion, which deletes the message, waits.
    sqlx::query("SELECT id FROM redrive.retry_messages FOR UPDATE")
        .execute(&mut *open)
        .await
        .unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *open)
        .await
        .unwrap();

    let stub = Stub::start(|_| (200, vec![])).await;
    let config = write_config(&format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"orders\"]\n\"group.id\" = \"g\"\n\
         \"bootstrap.servers\" = \"{}\"\n[handler]\nurl = \"http://{}/\"\n",
        db.url,
        kafka(),
        stub.addr
    ));
    let mut child = tokio::process::Command::new(redrive_bin())
        .args(["--config", config.0.to_str().unwrap(), "run"])
        .args(["--no-consumer", "--no-dlq", "--no-http"])
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let named = format!("another session holds: postgres pid {holder},");
    let mut log = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line.clone());
            if line.contains(&named) {
                return Some(line);
            }
        }
        None
    })
    .await;
    let Ok(Some(line)) = found else {
        panic!("no log line naming pid {holder}: {log:#?}")
    };
    assert!(
        line.contains(&format!("pg_terminate_backend({holder})")),
        "{line}"
    );
    assert_eq!(
        stub.count(),
        1,
        "the attempt was made; its completion waits"
    );
    assert_eq!(db.count("true").await, 1);
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    open.rollback().await.unwrap();
    wait_for(
        "the completion once the lock is gone",
        Duration::from_secs(30),
        || async { (db.count("true").await == 0).then_some(()) },
    )
    .await;
    assert_eq!(stub.count(), 1, "attempted once");
    terminate(&mut child).await;
}
