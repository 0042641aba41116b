//! The messages of a chaos run and the HTTP handler that answers them.
//!
//! Each message's class follows from its index, so the handler, the producer and the checks agree
//! without sharing state: most succeed, some fail twice then succeed, some fail for good (a 400, an
//! error body with a NUL byte, a panic in the library handler, a value too large for the DLQ topic,
//! a header name that is not UTF-8).

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use redrive::message::{Header, Message};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Larger than the DLQ topic takes (its `max.message.bytes` is [`DLQ_MAX_BYTES`]).
pub const BIG_BYTES: usize = 200 << 10;
/// The DLQ topic's `max.message.bytes`.
pub const DLQ_MAX_BYTES: usize = 100 << 10;
/// Attempts a message gets in all.
pub const MAX_ATTEMPTS: u32 = 3;
/// The first retry delay; each next one doubles (no jitter).
pub const INITIAL_DELAY_MS: u64 = 200;

/// What a message does to its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Ok,
    /// 503 on attempts 1 and 2, then 200.
    Transient,
    /// 400: dead at once.
    Permanent,
    /// 500 with the body `bad\0thing`, every time: dead after the last attempt.
    Nul,
    /// The library handler panics; the HTTP handler answers 400.
    Panic,
    /// 400, and a value too large for the DLQ topic: dead, and refused by the DLQ broker.
    Big,
    /// 400, and a header whose name is not UTF-8: dead, and in the DLQ byte for byte.
    OddHeader,
}

impl Class {
    pub fn of(i: usize) -> Class {
        match i % 10 {
            0..=5 => Class::Ok,
            6 => Class::Transient,
            7 => Class::Permanent,
            8 => Class::Nul,
            _ => match (i / 10) % 4 {
                0 => Class::Panic,
                1 => Class::Big,
                2 => Class::OddHeader,
                _ => Class::Ok,
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::Transient => "transient",
            Class::Permanent => "permanent",
            Class::Nul => "nul",
            Class::Panic => "panic",
            Class::Big => "big",
            Class::OddHeader => "odd-header",
        }
    }
}

/// Message `i` as it is produced (topic, partition and offset are filled in by the broker).
pub fn message(topic: &str, i: usize) -> Message {
    let class = Class::of(i);
    let mut payload = format!("{}:{i}:", class.name()).into_bytes();
    let size = if class == Class::Big { BIG_BYTES } else { 200 };
    payload.resize(size, b'.');
    let mut headers = vec![Header::new("chaos-index", Some(i.to_string().into_bytes()))];
    if class == Class::OddHeader {
        headers.push(Header {
            key: vec![0xff, b'o', b'd', b'd'],
            value: Some(vec![0, 1, 0xfe]),
        });
    }
    Message {
        topic: topic.to_string(),
        partition: -1,
        offset: -1,
        timestamp: None,
        key: Some(format!("k{}", key_of(i)).into_bytes()),
        payload: Some(payload),
        headers,
    }
}

/// The key of message `i`: `k` and this number. Ten messages in a row share a key, so each key
/// gets every class of [`Class::of`] in turn. (With `i % 50`, a key's messages were all of one
/// class: under key order, five keys retried every message twice and five more let every message
/// die after three attempts, one message at a time, and the long run could never settle.)
pub fn key_of(i: usize) -> usize {
    (i / 10) % 50
}

/// The index of a message from its value.
pub fn index_of(payload: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(payload.get(..payload.len().min(40))?).ok()?;
    text.split(':').nth(1)?.parse().ok()
}

/// One call the handler answered.
#[derive(Debug, Clone)]
pub struct Call {
    pub index: usize,
    pub attempt: u32,
    pub arrived: Instant,
    pub answered: Instant,
    pub status: u16,
}

/// Every call, in the order they were answered.
pub type Calls = Arc<Mutex<Vec<Call>>>;

/// Starts the HTTP handler on a free loopback port.
pub async fn start() -> anyhow::Result<(SocketAddr, Calls)> {
    let calls = Calls::default();
    let sink = calls.clone();
    let app = Router::new().route(
        "/",
        post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let arrived = Instant::now();
                let attempt = headers
                    .get(redrive::handler::http::ATTEMPT_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0);
                let Some(index) = index_of(&body) else {
                    return (StatusCode::BAD_REQUEST, Vec::new());
                };
                let (status, body) = match Class::of(index) {
                    Class::Ok => (200, Vec::new()),
                    Class::Transient if attempt < 3 => (503, Vec::new()),
                    Class::Transient => (200, Vec::new()),
                    Class::Nul => (500, b"bad\0thing".to_vec()),
                    Class::Permanent | Class::Panic | Class::Big | Class::OddHeader => {
                        (400, Vec::new())
                    }
                };
                sink.lock().unwrap().push(Call {
                    index,
                    attempt,
                    arrived,
                    answered: Instant::now(),
                    status,
                });
                (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, calls))
}

/// The library handler of the `worker` processes: panics on `panic` messages, and hands every
/// other message to the HTTP handler.
pub struct Library(pub redrive::handler::http::HttpHandler);

impl redrive::Handler for Library {
    async fn handle(&self, d: redrive::handler::Delivery<'_>) -> Result<(), redrive::HandlerError> {
        let index = d.message.payload.as_deref().and_then(index_of);
        if index.map(Class::of) == Some(Class::Panic) {
            panic!("chaos: a library handler panics on message {index:?}");
        }
        self.0.handle(d).await
    }
}
