//! redrive gives Kafka consumers durable retries, dead-lettering and replay, with Postgres as the
//! retry store.
//!
//! A consumer hands each Kafka message to a [`Handler`]. A failed message is written to the
//! `redrive.retry_messages` table before its offset may be committed; retry workers claim due rows
//! with `FOR UPDATE SKIP LOCKED`, call the handler again and back off; rows out of attempts become
//! dead and are published to a DLQ topic through an outbox.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and `REDRIVE_…` environment overrides, validated at startup.
//! - [`cli`]: the command line (clap); `main.rs` calls one library function per subcommand.
//! - [`app`]: wires the services of `redrive run` together and owns their shutdown.
//! - [`message`]: a Kafka record as redrive keeps it, byte for byte.
//! - [`handler`]: the [`Handler`] trait and the HTTP (CloudEvents) handler.
//! - [`consumer`]: consumes topics, calls the handler, stores offsets only after a durable outcome.
//! - [`guard`]: the consumer's guards: stalled partitions, and commits that did not arrive.
//! - [`offsets`]: per-partition tracking of the highest offset below which all is durable.
//! - [`lines`]: the consumer's key lines: one message of a key at a time, parking behind a failure (I12).
//! - [`capturer`]: batches failed messages into one INSERT per batch.
//! - [`breaker`]: the circuit breaker that keeps an outage's backlog in Kafka (I13).
//! - [`breaker_sync`]: operators' breaker holds read from Postgres, and each process's states
//!   written there.
//! - [`dispatcher`]: the retry workers: claim due rows, call the handler, hand results on.
//! - [`completer`]: finishes attempts in batches, fenced on the claimed attempt.
//! - [`dlq`]: the outbox publisher that produces dead rows to the DLQ topic.
//! - [`backoff`]: the retry delay, a pure function of the attempt number.
//! - [`store`]: all SQL: migrations, capture, claim, complete, outbox, and the operators' find,
//!   replay, purge and status.
//! - [`ops`]: the operator commands `replay`, `purge` and `status`: chunking, progress, output.
//! - [`kafka`]: librdkafka client configuration and topic checks.
//! - [`batch`]: the collect-a-few-milliseconds helper that capture and completion share.
//! - [`http_server`]: `/metrics`, `/healthz` and `/readyz`.
//! - [`telemetry`]: tracing and metrics setup.
//! - [`shutdown`]: SIGINT/SIGTERM into a cancellation token.

pub mod app;
pub mod backoff;
pub mod batch;
pub mod breaker;
pub mod breaker_sync;
pub mod capturer;
pub mod cli;
pub mod completer;
pub mod config;
pub mod console;
pub mod consumer;
pub mod dispatcher;
pub mod dlq;
pub mod guard;
pub mod handler;
pub mod http_server;
pub mod kafka;
pub mod lines;
pub mod lockwatch;
pub mod message;
pub mod offsets;
pub mod ops;
pub mod sampler;
pub mod shutdown;
pub mod store;
#[doc(hidden)]
pub mod support;
pub mod telemetry;

pub use config::Config;
pub use handler::{ErrorKind, Handler, HandlerError};
pub use message::{Header, Message};
pub use store::Store;
