use super::*;
use crate::backoff::BackoffKind;
use crate::store::capture::{Line, OnDead};

const MINIMAL: &str = r#"
[postgres]
url = "postgres://redrive:hunter2@127.0.0.1:5432/redrive"

[kafka]
topics = ["orders"]
"bootstrap.servers" = "127.0.0.1:9092"
"group.id" = "g1"
"enable.idempotence" = true
"queued.max.messages.kbytes" = 1024
"#;

fn with(extra: &str) -> Result<Config, ConfigError> {
    Config::from_toml(&format!("{MINIMAL}\n{extra}"))
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = with("").unwrap();
    assert_eq!(c.kafka.topics, vec!["orders"]);
    assert_eq!(c.kafka.group_id(), "g1");
    assert_eq!(c.kafka.properties["enable.idempotence"], "true");
    assert_eq!(c.kafka.properties["queued.max.messages.kbytes"], "1024");
    assert_eq!(c.retry.default, RetryPolicy::default());
    assert_eq!(c.handler.timeout, Duration::from_secs(30));
    assert_eq!(c.dlq.topic, "{topic}.dlq");
}

#[test]
fn durations_are_human() {
    let c = with("[workers]\nlease = \"2m\"\n[handler]\ntimeout = \"1500ms\"").unwrap();
    assert_eq!(c.workers.lease, Duration::from_secs(120));
    assert_eq!(c.handler.timeout, Duration::from_millis(1500));
}

#[test]
fn per_topic_retry_overrides_keep_the_other_defaults() {
    let c = with(
        "[retry]\nmax_attempts = 4\ninitial_delay = \"1s\"\n\
         [retry.topics.\"orders\"]\nmax_attempts = 10\nbackoff = \"linear\"",
    )
    .unwrap();
    assert_eq!(c.retry.for_topic("other").max_attempts, 4);
    let orders = c.retry.for_topic("orders");
    assert_eq!(orders.max_attempts, 10);
    assert_eq!(orders.backoff, BackoffKind::Linear);
    assert_eq!(orders.initial_delay, Duration::from_secs(1));
}

#[test]
fn key_ordering_is_set_per_topic_and_off_by_default() {
    let c = with(
        "[retry.topics.\"orders\"]\nordering = \"key\"\n\
         [retry.topics.\"audit\"]\nordering = \"key\"\non_dead = \"skip\"",
    )
    .unwrap();
    assert_eq!(c.retry.default.ordering, OrderingMode::None);
    assert!(c.retry.any_ordered());
    let orders = c.retry.for_topic("orders");
    assert_eq!(orders.ordering, OrderingMode::Key);
    assert_eq!(
        orders.on_dead,
        OnDead::Block,
        "a dead message blocks its key by default"
    );
    assert_eq!(c.retry.for_topic("audit").on_dead, OnDead::Skip);
    assert_eq!(c.retry.for_topic("other").line(Some(b"k")), None);
    assert_eq!(
        orders.line(None),
        None,
        "a record without a key has no order to keep"
    );
    assert_eq!(orders.line(Some(b"k")), Some(Line::of(b"k", OnDead::Block)));
    assert!(!with("").unwrap().retry.any_ordered());
    let e = error_of("[retry]\nordering = \"partition\"");
    assert!(e.contains("retry") && e.contains("ordering"), "{e}");
    let e = error_of("[retry.topics.\"orders\"]\non_dead = \"later\"");
    assert!(e.contains("on_dead"), "{e}");
}

fn error_of(extra: &str) -> String {
    with(extra).unwrap_err().to_string()
}

#[test]
fn bad_values_name_their_field() {
    let e = error_of("[retry]\nmax_attempts = \"many\"");
    assert!(e.contains("max_attempts"), "{e}");
    let e = error_of("[retry.topics.\"orders\"]\njitter = 3.0");
    assert!(e.contains("retry.topics.\"orders\".jitter"), "{e}");
    let e = error_of("[workers]\nlease = \"soon\"");
    assert!(e.contains("lease"), "{e}");
    let e = error_of("[handler]\nretryable_statuses = [\"5xy\"]");
    assert!(e.contains("handler.retryable_statuses"), "{e}");
    let e = error_of("[workers]\nconcurrency = 0");
    assert!(e.contains("workers.concurrency"), "{e}");
    let e = error_of("[telemetry]\ntrace_ratio = 1.5");
    assert!(
        e.contains("telemetry.trace_ratio") && e.contains("from 0 to 1"),
        "{e}"
    );
    let e = error_of("[telemetry]\notlp_endpoint = \"collector:4318\"");
    assert!(e.contains("telemetry.otlp_endpoint"), "{e}");
    let e = error_of("[telemetry]\notlp_endpoint = \"grpc://collector:4317\"");
    assert!(e.contains("must start with http:// or https://"), "{e}");
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let e = error_of("[workers]\nconcurency = 3");
    assert!(e.contains("concurency"), "{e}");
}

#[test]
fn missing_group_and_topics_are_named() {
    let e = Config::from_toml("[postgres]\nurl = \"postgres://a@b/c\"\n[kafka]\ntopics = [\"t\"]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("group.id"), "{e}");
    let e =
        Config::from_toml("[postgres]\nurl = \"postgres://a@b/c\"\n[kafka]\n\"group.id\" = \"g\"")
            .unwrap_err()
            .to_string();
    assert!(e.contains("kafka.topics"), "{e}");
}

#[test]
fn nested_environment_style_keys_become_dotted_properties_and_win() {
    let dict: Dict = Figment::from(Toml::string(
        "\"bootstrap.servers\" = \"file:9092\"\n[bootstrap]\nservers = \"env:9092\"\n[group]\nid = \"g\"",
    ))
    .extract()
    .unwrap();
    let props = flatten_properties(dict, "kafka").unwrap();
    assert_eq!(props["bootstrap.servers"], "env:9092");
    assert_eq!(props["group.id"], "g");
}

#[test]
fn the_password_never_prints() {
    let c = with(
        "\"sasl.password\" = \"kafka-hunter3\"\n[dlq.kafka]\n\"sasl.password\" = \"dlq-hunter4\"",
    )
    .unwrap();
    assert_eq!(c.kafka.properties["sasl.password"], "kafka-hunter3");
    let debug = format!("{c:?}");
    for secret in ["hunter2", "hunter3", "hunter4"] {
        assert!(!debug.contains(secret), "{debug}");
    }
    assert_eq!(
        redact_url("postgres://redrive:hunter2@127.0.0.1:5432/redrive"),
        "postgres://redrive:***@127.0.0.1:5432/redrive"
    );
    assert!(kafka_property_is_secret("sasl.password"));
    assert!(!kafka_property_is_secret("bootstrap.servers"));
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
fn environment_variables_override_the_file() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("redrive.toml", MINIMAL)?;
        jail.set_env("REDRIVE_KAFKA__GROUP_ID", "from-env");
        jail.set_env("REDRIVE_KAFKA__TOPICS", "a,b");
        jail.set_env("REDRIVE_RETRY__MAX_ATTEMPTS", "8");
        jail.set_env("REDRIVE_HANDLER__TIMEOUT", "2s");
        jail.set_env("REDRIVE_TEST_DATABASE_URL", "not config: ignored");
        let c = Config::load(Some(Path::new("redrive.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.kafka.group_id(), "from-env");
        assert_eq!(c.kafka.topics, vec!["a", "b"]);
        assert_eq!(c.retry.default.max_attempts, 8);
        assert_eq!(c.handler.timeout, Duration::from_secs(2));
        jail.set_env("REDRIVE_WORKERS__LEASE", "never");
        let e = Config::load(Some(Path::new("redrive.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.to_lowercase().contains("workers.lease"), "{e}");
        Ok(())
    });
}

#[test]
fn a_missing_file_is_named() {
    let e = Config::load(Some(Path::new("/nonexistent/redrive.toml")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/redrive.toml"), "{e}");
}

#[test]
fn the_breaker_is_on_by_default_and_a_topic_may_override_it() {
    let c = with(
        "[breaker]\nfailure_rate = 0.8\n\
         [breaker.topics.\"payments\"]\nwindow_calls = 50\ncount = [\"retryable\"]\n",
    )
    .unwrap();
    let d = &c.breaker.default;
    assert!(d.enabled);
    assert_eq!((d.failure_rate, d.window_calls), (0.8, None));
    let p = c.breaker.for_topic("payments");
    assert_eq!(
        (p.failure_rate, p.window_calls),
        (0.8, Some(50)),
        "inherits the default"
    );
    assert_eq!(p.settings().window, crate::breaker::Window::Calls(50));
    assert_eq!(c.breaker.for_topic("other"), d);
}

#[test]
fn bad_breaker_settings_name_their_field() {
    for (text, field) in [
        ("[breaker]\nfailure_rate = 0.0", "`breaker.failure_rate`"),
        ("[breaker]\nfailure_rate = 1.5", "`breaker.failure_rate`"),
        ("[breaker]\nmin_calls = 0", "`breaker.min_calls`"),
        (
            "[breaker]\nopen_for = \"1m\"\nopen_max = \"10s\"",
            "`breaker.open_max`",
        ),
        ("[breaker]\ncount = []", "`breaker.count`"),
        ("[breaker]\ncount = [\"sometimes\"]", "breaker.count"),
        ("[breaker]\nwindow = \"0s\"", "`breaker.window`"),
        (
            "[breaker.topics.\"t\"]\nprobes = 0",
            "`breaker.topics.\"t\".probes`",
        ),
        ("[breaker]\nhalf_open = 3", "half_open"),
    ] {
        let e = with(text).unwrap_err().to_string();
        assert!(e.contains(field), "{text}: {e}");
    }
}

#[test]
fn the_dlq_rounds_in_flight_are_at_least_one() {
    assert_eq!(with("").unwrap().dlq.rounds_in_flight, None);
    assert_eq!(
        with("[dlq]\nrounds_in_flight = 4")
            .unwrap()
            .dlq
            .rounds_in_flight,
        Some(4)
    );
    let e = with("[dlq]\nrounds_in_flight = 0").unwrap_err().to_string();
    assert!(e.contains("dlq.rounds_in_flight"), "{e}");
    assert!(e.contains("at least 1"), "{e}");
}
