//! The gauges of `/metrics`, on the `redrive` binary after a known scenario: rows by group, topic
//! and state, how late the oldest due row is, the DLQ backlog, paused topics, messages and
//! attempts in flight and the consumer's lag; and one sampler per database.

use crate::helpers::*;
use std::time::Duration;

/// A free loopback port.
fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_config(db: &TestDb, topic: &str, group: &str, port: u16, handler: &str) -> String {
    format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"{topic}\"]\n\"group.id\" = \"{group}\"\n\
         \"bootstrap.servers\" = \"{}\"\n\"statistics.interval.ms\" = 500\n\
         [handler]\nurl = \"{handler}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [telemetry]\nsample_every = \"200ms\"\n",
        db.url,
        kafka()
    )
}

/// The value of the sample of `/metrics` that starts with `series` (a name and its labels, as
/// rendered), or `None` when there is none.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn scrape(port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Inserts `n` rows of `topic` in group `group` in `state`, due (or dead) `ago` seconds ago.
async fn rows(db: &TestDb, group: &str, topic: &str, state: &str, n: i64, ago: i64) {
    let dead = state == "dead";
    sqlx::query(
        r#"INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition",
               kafka_offset, payload, state, attempts, max_attempts, next_attempt_at,
               last_error, error_kind, dead_at)
           SELECT gen_random_uuid(), $1, $2, 0, 1000 * $6::int + i, '\x00', $3, 1, 5,
                  now() - make_interval(secs => $5), 'boom', 'retryable',
                  CASE WHEN $4 THEN now() - make_interval(secs => $5) END
           FROM generate_series(1, $7) AS i"#,
    )
    .bind(group)
    .bind(topic)
    .bind(state)
    .bind(dead)
    .bind(ago as f64)
    .bind(state.len() as i32)
    .bind(n)
    .execute(db.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn the_gauges_show_the_table_and_one_process_reads_them() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("gauged"), unique("g"));
    create_topic(&topic, 2).await;
    rows(&db, &group, &topic, "pending", 3, 3600).await;
    rows(&db, &group, &topic, "dead", 2, 60).await;
    rows(&db, "other", "elsewhere", "paused", 4, 0).await;
    sqlx::query("SELECT redrive.pause('elsewhere', 'other', 'maintenance')")
        .execute(db.pool())
        .await
        .unwrap();

    // The handler takes a message "ok" and refuses the rest.
    let stub = Stub::start(|r| (if &r.body[..] == b"ok" { 200 } else { 503 }, vec![])).await;
    let handler = format!("http://{}/", stub.addr);
    // No workers and no DLQ publisher: the due rows stay due and the dead ones unpublished.
    let (a_port, b_port) = (port(), port());
    let a_config = write_config(&run_config(&db, &topic, &group, a_port, &handler));
    let mut a = spawn_redrive(&a_config.0, &["--no-workers", "--no-dlq"]);
    let g = format!("group=\"{group}\"");
    let m = wait_for("the row gauges", Duration::from_secs(60), || async {
        let m = scrape(a_port).await?;
        let series = format!("redrive_rows{{{g},topic=\"{topic}\",state=\"dead\"}}");
        (sample(&m, &series) == Some(2.0)).then_some(m)
    })
    .await;
    let value =
        |series: String| sample(&m, &series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(
        value(format!(
            "redrive_rows{{{g},topic=\"{topic}\",state=\"pending\"}}"
        )),
        3.0
    );
    assert_eq!(
        value(format!(
            "redrive_rows{{{g},topic=\"{topic}\",state=\"waiting\"}}"
        )),
        0.0
    );
    assert_eq!(
        value("redrive_rows{group=\"other\",topic=\"elsewhere\",state=\"paused\"}".into()),
        4.0
    );
    assert_eq!(value(format!("redrive_due_rows{{{g}}}")), 3.0);
    let late = value(format!("redrive_oldest_due_age_seconds{{{g}}}"));
    assert!((3600.0..3700.0).contains(&late), "oldest due age {late}");
    assert_eq!(value(format!("redrive_dlq_backlog_rows{{{g}}}")), 2.0);
    let unpublished = value(format!("redrive_dlq_oldest_unpublished_age_seconds{{{g}}}"));
    assert!(
        (60.0..160.0).contains(&unpublished),
        "oldest unpublished age {unpublished}"
    );
    assert_eq!(
        value("redrive_topic_paused{group=\"other\",topic=\"elsewhere\"}".into()),
        1.0
    );
    // A metric without a group of its own has the process's.
    assert_eq!(value(format!("redrive_rows_sampler{{{g}}}")), 1.0);
    assert_eq!(value(format!("redrive_stalled_partitions{{{g}}}")), 0.0);
    assert_eq!(value(format!("redrive_in_flight_messages{{{g}}}")), 0.0);

    // The consumer's lag, from librdkafka's statistics: both partitions, caught up once each has
    // a record to read (the handler refuses them all; they become rows).
    let p = producer(&kafka());
    for partition in [0, 1] {
        p.send(
            rdkafka::producer::FutureRecord::<(), _>::to(&topic)
                .partition(partition)
                .payload("x"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    wait_for("the lag gauges", Duration::from_secs(60), || async {
        let m = scrape(a_port).await?;
        let lag = |p: i32| {
            sample(
                &m,
                &format!(
                    "redrive_consumer_lag_messages{{{g},topic=\"{topic}\",partition=\"{p}\"}}"
                ),
            )
        };
        (lag(0) == Some(0.0) && lag(1) == Some(0.0)).then_some(())
    })
    .await;

    // One that succeeds: its time from the record's timestamp.
    p.send(
        rdkafka::producer::FutureRecord::<(), _>::to(&topic)
            .partition(0)
            .payload("ok"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    wait_for(
        "the end-to-end histogram",
        Duration::from_secs(60),
        || async {
            let m = scrape(a_port).await?;
            let n = sample(
                &m,
                &format!("redrive_end_to_end_seconds_count{{{g},path=\"first\"}}"),
            )?;
            let sum = sample(
                &m,
                &format!("redrive_end_to_end_seconds_sum{{{g},path=\"first\"}}"),
            )?;
            (n == 1.0 && sum > 0.0 && sum < 60.0).then_some(())
        },
    )
    .await;

    // The two refused first deliveries: their calls' durations, and the capture batch.
    wait_for("the first deliveries' histograms", Duration::from_secs(60), || async {
        let m = scrape(a_port).await?;
        let calls = sample(
            &m,
            &format!("redrive_handler_duration_seconds_count{{{g},path=\"first\",outcome=\"retryable\"}}"),
        )?;
        let batches = sample(&m, &format!("redrive_batch_rows_count{{{g},what=\"capture\"}}"))?;
        let rows = sample(&m, &format!("redrive_batch_rows_sum{{{g},what=\"capture\"}}"))?;
        // The counters have the process's group.
        let refused = format!("redrive_deliveries_total{{{g},outcome=\"retryable\"}}");
        let refused = sample(&m, &refused)?;
        let captured = sample(&m, &format!("redrive_captured_total{{{g},state=\"pending\"}}"))?;
        (calls == 2.0 && batches >= 1.0 && rows == 2.0 && refused == 2.0 && captured == 2.0)
            .then_some(())
    })
    .await;

    // A second process of the same database does not read the table: it says so.
    // It retries the due rows and publishes the dead ones to the DLQ topic.
    create_topic(&format!("{topic}.dlq"), 1).await;
    let b_config = write_config(&run_config(&db, &topic, &group, b_port, &handler));
    let mut b = spawn_redrive(&b_config.0, &["--no-consumer"]);
    let m = wait_for(
        "the second process's metrics",
        Duration::from_secs(60),
        || async {
            let m = scrape(b_port).await?;
            m.contains("redrive_in_flight_attempts").then_some(m)
        },
    )
    .await;
    assert_eq!(
        sample(&m, &format!("redrive_rows_sampler{{{g}}}")),
        Some(0.0),
        "{m}"
    );
    assert!(!m.contains("redrive_rows{"), "{m}");

    // Its workers retry the three rows due an hour ago: each attempt is an hour late, and fails
    // again. A retry's lateness is counted when it starts, and its outcome and its handler call's
    // duration when the call ends, so the wait is for all three.
    let retried =
        format!("redrive_handler_duration_seconds_count{{{g},path=\"retry\",outcome=\"retry\"}}");
    let m = wait_for(
        "the retries' histograms",
        Duration::from_secs(60),
        || async {
            let m = scrape(b_port).await?;
            let late = sample(&m, &format!("redrive_retry_lateness_seconds_count{{{g}}}"))?;
            // Each attempt's outcome is counted once its handler call has ended.
            let attempts = sample(
                &m,
                &format!("redrive_attempts_total{{{g},outcome=\"retry\"}}"),
            )?;
            (late >= 3.0 && attempts >= 3.0 && m.contains(&retried)).then_some(m)
        },
    )
    .await;
    let within = |le: &str| {
        sample(
            &m,
            &format!("redrive_retry_lateness_seconds_bucket{{{g},le=\"{le}\"}}"),
        )
        .unwrap()
    };
    // The rows due an hour ago are over 300 s late (rows captured just now are not).
    assert!(within("+Inf") - within("300") >= 3.0, "{m}");
    let sum = sample(&m, &format!("redrive_retry_lateness_seconds_sum{{{g}}}")).unwrap();
    assert!(sum >= 3.0 * 3600.0, "{m}");
    assert!(m.contains(&retried), "{m}");

    // Every metric the shipped dashboard and alert rules use is exported by these two processes
    // (the last ones once the retries' completions and the DLQ records are written).
    let used = used_by_deploy();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let exported = format!(
            "{}\n{}",
            scrape(a_port).await.unwrap_or_default(),
            scrape(b_port).await.unwrap_or_default()
        );
        let missing: Vec<&String> = used
            .iter()
            .filter(|name| !exported.contains(&format!("# TYPE {name} ")))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "used in deploy/ but not exported within 30 s: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(&mut b).await;
    terminate(&mut a).await;
}

/// The metric names the Grafana dashboard and the Prometheus rules under deploy/ use, a
/// histogram's `_bucket`, `_sum` and `_count` series named by the histogram.
fn used_by_deploy() -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut text = String::new();
    for file in [
        "grafana/redrive-dashboard.json",
        "prometheus/redrive-alerts.yml",
    ] {
        text.push_str(&std::fs::read_to_string(root.join(file)).unwrap());
    }
    let mut names = std::collections::BTreeSet::new();
    for (at, _) in text.match_indices("redrive_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|n| n.ends_with("_seconds") || n.ends_with("_rows"))
            })
            .map_or(name.clone(), str::to_string);
        names.insert(name);
    }
    assert!(names.len() > 10, "{names:?}");
    names
}
