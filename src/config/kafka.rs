//! `[kafka]`: the topics to consume and librdkafka properties passed through as they are, with
//! the redaction that keeps SASL and TLS secrets out of logs and `Debug` output (I9).

use super::{invalid, ConfigError};
use figment::value::{Dict, Value};
use figment::Figment;
use std::collections::BTreeMap;

/// `[kafka]`: `topics`, plus any librdkafka property (`"bootstrap.servers"`, `"group.id"`, …).
#[derive(Clone)]
pub struct KafkaConfig {
    /// Topics to consume. They must exist: redrive never creates or assumes them.
    pub topics: Vec<String>,
    /// librdkafka properties, passed to the consumer and the DLQ producer as they are.
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("topics", &self.topics)
            .field("properties", &crate::kafka::describe(&self.properties))
            .finish()
    }
}

impl KafkaConfig {
    /// Reads `[kafka]`: `topics`, and every other key as a librdkafka property.
    ///
    /// An environment override arrives nested (`REDRIVE_KAFKA__GROUP_ID` → `group` → `id`), so
    /// nested tables are flattened back into dotted names, after (and so over) the file's keys.
    pub(super) fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let mut section = figment
            .find_value("kafka")
            .map_err(|_| {
                invalid(
                    "kafka",
                    "is missing: it needs at least `topics` and \"group.id\"",
                )
            })?
            .into_dict()
            .ok_or_else(|| invalid("kafka", "must be a table"))?;
        let topics = match section.remove("topics") {
            Some(Value::Array(_, items)) => items
                .into_iter()
                .map(|v| {
                    v.into_string()
                        .ok_or_else(|| invalid("kafka.topics", "must be a list of strings"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::String(_, s)) => s.split(',').map(|t| t.trim().to_string()).collect(),
            Some(_) => return Err(invalid("kafka.topics", "must be a list of strings")),
            None => {
                return Err(invalid(
                    "kafka.topics",
                    "is missing: name the topics to consume",
                ))
            }
        };
        if topics.is_empty() || topics.iter().any(|t| t.is_empty()) {
            return Err(invalid(
                "kafka.topics",
                "must name at least one topic, none of them empty",
            ));
        }
        let properties = flatten_properties(section, "kafka")?;
        if !properties.contains_key("group.id") {
            return Err(invalid(
                "kafka.\"group.id\"",
                "is missing: the consumer group is required",
            ));
        }
        Ok(Self { topics, properties })
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        self.properties
            .get("group.id")
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// Turns a table of librdkafka properties into dotted names and string values.
pub fn flatten_properties(dict: Dict, at: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    let (flat, nested): (Vec<_>, Vec<_>) =
        dict.into_iter().partition(|(_, v)| v.as_dict().is_none());
    for (key, value) in flat.into_iter().chain(nested) {
        flatten_into(&mut out, key.replace('_', "."), value, at)?;
    }
    Ok(out)
}

fn flatten_into(
    out: &mut BTreeMap<String, String>,
    key: String,
    v: Value,
    at: &str,
) -> Result<(), ConfigError> {
    let text = match v {
        Value::Dict(_, d) => {
            for (k, inner) in d {
                flatten_into(out, format!("{key}.{}", k.replace('_', ".")), inner, at)?;
            }
            return Ok(());
        }
        Value::String(_, s) => s,
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_i128()
            .map(|i| i.to_string())
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
        Value::Empty(..) | Value::Array(..) => {
            return Err(invalid(
                format!("{at}.\"{key}\""),
                "must be a string, number or boolean",
            ))
        }
    };
    out.insert(key, text);
    Ok(())
}

/// The URL with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                // Setting a password only fails for URLs that cannot have one, checked just above.
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// Whether a librdkafka property holds a secret (`sasl.password`, `ssl.key.password`, …).
pub fn kafka_property_is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password")
        || n.contains("secret")
        || n.contains("sasl.jaas")
        || n.contains("oauthbearer.config")
}
