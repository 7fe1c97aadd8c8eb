//! `filter`: drops the events whose JSON field `field` equals `equals`, passes the rest unchanged to
//! output 0.
//!
//! Configuration:
//! - `field` (required): the name of a top-level field of the event's JSON object.
//! - `equals` (required): the value that drops an event. It is read as JSON if it parses as JSON
//!   (`equals=42` matches the number 42, `equals=true` the boolean, `equals="42"` the string "42") and
//!   as a plain string otherwise (`equals=red` matches the string "red").
//!
//! Events that are not JSON objects, or lack the field, pass: a filter only drops what it matches. It
//! never fails an event. The value is scanned without building it: only the named field is parsed.

use std::fmt;

use procd_sdk::{Config, Context, Event, Handler, Result};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// Drops events whose `field` equals `equals`.
#[derive(Default)]
pub struct Filter {
    field: String,
    equals: Value,
}

impl Handler for Filter {
    fn init(&mut self, config: &Config) -> Result {
        self.field = config.require("field")?.to_owned();
        let equals = config.require("equals")?;
        self.equals =
            serde_json::from_str(equals).unwrap_or_else(|_| Value::String(equals.to_owned()));
        Ok(())
    }

    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        let field = FieldOf { name: &self.field };
        let mut json = serde_json::Deserializer::from_slice(event.value());
        let matches = match field.deserialize(&mut json) {
            Ok(Some(value)) => value == self.equals,
            // Not an object, no such field, or not JSON at all: not ours to drop.
            Ok(None) | Err(_) => false,
        };
        if !matches {
            ctx.emit(0, event.key(), event.value());
        }
        Ok(())
    }
}

procd_sdk::export!(Filter);

/// Reads the value of one top-level field of a JSON object, skipping every other field unparsed.
struct FieldOf<'f> {
    name: &'f str,
}

impl<'de> DeserializeSeed<'de> for FieldOf<'_> {
    type Value = Option<Value>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Option<Value>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldOf<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Option<Value>, A::Error> {
        let mut found = None;
        while let Some(is_field) = map.next_key_seed(KeyIs(self.name))? {
            if is_field && found.is_none() {
                found = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Compares a map key with a name without allocating it (unless it has escapes).
struct KeyIs<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> std::result::Result<bool, E> {
        Ok(key == self.0)
    }
}

#[cfg(test)]
mod tests {
    use procd_sdk::testing::TestDriver;

    use super::*;

    fn driver(field: &str, equals: &str) -> TestDriver<Filter> {
        TestDriver::new(Filter::default())
            .config("field", field)
            .config("equals", equals)
            .outputs(["kept"])
    }

    fn kept(driver: &mut TestDriver<Filter>, values: &[&str]) -> Vec<String> {
        let events: Vec<(String, &str)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("k{i}"), *v))
            .collect();
        let records = driver.send_batch(events).expect("filter never fails");
        records.iter().map(|r| r.value_str().to_owned()).collect()
    }

    #[test]
    fn drops_matching_strings_and_passes_the_rest() {
        let mut driver = driver("status", "spam");
        let out = kept(
            &mut driver,
            &[
                r#"{"status":"spam","n":1}"#,
                r#"{"n":2,"status":"ok"}"#,
                r#"{"n":3}"#,
                r#"{"nested":{"status":"spam"}}"#,
                "not json",
                "[1,2]",
                r#"{"status":"sp\u0061m"}"#,
            ],
        );
        assert_eq!(
            out,
            [
                r#"{"n":2,"status":"ok"}"#,
                r#"{"n":3}"#,
                r#"{"nested":{"status":"spam"}}"#,
                "not json",
                "[1,2]"
            ]
        );
    }

    #[test]
    fn equals_is_json_when_it_parses() {
        let mut numbers = driver("n", "42");
        assert_eq!(
            kept(
                &mut numbers,
                &[r#"{"n":42}"#, r#"{"n":"42"}"#, r#"{"n":43}"#]
            ),
            [r#"{"n":"42"}"#, r#"{"n":43}"#]
        );
        let mut strings = driver("n", "\"42\"");
        assert_eq!(
            kept(&mut strings, &[r#"{"n":42}"#, r#"{"n":"42"}"#]),
            [r#"{"n":42}"#]
        );
        let mut nulls = driver("deleted", "true");
        assert_eq!(
            kept(&mut nulls, &[r#"{"deleted":true}"#, r#"{"deleted":false}"#]),
            [r#"{"deleted":false}"#]
        );
    }

    #[test]
    fn keeps_keys_and_requires_its_config() {
        let mut filter = driver("a", "1");
        let records = filter
            .send("key", r#"{"a":2}"#)
            .expect("filter never fails");
        assert_eq!(
            (records[0].key_str(), records[0].topic.as_deref()),
            ("key", Some("kept"))
        );

        let err = TestDriver::new(Filter::default())
            .config("field", "a")
            .init()
            .expect_err("equals is missing");
        assert_eq!(err.message(), "missing config key `equals`");
    }
}
