//! A Kafka record as redrive keeps it: everything needed to call the handler again and to produce
//! the record to a DLQ topic unchanged (I8: bad input is data, not a crash).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chrono::{DateTime, Utc};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use serde::{Deserialize, Serialize};

/// One Kafka record. `None` and `Some(vec![])` differ: a `None` payload is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic the record was consumed from.
    pub topic: String,
    /// Partition the record was consumed from.
    pub partition: i32,
    /// Offset of the record in its partition.
    pub offset: i64,
    /// The record's timestamp, when the broker gave one.
    pub timestamp: Option<DateTime<Utc>>,
    /// The key, byte for byte; `None` when the record has no key.
    pub key: Option<Vec<u8>>,
    /// The value, byte for byte; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers in record order; names may repeat.
    pub headers: Vec<Header>,
}

/// One record header. Kafka header names are strings; values are arbitrary bytes or null.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value, byte for byte (stored as base64 in the table's `headers` jsonb).
    #[serde(with = "base64_opt")]
    pub value: Option<Vec<u8>>,
}

impl Message {
    /// Copies a consumed record out of librdkafka's buffer.
    pub fn from_kafka(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| Header {
                        key: h.key.to_string(),
                        value: h.value.map(<[u8]>::to_vec),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Message {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The headers as the jsonb array the table stores.
    pub fn headers_json(&self) -> serde_json::Value {
        // Serializing plain strings and options cannot fail.
        serde_json::to_value(&self.headers).unwrap_or(serde_json::Value::Array(vec![]))
    }

    /// Reads headers back from the table's jsonb; a malformed entry is an error, not a panic.
    pub fn headers_from_json(v: serde_json::Value) -> Result<Vec<Header>, serde_json::Error> {
        serde_json::from_value(v)
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&Header> {
        self.headers.iter().find(|h| h.key == name)
    }
}

mod base64_opt {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_some(&BASE64.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| BASE64.decode(t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_json_byte_for_byte() {
        let m = Message {
            topic: "t".into(),
            partition: 0,
            offset: 1,
            timestamp: None,
            key: None,
            payload: None,
            headers: vec![
                Header {
                    key: "bin".into(),
                    value: Some(vec![0xff, 0x00, 0xfe]),
                },
                Header {
                    key: "null".into(),
                    value: None,
                },
                Header {
                    key: "empty".into(),
                    value: Some(vec![]),
                },
            ],
        };
        let back = Message::headers_from_json(m.headers_json()).unwrap();
        assert_eq!(back, m.headers);
    }
}
