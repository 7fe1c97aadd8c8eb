//! `enrich`: a JSON transform. Parses each event's value as a JSON object, adds fields, and emits the
//! result to output 0 with the same key.
//!
//! Added fields (replacing any of the same name):
//! - `"enriched_by": "procd"`,
//! - `"partition"` and `"offset"`: the event's, as numbers,
//! - one string field per configuration entry `add.<name>=<value>`: `add.region=eu` adds
//!   `"region": "eu"`.
//!
//! A value that is not a JSON object fails the event: it goes to the dead-letter log with the reason.
//! The output object's fields are in name order (serde_json's map is ordered by key).

use procd_sdk::{Config, Context, Error, Event, Handler, Result};
use serde_json::{Map, Value};

/// Adds fields to JSON objects.
#[derive(Default)]
pub struct Enrich {
    /// The configured `add.<name>` fields, ready to insert.
    added: Vec<(String, Value)>,
}

impl Handler for Enrich {
    fn init(&mut self, config: &Config) -> Result {
        self.added = config
            .with_prefix("add.")
            .map(|(name, value)| (name.to_owned(), Value::from(value)))
            .collect();
        if let Some((name, _)) = self.added.iter().find(|(name, _)| name.is_empty()) {
            return Err(Error::msg(format!(
                "config key `add.{name}` needs a field name after `add.`"
            )));
        }
        Ok(())
    }

    fn handle(&mut self, event: &Event<'_>, ctx: &mut Context<'_>) -> Result {
        let mut object: Map<String, Value> = match event.json::<Value>()? {
            Value::Object(object) => object,
            other => procd_sdk::bail!("value is not a JSON object but {}", kind(&other)),
        };
        object.insert("enriched_by".into(), "procd".into());
        object.insert("partition".into(), event.partition().into());
        object.insert("offset".into(), event.offset().into());
        for (name, value) in &self.added {
            object.insert(name.clone(), value.clone());
        }
        ctx.emit_json(0, event.key(), &object)
    }
}

procd_sdk::export!(Enrich);

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use procd_sdk::testing::TestDriver;
    use serde_json::json;

    use super::*;

    #[test]
    fn adds_the_fixed_and_configured_fields() {
        let mut driver = TestDriver::new(Enrich::default())
            .config("add.region", "eu")
            .config("add.team", "core")
            .config("unrelated", "x")
            .partition(3)
            .start_offset(40);
        let records = driver
            .send_json("k", &json!({"user": "ada", "offset": "theirs"}))
            .expect("an object");
        assert_eq!(records[0].key_str(), "k");
        assert_eq!(
            records[0].value_json::<Value>(),
            json!({"user": "ada", "enriched_by": "procd", "partition": 3, "offset": 40, "region": "eu", "team": "core"})
        );
    }

    #[test]
    fn non_objects_fail_the_event_with_the_reason() {
        let mut driver = TestDriver::new(Enrich::default());
        let outcome = driver.process_batch([
            ("a", "{}"),
            ("b", "[1]"),
            ("c", "nope"),
            ("d", r#"{"x":1}"#),
        ]);
        assert_eq!(outcome.records.len(), 2);
        let dead: Vec<(u64, &str)> = outcome
            .dead_letters
            .iter()
            .map(|f| (f.offset, f.message.as_str()))
            .collect();
        assert_eq!(dead[0], (1, "value is not a JSON object but an array"));
        assert_eq!(dead[1].0, 2);
        assert!(
            dead[1]
                .1
                .starts_with("event value is not the expected JSON"),
            "{}",
            dead[1].1
        );
    }

    #[test]
    fn an_empty_added_name_refuses_the_deployment() {
        let err = TestDriver::new(Enrich::default())
            .config("add.", "x")
            .init()
            .expect_err("no name");
        assert!(err.message().contains("needs a field name"), "{err}");
    }
}
