//! Traces over OTLP/HTTP, on the `redrive` binary, with a receiver in the test: a message's first
//! delivery, the capture of its failure, its retry and its DLQ publish are spans of one trace (the
//! record's own when it carries a `traceparent`, else one its first delivery starts), the handler
//! receives the trace context, and so does the DLQ record.

use crate::helpers::*;
use axum::routing::post;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

type Bodies = Arc<Mutex<Vec<serde_json::Value>>>;

/// An OTLP/HTTP receiver: every JSON body POSTed to /v1/traces.
async fn receiver() -> (u16, Bodies) {
    let (app, got) = collector();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, got)
}

/// The receiver over TLS, with a certificate for `localhost` signed by a CA of its own, which also
/// answers a handler's POSTs to `/` with 200. Returns its port, what it received, how many
/// handler calls it answered, and the CA's certificate (PEM).
async fn tls_receiver() -> (u16, Bodies, Arc<std::sync::atomic::AtomicUsize>, String) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_rustls::rustls;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (app, got) = collector();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let app = app.route(
        "/",
        post(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, got, calls, ca.pem())
}

/// The collector's routes: every JSON body POSTed to /v1/traces is kept.
fn collector() -> (axum::Router, Bodies) {
    let got: Bodies = Arc::default();
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
    (app, got)
}

/// A `redrive run` configuration of one topic, sending traces to `endpoint`; `extra` follows,
/// inside `[telemetry]` until it opens a table of its own.
fn traced_config(
    db: &TestDb,
    (topic, group): (&str, &str),
    handler: &str,
    endpoint: &str,
    extra: &str,
) -> tempfile_path::TempPath {
    write_config(&format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\ntopics = [\"{topic}\"]\n\"group.id\" = \"{group}\"\n\
         \"bootstrap.servers\" = \"{}\"\n[handler]\nurl = \"{handler}\"\n[http]\n\
         listen = \"127.0.0.1:0\"\n[telemetry]\notlp_endpoint = \"{endpoint}\"\n{extra}\n",
        db.url,
        kafka(),
    ))
}

/// `redrive run` with `config`, its log written to a file named after `topic` (returned).
fn logged_run(
    config: &tempfile_path::TempPath,
    topic: &str,
) -> (tokio::process::Command, std::path::PathBuf) {
    let log_path = std::env::temp_dir().join(format!("{topic}.log"));
    let mut command = tokio::process::Command::new(redrive_bin());
    command
        .args(["--config", config.0.to_str().unwrap(), "run"])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true);
    (command, log_path)
}

/// One span received.
#[derive(Debug, Clone)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    attributes: String,
}

/// The spans received.
fn spans(got: &Mutex<Vec<serde_json::Value>>) -> Vec<Span> {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_lowercase();
    let mut out = Vec::new();
    for body in got.lock().unwrap().iter() {
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    out.push(Span {
                        trace: text(&s["traceId"]),
                        id: text(&s["spanId"]),
                        parent: text(&s["parentSpanId"]),
                        name: s["name"].as_str().unwrap_or("").to_string(),
                        attributes: s["attributes"].to_string(),
                    });
                }
            }
        }
    }
    out
}

/// What one traced message left: the handler's calls, the DLQ record, the spans received, and the
/// trace context its row kept.
struct Traced {
    topic: String,
    calls: Vec<Received>,
    dlq: redrive::Message,
    spans: Vec<Span>,
    row_trace: Option<String>,
    resource: String,
    /// Its log, `REDRIVE_LOG_FORMAT=json` at info.
    log: String,
}

/// Runs `redrive run` with traces exported to a receiver in the test, produces one record with
/// `headers`, whose first delivery fails and whose retry fails for good, and stops redrive once
/// the record reached the DLQ topic.
async fn one_message_dies(headers: &[(&str, Option<&[u8]>)]) -> Traced {
    let db = TestDb::new().await;
    let (topic, group) = (unique("traced"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|r| (if r.attempt() == 1 { 503 } else { 400 }, vec![])).await;
    let (port, got) = receiver().await;
    let config = traced_config(
        &db,
        (&topic, &group),
        &format!("http://{}/", stub.addr),
        &format!("http://127.0.0.1:{port}"),
        "service_name = \"orders-redrive\"\n[retry]\ninitial_delay = \"100ms\"\njitter = 0.0",
    );
    let (mut command, log_path) = logged_run(&config, &topic);
    let mut run = command
        // The default filter, which logs redrive at info: a retry's span used to be lost there.
        .env_remove("REDRIVE_LOG")
        .env_remove("RUST_LOG")
        .env("REDRIVE_LOG_FORMAT", "json")
        .spawn()
        .unwrap();
    produce(
        &producer(&kafka()),
        &topic,
        Some(b"k"),
        Some(b"{}"),
        headers,
    )
    .await;
    let dlq = read_topic_raw(&format!("{topic}.dlq"), 1, Duration::from_secs(60)).await;
    let row_trace: Option<String> =
        sqlx::query_scalar("SELECT trace_context FROM redrive.retry_messages WHERE topic = $1")
            .bind(&topic)
            .fetch_one(db.pool())
            .await
            .unwrap();
    // The spans are sent in batches; a stop sends the rest.
    assert!(
        terminate(&mut run).await.success(),
        "redrive exits cleanly with traces on"
    );
    // Two process spans, the capture and the publish.
    let spans = wait_for("the spans", Duration::from_secs(30), || async {
        let s = spans(&got);
        (s.len() >= 4).then_some(s)
    })
    .await;
    let resource = got.lock().unwrap().iter().map(|b| b.to_string()).collect();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    Traced {
        topic,
        calls: stub.all(),
        dlq: dlq.into_iter().next().unwrap(),
        spans,
        row_trace,
        resource,
        log,
    }
}

impl Traced {
    /// The spans of one message's life, all in `trace`: the first delivery's process span, its
    /// capture, the retry's process span and the DLQ publish, each of the last three a child of the
    /// first. Returns the first delivery's span.
    fn assert_one_trace(&self, trace: &str) -> &Span {
        let named =
            |name: String| -> Vec<&Span> { self.spans.iter().filter(|s| s.name == name).collect() };
        assert_eq!(self.spans.len(), 4, "{:#?}", self.spans);
        assert!(
            self.spans.iter().all(|s| s.trace == trace),
            "{:#?}",
            self.spans
        );
        let process = named(format!("{} process", self.topic));
        assert_eq!(process.len(), 2, "{:#?}", self.spans);
        let first = process
            .iter()
            .find(|s| s.attributes.contains("first"))
            .expect("the first delivery's span");
        let retry = process
            .iter()
            .find(|s| s.attributes.contains("retry"))
            .expect("the retry's span");
        let capture = named("redrive capture".to_string());
        let publish = named(format!("{}.dlq publish", self.topic));
        assert_eq!((capture.len(), publish.len()), (1, 1), "{:#?}", self.spans);
        for child in [retry, capture[0], publish[0]] {
            assert_eq!(
                child.parent, first.id,
                "{} under the first delivery",
                child.name
            );
        }
        for needle in [
            "messaging.system",
            "kafka",
            "messaging.consumer.group.name",
            "messaging.destination.partition.id",
            "messaging.kafka.offset",
            "redrive.attempt",
        ] {
            assert!(first.attributes.contains(needle), "{needle} in {first:?}");
        }
        assert!(
            capture[0].attributes.contains("pending"),
            "{:?}",
            capture[0]
        );
        assert!(publish[0].attributes.contains("send"), "{:?}", publish[0]);
        assert!(self.resource.contains("orders-redrive"));
        first
    }

    /// Every handler call got a `traceparent` of `trace` (also as `ce-traceparent`), whose parent
    /// is redrive's own span.
    fn assert_handler_in(&self, trace: &str) {
        assert_eq!(self.calls.len(), 2);
        for call in &self.calls {
            let tp = call
                .header("traceparent")
                .expect("the handler gets a traceparent");
            assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
            let own = self.spans.iter().any(|s| tp.contains(&s.id));
            assert!(own, "the handler's parent is one of redrive's spans: {tp}");
            assert_eq!(call.header("ce-traceparent").as_deref(), Some(tp.as_str()));
        }
    }

    /// The JSON log line of the row's death names the row, as the retry's span does, and lists
    /// that span with its fields.
    fn assert_death_logged(&self) {
        let events: Vec<serde_json::Value> = (self.log.lines())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let dead = events
            .iter()
            .find(|e| {
                let message = e["fields"]["message"].as_str().unwrap_or("");
                message.contains("row is dead")
            })
            .unwrap_or_else(|| panic!("the death is logged: {}", self.log));
        let fields = &dead["fields"];
        assert_eq!(fields["topic"], self.topic.as_str(), "{dead}");
        assert_eq!(
            (fields["partition"].as_i64(), fields["offset"].as_i64()),
            (Some(0), Some(0))
        );
        assert_eq!(fields["attempt"].as_i64(), Some(2), "{dead}");
        assert!(
            fields["id"].as_str().is_some_and(|id| id.len() == 36),
            "{dead}"
        );
        let span = dead["spans"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "process"))
            .unwrap_or_else(|| panic!("the process span is listed: {dead}"));
        assert_eq!(
            span["messaging.destination.name"],
            self.topic.as_str(),
            "{span}"
        );
        assert_eq!(span["redrive.path"], "retry", "{span}");
    }

    /// The DLQ record's `traceparent`.
    fn dlq_traceparent(&self) -> String {
        let tp = self.dlq.header("traceparent").and_then(|h| h.value.clone());
        String::from_utf8(tp.expect("the DLQ record has a traceparent")).unwrap()
    }
}

#[tokio::test]
async fn a_records_trace_runs_through_delivery_handler_retry_and_dlq() {
    // The producer's span.
    let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
    let traced = one_message_dies(&[("traceparent", Some(parent.as_bytes()))]).await;
    let first = traced.assert_one_trace(TRACE);
    assert_eq!(
        first.parent, "00f067aa0ba902b7",
        "the producer's span is the parent"
    );
    traced.assert_handler_in(TRACE);
    traced.assert_death_logged();
    assert_eq!(
        traced.dlq_traceparent(),
        parent,
        "the DLQ record keeps the record's own traceparent"
    );
    assert!(
        traced
            .row_trace
            .as_deref()
            .unwrap_or("")
            .contains(&first.id),
        "the row keeps the first delivery's context: {:?}",
        traced.row_trace
    );
}

#[tokio::test]
async fn a_record_without_a_trace_starts_one_that_its_retries_and_dlq_record_stay_in() {
    let traced = one_message_dies(&[]).await;
    let root = traced
        .spans
        .iter()
        .find(|s| s.parent.is_empty())
        .expect("the first delivery starts a trace");
    let trace = root.trace.clone();
    let first = traced.assert_one_trace(&trace);
    assert!(first.parent.is_empty(), "{first:?}");
    traced.assert_handler_in(&trace);
    traced.assert_death_logged();
    let row = traced.row_trace.clone().expect("the row keeps the context");
    assert_eq!(row, format!("00-{trace}-{}-01", first.id));
    let tp = traced.dlq_traceparent();
    assert!(
        tp.starts_with(&format!("00-{trace}-")),
        "the DLQ record goes on in the message's trace: {tp}"
    );
}

#[tokio::test]
async fn trace_ratio_samples_the_traces_redrive_starts_and_follows_a_records_own() {
    let db = TestDb::new().await;
    let (topic, group) = (unique("sampled"), unique("g"));
    create_topic(&topic, 1).await;
    create_topic(&format!("{topic}.dlq"), 1).await;
    let stub = Stub::start(|_| (200, vec![])).await;
    let (port, got) = receiver().await;
    let config = traced_config(
        &db,
        (&topic, &group),
        &format!("http://{}/", stub.addr),
        &format!("http://127.0.0.1:{port}"),
        "trace_ratio = 0.0",
    );
    let mut run = spawn_redrive(&config.0, &[]);
    let producer = producer(&kafka());
    // Ten records of no trace (none of them is exported at a ratio of 0), and one whose producer
    // sampled its trace (followed).
    for i in 0..10u8 {
        produce(&producer, &topic, Some(&[i]), Some(b"{}"), &[]).await;
    }
    let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
    produce(
        &producer,
        &topic,
        Some(b"k"),
        Some(b"{}"),
        &[("traceparent", Some(parent.as_bytes()))],
    )
    .await;
    wait_for("eleven handler calls", Duration::from_secs(60), || async {
        (stub.count() == 11).then_some(())
    })
    .await;
    // The exporter sends what it holds before redrive exits.
    assert!(terminate(&mut run).await.success());
    let spans = spans(&got);
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].trace, TRACE);
    assert_eq!(spans[0].parent, "00f067aa0ba902b7");
}

/// `https://` endpoints, for the handler and the collector: the handler is called and spans reach
/// the collector when their CA is trusted (`SSL_CERT_FILE` names it, as the system's roots
/// would); when it is not, the handler's failure and the failed export both name the certificate.
#[tokio::test]
async fn an_https_handler_and_collector_work_when_their_certificate_is_trusted() {
    let db = TestDb::new().await;
    let (port, got, calls, ca) = tls_receiver().await;
    let ca_file = write_config(&ca);
    for trusted in [true, false] {
        let (topic, group) = (unique("tls"), unique("g"));
        create_topic(&topic, 1).await;
        create_topic(&format!("{topic}.dlq"), 1).await;
        let url = format!("https://localhost:{port}");
        let config = traced_config(&db, (&topic, &group), &format!("{url}/"), &url, "");
        let (mut command, log_path) = logged_run(&config, &topic);
        command
            .env("REDRIVE_LOG", "warn")
            .env_remove("SSL_CERT_DIR");
        if trusted {
            command.env("SSL_CERT_FILE", &ca_file.0);
        } else {
            command.env_remove("SSL_CERT_FILE");
        }
        let mut run = command.spawn().unwrap();
        produce(&producer(&kafka()), &topic, Some(b"k"), Some(b"{}"), &[]).await;
        if trusted {
            wait_for("the handler's call", Duration::from_secs(60), || async {
                (calls.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
            })
            .await;
        } else {
            let error = wait_for("the failure's row", Duration::from_secs(60), || async {
                sqlx::query_scalar::<_, Option<String>>(
                    "SELECT last_error FROM redrive.retry_messages WHERE topic = $1",
                )
                .bind(&topic)
                .fetch_optional(db.pool())
                .await
                .unwrap()
                .flatten()
            })
            .await;
            assert!(error.to_lowercase().contains("certificate"), "{error}");
            assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        }
        // The exporter sends what it holds, or fails to, before redrive exits.
        assert!(terminate(&mut run).await.success());
        let ours = spans(&got)
            .into_iter()
            .filter(|s| s.name == format!("{topic} process"))
            .count();
        assert_eq!(ours, usize::from(trusted), "trusted: {trusted}");
        // An export that fails says why.
        let log = std::fs::read_to_string(&log_path).unwrap();
        let _ = std::fs::remove_file(&log_path);
        let failed = format!("exporting traces to https://localhost:{port}/v1/traces failed");
        assert_eq!(log.contains(&failed), !trusted, "{log}");
        if !trusted {
            assert!(log.to_lowercase().contains("certificate"), "{log}");
        }
    }
}
