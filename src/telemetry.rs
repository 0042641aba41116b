//! Tracing and metrics setup. Logs go to stderr, filtered by `REDRIVE_LOG` (or `RUST_LOG`), as
//! text for people or, with `REDRIVE_LOG_FORMAT=json`, one JSON object per line for log
//! collectors; metrics are Prometheus counters and gauges named `redrive_…`, served on `/metrics`.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

/// Default log filter: redrive at info, noisy dependencies at warn.
pub const DEFAULT_FILTER: &str =
    "info,sqlx=warn,rdkafka=warn,librdkafka=warn,hyper=warn,reqwest=warn";

/// Installs the global tracing subscriber. Safe to call more than once (later calls do nothing).
///
/// `REDRIVE_LOG_FORMAT=json` writes each event as one JSON object: `timestamp`, `level`, `fields`
/// (the message and the event's fields) and `spans` (the fields of the spans it is in). Any other
/// value than `json` or `text` is reported on stderr, and text is used.
pub fn init_tracing() {
    let filter = std::env::var("REDRIVE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| DEFAULT_FILTER.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false);
    let format = std::env::var("REDRIVE_LOG_FORMAT").unwrap_or_default();
    let _ = match format.as_str() {
        "json" => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
        "" | "text" => builder.try_init(),
        other => {
            eprintln!("REDRIVE_LOG_FORMAT={other:?} is not `json` or `text`: logging as text");
            builder.try_init()
        }
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder was installed first; ours then renders nothing new.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
