//! Traces over OTLP/HTTP, on the `redrive` binary, with a receiver in the test: a record carrying
//! a `traceparent` is processed in a span of that trace, the handler receives the trace context,
//! and the retry of the failed first delivery is in the same trace, as is its DLQ record.

use crate::helpers::*;
use axum::routing::post;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// An OTLP/HTTP receiver: every JSON body POSTed to /v1/traces.
async fn receiver() -> (u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                if let Ok(v) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push(v);
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, got)
}

/// The spans received: (trace id, name, attributes as text).
fn spans(got: &Mutex<Vec<serde_json::Value>>) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for body in got.lock().unwrap().iter() {
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    out.push((
                        s["traceId"].as_str().unwrap_or("").to_lowercase(),
                        s["name"].as_str().unwrap_or("").to_string(),
                        s["attributes"].to_string(),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn a_records_trace_runs_through_delivery_handler_retry_and_dlq() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("traced"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    // The first delivery fails, its retry fails for good: the message dies.
    let stub = Stub::start(|r| (if r.attempt() == 1 { 503 } else { 400 }, vec![])).await;
    let (port, got) = receiver().await;
    let text = format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"{topic}\"]\n\"group.id\" = \"{group}\"\n\
         \"bootstrap.servers\" = \"{}\"\n[handler]\nurl = \"http://{}/\"\n\
         [retry]\ninitial_delay = \"100ms\"\njitter = 0.0\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"orders-redrive\"\n",
        db.url,
        kafka(),
        stub.addr
    );
    let config = write_config(&text);
    let mut run = spawn_redrive(&config.0, &[]);
    let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
    produce(
        &producer(&kafka()),
        &topic,
        Some(b"k"),
        Some(b"{}"),
        &[("traceparent", Some(parent.as_bytes()))],
    )
    .await;
    wait_for("two handler calls", Duration::from_secs(60), || async {
        (stub.count() == 2).then_some(())
    })
    .await;
    for call in stub.all() {
        let tp = call
            .header("traceparent")
            .expect("the handler gets a traceparent");
        assert!(tp.starts_with(&format!("00-{TRACE}-")), "{tp}");
        assert_ne!(
            tp, parent,
            "the handler's parent is redrive's span, not the producer's"
        );
        assert_eq!(call.header("ce-traceparent").as_deref(), Some(tp.as_str()));
    }
    let dlq = read_topic_raw(&format!("{topic}.dlq"), 1, Duration::from_secs(60)).await;
    let carried = dlq[0]
        .headers
        .iter()
        .find(|h| h.key == b"traceparent")
        .and_then(|h| h.value.clone());
    assert_eq!(
        carried.as_deref(),
        Some(parent.as_bytes()),
        "the DLQ record keeps the trace"
    );
    // The spans are sent in batches; a stop sends the rest.
    assert!(
        terminate(&mut run).await.success(),
        "redrive exits cleanly with traces on"
    );
    let spans = wait_for("the spans", Duration::from_secs(30), || async {
        let s = spans(&got);
        (s.iter().filter(|(t, ..)| t == TRACE).count() >= 2).then_some(s)
    })
    .await;
    let ours: Vec<_> = spans.iter().filter(|(t, ..)| t == TRACE).collect();
    assert_eq!(ours.len(), 2, "{spans:?}");
    assert!(
        ours.iter()
            .all(|(_, name, _)| name == &format!("{topic} process")),
        "{ours:?}"
    );
    let attrs: String = ours.iter().map(|(_, _, a)| a.as_str()).collect();
    for needle in [
        "messaging.system",
        "kafka",
        "messaging.consumer.group.name",
        "redrive.path",
        "first",
        "retry",
    ] {
        assert!(attrs.contains(needle), "{needle} in {attrs}");
    }
    assert!(got
        .lock()
        .unwrap()
        .iter()
        .any(|b| b.to_string().contains("orders-redrive")));
}
