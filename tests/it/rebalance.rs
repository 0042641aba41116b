//! Ownership across rebalances (I11): work for a partition this member no longer owns stores no
//! offset, so a committed offset never moves backwards, and the stored offsets are committed before
//! partitions are revoked, so their next owner does not redeliver finished work. Two members of one
//! group, partitions moved back and forth.

use crate::helpers::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redrive::cli::RunArgs;
use redrive::handler::{Delivery, Handler, HandlerError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

type Log = Arc<Mutex<Vec<(&'static str, i32, i64)>>>;

/// One group member's handler. Records every delivery; a first delivery of "slow" waits at the
/// gate until the test opens it.
#[derive(Clone)]
struct Member {
    name: &'static str,
    log: Log,
    gate: Arc<Semaphore>,
    slow_done: Arc<AtomicUsize>,
}

impl Handler for Member {
    async fn handle(&self, d: Delivery<'_>) -> Result<(), HandlerError> {
        let (p, o) = (d.message.partition, d.message.offset);
        let first = {
            let mut log = self.log.lock().unwrap();
            let first = !log.iter().any(|(_, lp, lo)| (*lp, *lo) == (p, o));
            log.push((self.name, p, o));
            first
        };
        if first && d.message.payload.as_deref() == Some(b"slow") {
            let _open = self.gate.acquire().await;
            self.slow_done.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn members() -> (Member, Member) {
    let a = Member {
        name: "A",
        log: Log::default(),
        gate: Arc::new(Semaphore::new(0)),
        slow_done: Arc::default(),
    };
    let b = Member {
        name: "B",
        ..a.clone()
    };
    (a, b)
}

fn start(
    config: redrive::Config,
    m: &Member,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let parts = RunArgs {
        no_workers: true,
        no_dlq: true,
        no_http: true,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let app = tokio::spawn(redrive::app::run(config, m.clone(), parts, stop.clone()));
    (stop, app)
}

async fn produce_to(p: &FutureProducer, topic: &str, partition: i32, body: &str) {
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .partition(partition)
        .payload(body.as_bytes());
    p.send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// The partitions of `topic` the group's coordinator has assigned to the member whose `client.id`
/// is `client`, read from the consumer protocol's assignment (version, then topics with their
/// partitions).
fn assigned(group: &str, client: &str, topic: &str) -> Vec<i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let Ok(groups) = c
        .client()
        .fetch_group_list(Some(group), Duration::from_secs(10))
    else {
        return vec![];
    };
    let mut out = Vec::new();
    for g in groups.groups() {
        for m in g.members().iter().filter(|m| m.client_id() == client) {
            let Some(b) = m.assignment().filter(|b| b.len() >= 6) else {
                continue;
            };
            let i16_at = |i: usize| i16::from_be_bytes([b[i], b[i + 1]]) as usize;
            let i32_at = |i: usize| i32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            let mut at = 6; // version (2 bytes), topic count (4)
            for _ in 0..i32_at(2) {
                let len = i16_at(at);
                let name = String::from_utf8_lossy(&b[at + 2..at + 2 + len]).into_owned();
                at += 2 + len;
                let count = i32_at(at);
                at += 4;
                for _ in 0..count {
                    if name == topic {
                        out.push(i32_at(at));
                    }
                    at += 4;
                }
            }
        }
    }
    out
}

fn handled_by(log: &Log, name: &str) -> Vec<(i32, i64)> {
    let log = log.lock().unwrap();
    log.iter()
        .filter(|(n, _, _)| *n == name)
        .map(|(_, p, o)| (*p, *o))
        .collect()
}

#[tokio::test]
async fn a_moved_partition_is_committed_first_so_its_next_owner_redelivers_nothing_finished() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("revoke"), unique("g"));
    create_topic(&topic, 4).await;
    // No periodic commit: only the commit before a revoke can tell the next owner where to start.
    let mut config = config(&db.url, &[&topic], &group, None, "");
    config
        .kafka
        .properties
        .insert("auto.commit.interval.ms".into(), "3600000".into());
    let (a, b) = members();
    let (stop_a, app_a) = start(config.clone(), &a);
    let p = producer(&kafka());
    for i in 0..40 {
        produce_to(&p, &topic, i % 4, "fast").await;
    }
    wait_for("A to handle 40", Duration::from_secs(60), || async {
        (handled_by(&a.log, "A").len() == 40).then_some(())
    })
    .await;

    let (stop_b, app_b) = start(config, &b);
    wait_for(
        "the revoke to commit A's durable positions",
        Duration::from_secs(60),
        || async {
            (0..4)
                .all(|part| committed(&group, &topic, part) == Some(10))
                .then_some(())
        },
    )
    .await;
    for i in 0..40 {
        produce_to(&p, &topic, i % 4, "fast").await;
    }
    wait_for("all 80 to be handled", Duration::from_secs(60), || async {
        let mut seen = a
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p, o)| (*p, *o))
            .collect::<Vec<_>>();
        seen.sort();
        seen.dedup();
        (seen.len() == 80).then_some(())
    })
    .await;
    assert!(
        !handled_by(&a.log, "B").is_empty(),
        "B took partitions over"
    );
    assert_eq!(
        a.log.lock().unwrap().len(),
        80,
        "no message was delivered twice"
    );
    stop_b.cancel();
    app_b.await.unwrap().unwrap();
    stop_a.cancel();
    app_a.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_partition_that_moves_away_and_back_never_commits_backwards() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("a-b-a"), unique("g"));
    create_topic(&topic, 2).await;
    let mut config = config(&db.url, &[&topic], &group, None, "");
    config.handler.timeout = Duration::from_secs(25);
    let with_client = |id: &str| {
        let mut c = config.clone();
        c.kafka.properties.insert("client.id".into(), id.into());
        c
    };
    let (a, b) = members();
    let p = producer(&kafka());
    for part in 0..2 {
        produce_to(&p, &topic, part, "slow").await;
        for _ in 0..5 {
            produce_to(&p, &topic, part, "fast").await;
        }
    }
    // Commits are watched throughout: none may go below one seen before.
    let watching = CancellationToken::new();
    let watcher = {
        let (group, topic, stop) = (group.clone(), topic.clone(), watching.clone());
        tokio::spawn(async move {
            let mut highest = [0i64; 2];
            let mut backwards = Vec::new();
            while !stop.is_cancelled() {
                for part in 0..2 {
                    let c = committed(&group, &topic, part).unwrap_or(0);
                    if c < highest[part as usize] {
                        backwards.push((part, highest[part as usize], c));
                    }
                    highest[part as usize] = highest[part as usize].max(c);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            backwards
        })
    };

    // A holds both slow messages in flight, and everything after them done.
    let (stop_a, app_a) = start(with_client("A"), &a);
    wait_for("A to handle all 12", Duration::from_secs(60), || async {
        (handled_by(&a.log, "A").len() == 12).then_some(())
    })
    .await;
    // B joins and takes one partition over; it handles that partition's slow message at once (a
    // redelivery), and more, and commits past anything A had.
    let (stop_b, app_b) = start(with_client("B"), &b);
    let moved = wait_for("B to take a partition", Duration::from_secs(60), || async {
        handled_by(&a.log, "B").first().map(|(part, _)| *part)
    })
    .await;
    for _ in 0..5 {
        produce_to(&p, &topic, moved, "fast").await;
    }
    wait_for("B to commit 11", Duration::from_secs(60), || async {
        (committed(&group, &topic, moved) == Some(11)).then_some(())
    })
    .await;
    // B leaves; the partition comes back to A, with nothing new in it.
    stop_b.cancel();
    app_b.await.unwrap().unwrap();
    wait_for(
        "A to own the partition again",
        Duration::from_secs(60),
        || async { assigned(&group, "A", &topic).contains(&moved).then_some(()) },
    )
    .await;

    // Now A's slow first delivery of the moved partition finishes, from an assignment long gone:
    // it must not store 6 over B's 11.
    a.gate.add_permits(2);
    wait_for(
        "both slow deliveries to finish",
        Duration::from_secs(30),
        || async { (a.slow_done.load(Ordering::SeqCst) == 2).then_some(()) },
    )
    .await;
    stop_a.cancel();
    app_a.await.unwrap().unwrap();
    watching.cancel();
    let backwards = watcher.await.unwrap();
    assert_eq!(committed(&group, &topic, moved), Some(11));
    assert_eq!(committed(&group, &topic, 1 - moved), Some(6));
    assert!(
        backwards.is_empty(),
        "commits moved backwards: {backwards:?}"
    );
}

#[tokio::test]
async fn a_member_fenced_by_another_with_its_group_instance_id_stops_with_an_error_naming_it() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("fenced"), unique("g"));
    create_topic(&topic, 1).await;
    let mut config = config(&db.url, &[&topic], &group, None, "");
    config
        .kafka
        .properties
        .insert("group.instance.id".into(), "one-id".into());
    let (a, b) = members();
    let (_stop_a, app_a) = start(config.clone(), &a);
    let p = producer(&kafka());
    produce_to(&p, &topic, 0, "fast").await;
    wait_for(
        "A to handle the message",
        Duration::from_secs(60),
        || async { (handled_by(&a.log, "A").len() == 1).then_some(()) },
    )
    .await;

    // B joins with A's id: the coordinator fences A, which cannot consume again.
    let (stop_b, app_b) = start(config, &b);
    let stopped = tokio::time::timeout(Duration::from_secs(90), app_a)
        .await
        .expect("the fenced member stops")
        .unwrap();
    let error = format!("{:#}", stopped.expect_err("the fenced member fails"));
    assert!(error.contains("group.instance.id"), "{error}");

    produce_to(&p, &topic, 0, "fast").await;
    wait_for(
        "B to handle the next message",
        Duration::from_secs(60),
        || async { handled_by(&b.log, "B").contains(&(0, 1)).then_some(()) },
    )
    .await;
    stop_b.cancel();
    app_b.await.unwrap().unwrap();
}
