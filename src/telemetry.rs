//! Tracing and metrics setup. Logs go to stderr, filtered by `REDRIVE_LOG` (or `RUST_LOG`), as
//! text for people or, with `REDRIVE_LOG_FORMAT=json`, one JSON object per line for log
//! collectors; metrics are Prometheus counters and gauges named `redrive_…`, served on `/metrics`.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

/// Default log filter: redrive at info, noisy dependencies at warn. The migration library's lines
/// and the notices Postgres sends during a migration are left out: `redrive migrate` reports each
/// migration it applies itself.
pub const DEFAULT_FILTER: &str =
    "info,sqlx=warn,rdkafka=warn,librdkafka=warn,hyper=warn,reqwest=warn,\
     refinery_core=warn,tokio_postgres=warn";

/// Installs the global tracing subscriber. Safe to call more than once (later calls do nothing).
///
/// `REDRIVE_LOG_FORMAT=json` writes each event as one JSON object: `timestamp`, `level`, `fields`
/// (the message and the event's fields) and `spans` (the fields of the spans it is in). Any other
/// value than `json` or `text` is reported on stderr, and text is used.
pub fn init_tracing() {
    let _ = init_tracing_with(None);
}

/// [`init_tracing`], and when `telemetry.otlp_endpoint` is set, traces exported over OTLP/HTTP:
/// a span per first delivery and per retry attempt (see [`process_span`]). Returns what must be
/// shut down to flush them; an exporter that cannot be built is reported and left out.
pub fn init_tracing_with(telemetry: Option<&crate::config::TelemetryConfig>) -> Option<Traces> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = std::env::var("REDRIVE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| DEFAULT_FILTER.to_string());
    let format = std::env::var("REDRIVE_LOG_FORMAT").unwrap_or_default();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let logs: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = match format.as_str() {
        "json" => fmt
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(Fresh(EnvFilter::new(&filter)))
            .boxed(),
        "" | "text" => fmt.with_filter(Fresh(EnvFilter::new(&filter))).boxed(),
        other => {
            eprintln!("REDRIVE_LOG_FORMAT={other:?} is not `json` or `text`: logging as text");
            fmt.with_filter(Fresh(EnvFilter::new(&filter))).boxed()
        }
    };
    let traces = telemetry
        .and_then(|t| Some((t.otlp_endpoint.as_deref()?, t)))
        .and_then(
            |(endpoint, t)| match Traces::new(endpoint, &t.service_name, t.trace_ratio) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!(
                        "traces are off: the OTLP exporter to {endpoint} could not be built: {e}"
                    );
                    None
                }
            },
        );
    let otel = traces.as_ref().map(|t| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(t.provider.tracer("redrive"))
            .with_filter(Fresh(tracing_subscriber::filter::filter_fn(|m| {
                m.is_span() && EXPORTED.contains(&m.name())
            })))
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && traces.is_some() {
        TRACES.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    traces.filter(|_| installed)
}

/// A per-layer filter whose callsites are never cached as always enabled, so its `enabled` runs
/// on every span and event it lets through. tracing-subscriber hands each filter's decision from
/// `enabled` to the span or event through a thread-local; a callsite cached as always enabled
/// skips `enabled`, and reads what the last check left there. sqlx checks `log_enabled!` after
/// every statement, which leaves "disabled" behind: the next span of an always-enabled callsite
/// was dropped from every layer (a retry's span, made right after its claim, never reached the
/// exporter or the log). Callsites a filter disables stay cached as never: what is not logged
/// costs what it did.
struct Fresh<F>(F);

impl<S, F: tracing_subscriber::layer::Filter<S>> tracing_subscriber::layer::Filter<S> for Fresh<F> {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        let interest = self.0.callsite_enabled(meta);
        if interest.is_always() {
            tracing::subscriber::Interest::sometimes()
        } else {
            interest
        }
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_new_span(attrs, id, cx)
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_record(id, values, cx)
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, cx)
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, cx)
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, cx)
    }
}

/// The spans exported: [`process_span`], [`capture_span`] and [`publish_span`].
const EXPORTED: [&str; 3] = ["process", "capture", "publish"];

static TRACES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported: when not, [`process_span`] makes none, and the happy path pays for
/// nothing.
pub fn traces_on() -> bool {
    TRACES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The OTLP exporter's HTTP client: redrive's own (rustls, trusting the system's roots and
/// Mozilla's, so `https://` endpoints work, and `SSL_CERT_FILE` names a private CA). The SDK's
/// batch processor exports from a thread of its own, outside any runtime: each request runs on
/// the process's runtime, and the thread waits for it.
/// A failed export is logged at most once a minute, with how many failed since.
#[derive(Debug)]
struct OtlpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    endpoint: String,
    failures: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
}

impl OtlpClient {
    fn failed(&self, why: &dyn std::fmt::Display) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.0 += 1;
        if failures
            .1
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(60))
        {
            return;
        }
        tracing::warn!(
            failures = failures.0,
            "exporting traces to {} failed, and their spans are dropped: {why}",
            self.endpoint
        );
        *failures = (0, Some(std::time::Instant::now()));
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        let sent = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let (status, headers) = (response.status(), response.headers().clone());
            let mut out = opentelemetry_http::Response::new(response.bytes().await?);
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok::<_, opentelemetry_http::HttpError>(out)
        });
        let answer = sent.await.map_err(Into::into).and_then(|r| r);
        match &answer {
            // The whole chain: reqwest's own text ends at "client error (Connect)".
            Err(e) => self.failed(&crate::handler::http::error_chain(e.as_ref())),
            Ok(r) if !r.status().is_success() => {
                self.failed(&format!("the collector answered {}", r.status()))
            }
            Ok(_) => {}
        }
        answer
    }
}

/// The trace exporter; [`Traces::shutdown`] sends what is still queued.
pub struct Traces {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Traces {
    fn new(endpoint: &str, service: &str, ratio: f64) -> anyhow::Result<Traces> {
        use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
        use opentelemetry_sdk::trace::Sampler;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("traces are exported from a tokio runtime; none runs"))?;
        let endpoint = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let client = OtlpClient {
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?,
            runtime,
            endpoint: endpoint.clone(),
            failures: Default::default(),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(endpoint)
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_string())
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            // A trace started elsewhere is followed as its parent says.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .build();
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Ok(Traces { provider })
    }

    /// Sends the spans still queued; call before the process exits.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("sending the last traces failed: {e}");
        }
    }
}

/// The span of one delivery of `message` to the handler (a first delivery, or the retry of `row`),
/// following the OpenTelemetry messaging conventions. A retry's span is a child of the first
/// delivery's (`trace`, the context its row keeps); a first delivery's, of the record's
/// `traceparent` when it has one. `Span::none()` when traces are off (a debug span when
/// `REDRIVE_LOG` asks for debug).
pub fn process_span(
    message: &crate::message::Message,
    group: &str,
    attempt: u32,
    row: Option<uuid::Uuid>,
    trace: Option<&str>,
) -> tracing::Span {
    let path = if row.is_some() { "retry" } else { "first" };
    if !traces_on() {
        return if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!("message", topic = %message.topic,
                partition = message.partition, offset = message.offset, attempt, path,
                id = row.map(tracing::field::display))
        } else {
            tracing::Span::none()
        };
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!("process",
        otel.name = %format!("{} process", message.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %message.topic,
        messaging.consumer.group.name = %group,
        messaging.destination.partition.id = %message.partition,
        messaging.kafka.offset = message.offset,
        redrive.attempt = attempt,
        redrive.path = path);
    if let Some(parent) = trace
        .and_then(stored_context)
        .or_else(|| record_context(message))
    {
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of making a failed first delivery durable: from handing it to the capturer until its
/// row is committed, a child of the delivery's `process` span. `Span::none()` when traces are off.
pub fn capture_span(process: &tracing::Span, state: &'static str) -> tracing::Span {
    if !traces_on() || process.is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(parent: process, "capture",
        otel.name = "redrive capture",
        otel.kind = "internal",
        redrive.state = state)
}

/// The span of producing a dead row to its DLQ topic, a child of its first delivery's span
/// (`trace`, the context its row keeps) or else of the record's `traceparent`. `Span::none()` when
/// traces are off.
pub fn publish_span(
    message: &crate::message::Message,
    dlq_topic: &str,
    group: &str,
    trace: Option<&str>,
) -> tracing::Span {
    if !traces_on() {
        return tracing::Span::none();
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!("publish",
        otel.name = %format!("{dlq_topic} publish"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %dlq_topic,
        messaging.consumer.group.name = %group,
        redrive.origin.topic = %message.topic,
        redrive.origin.partition = message.partition,
        redrive.origin.offset = message.offset);
    if let Some(parent) = trace
        .and_then(stored_context)
        .or_else(|| record_context(message))
    {
        let _ = span.set_parent(parent);
    }
    span
}

/// `span`'s context as a row keeps it: the `traceparent`, then the `tracestate` after a newline
/// when there is one. `None` when traces are off or the span is not exported.
pub fn context_text(span: &tracing::Span) -> Option<String> {
    let headers = exported_headers(span);
    let parent = headers.iter().find(|(n, _)| *n == "traceparent")?;
    Some(match headers.iter().find(|(n, _)| *n == "tracestate") {
        Some((_, state)) => format!("{}\n{state}", parent.1),
        None => parent.1.clone(),
    })
}

/// An exported span's context as W3C headers (`traceparent`, and `tracestate` when not empty);
/// none when traces are off or the span is not exported.
pub fn exported_headers(span: &tracing::Span) -> Vec<(&'static str, String)> {
    if !traces_on() || span.is_none() {
        return Vec::new();
    }
    span_headers(span)
}

/// A context a row keeps ([`context_text`]) as W3C headers.
pub fn stored_headers(text: &str) -> Vec<(&'static str, String)> {
    let mut lines = text.splitn(2, '\n');
    let mut out = Vec::with_capacity(2);
    if let Some(parent) = lines.next().filter(|p| !p.is_empty()) {
        out.push(("traceparent", parent.to_string()));
        if let Some(state) = lines.next().filter(|s| !s.is_empty()) {
            out.push(("tracestate", state.to_string()));
        }
    }
    out
}

/// A context a row keeps, when it is a valid one.
fn stored_context(text: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    let carrier: std::collections::HashMap<String, String> = stored_headers(text)
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// A span's context as W3C headers (`traceparent`, and `tracestate` when not empty).
fn span_headers(span: &tracing::Span) -> Vec<(&'static str, String)> {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut carrier = std::collections::HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&span.context(), &mut carrier);
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| Some((name, carrier.remove(name).filter(|v| !v.is_empty())?)))
        .collect()
}

/// The trace context a record carries in its `traceparent` (and `tracestate`) headers.
fn record_context(message: &crate::message::Message) -> Option<opentelemetry::Context> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    let text = |name: &str| {
        let value = message.header(name)?.value.clone()?;
        String::from_utf8(value).ok()
    };
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), text("traceparent")?);
    if let Some(state) = text("tracestate") {
        carrier.insert("tracestate".to_string(), state);
    }
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The current span's context as W3C headers, for the HTTP handler: `traceparent` and
/// `tracestate`, and the same as the CloudEvents extension `ce-traceparent`/`ce-tracestate`.
/// Empty when traces are off.
pub fn outgoing_context() -> Vec<(&'static str, String)> {
    if !traces_on() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(4);
    for (name, value) in span_headers(&tracing::Span::current()) {
        let ce = if name == "traceparent" {
            "ce-traceparent"
        } else {
            "ce-tracestate"
        };
        out.push((name, value.clone()));
        out.push((ce, value));
    }
    out
}

/// The buckets of every `…_seconds` histogram: 1 ms to 5 minutes.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The buckets of `redrive_batch_rows`: 1 to 10,000 rows.
pub const ROWS_BUCKETS: [f64; 10] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 10000.0,
];

/// The consumer group of this process, a label of every metric that has none of its own.
static PROCESS_GROUP: OnceLock<String> = OnceLock::new();

/// Labels every metric of this process that has no `group` of its own with `group` (the `redrive
/// run` of one configuration: one group). Call it before [`metrics`] is first used; later, or a
/// second time, it does nothing. The row gauges keep the group of each of their rows.
pub fn label_metrics_with_group(group: &str) {
    let _ = PROCESS_GROUP.set(group.to_string());
}

/// The process-wide Prometheus recorder, installed on first use. Histograms are rendered as
/// Prometheus histograms with [`SECONDS_BUCKETS`] or [`ROWS_BUCKETS`]; a thread folds recorded
/// values into them every 5 seconds, so memory stays bounded however rarely `/metrics` is read.
pub fn metrics() -> &'static PrometheusHandle {
    use metrics_exporter_prometheus::Matcher;
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        if let Some(group) = PROCESS_GROUP.get() {
            builder = builder.add_global_label("group", group);
        }
        let recorder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full("redrive_batch_rows".into()), &ROWS_BUCKETS)
            })
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder was installed first; ours then renders nothing new.
        let _ = metrics::set_global_recorder(recorder);
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .expect("a thread for the metrics' upkeep");
        handle
    })
}

/// A histogram in [`SECONDS_BUCKETS`] counted here rather than by the `metrics` recorder, which
/// keeps every value until its upkeep: on the happy path a batch's messages that finish together
/// cost one bucket lookup each and a few atomic additions in all, not one push per message (the
/// recorder's way cost the in-process happy path 8 %, BENCHMARKS.md). Two families use it:
/// `redrive_handler_duration_seconds{group, path, outcome}` and
/// `redrive_end_to_end_seconds{group, path}` (from the record's timestamp to its success).
pub struct Durations {
    family: &'static str,
    /// `group="…",…`, escaped.
    labels: String,
    /// Per bucket, not cumulative; the last is `+Inf`.
    counts: [std::sync::atomic::AtomicU64; SECONDS_BUCKETS.len() + 1],
    sum_nanos: std::sync::atomic::AtomicU64,
}

/// Values gathered by one task, added to a [`Durations`] at once.
#[derive(Debug, Default)]
pub struct Tally {
    counts: [u64; SECONDS_BUCKETS.len() + 1],
    sum_nanos: u64,
}

impl Tally {
    pub fn add(&mut self, took: std::time::Duration) {
        self.counts[bucket(took)] += 1;
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
    }
}

fn bucket(took: std::time::Duration) -> usize {
    let secs = took.as_secs_f64();
    SECONDS_BUCKETS.partition_point(|le| *le < secs)
}

fn durations() -> &'static std::sync::Mutex<Vec<std::sync::Arc<Durations>>> {
    static ALL: OnceLock<std::sync::Mutex<Vec<std::sync::Arc<Durations>>>> = OnceLock::new();
    ALL.get_or_init(Default::default)
}

fn histogram(family: &'static str, labels: &[(&str, &str)]) -> std::sync::Arc<Durations> {
    let escape = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let labels = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",");
    let mut all = durations().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = all
        .iter()
        .find(|d| d.family == family && d.labels == labels)
    {
        return d.clone();
    }
    let d = std::sync::Arc::new(Durations {
        family,
        labels,
        counts: Default::default(),
        sum_nanos: Default::default(),
    });
    all.push(d.clone());
    d
}

/// The handler-duration histogram of one label set; take it once where calls are many.
pub fn handler_durations(group: &str, path: &str, outcome: &str) -> std::sync::Arc<Durations> {
    histogram(
        "redrive_handler_duration_seconds",
        &[("group", group), ("path", path), ("outcome", outcome)],
    )
}

/// The end-to-end histogram of one group and path (`first` or `retry`): from the Kafka record's
/// timestamp to the handler's success.
pub fn end_to_end(group: &str, path: &str) -> std::sync::Arc<Durations> {
    histogram(
        "redrive_end_to_end_seconds",
        &[("group", group), ("path", path)],
    )
}

/// The counters of one family by its `outcome` label, each looked up once, on its first use (so a
/// series appears only once something is counted in it): a look-up formats and hashes the labels,
/// which costs more than the count where one is made per message or per attempt.
pub struct OutcomeCounters<const N: usize> {
    family: &'static str,
    by_outcome: [OnceLock<metrics::Counter>; N],
}

impl<const N: usize> OutcomeCounters<N> {
    pub fn new(family: &'static str) -> Self {
        Self {
            family,
            by_outcome: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Adds `n` to the counter of `outcome`, which is always the `at`-th of the family's outcomes.
    pub fn add(&self, at: usize, outcome: &'static str, n: u64) {
        self.by_outcome[at]
            .get_or_init(|| metrics::counter!(self.family, "outcome" => outcome))
            .increment(n);
    }
}

/// The time from a record's timestamp to `now`, or `None` without a timestamp; a timestamp in the
/// future (a producer's clock ahead) counts as no time.
pub fn since_record(
    timestamp: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    Some((now - timestamp?).to_std().unwrap_or_default())
}

impl Durations {
    /// Counts `n` values that each took `took`.
    pub fn record_many(&self, took: std::time::Duration, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if n == 0 {
            return;
        }
        self.counts[bucket(took)].fetch_add(n, Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos.saturating_mul(n), Relaxed);
    }

    pub fn record(&self, took: std::time::Duration) {
        self.record_many(took, 1);
    }

    /// Adds what a task gathered.
    pub fn add(&self, tally: &Tally) {
        use std::sync::atomic::Ordering::Relaxed;
        for (count, n) in self.counts.iter().zip(tally.counts) {
            if n > 0 {
                count.fetch_add(n, Relaxed);
            }
        }
        self.sum_nanos.fetch_add(tally.sum_nanos, Relaxed);
    }
}

/// What `/metrics` serves: the recorder's metrics, then the histograms counted here.
pub fn render() -> String {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = metrics().render();
    let mut all = durations()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    all.sort_by_key(|d| d.family);
    let mut family = "";
    for d in all {
        let name = d.family;
        if name != family {
            let _ = writeln!(out, "# TYPE {name} histogram");
            family = name;
        }
        let mut cumulative = 0;
        for (i, le) in SECONDS_BUCKETS.iter().enumerate() {
            cumulative += d.counts[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{},le=\"{le}\"}} {cumulative}",
                d.labels
            );
        }
        cumulative += d.counts[SECONDS_BUCKETS.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{},le=\"+Inf\"}} {cumulative}",
            d.labels
        );
        let sum = d.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{}}} {sum}", d.labels);
        let _ = writeln!(out, "{name}_count{{{}}} {cumulative}", d.labels);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn handler_durations_render_as_a_prometheus_histogram() {
        let d = handler_durations("g\"1", "first", "succeeded");
        d.record_many(Duration::from_micros(500), 3);
        d.record(Duration::from_millis(30));
        d.record(Duration::from_secs(900));
        assert!(std::sync::Arc::ptr_eq(
            &d,
            &handler_durations("g\"1", "first", "succeeded")
        ));
        let text = render();
        let labels = r#"group="g\"1",path="first",outcome="succeeded""#;
        for (le, n) in [
            ("0.001", 3),
            ("0.025", 3),
            ("0.05", 4),
            ("300", 4),
            ("+Inf", 5),
        ] {
            let line =
                format!("redrive_handler_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(text.contains(&format!(
            "redrive_handler_duration_seconds_count{{{labels}}} 5\n"
        )));
        assert!(
            text.contains(&format!(
                "redrive_handler_duration_seconds_sum{{{labels}}} 900.0315\n"
            )),
            "{text}"
        );
    }
}
