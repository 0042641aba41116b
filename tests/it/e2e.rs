//! The demo scenario as a test, on the real broker: values 1..10, the multiples of 3 fail.

use crate::helpers::*;
use rdkafka::message::{Headers, Message};
use redrive::cli::RunArgs;
use redrive::dlq::headers as h;
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test]
async fn the_knative_seed_experiment() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("values"), unique("g"));
    let dlq = format!("{topic}.dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let stub = Stub::start(|r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        (
            if v["value"].as_i64().unwrap() % 3 == 0 {
                500
            } else {
                200
            },
            vec![],
        )
    })
    .await;
    // The breaker is on, as by default, and judges from the fifth call: 3 failures in 10 (30 %)
    // stay below its 50 %, so retries and the DLQ go exactly as without it (I13).
    redrive::telemetry::metrics();
    let retry =
        "[retry]\nmax_attempts = 4\ninitial_delay = \"200ms\"\nmultiplier = 2.0\njitter = 0.0\n\
                 [breaker]\nmin_calls = 5";
    let (stop, app) = spawn_app(
        config(&db.url, &[&topic], &group, Some(stub.addr), retry),
        RunArgs::default(),
    );
    let p = producer(&kafka());
    let mut offsets = BTreeMap::new();
    for v in 1..=10 {
        let key = format!("value-{v}");
        let off = produce(
            &p,
            &topic,
            Some(key.as_bytes()),
            Some(format!("{{\"value\":{v}}}").as_bytes()),
            &[],
        )
        .await;
        offsets.insert(v, off);
    }

    let records = read_topic(&kafka(), &dlq, 3, Duration::from_secs(60)).await;
    wait_for(
        "offsets of all 10 messages to be committed",
        Duration::from_secs(30),
        || async { (committed(&group, &topic, 0) == Some(10)).then_some(()) },
    )
    .await;
    stop.cancel();
    app.await.unwrap().unwrap();
    let opened = format!(
        "redrive_breaker_transitions_total{{group=\"{group}\",breaker=\"default\",from=\"closed\",to=\"open\"}}"
    );
    assert_eq!(counter(&opened), 0.0, "the breaker never opened");

    // Delivery counts and attempt numbers per value.
    let mut by_value: BTreeMap<i64, Vec<(u32, chrono::DateTime<chrono::Utc>)>> = BTreeMap::new();
    for r in stub.all() {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        by_value
            .entry(v["value"].as_i64().unwrap())
            .or_default()
            .push((r.attempt(), r.at));
    }
    for v in 1..=10 {
        let attempts: Vec<u32> = by_value[&v].iter().map(|(a, _)| *a).collect();
        let want: Vec<u32> = if v % 3 == 0 {
            vec![1, 2, 3, 4]
        } else {
            vec![1]
        };
        assert_eq!(attempts, want, "value {v}");
    }
    // Gaps are never shorter than the policy's 200ms, 400ms, 800ms.
    for v in [3, 6, 9] {
        let times: Vec<_> = by_value[&v].iter().map(|(_, at)| *at).collect();
        for (i, w) in times.windows(2).enumerate() {
            let min = chrono::Duration::milliseconds(200 << i);
            assert!(
                w[1] - w[0] >= min - chrono::Duration::milliseconds(5),
                "value {v} gap {i}: {:?}",
                w[1] - w[0]
            );
        }
    }

    // The DLQ records: the original key and value, and the origin headers.
    let mut dead_values = Vec::new();
    for m in &records {
        let headers: BTreeMap<String, String> = m
            .headers()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x.key.to_string(),
                    String::from_utf8(x.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect();
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let v = v["value"].as_i64().unwrap();
        dead_values.push(v);
        assert_eq!(m.key().unwrap(), format!("value-{v}").as_bytes());
        assert_eq!(headers[h::TOPIC], topic);
        assert_eq!(headers[h::PARTITION], "0");
        assert_eq!(headers[h::OFFSET], offsets[&v].to_string());
        assert_eq!(headers[h::GROUP], group);
        assert_eq!(headers[h::ATTEMPTS], "4");
        assert_eq!(headers[h::ERROR_KIND], "retryable");
        assert!(
            headers[h::LAST_ERROR].contains("500"),
            "{}",
            headers[h::LAST_ERROR]
        );
        assert!(!headers[h::TIMESTAMP].is_empty() && !headers[h::FIRST_FAILED_AT].is_empty());
        let id: uuid::Uuid = headers[h::ID].parse().unwrap();
        let row: (String, i32, bool) = sqlx::query_as(
            "SELECT state, attempts, dlq_published_at IS NOT NULL FROM redrive.retry_messages WHERE id = $1",
        )
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(row, ("dead".to_string(), 4, true));
    }
    dead_values.sort();
    assert_eq!(dead_values, vec![3, 6, 9]);
    assert_eq!(db.count("true").await, 3, "only the dead rows remain");
}
