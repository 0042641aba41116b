//! The operator surface: `redrive replay`, `status` and `purge`, the SQL views and functions,
//! the least-privilege roles, and every recipe of docs/operators.md.

use crate::helpers::*;
use redrive::store::find::{Filter, Scope};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A row to insert directly, in any state.
#[derive(Clone)]
struct Row<'a> {
    group: &'a str,
    topic: &'a str,
    state: &'a str,
    key: Option<&'a [u8]>,
    error: &'a str,
    kind: &'a str,
    /// Seconds since the row died (dead and replayed rows).
    dead_ago: f64,
    /// Seconds until the row is due (pending rows); negative when overdue.
    due_in: f64,
    /// Seconds since the recorded error.
    error_ago: f64,
    /// Whether the DLQ broker acknowledged the dead row.
    published: bool,
    max_attempts: i32,
}

impl Default for Row<'_> {
    fn default() -> Self {
        Row {
            group: "g",
            topic: "orders",
            state: "dead",
            key: None,
            error: "HTTP 503",
            kind: "retryable",
            dead_ago: 60.0,
            due_in: -1.0,
            error_ago: 60.0,
            published: true,
            max_attempts: 3,
        }
    }
}

static NEXT_OFFSET: AtomicI64 = AtomicI64::new(0);

/// Inserts `r` and returns its id. Its payload is `payload-<offset>`.
async fn insert(db: &TestDb, r: Row<'_>) -> Uuid {
    let id = Uuid::now_v7();
    let offset = NEXT_OFFSET.fetch_add(1, Ordering::Relaxed);
    // A row being attempted is pending in the table, and running in the queue.
    let stored = if r.state == "running" {
        "pending"
    } else {
        r.state
    };
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, key, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, error_history, dead_at,
            dlq_published_at)
        VALUES ($1, $2, $3, 0, $4, $5, convert_to('payload-' || $4, 'UTF8'), $6,
                CASE WHEN $6 IN ('dead', 'replayed') THEN $13 ELSE 1 END, $13,
                now() + make_interval(secs => $7),
                $8, $9,
                jsonb_build_array(jsonb_build_object('at', now() - make_interval(secs => $10),
                    'attempt', 1, 'kind', $9, 'error', $8)),
                CASE WHEN $6 IN ('dead', 'replayed') THEN now() - make_interval(secs => $11) END,
                CASE WHEN $6 IN ('dead', 'replayed') AND $12 THEN now() END)
        "#,
    )
    .bind(id)
    .bind(r.group)
    .bind(r.topic)
    .bind(offset)
    .bind(r.key)
    .bind(stored)
    .bind(r.due_in)
    .bind(r.error)
    .bind(r.kind)
    .bind(r.error_ago)
    .bind(r.dead_ago)
    .bind(r.published)
    .bind(r.max_attempts)
    .execute(db.pool())
    .await
    .unwrap();
    if r.state == "running" {
        sqlx::query(
            "UPDATE redrive.queue SET state = 'running', lease_expires_at = now() + interval '1 hour', \
             locked_by = 'w', claim_token = gen_random_uuid() WHERE id = $1",
        )
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    }
    id
}

/// The count a dry run reports: "dry run: would replay N row(s)".
fn dry_run_count(out: &str) -> i64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("dry run: "))
        .unwrap_or_else(|| panic!("no dry-run line in:\n{out}"));
    line.split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap()
}

/// Every row, as text, for before/after comparisons.
async fn snapshot(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT r::text FROM redrive.retry_messages r ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

async fn state_of(db: &TestDb, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM redrive.messages WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await
        .unwrap()
}

/// The rows `filter` matches among dead rows, by the SQL of `replay`.
async fn matching(db: &TestDb, filter: &Filter) -> BTreeSet<Uuid> {
    db.store
        .sample_matching(Scope::Dead, filter, true, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect()
}

#[tokio::test]
async fn every_filter_alone_and_combined_selects_exactly_its_rows() {
    let db = TestDb::new().await;
    let hour = 3600.0;
    let r1 = insert(
        &db,
        Row {
            topic: "orders",
            group: "g1",
            key: Some(b"k1"),
            error: "HTTP 503: upstream timeout",
            kind: "timeout",
            dead_ago: hour,
            ..Row::default()
        },
    )
    .await;
    let r2 = insert(
        &db,
        Row {
            topic: "orders",
            group: "g2",
            key: Some(b"k2"),
            error: "HTTP 400: bad field",
            kind: "permanent",
            dead_ago: 30.0 * hour,
            ..Row::default()
        },
    )
    .await;
    let r3 = insert(
        &db,
        Row {
            topic: "payments",
            group: "g1",
            key: Some(b"k1"),
            error: "connection refused",
            kind: "retryable",
            dead_ago: 3.0 * hour,
            ..Row::default()
        },
    )
    .await;
    let r4 = insert(
        &db,
        Row {
            topic: "payments",
            group: "g2",
            key: Some(&[0xff, 0x00]),
            error: "HTTP 503: Upstream TIMEOUT",
            kind: "retryable",
            dead_ago: 50.0 * hour,
            ..Row::default()
        },
    )
    .await;
    // Not dead: never selected by replay.
    let r5 = insert(
        &db,
        Row {
            topic: "orders",
            group: "g1",
            state: "pending",
            key: Some(b"k1"),
            error: "HTTP 503: upstream timeout",
            ..Row::default()
        },
    )
    .await;
    let ago = |h: i64| chrono::Utc::now() - chrono::Duration::hours(h);
    let s = |ids: &[Uuid]| ids.iter().copied().collect::<BTreeSet<_>>();
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases: Vec<(&str, Filter, BTreeSet<Uuid>)> = vec![
        ("none", Filter::default(), s(&[r1, r2, r3, r4])),
        (
            "ids",
            Filter {
                ids: vec![r1, r3],
                ..Filter::default()
            },
            s(&[r1, r3]),
        ),
        (
            "id of a pending row",
            Filter {
                ids: vec![r5],
                ..Filter::default()
            },
            s(&[]),
        ),
        (
            "topic",
            Filter {
                topics: strings(&["orders"]),
                ..Filter::default()
            },
            s(&[r1, r2]),
        ),
        (
            "two topics",
            Filter {
                topics: strings(&["orders", "payments"]),
                ..Filter::default()
            },
            s(&[r1, r2, r3, r4]),
        ),
        (
            "group",
            Filter {
                consumer_groups: strings(&["g2"]),
                ..Filter::default()
            },
            s(&[r2, r4]),
        ),
        (
            "key",
            Filter {
                key: Some("k1".into()),
                ..Filter::default()
            },
            s(&[r1, r3]),
        ),
        (
            "error text, any case",
            Filter {
                error_contains: Some("timeout".into()),
                ..Filter::default()
            },
            s(&[r1, r4]),
        ),
        (
            "error kind",
            Filter {
                error_kinds: strings(&["timeout"]),
                ..Filter::default()
            },
            s(&[r1]),
        ),
        (
            "dead since",
            Filter {
                dead_since: Some(ago(4)),
                ..Filter::default()
            },
            s(&[r1, r3]),
        ),
        (
            "dead before",
            Filter {
                dead_before: Some(ago(4)),
                ..Filter::default()
            },
            s(&[r2, r4]),
        ),
        (
            "window",
            Filter {
                dead_since: Some(ago(40)),
                dead_before: Some(ago(2)),
                ..Filter::default()
            },
            s(&[r2, r3]),
        ),
        (
            "topic and error",
            Filter {
                topics: strings(&["payments"]),
                error_contains: Some("timeout".into()),
                ..Filter::default()
            },
            s(&[r4]),
        ),
        (
            "key and since",
            Filter {
                key: Some("k1".into()),
                dead_since: Some(ago(2)),
                ..Filter::default()
            },
            s(&[r1]),
        ),
        (
            "group and kind",
            Filter {
                consumer_groups: strings(&["g1"]),
                error_kinds: strings(&["retryable", "timeout"]),
                ..Filter::default()
            },
            s(&[r1, r3]),
        ),
        (
            "ids and topic",
            Filter {
                ids: vec![r1, r3],
                topics: strings(&["payments"]),
                ..Filter::default()
            },
            s(&[r3]),
        ),
    ];
    for (name, filter, want) in &cases {
        assert_eq!(&matching(&db, filter).await, want, "filter {name}");
    }

    // The command line maps each flag onto the same filter.
    let config = ops_config(&db.url);
    let (r1s, r3s) = (r1.to_string(), r3.to_string());
    let flags: Vec<(Vec<&str>, i64)> = vec![
        (vec!["--all"], 4),
        (vec!["--id", &r1s, "--id", &r3s], 2),
        (vec!["--topic", "orders"], 2),
        (vec!["--topic", "orders", "--topic", "payments"], 4),
        (vec!["--consumer-group", "g2"], 2),
        (vec!["--key", "k1"], 2),
        (vec!["--error-contains", "TimeOut"], 2),
        (vec!["--error-kind", "timeout"], 1),
        (vec!["--dead-since", "4h"], 2),
        (vec!["--dead-before", "4h"], 2),
        (vec!["--dead-since", "40h", "--dead-before", "2h"], 2),
        (
            vec!["--topic", "payments", "--error-contains", "timeout"],
            1,
        ),
        (vec!["--all", "--limit", "3"], 3),
    ];
    for (args, want) in flags {
        let mut all = vec!["replay", "--dry-run"];
        all.extend(&args);
        let out = redrive(&config.0, &all).await.ok();
        assert_eq!(
            dry_run_count(&out.stdout),
            want,
            "replay {args:?}:\n{}",
            out.stdout
        );
        let mut purge = vec!["purge", "--older-than", "0s", "--dry-run"];
        purge.extend(args.iter().filter(|a| **a != "--all"));
        let out = redrive(&config.0, &purge).await.ok();
        assert_eq!(
            dry_run_count(&out.stdout),
            want,
            "purge {args:?}:\n{}",
            out.stdout
        );
    }
}

#[tokio::test]
async fn a_dry_run_changes_nothing() {
    let db = TestDb::new().await;
    for i in 0..5 {
        insert(
            &db,
            Row {
                dead_ago: 40.0 * 86400.0,
                published: i % 2 == 0,
                ..Row::default()
            },
        )
        .await;
    }
    insert(
        &db,
        Row {
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    let before = snapshot(&db).await;
    let config = ops_config(&db.url);
    let out = redrive(&config.0, &["replay", "--all", "--dry-run"])
        .await
        .ok();
    assert_eq!(dry_run_count(&out.stdout), 5);
    assert!(out.stdout.contains("nothing was changed"), "{}", out.stdout);
    let out = redrive(&config.0, &["purge", "--older-than", "30d", "--dry-run"])
        .await
        .ok();
    assert_eq!(dry_run_count(&out.stdout), 3);
    assert!(
        out.stdout.contains("kept 2 matching dead row(s)"),
        "{}",
        out.stdout
    );
    let out = redrive(
        &config.0,
        &[
            "purge",
            "--older-than",
            "0s",
            "--include-unpublished",
            "--dry-run",
        ],
    )
    .await
    .ok();
    assert_eq!(dry_run_count(&out.stdout), 5);
    assert_eq!(snapshot(&db).await, before);
}

#[tokio::test]
async fn hostile_filter_text_only_filters() {
    let db = TestDb::new().await;
    insert(
        &db,
        Row {
            error: "100% broken",
            ..Row::default()
        },
    )
    .await;
    insert(
        &db,
        Row {
            error: "plain failure",
            key: Some(b"k"),
            ..Row::default()
        },
    )
    .await;
    let before = snapshot(&db).await;
    let config = ops_config(&db.url);
    let hostile = [
        "x' OR '1'='1",
        "'; DROP TABLE redrive.retry_messages; --",
        "orders'); DELETE FROM redrive.retry_messages; --",
        "%",
        "_",
        "\\",
        "\"",
        "$1",
    ];
    for text in hostile {
        for flag in ["--topic", "--consumer-group", "--key", "--error-contains"] {
            let out = redrive(&config.0, &["replay", flag, text, "--dry-run"])
                .await
                .ok();
            let want = i64::from(flag == "--error-contains" && text == "%");
            assert_eq!(dry_run_count(&out.stdout), want, "{flag} {text:?}");
            redrive(&config.0, &["replay", flag, text]).await.ok();
            redrive(&config.0, &["purge", "--older-than", "0s", flag, text])
                .await
                .ok();
        }
    }
    // `%` is a character, not a wildcard: it matched the one row that contains it, and that row
    // was replayed and then (not being dead any more) not purged; nothing else changed.
    let after = snapshot(&db).await;
    assert_eq!(after.len(), before.len());
    assert_eq!(db.count("state = 'dead'").await, 1);
    assert_eq!(
        db.count("state = 'pending' AND last_error = '100% broken'")
            .await,
        1
    );
}

#[tokio::test]
async fn replaying_rows_that_are_not_dead_changes_nothing_and_says_so() {
    let db = TestDb::new().await;
    let pending = insert(
        &db,
        Row {
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    let running = insert(
        &db,
        Row {
            state: "running",
            ..Row::default()
        },
    )
    .await;
    let missing = Uuid::now_v7();
    let before = snapshot(&db).await;
    let config = ops_config(&db.url);
    let (p, r, m) = (
        pending.to_string(),
        running.to_string(),
        missing.to_string(),
    );
    let out = redrive(&config.0, &["replay", "--id", &p, "--id", &r, "--id", &m])
        .await
        .ok();
    assert!(out.stdout.contains("replayed 0 row(s)"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("skipped {p}: not dead (state pending)")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("skipped {r}: not dead (state running)")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("skipped {m}: no such row")),
        "{}",
        out.stdout
    );
    assert_eq!(snapshot(&db).await, before);
}

/// state, attempts, max_attempts, due, error_history, replay_count, replayed just now,
/// last_replayed_by, last_replay_reason, dead_at.
type ReplayedRow = (
    String,
    i32,
    i32,
    bool,
    Value,
    i32,
    bool,
    String,
    String,
    Option<chrono::DateTime<chrono::Utc>>,
);

#[tokio::test]
async fn replay_resets_the_budget_keeps_the_history_records_the_audit_and_wakes_workers() {
    let db = TestDb::new().await;
    let id = insert(
        &db,
        Row {
            max_attempts: 4,
            ..Row::default()
        },
    )
    .await;
    sqlx::query("UPDATE redrive.retry_messages SET error_history = error_history || error_history || error_history WHERE id = $1")
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    let history: Value =
        sqlx::query_scalar("SELECT error_history FROM redrive.retry_messages WHERE id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(db.pool())
        .await
        .unwrap();
    listener
        .listen(redrive::dispatcher::PENDING_CHANNEL)
        .await
        .unwrap();
    let config = ops_config(&db.url);
    let out = redrive(
        &config.0,
        &[
            "replay",
            "--id",
            &id.to_string(),
            "--reason",
            "fixed in v1.4.2",
            "--max-attempts",
            "6",
        ],
    )
    .await
    .ok();
    assert!(out.stdout.contains("replayed 1 row(s)"), "{}", out.stdout);
    tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a NOTIFY on redrive_pending wakes the workers")
        .unwrap();
    let row: ReplayedRow = sqlx::query_as(
        "SELECT state, attempts, max_attempts, next_attempt_at <= now(), error_history, replay_count,
                last_replayed_at > now() - interval '1 minute', last_replayed_by, last_replay_reason, dead_at
         FROM redrive.retry_messages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    let os_user = whoami::username().unwrap();
    assert_eq!(
        row,
        (
            "pending".into(),
            0,
            6,
            true,
            history,
            1,
            true,
            os_user,
            "fixed in v1.4.2".into(),
            None
        )
    );
    // It is claimable at once.
    let claimed = db.claim(Duration::from_secs(30)).await;
    assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(claimed[0].attempt, 1);
}

#[tokio::test]
async fn replay_while_run_works_attempts_each_replayed_row_exactly_once_more() {
    let db = TestDb::new().await;
    let stub = Stub::start(|_| (200, vec![])).await;
    let group = unique("g");
    let mut expected = HashMap::new();
    for i in 0..1500 {
        // 1000 rows of work that is going on anyway, 500 dead rows to replay meanwhile.
        let state = if i < 1000 { "pending" } else { "dead" };
        insert(
            &db,
            Row {
                group: &group,
                state,
                ..Row::default()
            },
        )
        .await;
    }
    for payload in sqlx::query_scalar::<_, String>(
        "SELECT convert_from(payload, 'UTF8') FROM redrive.retry_messages",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    {
        expected.insert(payload, 1usize);
    }
    let config = config(&db.url, &["unused"], &group, Some(stub.addr), "");
    let parts = redrive::cli::RunArgs {
        no_consumer: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let (stop, app) = spawn_app(config, parts);
    wait_for("the workers to start", Duration::from_secs(30), || async {
        (stub.count() > 0).then_some(())
    })
    .await;
    // Two replays at once, in small chunks, while the workers run.
    let ops = ops_config(&db.url);
    let args = ["replay", "--consumer-group", &group, "--chunk-size", "50"];
    let (a, b) = tokio::join!(redrive(&ops.0, &args), redrive(&ops.0, &args));
    let replayed = |out: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with("replayed "))
            .unwrap_or_else(|| panic!("{out}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(replayed(&a.ok().stdout) + replayed(&b.ok().stdout), 500);
    wait_for("every row to succeed", Duration::from_secs(120), || async {
        (db.count("true").await == 0).then_some(())
    })
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in stub.all() {
        *seen
            .entry(String::from_utf8(r.body.to_vec()).unwrap())
            .or_default() += 1;
    }
    assert_eq!(seen, expected, "each row attempted exactly once");
}

#[tokio::test]
async fn a_large_replay_runs_in_chunks_can_be_interrupted_and_never_stalls_claims() {
    const ROWS: i64 = 200_000;
    let db = TestDb::new().await;
    // 200,000 dead rows, and a steady supply of due rows for a claiming worker in the same group.
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition", kafka_offset,
            payload, state, attempts, max_attempts, next_attempt_at, last_error, error_kind, dead_at,
            dlq_published_at)
        SELECT gen_random_uuid(), 'g', 'orders', 0, i, convert_to(repeat('x', 200), 'UTF8'),
               CASE WHEN i <= $1 THEN 'dead' ELSE 'pending' END, 3, 3, now() - interval '1 second',
               'HTTP 503', 'retryable', CASE WHEN i <= $1 THEN now() - make_interval(secs => i) END,
               now()
        FROM generate_series(1, $1 + 20000) AS i
        "#,
    )
    .bind(ROWS)
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("ANALYZE redrive.retry_messages")
        .execute(db.pool())
        .await
        .unwrap();
    let config = ops_config(&db.url);

    // Interrupted: SIGINT once some chunks are done. Finished chunks stay replayed, whole.
    let child = tokio::process::Command::new(redrive_bin())
        .args([
            "--config",
            config.0.to_str().unwrap(),
            "replay",
            "--all",
            "--chunk-size",
            "1000",
        ])
        .env("REDRIVE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the first chunks", Duration::from_secs(60), || async {
        (db.count("replay_count = 1").await >= 3000).then_some(())
    })
    .await;
    let pid = child.id().unwrap().to_string();
    tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("replay stops within 30s of SIGINT")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    let done = db.count("replay_count = 1").await;
    assert!(done < ROWS, "interrupted before the end: {done}");
    assert_eq!(done % 1000, 0, "only whole chunks are replayed: {done}");
    assert!(
        stdout.contains(&format!("interrupted: {done} of {ROWS}")),
        "{stdout}"
    );
    assert_eq!(db.count("state = 'dead'").await, ROWS - done);

    // The rest, while a worker keeps claiming from the same group: every claim stays quick.
    let claiming = tokio_util::sync::CancellationToken::new();
    let worker = {
        let (store, stop) = (db.store.clone(), claiming.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.is_cancelled() {
                let started = Instant::now();
                store
                    .claim("g", 100, Duration::from_secs(300), "w")
                    .await
                    .unwrap();
                latencies.push(started.elapsed());
                // A worker's pace: about 50 claims a second.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies
        })
    };
    let out = redrive(&config.0, &["replay", "--all"]).await.ok();
    claiming.cancel();
    let latencies = worker.await.unwrap();
    assert!(
        out.stdout
            .contains(&format!("replayed {} row(s)", ROWS - done)),
        "{}",
        out.stdout
    );
    assert_eq!(db.count("replay_count = 1").await, ROWS);
    assert_eq!(db.count("state = 'dead'").await, 0);
    let worst = latencies.iter().max().copied().unwrap_or_default();
    assert!(
        latencies.len() >= 10,
        "the worker claimed during the replay: {} claims",
        latencies.len()
    );
    assert!(
        worst < Duration::from_secs(5),
        "a claim took {worst:?} during the replay"
    );
}

#[tokio::test]
async fn status_json_reports_the_table() {
    let db = TestDb::new().await;
    let o = Row {
        group: "g1",
        topic: "orders",
        ..Row::default()
    };
    insert(
        &db,
        Row {
            state: "pending",
            due_in: -120.0,
            error: "HTTP 503",
            error_ago: 60.0,
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "pending",
            due_in: -30.0,
            error: "HTTP 503",
            error_ago: 30.0,
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "pending",
            due_in: 3600.0,
            error: "timed out",
            kind: "timeout",
            error_ago: 10.0,
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "running",
            error: "HTTP 503",
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "paused",
            error: "HTTP 503",
            error_ago: 7200.0,
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "dead",
            dead_ago: 600.0,
            published: false,
            error: "HTTP 400",
            kind: "permanent",
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "dead",
            dead_ago: 300.0,
            error: "HTTP 400",
            kind: "permanent",
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "replayed",
            dead_ago: 300.0,
            error: "HTTP 400",
            kind: "permanent",
            error_ago: 7200.0,
            ..o.clone()
        },
    )
    .await;
    insert(
        &db,
        Row {
            group: "g2",
            topic: "payments",
            state: "dead",
            error: "HTTP 503",
            error_ago: 7200.0,
            ..Row::default()
        },
    )
    .await;
    sqlx::query("SELECT redrive.pause('refunds', 'g2', 'INC-7')")
        .execute(db.pool())
        .await
        .unwrap();
    let config = ops_config(&db.url);
    let out = redrive(&config.0, &["status", "--json", "--window", "1h"])
        .await
        .ok();
    let s: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(
        s["topics"],
        json!([
            {"consumer_group": "g1", "topic": "orders", "pending": 3, "running": 1, "paused": 1, "dead": 2, "replayed": 1, "waiting": 0, "estimated": false},
            {"consumer_group": "g2", "topic": "payments", "pending": 0, "running": 0, "paused": 0, "dead": 1, "replayed": 0, "waiting": 0, "estimated": false},
        ])
    );
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let now = at(&s["at"]);
    let g1 = &s["groups"][0];
    assert_eq!(
        (
            g1["consumer_group"].as_str(),
            g1["due"].as_i64(),
            g1["dlq_backlog"].as_i64()
        ),
        (Some("g1"), Some(2), Some(1))
    );
    let late = (now - at(&g1["oldest_due_at"])).num_seconds();
    assert!(
        (115..=125).contains(&late),
        "the oldest due row is 120 s late, not {late}"
    );
    let next = (at(&g1["next_due_at"]) - now).num_seconds();
    assert!(
        (3590..=3600).contains(&next),
        "the next row is due in an hour, not {next}s"
    );
    let unpublished = (now - at(&g1["dlq_oldest_dead_at"])).num_seconds();
    assert!((595..=605).contains(&unpublished), "{unpublished}");
    assert_eq!(s["groups"][1]["dlq_backlog"], json!(0));
    assert_eq!(s["groups"][1]["oldest_due_at"], Value::Null);
    assert_eq!(s["paused_topics"][0]["topic"], json!("refunds"));
    assert_eq!(s["paused_topics"][0]["reason"], json!("INC-7"));
    // Errors of the last hour only: the three "HTTP 503" of the pending and running rows, the
    // two "HTTP 400" of dead rows, one timeout. The two-hour-old ones are outside the window.
    let errors: Vec<(String, i64)> = s["top_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["error"].as_str().unwrap().to_string(),
                e["failures"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            ("HTTP 503".into(), 3),
            ("HTTP 400".into(), 2),
            ("timed out".into(), 1)
        ]
    );
    assert_eq!(s["error_window_seconds"], json!(3600));
    // A table this small is read whole: nothing is estimated.
    assert_eq!(
        (&s["sample"], &s["top_errors_estimated"], &g1["estimated"]),
        (&Value::Null, &json!(false), &json!(false))
    );
    // The table shows the same numbers.
    let text = redrive(&config.0, &["status"]).await.ok().stdout;
    for expected in [
        "orders",
        "payments",
        "refunds",
        "INC-7",
        "HTTP 503",
        "Top errors in the last 1h",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}

/// Runs sql/roles.sql on the test database, as psql would be run by an administrator.
async fn apply_roles(db: &TestDb) {
    // The roles are cluster-wide; two tests creating them at once would race.
    static ONCE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = ONCE.lock().await;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/roles.sql");
    for _ in 0..2 {
        // Twice: the file must be safe to run again.
        let out = tokio::process::Command::new("psql")
            .args([&db.url, "-q", "-v", "ON_ERROR_STOP=1", "-f", path])
            .output()
            .await
            .expect("psql is installed with the server");
        assert!(
            out.status.success(),
            "sql/roles.sql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A login role in `group`, and the database URL that logs in as it.
async fn login_role(db: &TestDb, group: &str) -> (String, String) {
    // `make clean-test-dbs` drops what a failed run leaves behind, by this prefix.
    let name = unique("redrive_test_login").replace('-', "_");
    let password = format!("pw-{}", Uuid::now_v7().simple());
    sqlx::query(&format!(
        "CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE {group}"
    ))
    .execute(db.pool())
    .await
    .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&name).unwrap();
    url.set_password(Some(&password)).unwrap();
    (url.to_string(), password)
}

async fn denied(pool: &sqlx::PgPool, sql: &str) {
    let e = sqlx::query(sql).execute(pool).await.expect_err(sql);
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string());
    assert!(
        matches!(code.as_deref(), Some("42501")),
        "{sql}: expected permission denied, got {e}"
    );
}

#[tokio::test]
async fn each_role_can_do_its_job_and_nothing_more() {
    use redrive::store::capture::{Capture, InitialState};
    use redrive::store::complete::{Completion, Outcome};
    let db = TestDb::new().await;
    apply_roles(&db).await;
    let (worker_url, _) = login_role(&db, "redrive_worker").await;
    let (operator_url, _) = login_role(&db, "redrive_operator").await;
    let (reader_url, reader_password) = login_role(&db, "redrive_readonly").await;
    let pool = |url: String| async move { sqlx::PgPool::connect(&url).await.unwrap() };
    let (worker, operator, reader) = (
        pool(worker_url.clone()).await,
        pool(operator_url.clone()).await,
        pool(reader_url.clone()).await,
    );

    // The worker does all that `redrive run` does.
    let store = redrive::Store::from_pool(worker.clone());
    store.check_schema().await.unwrap();
    let capture = |offset: i64, state| Capture {
        message: redrive::Message {
            topic: "orders".into(),
            partition: 0,
            offset,
            timestamp: None,
            key: None,
            payload: Some(b"{}".to_vec()),
            headers: vec![],
        },
        state,
        max_attempts: 3,
        retry_in: Duration::ZERO,
        error: redrive::HandlerError::retryable("HTTP 503"),
        line: None,
        trace: None,
    };
    let captured = store
        .capture(
            "g",
            &[
                capture(1, InitialState::Pending),
                capture(2, InitialState::Pending),
                capture(3, InitialState::Pending),
                capture(4, InitialState::Dead),
            ],
        )
        .await
        .unwrap();
    assert_eq!(captured, 4);
    let claimed = store
        .claim("g", 10, Duration::from_secs(60), "w")
        .await
        .unwrap()
        .rows;
    assert_eq!(claimed.len(), 3);
    let done = store
        .complete(&[
            Completion {
                id: claimed[0].id,
                attempt: claimed[0].attempt,
                token: claimed[0].token,
                outcome: Outcome::Succeeded,
            },
            Completion {
                id: claimed[1].id,
                attempt: claimed[1].attempt,
                token: claimed[1].token,
                outcome: Outcome::Retry {
                    retry_in: Duration::ZERO,
                    error: redrive::HandlerError::retryable("again"),
                },
            },
            Completion {
                id: claimed[2].id,
                attempt: claimed[2].attempt,
                token: claimed[2].token,
                outcome: Outcome::Dead {
                    error: redrive::HandlerError::permanent("HTTP 400"),
                },
            },
        ])
        .await
        .unwrap();
    assert_eq!((done.deleted, done.rescheduled, done.dead), (1, 1, 1));
    let again = store
        .claim("g", 10, Duration::from_secs(60), "w")
        .await
        .unwrap()
        .rows;
    assert_eq!(
        store
            .release(&[(again[0].id, again[0].token)])
            .await
            .unwrap(),
        1
    );
    // A lease that runs out on the last attempt is taken back by the worker's next claim, and the
    // row is dead.
    let held = store
        .claim("g", 10, Duration::from_secs(60), "w")
        .await
        .unwrap()
        .rows;
    assert_eq!(held.len(), 1);
    sqlx::query("UPDATE redrive.queue SET lease_expires_at = now() - interval '1s'")
        .execute(db.pool())
        .await
        .unwrap();
    let rescue = store.claim("g", 10, Duration::from_secs(60), "w").await;
    assert_eq!(rescue.unwrap().len(), 0);
    assert_eq!(
        db.count("error_kind = 'timeout' AND state = 'dead'").await,
        1
    );
    db.assert_queue_in_step().await;
    let batch = store.outbox_batch("g", 10, 16 << 20).await.unwrap();
    let published: Vec<(Uuid, String)> = batch
        .rows
        .iter()
        .map(|r| (r.id, "orders.dlq".to_string()))
        .collect();
    assert_eq!(published.len(), 3);
    batch.finish(&published, &[]).await.unwrap();
    // It reads the breaker holds and reports its breakers' states.
    let b = redrive::breaker::Breakers::new(&Default::default(), "g");
    let snapshots: Vec<_> = b.all().map(|b| b.snapshot()).collect();
    store.breaker_holds("g").await.unwrap();
    store.breakers_open("g", "w-2").await.unwrap();
    store
        .report_breakers("g", "w-1", true, &snapshots)
        .await
        .unwrap();
    store.forget_breakers("g", "w-1").await.unwrap();
    // It captures in key lines (I12): a message parks behind an earlier one of its key.
    let line = redrive::store::capture::Line::of(b"k", Default::default());
    let in_line = |offset, state| Capture {
        line: Some(line),
        ..capture(offset, state)
    };
    let captured = store
        .capture(
            "lines",
            &[
                in_line(1, InitialState::Pending),
                in_line(2, InitialState::Parked),
            ],
        )
        .await
        .unwrap();
    assert_eq!(captured, 2);
    assert_eq!(
        db.count("consumer_group = 'lines' AND state = 'waiting'")
            .await,
        1
    );
    // ... and nothing an operator does.
    denied(&worker, "SELECT redrive.hold_breaker('open')").await;
    denied(&worker, "DELETE FROM redrive.retry_messages").await;
    // Rows join and leave the queue only with their state in the table.
    denied(&worker, "DELETE FROM redrive.queue").await;
    denied(
        &worker,
        "INSERT INTO redrive.queue (id, consumer_group, attempts, next_attempt_at) \
         VALUES (gen_random_uuid(), 'g', 0, now())",
    )
    .await;
    denied(&worker, "UPDATE redrive.retry_messages SET payload = 'x'").await;
    denied(
        &worker,
        "UPDATE redrive.retry_messages SET replay_count = 9",
    )
    .await;
    denied(
        &worker,
        "SELECT redrive.replay(ARRAY(SELECT id FROM redrive.retry_messages))",
    )
    .await;
    denied(
        &worker,
        "INSERT INTO redrive.paused_topics (topic) VALUES ('orders')",
    )
    .await;
    let worker_config = ops_config(&worker_url);
    let out = redrive(&worker_config.0, &["purge", "--older-than", "0s"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains("not allowed") && out.stderr.contains("redrive_operator"),
        "{}",
        out.stderr
    );
    assert_eq!(
        db.count("state = 'dead'").await,
        3,
        "the worker purged nothing"
    );

    // The read-only role reads, and changes nothing.
    let reader_config = ops_config(&reader_url);
    let status = redrive(&reader_config.0, &["status"]).await.ok();
    assert!(status.stdout.contains("orders"), "{}", status.stdout);
    assert!(
        !status.stdout.contains(&reader_password) && !status.stderr.contains(&reader_password),
        "status printed the password"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM redrive.dead_messages")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(rows, 3);
    // A status of a table too large to count reads its sample beside its own transaction, in that
    // transaction's snapshot: the role may export one and read in it.
    let (tx, in_tx, snapshot) = exporting(&reader).await;
    let mut beside = redrive::Store::from_pool(reader.clone())
        .snapshot_reader(&snapshot)
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM redrive.retry_messages")
        .fetch_one(&mut beside)
        .await
        .unwrap();
    assert_eq!((rows, in_tx), (5, 5));
    tx.commit().await.unwrap();
    for args in [
        &["replay", "--all"][..],
        &["purge", "--older-than", "0s"][..],
    ] {
        let out = redrive(&reader_config.0, args).await;
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stdout);
        assert!(out.stderr.contains("not allowed"), "{}", out.stderr);
        assert!(
            !out.stderr.contains(&reader_password),
            "the error printed the password"
        );
    }
    denied(&reader, "SELECT redrive.pause('orders')").await;
    let out = redrive(&reader_config.0, &["breaker", "open", "--wait", "0s"]).await;
    assert!(out.stderr.contains("not allowed"), "{}", out.stderr);
    redrive(&reader_config.0, &["breaker", "status"]).await.ok();
    denied(
        &reader,
        "UPDATE redrive.retry_messages SET next_attempt_at = now()",
    )
    .await;
    assert_eq!(db.count("state = 'dead'").await, 3);

    // The operator replays, reschedules, pauses and purges, and cannot forge or destroy.
    denied(&operator, "INSERT INTO redrive.retry_messages (id, consumer_group, topic, \"partition\", kafka_offset, state, attempts, max_attempts, next_attempt_at) VALUES (gen_random_uuid(), 'g', 't', 0, 99, 'pending', 0, 1, now())").await;
    denied(&operator, "TRUNCATE redrive.retry_messages").await;
    denied(&operator, "DROP TABLE redrive.retry_messages").await;
    denied(
        &operator,
        "ALTER TABLE redrive.retry_messages ADD COLUMN x int",
    )
    .await;
    denied(&operator, "DELETE FROM redrive.refinery_schema_history").await;
    sqlx::query("SELECT redrive.pause('orders')")
        .execute(&operator)
        .await
        .unwrap();
    sqlx::query("SELECT redrive.resume('orders')")
        .execute(&operator)
        .await
        .unwrap();
    let operator_config = ops_config(&operator_url);
    let out = redrive(&operator_config.0, &["breaker", "open", "--wait", "0s"])
        .await
        .ok();
    assert!(out.stdout.contains("held open"), "{}", out.stdout);
    let out = redrive(&operator_config.0, &["breaker", "release", "--wait", "0s"])
        .await
        .ok();
    assert!(out.stdout.contains("lifted 1 hold(s)"), "{}", out.stdout);
    let one: Uuid = sqlx::query_scalar("SELECT id FROM redrive.dead_messages LIMIT 1")
        .fetch_one(&operator)
        .await
        .unwrap();
    let out = redrive(&operator_config.0, &["replay", "--id", &one.to_string()])
        .await
        .ok();
    assert!(out.stdout.contains("replayed 1 row(s)"), "{}", out.stdout);
    let out = redrive(&operator_config.0, &["purge", "--older-than", "0s"])
        .await
        .ok();
    assert!(out.stdout.contains("deleted 2 row(s)"), "{}", out.stdout);
    assert_eq!(db.count("state = 'dead'").await, 0);
    db.assert_queue_in_step().await;
    for p in [worker, operator, reader] {
        p.close().await;
    }
}

#[tokio::test]
async fn paused_and_rescheduled_rows_are_honoured_by_running_workers() {
    let db = TestDb::new().await;
    let stub = Stub::start(|_| (200, vec![])).await;
    let group = unique("g");
    let later = insert(
        &db,
        Row {
            group: &group,
            state: "pending",
            due_in: 3600.0,
            ..Row::default()
        },
    )
    .await;
    let config = config(&db.url, &["unused"], &group, Some(stub.addr), "");
    let parts = redrive::cli::RunArgs {
        no_consumer: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let (stop, app) = spawn_app(config, parts);
    let attempted = |offset_payload: String| {
        let stub = stub.clone();
        move || {
            let stub = stub.clone();
            let p = offset_payload.clone();
            async move {
                stub.all()
                    .iter()
                    .any(|r| r.body == p.as_bytes())
                    .then_some(())
            }
        }
    };
    let payload_of = |id: Uuid| {
        let pool = db.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT convert_from(payload, 'UTF8') FROM redrive.retry_messages WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // Rescheduled to now by SQL: attempted at once (the workers' fallback wake-up is an hour).
    let p = payload_of(later).await;
    sqlx::query("UPDATE redrive.retry_messages SET next_attempt_at = now() WHERE id = $1")
        .bind(later)
        .execute(db.pool())
        .await
        .unwrap();
    wait_for("the rescheduled row", Duration::from_secs(10), attempted(p)).await;

    // A paused topic's new rows wait; other topics' rows go on.
    sqlx::query("SELECT redrive.pause('orders')")
        .execute(db.pool())
        .await
        .unwrap();
    let held = insert(
        &db,
        Row {
            group: &group,
            state: "pending",
            due_in: -10.0,
            ..Row::default()
        },
    )
    .await;
    // Not due when it is inserted, so its payload can be read before a worker takes and deletes
    // it; then due now, after the paused row.
    let other = insert(
        &db,
        Row {
            group: &group,
            topic: "payments",
            state: "pending",
            due_in: 3600.0,
            ..Row::default()
        },
    )
    .await;
    assert_eq!(state_of(&db, held).await.as_deref(), Some("paused"));
    let (held_payload, other_payload) = (payload_of(held).await, payload_of(other).await);
    sqlx::query("UPDATE redrive.retry_messages SET next_attempt_at = now() WHERE id = $1")
        .bind(other)
        .execute(db.pool())
        .await
        .unwrap();
    wait_for(
        "the other topic's row",
        Duration::from_secs(10),
        attempted(other_payload),
    )
    .await;
    assert!(
        !stub.all().iter().any(|r| r.body == held_payload.as_bytes()),
        "a paused row was attempted, though it was due before the row that was"
    );
    let resumed: i64 = sqlx::query_scalar("SELECT redrive.resume('orders')")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(resumed, 1);
    wait_for(
        "the resumed row",
        Duration::from_secs(10),
        attempted(held_payload),
    )
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// The code block that follows `<!-- recipe: NAME -->` in docs/operators.md.
pub fn recipe(name: &str) -> String {
    let doc = include_str!("../../docs/operators.md");
    let marker = format!("<!-- recipe: {name} -->");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("no recipe {name}"));
    let rest = &doc[start + marker.len()..];
    let open = rest.find("```").unwrap();
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_string()
}

/// Runs a shell recipe with `redrive` on the PATH and the test database configured.
async fn run_recipe(name: &str, config: &Path) -> String {
    let bin_dir = Path::new(redrive_bin()).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &recipe(name)])
        .env("PATH", path)
        .env("REDRIVE_CONFIG", config)
        .env("REDRIVE_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "recipe {name} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn every_recipe_in_the_operators_guide_works() {
    let db = TestDb::new().await;
    let config = ops_config(&db.url);
    let day = 86400.0;

    // What is failing now: the rows still being retried, by error.
    insert(
        &db,
        Row {
            state: "pending",
            error: "HTTP 503",
            ..Row::default()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "running",
            error: "HTTP 503",
            ..Row::default()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "pending",
            error: "connection refused",
            ..Row::default()
        },
    )
    .await;
    insert(
        &db,
        Row {
            state: "dead",
            error: "HTTP 400",
            ..Row::default()
        },
    )
    .await;
    let rows: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(&recipe("failing-now"))
        .fetch_all(db.pool())
        .await
        .unwrap()
        .into_iter()
        .map(
            |(g, t, e, n, _since): (
                String,
                String,
                Option<String>,
                i64,
                chrono::DateTime<chrono::Utc>,
            )| (g, t, e, n),
        )
        .collect();
    assert_eq!(
        rows,
        vec![
            ("g".into(), "orders".into(), Some("HTTP 503".into()), 2),
            (
                "g".into(),
                "orders".into(),
                Some("connection refused".into()),
                1
            ),
        ]
    );
    let status = run_recipe("status", &config.0).await;
    assert!(
        status.contains("orders") && status.contains("HTTP 503"),
        "{status}"
    );

    // Top errors in the last hour.
    insert(
        &db,
        Row {
            state: "dead",
            error: "old",
            error_ago: 7200.0,
            ..Row::default()
        },
    )
    .await;
    let top: Vec<(String, String, i64, i64)> = sqlx::query_as(&recipe("top-errors"))
        .fetch_all(db.pool())
        .await
        .unwrap();
    let top: Vec<(String, i64)> = top.into_iter().map(|(e, _, n, _)| (e, n)).collect();
    assert_eq!(top[0], ("HTTP 503".into(), 2));
    assert!(top.iter().all(|(e, _)| e != "old"), "{top:?}");
    assert_eq!(top.len(), 3);
    sqlx::query("DELETE FROM redrive.retry_messages")
        .execute(db.pool())
        .await
        .unwrap();

    // Replay every timeout from yesterday: by the command, then by SQL.
    let yesterday_noon: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '12 hours'))::float8",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    for round in ["replay-timeouts", "replay-timeouts-sql"] {
        let hit = insert(
            &db,
            Row {
                kind: "timeout",
                dead_ago: yesterday_noon,
                ..Row::default()
            },
        )
        .await;
        let not_timeout = insert(
            &db,
            Row {
                kind: "retryable",
                dead_ago: yesterday_noon,
                ..Row::default()
            },
        )
        .await;
        let day_before = insert(
            &db,
            Row {
                kind: "timeout",
                dead_ago: yesterday_noon + day,
                ..Row::default()
            },
        )
        .await;
        if round == "replay-timeouts" {
            let out = run_recipe(round, &config.0).await;
            assert!(out.contains("replayed 1 row(s)"), "{out}");
        } else {
            let n: i64 = sqlx::query_scalar(&recipe(round))
                .fetch_one(db.pool())
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
        assert_eq!(
            state_of(&db, hit).await.as_deref(),
            Some("pending"),
            "{round}"
        );
        assert_eq!(
            state_of(&db, not_timeout).await.as_deref(),
            Some("dead"),
            "{round}"
        );
        assert_eq!(
            state_of(&db, day_before).await.as_deref(),
            Some("dead"),
            "{round}"
        );
        let reason: String = sqlx::query_scalar(
            "SELECT last_replay_reason FROM redrive.retry_messages WHERE id = $1",
        )
        .bind(hit)
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert!(reason.contains("timeouts of"), "{reason}");
        sqlx::query("DELETE FROM redrive.retry_messages")
            .execute(db.pool())
            .await
            .unwrap();
    }

    // Pause one topic's retries, then resume it.
    let orders = insert(
        &db,
        Row {
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    let payments = insert(
        &db,
        Row {
            topic: "payments",
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    let running = insert(
        &db,
        Row {
            state: "running",
            ..Row::default()
        },
    )
    .await;
    let token = uuid::Uuid::now_v7();
    sqlx::query("UPDATE redrive.queue SET claim_token = $1 WHERE id = $2")
        .bind(token)
        .bind(running)
        .execute(db.pool())
        .await
        .unwrap();
    let paused: i64 = sqlx::query_scalar(&recipe("pause-topic"))
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(paused, 1);
    assert_eq!(state_of(&db, orders).await.as_deref(), Some("paused"));
    assert_eq!(state_of(&db, payments).await.as_deref(), Some("pending"));
    // Rows that arrive or fail again meanwhile are held too.
    let arrived = insert(
        &db,
        Row {
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    assert_eq!(state_of(&db, arrived).await.as_deref(), Some("paused"));
    // A row being attempted when the pause starts finishes its attempt, and is held after.
    assert_eq!(state_of(&db, running).await.as_deref(), Some("running"));
    let retry = redrive::store::complete::Outcome::Retry {
        retry_in: Duration::ZERO,
        error: redrive::HandlerError::retryable("HTTP 503"),
    };
    let done = db
        .store
        .complete(&[redrive::store::complete::Completion {
            id: running,
            attempt: 1,
            token,
            outcome: retry,
        }])
        .await
        .unwrap();
    assert_eq!(done.rescheduled, 1);
    assert_eq!(state_of(&db, running).await.as_deref(), Some("paused"));
    let claimed = db.claim(Duration::from_secs(30)).await;
    assert_eq!(
        claimed.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![payments]
    );
    let resumed: i64 = sqlx::query_scalar(&recipe("resume-topic"))
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(resumed, 3);
    assert_eq!(db.count("state = 'paused'").await, 0);
    let claimed: BTreeSet<Uuid> = db
        .claim(Duration::from_secs(30))
        .await
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(claimed, [orders, arrived, running].into_iter().collect());
    sqlx::query("DELETE FROM redrive.retry_messages")
        .execute(db.pool())
        .await
        .unwrap();

    // Retry a topic later.
    let due = insert(
        &db,
        Row {
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    sqlx::query(&recipe("reschedule"))
        .execute(db.pool())
        .await
        .unwrap();
    assert!(db.claim(Duration::from_secs(30)).await.is_empty());
    assert_eq!(
        db.count(&format!(
            "id = '{due}' AND next_attempt_at > now() + interval '119 minutes'"
        ))
        .await,
        1
    );
    sqlx::query("DELETE FROM redrive.retry_messages")
        .execute(db.pool())
        .await
        .unwrap();

    // Raise max attempts for one key: retrying rows by SQL, dead rows by replay.
    let mine = insert(
        &db,
        Row {
            state: "pending",
            key: Some(b"customer-42"),
            ..Row::default()
        },
    )
    .await;
    let other = insert(
        &db,
        Row {
            state: "pending",
            key: Some(b"customer-7"),
            ..Row::default()
        },
    )
    .await;
    let dead = insert(
        &db,
        Row {
            state: "dead",
            key: Some(b"customer-42"),
            ..Row::default()
        },
    )
    .await;
    sqlx::query(&recipe("raise-max-attempts"))
        .execute(db.pool())
        .await
        .unwrap();
    let budget = |id: Uuid| {
        let pool = db.pool().clone();
        async move {
            sqlx::query_scalar::<_, i32>(
                "SELECT max_attempts FROM redrive.retry_messages WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        (budget(mine).await, budget(other).await, budget(dead).await),
        (20, 3, 3)
    );
    let out = run_recipe("raise-max-attempts-dead", &config.0).await;
    assert!(out.contains("replayed 1 row(s)"), "{out}");
    assert_eq!(
        (budget(dead).await, state_of(&db, dead).await.as_deref()),
        (20, Some("pending"))
    );
    sqlx::query("DELETE FROM redrive.retry_messages")
        .execute(db.pool())
        .await
        .unwrap();

    // Purge last month.
    let old = insert(
        &db,
        Row {
            dead_ago: 40.0 * day,
            ..Row::default()
        },
    )
    .await;
    let old_replayed = insert(
        &db,
        Row {
            state: "replayed",
            dead_ago: 45.0 * day,
            ..Row::default()
        },
    )
    .await;
    let old_unpublished = insert(
        &db,
        Row {
            dead_ago: 40.0 * day,
            published: false,
            ..Row::default()
        },
    )
    .await;
    let recent = insert(
        &db,
        Row {
            dead_ago: 10.0 * day,
            ..Row::default()
        },
    )
    .await;
    let pending = insert(
        &db,
        Row {
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    let out = run_recipe("purge", &config.0).await;
    assert!(out.contains("deleted 2 row(s)"), "{out}");
    assert!(out.contains("kept 1 matching dead row(s)"), "{out}");
    for (id, kept) in [
        (old, false),
        (old_replayed, false),
        (old_unpublished, true),
        (recent, true),
        (pending, true),
    ] {
        assert_eq!(state_of(&db, id).await.is_some(), kept, "{id}");
    }
}

#[tokio::test]
async fn operator_commands_explain_bad_input() {
    let db = TestDb::new().await;
    insert(&db, Row::default()).await;
    let config = ops_config(&db.url);
    let out = redrive(&config.0, &["replay"]).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("replay needs a filter") && out.stderr.contains("--all"),
        "{}",
        out.stderr
    );
    let out = redrive(&config.0, &["purge", "--topic", "orders"]).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("purge needs --older-than"),
        "{}",
        out.stderr
    );
    let out = redrive(&config.0, &["replay", "--dead-since", "last tuesday"]).await;
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("--dead-since") && out.stderr.contains("neither a duration"),
        "{}",
        out.stderr
    );
    let out = redrive(&config.0, &["replay", "--id", "not-a-uuid"]).await;
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("--id"), "{}", out.stderr);
    let empty = TestDb::empty().await;
    let config = ops_config(&empty.url);
    let out = redrive(&config.0, &["status"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("redrive migrate"), "{}", out.stderr);
    let unreachable = ops_config("postgres://redrive:hunter2@127.0.0.1:1/redrive");
    let out = redrive(&unreachable.0, &["status"]).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("127.0.0.1:1") && !out.stderr.contains("hunter2"),
        "{}",
        out.stderr
    );
    assert_eq!(db.count("state = 'dead'").await, 1);
}

/// A configuration file with `[kafka]` too, for `replay --to-topic`.
fn kafka_config(url: &str, bootstrap: &str, timeout: &str) -> tempfile_path::TempPath {
    write_config(&format!(
        "[postgres]\nurl = \"{url}\"\n\n[kafka]\ntopics = [\"unused\"]\n\"bootstrap.servers\" = \"{bootstrap}\"\n\"group.id\" = \"g\"\n\n[dlq]\npublish_timeout = \"{timeout}\"\n"
    ))
}

#[tokio::test]
async fn replay_to_topic_produces_the_original_records_and_marks_the_rows() {
    use rdkafka::message::{Headers, Message as _};
    let db = TestDb::new().await;
    let (source, other) = (unique("orders"), unique("orders-v2"));
    create_topic(&source, 1).await;
    create_topic(&other, 1).await;
    let key: &[u8] = &[0xff, 0x00, b'k'];
    let a = insert(
        &db,
        Row {
            topic: &source,
            key: Some(key),
            ..Row::default()
        },
    )
    .await;
    let b = insert(
        &db,
        Row {
            topic: &source,
            key: None,
            ..Row::default()
        },
    )
    .await;
    let not_dead = insert(
        &db,
        Row {
            topic: &source,
            state: "pending",
            ..Row::default()
        },
    )
    .await;
    // Headers as the consumer stores them: in order, binary values and NULL kept.
    sqlx::query(r#"UPDATE redrive.retry_messages SET headers = '[{"key": "trace", "value": "/wA="}, {"key": "empty", "value": null}]' WHERE id = $1"#)
        .bind(a)
        .execute(db.pool())
        .await
        .unwrap();

    // Kafka unreachable: an error that says so, and every row still dead.
    let down = kafka_config(&db.url, "127.0.0.1:1", "2s");
    let out = redrive(&down.0, &["replay", "--topic", &source, "--to-topic"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(out.stderr.contains("replay"), "{}", out.stderr);
    assert_eq!(db.count("state = 'dead'").await, 2);

    // To the original topic.
    let up = kafka_config(&db.url, &kafka(), "30s");
    let a_s = a.to_string();
    let out = redrive(
        &up.0,
        &["replay", "--id", &a_s, "--to-topic", "--reason", "INC-9"],
    )
    .await
    .ok();
    assert!(
        out.stdout
            .contains("replayed 1 row(s), produced back to Kafka"),
        "{}",
        out.stdout
    );
    let got = read_topic(&kafka(), &source, 1, Duration::from_secs(30)).await;
    let r = &got[0];
    assert_eq!(r.key(), Some(key));
    let payload: String = sqlx::query_scalar(
        "SELECT convert_from(payload, 'UTF8') FROM redrive.retry_messages WHERE id = $1",
    )
    .bind(a)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(r.payload(), Some(payload.as_bytes()));
    let headers: Vec<(String, Option<Vec<u8>>)> = r
        .headers()
        .unwrap()
        .iter()
        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(
        headers,
        vec![
            ("trace".into(), Some(vec![0xff, 0x00])),
            ("empty".into(), None),
            (
                redrive::ops::replay::REPLAY_OF_HEADER.into(),
                Some(a_s.clone().into_bytes())
            ),
        ]
    );
    let row: (String, Option<String>, i32, Option<String>) = sqlx::query_as(
        "SELECT state, replayed_to_topic, replay_count, last_replay_reason FROM redrive.retry_messages WHERE id = $1",
    )
    .bind(a)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "replayed".into(),
            Some(source.clone()),
            1,
            Some("INC-9".into())
        )
    );

    // To a named topic; the pending row is not touched. A record without a traceparent of its
    // own gets the trace context its row keeps (schema V15).
    let (parent, state) = (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "k=v",
    );
    sqlx::query("UPDATE redrive.retry_messages SET trace_context = $2 WHERE id = $1")
        .bind(b)
        .bind(format!("{parent}\n{state}"))
        .execute(db.pool())
        .await
        .unwrap();
    let out = redrive(&up.0, &["replay", "--topic", &source, "--to-topic", &other])
        .await
        .ok();
    assert!(out.stdout.contains("replayed 1 row(s)"), "{}", out.stdout);
    let got = read_topic(&kafka(), &other, 1, Duration::from_secs(30)).await;
    assert_eq!(got[0].key(), None);
    let header = |name: &str| {
        got[0]
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value.map(<[u8]>::to_vec))
    };
    assert_eq!(header("traceparent"), Some(parent.as_bytes().to_vec()));
    assert_eq!(header("tracestate"), Some(state.as_bytes().to_vec()));
    assert_eq!(
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT replayed_to_topic FROM redrive.retry_messages WHERE id = $1"
        )
        .bind(b)
        .fetch_one(db.pool())
        .await
        .unwrap(),
        Some(other.clone())
    );
    assert_eq!(state_of(&db, not_dead).await.as_deref(), Some("pending"));

    // A topic that does not exist: refused before anything is produced.
    let c = insert(
        &db,
        Row {
            topic: &source,
            ..Row::default()
        },
    )
    .await;
    let out = redrive(
        &up.0,
        &[
            "replay",
            "--id",
            &c.to_string(),
            "--to-topic",
            &unique("missing"),
        ],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
    assert_eq!(state_of(&db, c).await.as_deref(), Some("dead"));
}

/// A status whose sample cannot be read on a connection of its own (here the role may hold one
/// connection only) reads it in its own transaction, the same pages, and answers the same.
#[tokio::test]
async fn a_status_that_cannot_read_its_sample_beside_reads_it_itself() {
    use redrive::store::status::Limits;
    let db = TestDb::new().await;
    apply_roles(&db).await;
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, dead_at)
        SELECT gen_random_uuid(), 'g', 'big', 0, i, convert_to(repeat('x', 1024), 'UTF8'),
               CASE WHEN i % 3 = 0 THEN 'pending' ELSE 'dead' END, 1, 5, now(), 'boom',
               'retryable', CASE WHEN i % 3 <> 0 THEN now() END
        FROM generate_series(1, 2000) AS i
        "#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    let pages = table_pages(db.pool()).await;
    let limits = Limits {
        pair_rows: 100,
        pair_budget: 100,
        index_rows: 100,
        error_rows: 100,
        sample_pages: pages / 2,
        key_lines: 10,
    };
    let (url, _) = login_role(&db, "redrive_readonly").await;
    let role = url::Url::parse(&url).unwrap().username().to_string();
    sqlx::query(&format!("ALTER ROLE {role} CONNECTION LIMIT 1"))
        .execute(db.pool())
        .await
        .unwrap();
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let window = Duration::from_secs(3600);
    let alone = redrive::Store::from_pool(one)
        .status(window, 10, limits)
        .await
        .unwrap();
    let beside = db.store.status(window, 10, limits).await.unwrap();
    assert!(
        alone.sample.is_some() && alone.topics[0].estimated,
        "{alone:?}"
    );
    assert_eq!(
        (&alone.topics, &alone.groups, &alone.sample),
        (&beside.topics, &beside.groups, &beside.sample)
    );
}

/// The ids `redrive.find` matches in `states`, oldest death first, as replay and purge took them
/// before schema V25: the reference `redrive.find_oldest` must agree with.
async fn oldest_by_find(
    db: &TestDb,
    states: &[&str],
    filter: &Filter,
    with_unpublished: bool,
    limit: i64,
) -> Vec<Uuid> {
    let none = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    sqlx::query_scalar(
        "SELECT f.id FROM redrive.find($1, $2, $3, $4, $5, $6, $11, $7, $8) f \
         WHERE $9 OR f.state <> 'dead' OR f.dlq_published_at IS NOT NULL \
         ORDER BY f.dead_at, f.id LIMIT $10",
    )
    .bind(states)
    .bind((!filter.ids.is_empty()).then(|| filter.ids.clone()))
    .bind(none(&filter.topics))
    .bind(none(&filter.consumer_groups))
    .bind(&filter.key)
    .bind(&filter.error_contains)
    .bind(filter.dead_since)
    .bind(filter.dead_before)
    .bind(with_unpublished)
    .bind(limit)
    .bind(none(&filter.error_kinds))
    .fetch_all(db.pool())
    .await
    .unwrap()
}

/// Asserts that `sample_matching` (`redrive.find_oldest`) returns the same rows in the same order
/// as the plain query over `redrive.find`, for each of `filters`, both scopes, with and without the
/// unacknowledged rows, and limits that cut and that do not.
async fn same_rows_as_find(db: &TestDb, filters: &[Filter]) {
    for filter in filters {
        for (scope, states) in [
            (Scope::Dead, &["dead"][..]),
            (Scope::Finished, &["dead", "replayed"][..]),
        ] {
            for with_unpublished in [true, false] {
                for limit in [10, 1000, 40_000] {
                    let got: Vec<Uuid> = db
                        .store
                        .sample_matching(scope, filter, with_unpublished, limit)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|s| s.id)
                        .collect();
                    let want = oldest_by_find(db, states, filter, with_unpublished, limit).await;
                    assert!(!want.is_empty(), "{filter:?} matches rows");
                    assert_eq!(
                        got, want,
                        "{filter:?} in {states:?}, unpublished {with_unpublished}, limit {limit}"
                    );
                }
            }
        }
    }
}

/// What `work` returns, once it is known to have read fewer than `most` rows of the message table
/// (`what` names it in the failure).
async fn reads_fewer_than<T>(
    most: i64,
    what: &str,
    db: &TestDb,
    flushed: &sqlx::PgPool,
    work: impl std::future::Future<Output = T>,
) -> T {
    let (done, read) = read_by(db, flushed, work).await;
    assert!(read.1 < most, "{what} read {} rows", read.1);
    done
}

/// Through `store` (on `pool`'s one connection): a dry run's count of `filter`'s dead rows, read in
/// fewer than `count_most` rows; its sample of 10, in fewer than 100; and a replay chunk of 20, in
/// fewer than 200. `what` names the filter in the failures. Returns the count's eligible rows.
async fn count_sample_and_replay(
    db: &TestDb,
    pool: &sqlx::PgPool,
    store: &redrive::store::Store,
    filter: &Filter,
    what: &str,
    count_most: i64,
) -> i64 {
    let matched = reads_fewer_than(
        count_most,
        &format!("a dry run's count of {what}"),
        db,
        pool,
        store.count_matching(Scope::Dead, filter, true),
    )
    .await;
    let sample = reads_fewer_than(
        100,
        &format!("a dry run's sample of 10 rows of {what}"),
        db,
        pool,
        store.sample_matching(Scope::Dead, filter, true, 10),
    )
    .await;
    assert_eq!(sample.unwrap().len(), 10);
    let audit = redrive::store::replay::Audit {
        by: "test".into(),
        reason: None,
    };
    let chunk = reads_fewer_than(
        200,
        &format!("a replay chunk of 20 rows of {what}"),
        db,
        pool,
        store.replay_chunk(filter, 20, &audit, None),
    )
    .await;
    assert_eq!(chunk.unwrap().changed, 20);
    matched.unwrap().eligible
}

/// What `work` returns, the indexes (or `sequential`) it read the message table through, and the
/// entries and rows it read, once `flushed`'s backend has reported them.
async fn read_through<T>(
    db: &TestDb,
    flushed: &sqlx::PgPool,
    work: impl std::future::Future<Output = T>,
) -> (T, BTreeSet<String>, i64) {
    let before = index_reads(db, flushed).await;
    let done = work.await;
    let after = index_reads(db, flushed).await;
    let used = after
        .iter()
        .filter(|(k, v)| v.0 > before[*k].0)
        .map(|(k, _)| k.clone())
        .collect();
    let read = after.iter().map(|(k, v)| v.1 - before[k].1).sum();
    (done, used, read)
}

#[tokio::test]
async fn a_chunk_of_the_newest_deaths_reads_its_topics_rows_not_every_older_one() {
    // 30,000 rows that died days ago, of topic `old` in group `g-old`, and then 1,500 that died in
    // the last half hour, of topic `recent`, half in a group of their own. Some of the recent ones
    // are replayed, some not yet acknowledged by the DLQ broker. Vacuumed and analyzed, as
    // autovacuum keeps a table in service. A replay or purge of the recent topic or of the new
    // group reads them through that filter's index in death order; walking every death from the
    // oldest (the plan `ORDER BY dead_at LIMIT n` may take) would read the 30,000 old ones first.
    let db = TestDb::new().await;
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, dead_at, dlq_published_at)
        SELECT gen_random_uuid(), 'g-old', 'old', 0, i, '\x00'::bytea, 'dead', 3, 3, now(), 'old error',
               'retryable', t, t
        FROM generate_series(1, 30000) AS i,
             LATERAL (SELECT now() - interval '2 days' - i * interval '1 minute' AS t) AS x
        UNION ALL
        SELECT gen_random_uuid(), CASE WHEN i % 2 = 0 THEN 'g-new' ELSE 'g-old' END, 'recent', 1,
               i, '\x00'::bytea, CASE WHEN i % 11 = 0 THEN 'replayed' ELSE 'dead' END, 3, 3, now(),
               'new error', 'retryable', t, CASE WHEN i % 7 <> 0 THEN t END
        FROM generate_series(1, 1500) AS i,
             LATERAL (SELECT now() - i * interval '1 second' AS t) AS x
        "#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    vacuum_until_all_visible(&db).await;

    // What a dry run's sample and each command's chunk read of the table. This comes first: a
    // backend reports what it read when it goes idle, but not more often than once a second, so
    // the reads of the plain query below, on other connections, could be counted with whatever
    // runs after them.
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (pool, store) = on_one_connection(&db).await;
    let recent = Filter {
        topics: strings(&["recent"]),
        ..Filter::default()
    };
    let new_group = Filter {
        consumer_groups: strings(&["g-new"]),
        ..Filter::default()
    };
    let audit = redrive::store::replay::Audit {
        by: "test".into(),
        reason: None,
    };
    let sample = reads_fewer_than(
        100,
        "a dry run's sample of 10 rows of the recent topic",
        &db,
        &pool,
        store.sample_matching(Scope::Dead, &recent, true, 10),
    )
    .await;
    assert_eq!(sample.unwrap().len(), 10);
    let chunk = reads_fewer_than(
        1_000,
        "a replay chunk of 100 rows of the recent topic",
        &db,
        &pool,
        store.replay_chunk(&recent, 100, &audit, None),
    )
    .await;
    assert_eq!(chunk.unwrap().changed, 100);
    let chunk = reads_fewer_than(
        1_000,
        "a purge chunk of 100 rows of the new group",
        &db,
        &pool,
        store.purge_chunk(&new_group, false, 100),
    )
    .await;
    assert_eq!(chunk.unwrap().changed, 100);

    // Called from SQL on a session that plans it once for any arguments (as psql may after five
    // calls), it still reads through the topic's or the group's index: it may read their rows
    // whole and sort them, but it neither walks the older deaths nor reads another index whole.
    let generic = generic_plans(&db).await;
    // A group's rows may also come through the source key, whose first column is the group; a
    // topic's may not, since that index would be read whole to find them.
    for (filter, name, indexes, sql) in [
        (
            "topic",
            "recent",
            &["retry_messages_finished_topic"][..],
            "SELECT count(*) FROM redrive.find_oldest(topics => $1, lim => 10)",
        ),
        (
            "group",
            "g-new",
            &["retry_messages_finished_group", "retry_messages_source_key"][..],
            "SELECT count(*) FROM redrive.find_oldest(consumer_groups => $1, lim => 10)",
        ),
    ] {
        let query = sqlx::query_scalar::<_, i64>(sql)
            .bind(vec![name])
            .fetch_one(&generic);
        let (n, used, read) = read_through(&db, &generic, query).await;
        assert_eq!(n.unwrap(), 10);
        assert!(
            used.len() == 1 && indexes.contains(&used.first().unwrap().as_str()),
            "10 rows of the {filter} {name}, planned generically, were read through {used:?}"
        );
        assert!(
            read < 2_000,
            "10 rows of the {filter} {name}, planned generically, read {read} index entries"
        );
    }

    // The same rows in the same order as the plain query, for every kind of filter, both scopes,
    // with and without the unacknowledged rows, and limits that cut and that do not (on the table
    // as the chunks above left it).
    let some_ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM redrive.retry_messages WHERE kafka_offset % 500 = 3")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let filters = [
        Filter::default(),
        Filter {
            topics: strings(&["recent"]),
            ..Filter::default()
        },
        Filter {
            topics: strings(&["recent", "old", "recent"]),
            ..Filter::default()
        },
        Filter {
            consumer_groups: strings(&["g-new"]),
            ..Filter::default()
        },
        Filter {
            consumer_groups: strings(&["g-new", "g-old"]),
            ..Filter::default()
        },
        Filter {
            topics: strings(&["recent"]),
            consumer_groups: strings(&["g-old"]),
            ..Filter::default()
        },
        Filter {
            topics: strings(&["recent"]),
            dead_since: Some(chrono::Utc::now() - chrono::Duration::minutes(10)),
            ..Filter::default()
        },
        Filter {
            ids: some_ids,
            ..Filter::default()
        },
        Filter {
            error_contains: Some("NEW".into()),
            ..Filter::default()
        },
    ];
    same_rows_as_find(&db, &filters).await;
}

#[tokio::test]
async fn a_keys_deaths_are_read_through_their_own_index_whatever_the_keys_size() {
    // 30,000 rows that died days ago, each with a key of its own, and 2,000 without a key. Then
    // the deaths of one customer's key in the last hour, across two groups, some replayed, some
    // not yet acknowledged by the DLQ broker, with rows of that key still pending; and two keys of
    // 301 bytes whose first 256 are the same. Vacuumed and analyzed, as autovacuum keeps a table in
    // service. Since V26 a replay, purge or dry run of one key reads that key's rows through
    // `retry_messages_finished_key` instead of walking every death from the oldest.
    let db = TestDb::new().await;
    let long = |last: char| format!("{}{last}", "L".repeat(300));
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, key, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, dead_at, dlq_published_at)
        SELECT gen_random_uuid(), 'g-old', 'old', 0, i,
               CASE WHEN i <= 30000 THEN convert_to('old-' || i, 'UTF8') END, '\x00'::bytea,
               'dead', 3, 3, now(), 'old error', 'retryable', t, t
        FROM generate_series(1, 32000) AS i,
             LATERAL (SELECT now() - interval '2 days' - i * interval '1 minute' AS t) AS x
        UNION ALL
        SELECT gen_random_uuid(), CASE WHEN i % 2 = 0 THEN 'g-a' ELSE 'g-b' END, 'orders', 1, i,
               convert_to(k, 'UTF8'), '\x00'::bytea,
               CASE WHEN i > 60 THEN 'pending' WHEN i % 11 = 0 THEN 'replayed' ELSE 'dead' END,
               3, 3, now(), 'new error', 'retryable', CASE WHEN i <= 60 THEN t END,
               CASE WHEN i <= 60 AND i % 7 <> 0 THEN t END
        FROM generate_series(1, 65) AS i,
             LATERAL (SELECT now() - i * interval '1 minute' AS t, 'customer-42' AS k) AS x
        UNION ALL
        SELECT gen_random_uuid(), 'g-a', 'orders', 2, i, convert_to(k, 'UTF8'), '\x00'::bytea,
               'dead', 3, 3, now(), 'new error', 'retryable', now() - i * interval '1 second',
               now()
        FROM generate_series(1, 10) AS i,
             LATERAL (SELECT repeat('L', 300) || CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END AS k) x
        "#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    vacuum_until_all_visible(&db).await;

    // What each command reads of the table, first (see the test above for why).
    let (pool, store) = on_one_connection(&db).await;
    let key = |k: &str| Filter {
        key: Some(k.into()),
        ..Filter::default()
    };
    let customer = key("customer-42");
    let eligible = count_sample_and_replay(&db, &pool, &store, &customer, "one key", 200).await;
    assert_eq!(eligible, 55, "the key's dead rows");
    let chunk = reads_fewer_than(
        200,
        "a purge chunk of one long key",
        &db,
        &pool,
        store.purge_chunk(&key(&long('a')), true, 100),
    )
    .await;
    assert_eq!(
        chunk.unwrap().changed,
        5,
        "the long key's rows, not its neighbour's"
    );

    // Planned once for any arguments, it still reads the key's rows through their index alone.
    let generic = generic_plans(&db).await;
    let query = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM redrive.find_oldest(key => $1, lim => 10)",
    )
    .bind("customer-42")
    .fetch_one(&generic);
    let (n, used, read) = read_through(&db, &generic, query).await;
    assert_eq!(n.unwrap(), 10);
    assert_eq!(
        used,
        BTreeSet::from(["retry_messages_finished_key".to_string()]),
        "10 rows of one key, planned generically, were read through {used:?}"
    );
    assert!(
        read < 200,
        "10 rows of one key, planned generically, read {read} index entries"
    );

    // The same rows in the same order as the plain query.
    same_rows_as_find(
        &db,
        &[
            customer.clone(),
            Filter {
                topics: vec!["orders".into()],
                ..customer.clone()
            },
            Filter {
                consumer_groups: vec!["g-a".into()],
                ..customer.clone()
            },
            Filter {
                dead_since: Some(chrono::Utc::now() - chrono::Duration::minutes(30)),
                ..customer.clone()
            },
            key(&long('b')),
            key("old-17"),
        ],
    )
    .await;
    let none = store
        .sample_matching(Scope::Finished, &key("nobody"), true, 10)
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");

    // A key far past a B-tree entry's size limit, and random so that no compression brings it
    // under, dies like any other, at capture and at its last attempt, and is found by its filter.
    let huge: String = (0..65_536)
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect();
    let mut at_once = crate::store::pending("orders", 100, Duration::ZERO, 3);
    at_once.message.key = Some(huge.clone().into_bytes());
    at_once.state = redrive::store::capture::InitialState::Dead;
    let mut later = crate::store::pending("orders", 101, Duration::ZERO, 1);
    later.message.key = at_once.message.key.clone();
    assert_eq!(store.capture("g-huge", &[at_once, later]).await.unwrap(), 2);
    let claimed = store
        .claim("g-huge", 10, Duration::from_secs(60), "w")
        .await
        .unwrap()
        .rows;
    assert_eq!(claimed.len(), 1);
    let last = crate::store::done(
        &claimed[0],
        redrive::store::complete::Outcome::Dead {
            error: redrive::handler::HandlerError::permanent("refused"),
        },
    );
    assert_eq!(store.complete(&[last]).await.unwrap().dead, 1);
    let found = store
        .sample_matching(Scope::Dead, &key(&huge), true, 10)
        .await
        .unwrap();
    assert_eq!(found.len(), 2, "the huge key's two deaths");
}

#[tokio::test]
async fn an_error_kinds_deaths_are_read_through_their_own_index() {
    // 30,000 rows that died days ago of retryable errors, with a permanent one every thousand rows
    // and a few of no kind at all. Then 900 deaths in the last hour, of three kinds, across two
    // groups, some replayed, some not yet acknowledged by the DLQ broker, with rows that are still
    // pending after a timeout. Vacuumed and analyzed, as autovacuum keeps a table in service.
    // Since V29 a replay, purge or dry run of one kind (`--error-kind permanent`, once a bug is
    // fixed) reads that kind's rows through `retry_messages_finished_kind` instead of walking
    // every death from the oldest.
    let db = TestDb::new().await;
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, dead_at, dlq_published_at)
        SELECT gen_random_uuid(), 'g-old', 'old', 0, i, '\x00'::bytea, 'dead', 3, 3, now(),
               'old error', CASE WHEN i % 1000 = 1 THEN 'permanent'
                                 WHEN i % 1000 <> 2 THEN 'retryable' END, t, t
        FROM generate_series(1, 30000) AS i,
             LATERAL (SELECT now() - interval '2 days' - i * interval '1 minute' AS t) AS x
        UNION ALL
        SELECT gen_random_uuid(), CASE WHEN i % 2 = 0 THEN 'g-a' ELSE 'g-b' END, 'recent', 1, i,
               '\x00'::bytea, CASE WHEN i % 11 = 0 THEN 'replayed' ELSE 'dead' END, 3, 3, now(),
               'new error: ' || k, k, t, CASE WHEN i % 7 <> 0 THEN t END
        FROM generate_series(1, 900) AS i,
             LATERAL (SELECT now() - i * interval '1 second' AS t,
                             (ARRAY['permanent', 'timeout', 'retryable'])[i % 3 + 1] AS k) AS x
        UNION ALL
        SELECT gen_random_uuid(), 'g-a', 'recent', 2, i, '\x00'::bytea, 'pending', 1, 3, now(),
               'timed out', 'timeout', NULL, NULL
        FROM generate_series(1, 50) AS i
        "#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    vacuum_until_all_visible(&db).await;

    // What each command reads of the table, first (see the tests above for why).
    let (pool, store) = on_one_connection(&db).await;
    let kinds = |k: &[&str]| Filter {
        error_kinds: k.iter().map(|s| s.to_string()).collect(),
        ..Filter::default()
    };
    let permanent = kinds(&["permanent"]);
    let dead_permanent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM redrive.retry_messages
         WHERE state = 'dead' AND error_kind = 'permanent'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(dead_permanent > 200, "{dead_permanent} permanent deaths");
    let eligible = count_sample_and_replay(&db, &pool, &store, &permanent, "one kind", 1_000).await;
    assert_eq!(eligible, dead_permanent, "the kind's dead rows");
    let timeout = kinds(&["timeout"]);
    let chunk = reads_fewer_than(
        200,
        "a purge chunk of 20 rows of one kind",
        &db,
        &pool,
        store.purge_chunk(&timeout, true, 20),
    )
    .await;
    assert_eq!(chunk.unwrap().changed, 20);
    let pending_timeouts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM redrive.retry_messages WHERE state = 'pending' AND error_kind = 'timeout'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        pending_timeouts, 50,
        "a purge of dead rows leaves the pending ones"
    );

    // Planned once for any arguments, it still reads the kind's rows through their index alone.
    let generic = generic_plans(&db).await;
    let query = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM redrive.find_oldest(error_kinds => $1, lim => 10)",
    )
    .bind(vec!["permanent"])
    .fetch_one(&generic);
    let (n, used, read) = read_through(&db, &generic, query).await;
    assert_eq!(n.unwrap(), 10);
    assert_eq!(
        used,
        BTreeSet::from(["retry_messages_finished_kind".to_string()]),
        "10 rows of one kind, planned generically, were read through {used:?}"
    );
    assert!(
        read < 200,
        "10 rows of one kind, planned generically, read {read} index entries"
    );

    // The same rows in the same order as the plain query, on the table as the chunks above left
    // it; a kind no row has matches none.
    same_rows_as_find(
        &db,
        &[
            permanent.clone(),
            kinds(&["timeout", "permanent", "timeout"]),
            kinds(&["retryable"]),
            Filter {
                dead_since: Some(chrono::Utc::now() - chrono::Duration::minutes(10)),
                ..permanent.clone()
            },
            Filter {
                error_contains: Some("NEW".into()),
                ..permanent.clone()
            },
            Filter {
                topics: vec!["recent".into()],
                ..timeout.clone()
            },
            Filter {
                consumer_groups: vec!["g-b".into()],
                ..permanent.clone()
            },
        ],
    )
    .await;
    let none = store
        .sample_matching(Scope::Finished, &kinds(&["nosuch"]), true, 10)
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
}

#[tokio::test]
async fn a_command_of_many_chunks_walks_the_older_deaths_once() {
    // 20,000 rows that died days ago, then 300 in the last minutes of an error of their own. A
    // replay by that error's text alone has no index to read its rows through: its first chunk
    // walks the deaths from the oldest. Each chunk after it starts at the newest death the one
    // before it took (`Filter::start_at`), so the walk is made once, not once per chunk. The new
    // rows die seven at a time, as a completion batch's deaths share their time, so chunks of 50
    // end inside such a group: the next chunk must start at that time, not after it.
    let db = TestDb::new().await;
    sqlx::query(
        r#"
        INSERT INTO redrive.retry_messages (
            id, consumer_group, topic, "partition", kafka_offset, payload, state, attempts,
            max_attempts, next_attempt_at, last_error, error_kind, dead_at, dlq_published_at)
        SELECT gen_random_uuid(), 'g', 'orders', 0, i, '\x00'::bytea, 'dead', 3, 3, now(),
               CASE WHEN i <= 20000 THEN 'old error' ELSE 'new bug in v2' END, 'retryable', t, t
        FROM generate_series(1, 20300) AS i,
             LATERAL (SELECT now() - CASE WHEN i <= 20000 THEN interval '2 days' - i * interval '1 second'
                                          ELSE ((20300 - i) / 7) * interval '1 second' END AS t) AS x
        "#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    vacuum_until_all_visible(&db).await;

    let (pool, store) = on_one_connection(&db).await;
    let filter = Filter {
        error_contains: Some("NEW BUG".into()),
        ..Filter::default()
    };
    let args = redrive::cli::FilterArgs {
        chunk_size: 50,
        ..redrive::cli::FilterArgs::default()
    };
    let audit = redrive::store::replay::Audit {
        by: "test".into(),
        reason: None,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let finished = reads_fewer_than(
        30_000,
        "a replay of 300 rows in chunks of 50 behind 20,000 older deaths",
        &db,
        &pool,
        redrive::ops::chunked("replay", 300, &args, &filter, &stop, |n, from| {
            let (store, audit) = (&store, &audit);
            async move { Ok(store.replay_chunk(&from, n, audit, None).await.unwrap()) }
        }),
    )
    .await;
    assert_eq!(finished.unwrap().done, 300);
    let states: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT last_error, state, count(*) FROM redrive.retry_messages GROUP BY 1, 2 ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        states,
        [
            ("new bug in v2".to_string(), "pending".to_string(), 300),
            ("old error".to_string(), "dead".to_string(), 20_000),
        ]
    );
}

/// `redrive.pause` finds a topic's rows group by group, through the groups that
/// `redrive.consumer_groups()` lists (schema V28): every group's pending rows of the topic are
/// paused, and no other row, nor a row a worker is attempting. The console's pause preview counts
/// the same rows.
#[tokio::test]
async fn a_pause_holds_the_topics_pending_rows_of_every_group_and_no_other() {
    let db = TestDb::new().await;
    let none: Vec<String> = sqlx::query_scalar("SELECT unnest(redrive.consumer_groups())")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert!(none.is_empty(), "no rows, no groups: {none:?}");
    let groups = ["", "a", "b b", "z"];
    let mut offset = 0_i64;
    for group in groups {
        for (topic, state) in [
            ("t", "pending"),
            ("t", "pending"),
            ("u", "pending"),
            ("t", "dead"),
        ] {
            offset += 1;
            sqlx::query(
                r#"INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition",
                       kafka_offset, payload, state, attempts, max_attempts, next_attempt_at,
                       dead_at)
                   VALUES ($1, $2, $3, 0, $4, 'x', $5, 1, 3, now(),
                       CASE WHEN $5 = 'dead' THEN now() END)"#,
            )
            .bind(Uuid::now_v7())
            .bind(group)
            .bind(topic)
            .bind(offset)
            .bind(state)
            .execute(db.pool())
            .await
            .unwrap();
        }
    }
    let listed: Vec<String> = sqlx::query_scalar("SELECT unnest(redrive.consumer_groups())")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(listed, groups, "every group, in the source key's order");
    // A worker attempts one pending row of topic t in group a.
    let running: Uuid = sqlx::query_scalar(
        "UPDATE redrive.queue SET state = 'running', lease_expires_at = now() + interval '1 hour',
             locked_by = 'w', claim_token = gen_random_uuid()
         WHERE id = (SELECT id FROM redrive.retry_messages
                     WHERE consumer_group = 'a' AND topic = 't' AND state = 'pending'
                     ORDER BY id LIMIT 1)
         RETURNING id",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let t = Filter {
        topics: vec!["t".into()],
        ..Filter::default()
    };
    assert_eq!(
        db.store.count_rows(&["pending".into()], &t).await.unwrap(),
        8
    );
    let paused: i64 = sqlx::query_scalar("SELECT redrive.pause('t')")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        paused, 7,
        "two pending rows of t in each of four groups, one being attempted"
    );
    let by: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT consumer_group, topic, string_agg(state, ',' ORDER BY kafka_offset)
         FROM redrive.retry_messages WHERE id <> $1 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(running)
    .fetch_all(db.pool())
    .await
    .unwrap();
    for (group, topic, states) in &by {
        let want = if topic == "t" {
            "paused,paused,dead"
        } else {
            "pending"
        };
        let want = if group == "a" && topic == "t" {
            "paused,dead"
        } else {
            want
        };
        assert_eq!(states, want, "group {group:?}, topic {topic}");
    }
    assert_eq!(by.len(), 8);
    // One group of topic u.
    let paused: i64 = sqlx::query_scalar("SELECT redrive.pause('u', 'b b')")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(paused, 1);
    assert_eq!(db.count("topic = 'u' AND state = 'paused'").await, 1);
    // A topic of many rows is read as the table is (`redrive.few_rows_of`): the same rows.
    sqlx::query(
        r#"INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition",
               kafka_offset, payload, state, attempts, max_attempts, next_attempt_at, dead_at)
           SELECT gen_random_uuid(), 'a', 't', 1, i, 'x', 'dead', 3, 3, now(), now()
           FROM generate_series(1, 100000) AS i"#,
    )
    .execute(db.pool())
    .await
    .unwrap();
    let few: bool = sqlx::query_scalar("SELECT redrive.few_rows_of('{t}')")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(!few, "topic t has 100,012 rows");
    sqlx::query("SELECT redrive.resume('t')")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(
        db.store.count_rows(&["pending".into()], &t).await.unwrap(),
        8
    );
    let paused: i64 = sqlx::query_scalar("SELECT redrive.pause('t')")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(paused, 7, "the same rows, read the other way");
    assert_eq!(
        db.count("topic = 'u' AND state = 'paused' AND consumer_group = 'b b'")
            .await,
        1
    );
    db.assert_queue_in_step().await;
}
