//! The HTTP handler: POSTs each message as a CloudEvent in binary content mode, with the attributes
//! Knative's KafkaSource sends, so a Knative subscriber works unchanged (DESIGN §4).
//!
//! The body is the Kafka value byte for byte. Status classes decide the outcome: 2xx succeeds,
//! `retryable_statuses` (default 408, 429, 5xx) retry, `permanent_statuses` (default other 4xx)
//! go dead at once, anything else retries. `Retry-After` (seconds or an HTTP date) is passed on.

use super::{Delivery, Handler, HandlerError};
use crate::config::HandlerConfig;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use std::time::{Duration, SystemTime};

/// Header carrying the attempt number (a CloudEvents extension attribute).
pub const ATTEMPT_HEADER: &str = "ce-redriveattempt";

/// An exact status (`429`) or a class (`5xx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPattern {
    /// One status code.
    Exact(u16),
    /// A class: the hundreds digit.
    Class(u16),
}

impl StatusPattern {
    /// Parses `"503"` or `"5xx"`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(d) = s.strip_suffix("xx") {
            let d: u16 = d.parse().ok()?;
            return (1..=5).contains(&d).then_some(StatusPattern::Class(d));
        }
        let code: u16 = s.parse().ok()?;
        (100..=599)
            .contains(&code)
            .then_some(StatusPattern::Exact(code))
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusPattern::Exact(c) => c == status,
            StatusPattern::Class(d) => status / 100 == d,
        }
    }
}

/// POSTs messages to one URL.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: reqwest::Url,
    retryable: Vec<StatusPattern>,
    permanent: Vec<StatusPattern>,
    ce_source: String,
    ce_type: String,
}

impl HttpHandler {
    /// Builds the handler from `[handler]`; the config was validated at load time.
    pub fn new(config: &HandlerConfig) -> anyhow::Result<Self> {
        let url = config.url.as_deref().ok_or_else(|| {
            anyhow::anyhow!("`handler.url` is not set: redrive needs an endpoint to deliver to")
        })?;
        let parse = |list: &[String]| {
            list.iter()
                .filter_map(|s| StatusPattern::parse(s))
                .collect()
        };
        Ok(Self {
            client: reqwest::Client::builder().timeout(config.timeout).build()?,
            url: url.parse()?,
            retryable: parse(&config.retryable_statuses),
            permanent: parse(&config.permanent_statuses),
            ce_source: config.ce_source.clone(),
            ce_type: config.ce_type.clone(),
        })
    }

    /// What a response status means for the message.
    pub fn classify(&self, status: u16) -> Option<super::ErrorKind> {
        use super::ErrorKind::*;
        if (200..300).contains(&status) {
            None
        } else if self.retryable.iter().any(|p| p.matches(status)) {
            Some(Retryable)
        } else if self.permanent.iter().any(|p| p.matches(status)) {
            Some(Permanent)
        } else {
            Some(Retryable)
        }
    }

    /// The CloudEvents binary-mode headers, the key and the original Kafka headers.
    pub fn headers(&self, d: Delivery<'_>) -> HeaderMap {
        let m = d.message;
        let mut h = HeaderMap::new();
        let fill = |t: &str| t.replace("{group}", d.group).replace("{topic}", &m.topic);
        let mut put = |name: &str, value: String| {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                h.append(n, v);
            }
        };
        put("ce-specversion", "1.0".into());
        put(
            "ce-id",
            format!("partition:{}/offset:{}", m.partition, m.offset),
        );
        put("ce-source", fill(&self.ce_source));
        put("ce-type", self.ce_type.clone());
        put(
            "ce-subject",
            format!("partition:{}#{}", m.partition, m.offset),
        );
        if let Some(ts) = m.timestamp {
            put(
                "ce-time",
                ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
        }
        put(ATTEMPT_HEADER, d.attempt.to_string());
        match m.key.as_deref().map(std::str::from_utf8) {
            Some(Ok(text)) if HeaderValue::from_str(text).is_ok() => {
                put("ce-key", text.to_string())
            }
            Some(_) => put(
                "ce-keybase64",
                m.key
                    .as_deref()
                    .map(|k| BASE64.encode(k))
                    .unwrap_or_default(),
            ),
            None => {}
        }
        if m.payload.is_none() {
            put("ce-redrivetombstone", "true".into());
        }
        let content_type = m.header("content-type").and_then(|h| h.value.clone());
        let content_type = content_type.and_then(|v| String::from_utf8(v).ok());
        put(
            "content-type",
            content_type.unwrap_or_else(|| "application/octet-stream".into()),
        );
        // The delivery's span (when traces are exported), as W3C and CloudEvents trace context.
        for (name, value) in crate::telemetry::outgoing_context() {
            put(name, value);
        }
        for header in &m.headers {
            let name = format!("ce-kafkaheader{}", extension_name(&header.key));
            let Some(value) = &header.value else { continue };
            match std::str::from_utf8(value) {
                Ok(text) if HeaderValue::from_str(text).is_ok() => put(&name, text.to_string()),
                _ => put(&format!("{name}base64"), BASE64.encode(value)),
            }
        }
        h
    }
}

/// A CloudEvents extension name: lower-case letters and digits only.
fn extension_name(key: &[u8]) -> String {
    key.iter()
        .filter(|b| b.is_ascii_alphanumeric())
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect()
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl Handler for HttpHandler {
    async fn handle(&self, d: Delivery<'_>) -> Result<(), HandlerError> {
        let body = d.message.payload.clone().unwrap_or_default();
        let response = self
            .client
            .post(self.url.clone())
            .headers(self.headers(d))
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(HandlerError::timeout(format!(
                    "POST {}: timed out",
                    self.url
                )))
            }
            Err(e) => {
                return Err(HandlerError::retryable(format!(
                    "POST {}: {}",
                    self.url,
                    error_chain(&e)
                )))
            }
        };
        let status = response.status().as_u16();
        let Some(kind) = self.classify(status) else {
            return Ok(());
        };
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let mut text = response.text().await.unwrap_or_default();
        text.truncate(text.floor_char_boundary(512));
        let message = if text.is_empty() {
            format!("POST {} answered {status}", self.url)
        } else {
            format!("POST {} answered {status}: {}", self.url, text.trim())
        };
        Err(HandlerError {
            kind,
            message,
            retry_after,
        })
    }
}

/// The error and its sources on one line: reqwest's own message rarely names the cause.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::ErrorKind;
    use crate::message::{Header, Message};

    fn handler() -> HttpHandler {
        let config = HandlerConfig {
            url: Some("http://127.0.0.1:1/".into()),
            ..Default::default()
        };
        HttpHandler::new(&config).unwrap()
    }

    #[test]
    fn statuses_classify_as_documented() {
        let h = handler();
        assert_eq!(h.classify(200), None);
        assert_eq!(h.classify(204), None);
        for s in [408, 429, 500, 503] {
            assert_eq!(h.classify(s), Some(ErrorKind::Retryable), "{s}");
        }
        for s in [400, 404, 422] {
            assert_eq!(h.classify(s), Some(ErrorKind::Permanent), "{s}");
        }
        assert_eq!(h.classify(302), Some(ErrorKind::Retryable));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn cloudevent_headers_follow_knative() {
        let m = Message {
            topic: "orders".into(),
            partition: 2,
            offset: 7,
            timestamp: None,
            key: Some(vec![0xff]),
            payload: None,
            headers: vec![
                Header {
                    key: "Trace-Id".into(),
                    value: Some(b"abc".to_vec()),
                },
                Header {
                    key: "bin".into(),
                    value: Some(vec![0, 0xff]),
                },
            ],
        };
        let h = handler().headers(Delivery {
            message: &m,
            attempt: 3,
            group: "g",
        });
        assert_eq!(h["ce-id"], "partition:2/offset:7");
        assert_eq!(h["ce-source"], "/redrive/g#orders");
        assert_eq!(h["ce-type"], "dev.knative.kafka.event");
        assert_eq!(h[ATTEMPT_HEADER], "3");
        assert_eq!(h["ce-keybase64"], "/w==");
        assert_eq!(h["ce-redrivetombstone"], "true");
        assert_eq!(h["ce-kafkaheadertraceid"], "abc");
        assert_eq!(h["ce-kafkaheaderbinbase64"], "AP8=");
    }
}
