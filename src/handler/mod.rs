//! The handler contract: what redrive calls for every message, and how a failure is classified.
//!
//! A handler returns `Ok(())` when the message is processed, or a [`HandlerError`] whose
//! [`ErrorKind`] decides what happens next: retryable and timeout errors are retried with backoff,
//! a permanent error makes the row dead at once (DESIGN §4).

pub mod http;

use crate::message::Message;
use futures::FutureExt as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

/// How a failed attempt is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Try again later (5xx, 408, 429, a connection error).
    Retryable,
    /// Never going to work: dead at once (most 4xx).
    Permanent,
    /// The attempt ran out of time; retried like a retryable error.
    Timeout,
}

impl ErrorKind {
    /// The value stored in the table's `error_kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct HandlerError {
    /// Retry or not.
    pub kind: ErrorKind,
    /// What went wrong, stored as `last_error` and in the DLQ headers.
    pub message: String,
    /// The handler's own wish for the next attempt (HTTP `Retry-After`), capped by the policy.
    pub retry_after: Option<Duration>,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retryable,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure that will never succeed: the row goes dead at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }

    /// An attempt that ran out of time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Timeout,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// One call of the handler: the message and which attempt this is (1 = the first delivery).
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The message, byte for byte.
    pub message: &'a Message,
    /// 1 for the consumer's delivery, 2 for the first retry, and so on.
    pub attempt: u32,
    /// The consumer group the message belongs to.
    pub group: &'a str,
}

/// Processes one message. Implement it to use redrive as a library; the binary's HTTP handler is
/// one implementation. A handler is called concurrently and must be safe to call again for the same
/// message (delivery is at least once).
///
/// ```
/// use redrive::handler::{Delivery, Handler, HandlerError};
///
/// struct Mailer;
///
/// impl Handler for Mailer {
///     async fn handle(&self, d: Delivery<'_>) -> Result<(), HandlerError> {
///         match d.message.payload.as_deref() {
///             None => Err(HandlerError::permanent("a tombstone has no address")),
///             Some(b"") => Err(HandlerError::permanent("empty message")),
///             Some(_) if d.attempt > 3 => Ok(()), // the SMTP server is back by now
///             Some(_) => Err(HandlerError::retryable("SMTP server unavailable")),
///         }
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(
        &self,
        delivery: Delivery<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Calls the handler with a time limit, so a hung handler turns into a timeout error, and catches
/// a panic, which is a permanent failure of that message with the panic's text as its error (I10):
/// the rest of the partition and its offsets carry on.
pub async fn call_with_timeout<H: Handler>(
    handler: &H,
    delivery: Delivery<'_>,
    limit: Duration,
) -> Result<(), HandlerError> {
    // Nothing of redrive's is shared with the handler call, so nothing can be seen half-updated
    // after the unwind.
    let call = AssertUnwindSafe(handler.handle(delivery)).catch_unwind();
    match tokio::time::timeout(limit, call).await {
        Ok(result) => caught(result),
        Err(_) => Err(timeout_error(limit)),
    }
}

/// The result of a handler call made under `catch_unwind`: a panic is a permanent failure of that
/// message, with the panic's text as its error (I10).
pub fn caught(
    result: Result<Result<(), HandlerError>, Box<dyn std::any::Any + Send>>,
) -> Result<(), HandlerError> {
    result.unwrap_or_else(|panic| {
        let text = panic_text(panic.as_ref());
        tracing::error!("the handler panicked; the message is dead: {text}");
        Err(HandlerError::permanent(format!("handler panicked: {text}")))
    })
}

/// The error of a call that did not finish within `limit`.
pub fn timeout_error(limit: Duration) -> HandlerError {
    HandlerError::timeout(format!(
        "handler did not finish within {}",
        humantime::format_duration(limit)
    ))
}

/// The message a panic was raised with (`panic!("…")` gives a `&str` or a `String`).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// A handler for processes that run no consumer and no workers (only the DLQ publisher); it is
/// never called.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unused;

impl Handler for Unused {
    async fn handle(&self, _delivery: Delivery<'_>) -> Result<(), HandlerError> {
        Err(HandlerError::permanent(
            "no handler is configured in this process",
        ))
    }
}
