//! A Kafka record as redrive keeps it: everything needed to call the handler again and to produce
//! the record to a DLQ topic unchanged (I8: bad input is data, not a crash).
//!
//! Header names are bytes, not strings: other clients can produce names that are not UTF-8, and
//! such a record must be kept, handled and dead-lettered like any other (I10).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chrono::{DateTime, Utc};
use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedMessage, Message as _};
use serde::{Deserialize, Serialize};
use std::ffi::CStr;

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

/// One record header. Names are meant to be strings but are kept as the bytes the producer sent;
/// values are arbitrary bytes or null.
///
/// In the table's `headers` jsonb a name that is UTF-8 without NUL is stored as `"key"`, any other
/// name as base64 in `"key_b64"`; values are always base64 in `"value"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredHeader", into = "StoredHeader")]
pub struct Header {
    /// Header name, byte for byte.
    pub key: Vec<u8>,
    /// Header value, byte for byte.
    pub value: Option<Vec<u8>>,
}

impl Header {
    /// A header from a text name.
    pub fn new(key: impl Into<String>, value: Option<Vec<u8>>) -> Self {
        Header {
            key: key.into().into_bytes(),
            value,
        }
    }

    /// The name as text, when it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.key).ok()
    }
}

/// The jsonb form of a [`Header`]: jsonb text cannot hold NUL, and JSON strings must be UTF-8.
#[derive(Serialize, Deserialize)]
struct StoredHeader {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_b64: Option<String>,
    #[serde(with = "base64_opt")]
    value: Option<Vec<u8>>,
}

impl From<Header> for StoredHeader {
    fn from(h: Header) -> Self {
        let (key, key_b64) = match String::from_utf8(h.key) {
            Ok(text) if !text.contains('\0') => (Some(text), None),
            Ok(text) => (None, Some(BASE64.encode(text))),
            Err(e) => (None, Some(BASE64.encode(e.into_bytes()))),
        };
        StoredHeader {
            key,
            key_b64,
            value: h.value,
        }
    }
}

impl TryFrom<StoredHeader> for Header {
    type Error = String;
    fn try_from(s: StoredHeader) -> Result<Self, String> {
        let key = match (s.key, s.key_b64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => BASE64
                .decode(b64)
                .map_err(|e| format!("key_b64 is not base64: {e}"))?,
            _ => return Err("a header needs exactly one of key and key_b64".into()),
        };
        Ok(Header {
            key,
            value: s.value,
        })
    }
}

impl Message {
    /// Copies a consumed record out of librdkafka's buffer.
    pub fn from_kafka(m: &BorrowedMessage<'_>) -> Self {
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
            headers: raw_headers(m),
        }
    }

    /// The headers as the jsonb array the table stores.
    pub fn headers_json(&self) -> serde_json::Value {
        // Serializing byte vectors as base64 strings cannot fail.
        serde_json::to_value(HeadersJson(&self.headers)).unwrap_or(serde_json::Value::Array(vec![]))
    }

    /// Reads headers back from the text of the table's jsonb (`headers::text`), without building
    /// a `serde_json::Value` first; a malformed entry is an error, not a panic.
    pub fn headers_from_text(text: &str) -> Result<Vec<Header>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&Header> {
        self.headers.iter().find(|h| h.key == name.as_bytes())
    }
}

/// Headers in the table's jsonb form (see [`Header`]), serialized straight from the message: no
/// name or value is copied, and no `serde_json::Value` is built on the way. Capture writes one per
/// row, and the tree of values cost about a microsecond per header.
pub struct HeadersJson<'a>(pub &'a [Header]);

impl Serialize for HeadersJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        /// Base64, encoded on the stack when short (header values usually are).
        struct Base64<'b>(&'b [u8]);
        impl Serialize for Base64<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut buf = [0u8; 256];
                match BASE64.encode_slice(self.0, &mut buf) {
                    // Base64 is ASCII.
                    Ok(n) => s.serialize_str(std::str::from_utf8(&buf[..n]).unwrap_or_default()),
                    Err(_) => s.serialize_str(&BASE64.encode(self.0)),
                }
            }
        }
        /// One header as [`StoredHeader`] has it.
        struct Stored<'b>(&'b Header);
        impl Serialize for Stored<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_struct("StoredHeader", 2)?;
                match std::str::from_utf8(&self.0.key) {
                    Ok(text) if !text.contains('\0') => m.serialize_field("key", text)?,
                    _ => m.serialize_field("key_b64", &Base64(&self.0.key))?,
                }
                m.serialize_field("value", &self.0.value.as_deref().map(Base64))?;
                m.end()
            }
        }
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for header in self.0 {
            seq.serialize_element(&Stored(header))?;
        }
        seq.end()
    }
}

/// Reads a record's headers through librdkafka's C API. rdkafka's own accessor unwraps the name
/// as UTF-8 and panics on any other name; here the name is kept as bytes.
fn raw_headers(m: &BorrowedMessage<'_>) -> Vec<Header> {
    let mut hdrs: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a live message for the borrow of `m`; the headers it hands out belong to
    // the message and are only read here, before `m` can be dropped.
    unsafe {
        if rdsys::rd_kafka_message_headers(m.ptr(), &mut hdrs)
            != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || hdrs.is_null()
        {
            return Vec::new();
        }
        let count = rdsys::rd_kafka_header_cnt(hdrs);
        let mut out = Vec::with_capacity(count);
        for idx in 0..count {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
            if rdsys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size)
                != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || name.is_null()
            {
                continue;
            }
            out.push(Header {
                key: CStr::from_ptr(name).to_bytes().to_vec(),
                value: (!value.is_null())
                    .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec()),
            });
        }
        out
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
                Header::new("bin", Some(vec![0xff, 0x00, 0xfe])),
                Header::new("null", None),
                Header::new("empty", Some(vec![])),
                Header {
                    key: vec![0xc3, 0x28, b'k'],
                    value: Some(b"not utf-8 name".to_vec()),
                },
                Header::new("nul\0inside", Some(b"v".to_vec())),
            ],
        };
        let back = Message::headers_from_text(&m.headers_json().to_string()).unwrap();
        assert_eq!(back, m.headers);
        let json = m.headers_json().to_string();
        assert!(
            json.contains(r#""key":"bin""#) && !json.contains("\\u0000"),
            "text names stay readable, and nothing jsonb refuses is stored: {json}"
        );
    }

    #[test]
    fn headers_are_written_as_their_stored_form_says() {
        let headers = vec![
            Header::new("ce_id", Some(b"42".to_vec())),
            Header::new("bin", Some(vec![0xff, 0x00, 0xfe])),
            Header::new("null", None),
            Header::new("empty", Some(vec![])),
            Header {
                key: vec![0xc3, 0x28, b'k'],
                value: Some(vec![0; 100]),
            },
            Header::new("nul\0inside", Some(b"v".to_vec())),
            Header::new("quote\"and\\slash", Some(b"x".to_vec())),
            Header::new("", Some(b"no name".to_vec())),
            // Longer than the stack buffer's 256 characters of base64.
            Header::new("long", Some(vec![7; 300])),
        ];
        for n in 0..=headers.len() {
            let some = &headers[..n];
            let direct: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(&HeadersJson(some)).unwrap()).unwrap();
            let by_type = serde_json::to_value(some).unwrap();
            assert_eq!(direct, by_type, "{n} headers");
        }
    }

    #[test]
    fn a_malformed_stored_header_is_an_error() {
        for bad in [
            r#"[{"key": 5}]"#,
            r#"[{"value": null}]"#,
            r#"[{"key_b64": "%%"}]"#,
        ] {
            assert!(Message::headers_from_text(bad).is_err(), "{bad}");
        }
    }
}
