//! The retry workers: never early, prompt when due (I7), Retry-After capped (I6), unfinished claims
//! released at shutdown, no row attempted twice across processes (SKIP LOCKED), and a row that
//! another session holds locked holds up nothing but itself: its completion and the rescue of its
//! lease go around it, and a statement still waiting on a lock is named in the log with the
//! session that holds it.

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
use uuid::Uuid;

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

/// Three claimed rows; an operator's transaction holds the second one's message row locked (a
/// `SELECT … FOR UPDATE` left open), as an UPDATE would.
async fn three_claimed_and_one_held(
    db: &TestDb,
) -> (
    Vec<redrive::store::claim::Claimed>,
    sqlx::Transaction<'static, sqlx::Postgres>,
) {
    db.seed(&[
        pending("orders", 1, Duration::ZERO, 3),
        pending("orders", 2, Duration::ZERO, 3),
        pending("orders", 3, Duration::ZERO, 3),
    ])
    .await;
    let mut claimed = db.claim(Duration::from_secs(60)).await;
    claimed.sort_by_key(|c| c.message.offset);
    assert_eq!(claimed.len(), 3);
    let mut open = db.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM redrive.retry_messages WHERE kafka_offset = 2 FOR UPDATE")
        .execute(&mut *open)
        .await
        .unwrap();
    (claimed, open)
}

fn succeeded(c: &redrive::store::claim::Claimed) -> redrive::store::complete::Completion {
    redrive::store::complete::Completion {
        id: c.id,
        attempt: c.attempt,
        token: c.token,
        outcome: redrive::store::complete::Outcome::Succeeded,
    }
}

/// A completion batch with a row that another session holds gives up waiting for it: the other
/// rows are completed, the held one is handed back, and completing it again does not wait. Once
/// the transaction ends, it goes through. (A success, and two failures: the batch's statements in
/// one transaction.)
#[tokio::test]
async fn completions_go_around_a_row_another_session_holds_locked() {
    use redrive::store::complete::Outcome;
    let db = TestDb::new().await;
    let (claimed, open) = three_claimed_and_one_held(&db).await;
    let mut batch: Vec<_> = claimed.iter().map(succeeded).collect();
    batch[1].outcome = Outcome::Retry {
        retry_in: Duration::from_secs(60),
        error: HandlerError::retryable("503"),
    };
    batch[2].outcome = Outcome::Dead {
        error: HandlerError::permanent("400"),
    };
    let finished = tokio::time::timeout(
        Duration::from_secs(60),
        db.store.complete_around_held(&batch, true),
    )
    .await
    .expect("the batch does not wait for the held row")
    .unwrap();
    assert_eq!((finished.done.deleted, finished.done.dead), (1, 1));
    let held: Vec<Uuid> = finished.held.iter().map(|c| c.id).collect();
    assert_eq!(held, [claimed[1].id]);
    assert_eq!(db.count("state = 'running'").await, 1);

    // Without waiting first, as the completer's batches go for a minute after one found a held row.
    let again = tokio::time::timeout(
        Duration::from_secs(60),
        db.store.complete_around_held(&finished.held, false),
    )
    .await
    .expect("trying the held row again does not wait")
    .unwrap();
    assert_eq!((again.done.rescheduled, again.held.len()), (0, 1));

    open.rollback().await.unwrap();
    let done = db.store.complete_unheld(&again.held).await.unwrap();
    assert_eq!((done.done.rescheduled, done.held.len()), (1, 0));
    assert_eq!(db.count("state = 'pending'").await, 1);
    assert_eq!(db.count("state = 'dead'").await, 1);
}

/// A completion batch that gave up waiting for a held row has ended its transaction when it
/// returns. Only dropped, the transaction kept the locks of the rows it had changed until the pool
/// got round to its connection, and the completion of the rows nobody holds, which comes next,
/// took them for held by another session.
#[tokio::test]
async fn a_completion_that_gave_up_on_a_held_row_has_ended_its_transaction() {
    use redrive::store::complete::{is_lock_timeout, Outcome};
    use sqlx::Connection as _;
    let db = TestDb::new().await;
    let (claimed, _open) = three_claimed_and_one_held(&db).await;
    // A pool that is slow to take its connections back, as on a busy runtime: a transaction
    // left to the pool stays open for that long.
    let store = redrive::store::Store::from_pool(
        redrive::store::pool_options()
            .after_release(|_, _| {
                Box::pin(async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok(true)
                })
            })
            .connect(&db.url)
            .await
            .unwrap(),
    );
    let mut watch = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut batch: Vec<_> = claimed.iter().map(succeeded).collect();
    batch[2].outcome = Outcome::Dead {
        error: HandlerError::permanent("400"),
    };
    let e = store.complete(&batch).await.unwrap_err();
    assert!(is_lock_timeout(&e), "{e}");
    let open: Vec<String> = sqlx::query_scalar(
        "SELECT state FROM pg_stat_activity
         WHERE datname = current_database() AND state LIKE 'idle in transaction%'
           AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut watch)
    .await
    .unwrap();
    assert_eq!(
        open,
        ["idle in transaction"],
        "only the holder's transaction is open"
    );
}

/// The same through the completer: the completions behind the held row are written while it is
/// held, and the held one is written by itself once the transaction ends.
#[tokio::test]
async fn the_completer_writes_the_others_and_the_held_row_once_it_is_free() {
    let db = TestDb::new().await;
    let (claimed, open) = three_claimed_and_one_held(&db).await;
    let (completer, complete) = completer(db.store.clone(), "g", &WorkersConfig::default());
    let running = tokio::spawn(completer.run());
    for c in &claimed {
        assert!(complete.send(succeeded(c)).await);
    }
    let offsets = || async {
        sqlx::query_scalar::<_, i64>("SELECT kafka_offset FROM redrive.retry_messages")
            .fetch_all(db.pool())
            .await
            .unwrap()
    };
    wait_for(
        "the rows nobody holds completed",
        Duration::from_secs(60),
        || async { (offsets().await == [2]).then_some(()) },
    )
    .await;
    // Later completions are not held up either.
    db.seed(&[pending("orders", 4, Duration::ZERO, 3)]).await;
    let fourth = db.claim(Duration::from_secs(60)).await;
    assert!(complete.send(succeeded(&fourth[0])).await);
    wait_for(
        "a later completion written",
        Duration::from_secs(60),
        || async { (offsets().await == [2]).then_some(()) },
    )
    .await;

    open.rollback().await.unwrap();
    wait_for(
        "the held row completed once free",
        Duration::from_secs(60),
        || async { offsets().await.is_empty().then_some(()) },
    )
    .await;
    drop(complete);
    running.await.unwrap();
}

/// A claim takes back an expired lease only where no other session holds the row, and does not
/// wait for the one that does; it takes that one back once the transaction ends.
#[tokio::test]
async fn a_claim_does_not_wait_for_an_expired_row_that_another_session_holds() {
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::ZERO, 3)]).await;
    let expired = db.claim(Duration::ZERO).await;
    assert_eq!(expired.len(), 1);
    let mut open = db.pool().begin().await.unwrap();
    sqlx::query("SELECT id FROM redrive.retry_messages WHERE kafka_offset = 1 FOR UPDATE")
        .execute(&mut *open)
        .await
        .unwrap();
    db.seed(&[pending("orders", 2, Duration::ZERO, 3)]).await;
    let claimed = tokio::time::timeout(Duration::from_secs(60), db.claim(Duration::from_secs(60)))
        .await
        .expect("the claim does not wait for the held row");
    let offsets: Vec<i64> = claimed.iter().map(|c| c.message.offset).collect();
    assert_eq!(offsets, [2], "the held row is left as it is");

    open.rollback().await.unwrap();
    let claimed = db.claim(Duration::from_secs(60)).await;
    let offsets: Vec<i64> = claimed.iter().map(|c| c.message.offset).collect();
    assert_eq!(offsets, [1], "taken back once free");
    assert_eq!(
        claimed[0].attempt, 3,
        "the attempt whose lease ran out counts"
    );
}

/// A statement of a `redrive run` that waits on a lock for more than 5 s is named in its log, with
/// the session that holds the lock and how to end it. (redrive's own statements go around held
/// rows; this waiter is a session under the process's `application_name`.)
#[tokio::test]
async fn a_statement_waiting_on_another_sessions_lock_is_named_in_the_log() {
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;
    let db = TestDb::new().await;
    db.seed(&[pending("orders", 1, Duration::from_secs(3600), 3)])
        .await;
    let config = write_config(&format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"orders\"]\n\"group.id\" = \"g\"\n\
         \"bootstrap.servers\" = \"{}\"\n[handler]\nurl = \"http://127.0.0.1:9/\"\n",
        db.url,
        kafka(),
    ));
    let mut child = tokio::process::Command::new(redrive_bin())
        .args(["--config", config.0.to_str().unwrap(), "run"])
        .args(["--no-consumer", "--no-dlq", "--no-http"])
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let name = format!("redrive {}-{}", host.trim(), child.id().unwrap());

    let mut holding = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut open = holding.begin().await.unwrap();
    sqlx::query("SELECT id FROM redrive.retry_messages FOR UPDATE")
        .execute(&mut *open)
        .await
        .unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    let mut waiter = sqlx::postgres::PgConnectOptions::from_str(&db.url)
        .unwrap()
        .application_name(&name)
        .connect()
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        sqlx::query("UPDATE redrive.retry_messages SET last_error = 'x'")
            .execute(&mut waiter)
            .await
            .map(|_| ())
    });

    let named = format!("another session holds: postgres pid {holder},");
    let mut log = ChildLog::of(&mut child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let what = format!("a line naming pid {holder}");
    let Some(line) = log
        .until(deadline, &what, |line| line.contains(&named))
        .await
    else {
        panic!("redrive exited before naming pid {holder}: {:#?}", log.read)
    };
    assert!(
        line.contains(&format!("pg_terminate_backend({holder})")),
        "{line}"
    );
    assert!(line.contains("idle in transaction"), "{line}");
    drop(log.rest());

    open.rollback().await.unwrap();
    waiting.await.unwrap().unwrap();
    terminate(&mut child).await;
}
