//! Integration tests on a real Postgres and a real Kafka broker (`make test` starts both); the
//! librdkafka mock cluster stands in where a broker fault is injected.

mod breaker;
mod console;
mod consumer;
mod deploy;
mod dlq;
mod e2e;
mod hardening;
mod helpers;
mod key_order;
mod metrics;
mod operators;
mod ordering;
mod rebalance;
mod startup;
mod status;
mod store;
mod traces;
mod upgrade;
mod workers;
