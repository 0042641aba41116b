//! Key order through the consumer (I12), on the real broker: the messages of a key succeed in the
//! order they were produced, a failing key's later messages wait behind it in the retry table, and
//! every other key flows.

use crate::helpers::*;
use redrive::cli::RunArgs;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The value, key and attempt of each request the stub received, in the order received.
fn calls(stub: &Stub) -> Vec<(i64, String, u32)> {
    stub.all()
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let key = r.header("ce-key").unwrap_or_default();
            (v["value"].as_i64().unwrap(), key, r.attempt())
        })
        .collect()
}

/// The calls of one key: (value, attempt) in the order received.
fn of_key(calls: &[(i64, String, u32)], key: &str) -> Vec<(i64, u32)> {
    calls
        .iter()
        .filter(|(_, k, _)| k == key)
        .map(|(v, _, a)| (*v, *a))
        .collect()
}

async fn produce_values(topic: &str, values: impl Iterator<Item = (i64, &'static str)>) {
    let p = producer(&kafka());
    for (v, key) in values {
        produce(
            &p,
            topic,
            Some(key.as_bytes()),
            Some(format!("{{\"value\":{v}}}").as_bytes()),
            &[],
        )
        .await;
    }
}

/// The seed experiment in key mode: values 1–10, keys k1/k2 alternating, the multiples of 3 fail
/// twice. A later value of the same key as 3, 6 or 9 waits behind it; the other key flows.
#[tokio::test]
async fn the_seed_experiment_in_key_mode() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("values"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let fails = v["value"].as_i64().unwrap() % 3 == 0 && r.attempt() <= 2;
        (if fails { 500 } else { 200 }, vec![])
    })
    .await;
    let retry = "[retry]\nmax_attempts = 4\ninitial_delay = \"500ms\"\nmultiplier = 2.0\n\
                 jitter = 0.0\nordering = \"key\"";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), retry),
        RunArgs::default(),
    );
    produce_values(
        &topic,
        (1..=10).map(|v| (v, if v % 2 == 1 { "k1" } else { "k2" })),
    )
    .await;

    wait_for(
        "every value to succeed and every offset to be committed",
        Duration::from_secs(60),
        || async {
            let ok = stub.count() == 16 && committed(&group, &topic, 0) == Some(10);
            ok.then_some(())
        },
    )
    .await;
    wait_for(
        "the retry table to empty",
        Duration::from_secs(30),
        || async { (db.count("true").await == 0).then_some(()) },
    )
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();

    let calls = calls(&stub);
    // Each key's calls, in order: its failing value is retried, and nothing of the key is called
    // before that value has succeeded. A message that waited is called as its first attempt.
    assert_eq!(
        of_key(&calls, "k1"),
        [
            (1, 1),
            (3, 1),
            (3, 2),
            (3, 3),
            (5, 1),
            (7, 1),
            (9, 1),
            (9, 2),
            (9, 3)
        ]
    );
    assert_eq!(
        of_key(&calls, "k2"),
        [(2, 1), (4, 1), (6, 1), (6, 2), (6, 3), (8, 1), (10, 1)]
    );
    // k2 flows while k1 waits: 4 is called before 3 is retried at all.
    let at = |value, attempt| {
        calls
            .iter()
            .position(|(v, _, a)| *v == value && *a == attempt)
            .unwrap()
    };
    assert!(at(4, 1) < at(3, 2), "{calls:?}");
    assert!(at(10, 1) < at(9, 2) || at(6, 3) < at(9, 2), "{calls:?}");
}

/// Eight keys interleaved over two partitions; two of them fail: k1 at its second value, k5 at its
/// second and its fifth. Each key's values succeed in the order they were produced, every run, and
/// the six other keys are not held up by the failing ones: each of their values has succeeded
/// before the first retry of any failed value is called.
#[tokio::test]
async fn interleaved_keys_succeed_in_produce_order_and_a_failing_key_holds_up_only_itself() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("interleaved"), unique("g"));
    create_topic(&topic, 2).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    const KEYS: [&str; 8] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let key_of = |v: i64| KEYS[(v % 8) as usize];
    // v = 8n + k is key k's (n+1)th value.
    let fails = |v: i64, attempt: u32| [9, 13, 37].contains(&v) && attempt == 1;
    let stub = Stub::start(move |r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let failed = fails(v["value"].as_i64().unwrap(), r.attempt());
        (if failed { 503 } else { 200 }, vec![])
    })
    .await;
    let retry = "[retry]\nordering = \"key\"\ninitial_delay = \"3s\"\njitter = 0.0";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), retry),
        RunArgs::default(),
    );
    produce_values(&topic, (0..160).map(|v| (v, key_of(v)))).await;

    wait_for(
        "every value to succeed",
        Duration::from_secs(60),
        || async {
            let calls = calls(&stub);
            let ok: std::collections::HashSet<i64> = calls
                .iter()
                .filter(|(v, _, a)| !fails(*v, *a))
                .map(|(v, _, _)| *v)
                .collect();
            (ok.len() == 160).then_some(())
        },
    )
    .await;
    wait_for("the table to empty", Duration::from_secs(30), || async {
        (db.count("true").await == 0).then_some(())
    })
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();

    let calls = calls(&stub);
    for key in KEYS {
        let successes: Vec<i64> = of_key(&calls, key)
            .into_iter()
            .filter(|(v, a)| !fails(*v, *a))
            .map(|(v, _)| v)
            .collect();
        let produced: Vec<i64> = (0..160).filter(|v| key_of(*v) == key).collect();
        assert_eq!(
            successes, produced,
            "key {key}: successes out of produce order"
        );
    }
    let first_retry = calls.iter().position(|(_, _, a)| *a > 1).unwrap();
    let last_flowing = calls
        .iter()
        .rposition(|(_, k, _)| k != "k1" && k != "k5")
        .unwrap();
    assert!(
        last_flowing < first_retry,
        "a flowing key's value was called after the first retry: {calls:?}"
    );
}

/// A key's rows are written one statement at a time, and its later messages wait for each (I12):
/// a capture batch that holds a row in a key line is written without waiting out
/// `capture_linger`. With the linger far longer than the deadline here, a failing key's failure
/// and the messages parked behind it are stored and committed all the same.
#[tokio::test]
async fn a_key_lines_rows_do_not_wait_out_the_capture_linger() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("lingered"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|_| (503, vec![])).await;
    let extra = "[consumer]\ncapture_linger = \"10m\"\n\
                 [retry]\nordering = \"key\"\ninitial_delay = \"1h\"";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), extra),
        RunArgs::default(),
    );
    produce_values(&topic, (1..=5).map(|v| (v, "k"))).await;

    wait_for(
        "the failure and the four messages parked behind it to be stored and committed",
        Duration::from_secs(60),
        || async {
            let stored = (
                db.count("state = 'pending'").await,
                db.count("state = 'waiting'").await,
            );
            (stored == (1, 4) && committed(&group, &topic, 0) == Some(5)).then_some(())
        },
    )
    .await;
    assert_eq!(
        stub.count(),
        1,
        "only the key's first message was delivered"
    );
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// A parked message whose row Postgres refuses (I10) is kept dead in its safe form and keeps its
/// place in its key's line: the key's earlier messages go first, and with the default
/// `on_dead = "block"` the later ones wait behind it until an operator purges it. Nothing stalls:
/// every offset is committed.
#[tokio::test]
async fn a_parked_row_postgres_refuses_keeps_its_place_in_its_key_line() {
    let db = TestDb::new().await;
    // A rule of the database's own that value 3's row breaks.
    sqlx::query(
        "ALTER TABLE redrive.retry_messages ADD CONSTRAINT no_three \
         CHECK (payload IS DISTINCT FROM '{\"value\":3}'::bytea)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let (topic, group) = (unique("refused"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    // Value 1 fails at its first attempt, so the key's later values are parked behind it.
    let stub = Stub::start(|r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let fails = v["value"].as_i64().unwrap() == 1 && r.attempt() == 1;
        (if fails { 500 } else { 200 }, vec![])
    })
    .await;
    let retry = "[retry]\ninitial_delay = \"500ms\"\njitter = 0.0\nordering = \"key\"";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), retry),
        RunArgs::default(),
    );
    produce_values(&topic, (1..=5).map(|v| (v, "k"))).await;

    // 1 is retried and succeeds, then 2; 3 is the line's dead head, and 4 and 5 wait behind it.
    let head = || async {
        let head: Option<(i64, bool, i64)> = sqlx::query_as(
            "SELECT head_offset, needs_operator, waiting FROM redrive.key_lines WHERE topic = $1",
        )
        .bind(&topic)
        .fetch_optional(db.pool())
        .await
        .unwrap();
        head
    };
    wait_for(
        "every offset committed, and the refused row at the head of its line",
        Duration::from_secs(60),
        || async {
            let at_head = head().await == Some((2, true, 2));
            (at_head && committed(&group, &topic, 0) == Some(5)).then_some(())
        },
    )
    .await;
    assert_eq!(of_key(&calls(&stub), "k"), [(1, 1), (1, 2), (2, 1)]);
    let (payload, error): (Option<Vec<u8>>, String) = sqlx::query_as(
        "SELECT payload, last_error FROM redrive.retry_messages WHERE kafka_offset = 2",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(payload, None, "kept in its safe form");
    assert!(
        error.contains("no_three"),
        "names the database's error: {error}"
    );

    // Purged, the refused row lets its line go on, in order.
    sqlx::query("DELETE FROM redrive.retry_messages WHERE topic = $1 AND state = 'dead'")
        .bind(&topic)
        .execute(db.pool())
        .await
        .unwrap();
    wait_for("the line to drain", Duration::from_secs(60), || async {
        (db.count("true").await == 0 && stub.count() == 5).then_some(())
    })
    .await;
    assert_eq!(
        of_key(&calls(&stub), "k"),
        [(1, 1), (1, 2), (2, 1), (4, 1), (5, 1)]
    );
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// A dead message blocks its key until an operator replays it (`on_dead = "block"`), and then its
/// key's later messages go in order; with `"skip"` they go on at once. Other keys never wait.
#[tokio::test]
async fn a_dead_message_blocks_its_key_until_replayed_unless_its_topic_skips() {
    let db = TestDb::new().await;
    let (blocked, skipped, group) = (unique("blocked"), unique("skipped"), unique("g"));
    create_topic(&blocked, 1).await;
    create_topic(&skipped, 1).await;
    for t in [&blocked, &skipped] {
        create_topic(&format!("{t}.dlq"), 1).await;
    }
    // Value 1 is refused (permanent) until `healed`.
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let stub = Stub::start(move |r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let refused = v["value"].as_i64().unwrap() == 1 && !h.load(Ordering::SeqCst);
        (if refused { 400 } else { 200 }, vec![])
    })
    .await;
    let retry =
        format!("[retry]\nordering = \"key\"\n[retry.topics.\"{skipped}\"]\non_dead = \"skip\"");
    let start = || {
        spawn_app(
            config(
                &db.url,
                &[&blocked, &skipped],
                &group,
                Some(stub.addr),
                &retry,
            ),
            RunArgs::default(),
        )
    };
    let (stop, app) = start();
    let values = || [(1, "k"), (2, "k"), (3, "other"), (4, "k"), (5, "other")].into_iter();
    produce_values(&blocked, values()).await;
    produce_values(&skipped, values()).await;

    let on_topic = |topic: &str| {
        let topic = topic.to_string();
        let stub = stub.clone();
        move || {
            stub.all()
                .iter()
                .filter(|r| r.header("ce-source").is_some_and(|s| s.ends_with(&topic)))
                .map(|r| {
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                    v["value"].as_i64().unwrap()
                })
                .collect::<Vec<_>>()
        }
    };
    let (blocked_calls, skipped_calls) = (on_topic(&blocked), on_topic(&skipped));
    wait_for(
        "both topics' offsets to be committed, and the skipping topic's values called",
        Duration::from_secs(60),
        || async {
            let done = committed(&group, &blocked, 0) == Some(5)
                && committed(&group, &skipped, 0) == Some(5)
                && skipped_calls().len() == 5
                && blocked_calls().len() == 3;
            done.then_some(())
        },
    )
    .await;
    // Skip: 1 died, and the rest of its key went on in order.
    let mut k_values: Vec<i64> = skipped_calls()
        .into_iter()
        .filter(|v| [1, 2, 4].contains(v))
        .collect();
    assert_eq!(k_values, [1, 2, 4]);
    // Block: 1 is dead and 2 and 4 wait behind it; the other key went on.
    let mut got = blocked_calls();
    got.sort();
    assert_eq!(got, [1, 3, 5]);
    let states: Vec<(i64, String)> = sqlx::query_as(
        "SELECT kafka_offset, state FROM redrive.retry_messages WHERE topic = $1 ORDER BY 1",
    )
    .bind(&blocked)
    .fetch_all(db.pool())
    .await
    .unwrap();
    let states: BTreeMap<i64, String> = states.into_iter().collect();
    assert_eq!(states[&0], "dead");
    assert_eq!(states[&1], "waiting");
    assert_eq!(states[&3], "waiting");
    assert_eq!(states.len(), 3);

    // Restarted, the consumer reads the blocked key before it delivers anything: a new message
    // of it waits too, and the other key still flows.
    stop.cancel();
    app.await.unwrap().unwrap();
    let (stop, app) = start();
    produce_values(&blocked, [(6, "k"), (7, "other")].into_iter()).await;
    wait_for(
        "the new messages' offsets to be committed",
        Duration::from_secs(60),
        || async {
            (committed(&group, &blocked, 0) == Some(7) && blocked_calls().contains(&7))
                .then_some(())
        },
    )
    .await;
    assert!(!blocked_calls().contains(&6), "{:?}", blocked_calls());
    assert_eq!(
        db.count(&format!("topic = '{blocked}' AND state = 'waiting'"))
            .await,
        3
    );

    // The operator fixes the cause and replays the dead message: it goes first, then its key.
    healed.store(true, Ordering::SeqCst);
    sqlx::query(
        "SELECT redrive.replay(array_agg(id)) FROM redrive.retry_messages \
         WHERE topic = $1 AND state = 'dead'",
    )
    .bind(&blocked)
    .execute(db.pool())
    .await
    .unwrap();
    wait_for(
        "the blocked key to drain",
        Duration::from_secs(60),
        || async { (blocked_calls().len() == 8).then_some(()) },
    )
    .await;
    k_values = blocked_calls()
        .into_iter()
        .filter(|v| [1, 2, 4, 6].contains(v))
        .collect();
    assert_eq!(k_values, [1, 1, 2, 4, 6]);
    wait_for(
        "the retry table to hold only the skipped dead row",
        Duration::from_secs(30),
        || async { (db.count("true").await == 1).then_some(()) },
    )
    .await;
    // Once its line is empty, the key flows straight through the consumer again.
    produce_values(&blocked, [(8, "k")].into_iter()).await;
    wait_for("the key to flow again", Duration::from_secs(60), || async {
        (committed(&group, &blocked, 0) == Some(8) && blocked_calls().contains(&8)).then_some(())
    })
    .await;
    assert_eq!(db.count("true").await, 1);
    stop.cancel();
    app.await.unwrap().unwrap();
}

/// Key order while partitions move between two members: values of 20 keys over 4 partitions,
/// every seventh one failing at its first attempt and retried 3 s later, while a second member
/// joins and the first one leaves; each move happens while keys wait behind failed values. Each
/// key's values first succeed in the order they were produced: a value may succeed again later
/// (a redelivery), but never for the first time after a later value of its key.
#[tokio::test]
async fn key_order_holds_while_partitions_move_between_members() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("moving"), unique("g"));
    create_topic(&topic, 4).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let fails = |v: i64, attempt: u32| v % 7 == 0 && attempt == 1;
    let stub = Stub::start(move |r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let failed = fails(v["value"].as_i64().unwrap(), r.attempt());
        (if failed { 503 } else { 200 }, vec![])
    })
    .await;
    let retry = "[retry]\nordering = \"key\"\ninitial_delay = \"3s\"\njitter = 0.0";
    let member = || {
        spawn_app(
            config(&db.url, &[&topic], &group, Some(stub.addr), retry),
            RunArgs::default(),
        )
    };
    const KEYS: [&str; 20] = [
        "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11", "k12", "k13",
        "k14", "k15", "k16", "k17", "k18", "k19",
    ];
    let values = |from: i64, to: i64| (from..=to).map(|v| (v, KEYS[(v % 20) as usize]));
    let committed_all = |n: i64| {
        let (group, topic) = (group.clone(), topic.clone());
        move || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                let sum: i64 = (0..4).filter_map(|p| committed(&group, &topic, p)).sum();
                (sum == n).then_some(())
            }
        }
    };
    let (stop_a, app_a) = member();
    produce_values(&topic, values(1, 200)).await;
    wait_for(
        "the first values' outcomes",
        Duration::from_secs(60),
        committed_all(200),
    )
    .await;
    // Keys wait behind failed values now; the second member takes some of their partitions.
    let (stop_b, app_b) = member();
    produce_values(&topic, values(201, 300)).await;
    wait_for(
        "the next values' outcomes",
        Duration::from_secs(60),
        committed_all(300),
    )
    .await;
    // The first member leaves: the second one takes its partitions, and their waiting keys.
    stop_a.cancel();
    app_a.await.unwrap().unwrap();
    produce_values(&topic, values(301, 400)).await;

    let succeeded = || {
        let mut first = std::collections::HashSet::new();
        for (v, _, attempt) in calls(&stub) {
            if !fails(v, attempt) {
                first.insert(v);
            }
        }
        first.len()
    };
    wait_for(
        "every value to succeed",
        Duration::from_secs(120),
        || async { (succeeded() == 400).then_some(()) },
    )
    .await;
    wait_for(
        "every offset to be committed",
        Duration::from_secs(60),
        committed_all(400),
    )
    .await;
    wait_for("the table to empty", Duration::from_secs(60), || async {
        (db.count("true").await == 0).then_some(())
    })
    .await;
    stop_b.cancel();
    app_b.await.unwrap().unwrap();

    // Per key, the values in the order of their first success.
    let mut seen = std::collections::HashSet::new();
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (v, key, attempt) in calls(&stub) {
        if !fails(v, attempt) && seen.insert(v) {
            order.entry(key).or_default().push(v);
        }
    }
    assert_eq!(order.len(), 20);
    for (key, values) in &order {
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(
            values, &sorted,
            "key {key}: first successes out of produce order"
        );
    }
}
