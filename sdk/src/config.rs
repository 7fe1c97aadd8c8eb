//! The handler's configuration: the key/value pairs given at deploy time and passed to `init`.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Deploy-time configuration of a handler, in the order it was given.
///
/// Look-ups scan the pairs (configurations are small); when a key appears more than once, the last
/// value wins. Parse what you need once, in [`Handler::init`](crate::Handler::init), rather than per
/// event.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Config {
    entries: Vec<(String, String)>,
}

impl Config {
    /// A configuration with these pairs.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        Config { entries }
    }

    /// The value of `key`, if it was given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, or an error naming the missing key.
    pub fn require(&self, key: &str) -> Result<&str, Error> {
        self.get(key)
            .ok_or_else(|| Error::msg(format!("missing config key `{key}`")))
    }

    /// The value of `key` parsed with [`FromStr`], `None` if it was not given, or an error naming the
    /// key and the value that did not parse.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, Error>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.get(key) {
            None => Ok(None),
            Some(raw) => raw
                .parse()
                .map(Some)
                .map_err(|e| Error::msg(format!("config key `{key}`: cannot parse `{raw}`: {e}"))),
        }
    }

    /// Every pair, in the order given (duplicates included).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The pairs whose key starts with `prefix`, with the prefix removed: for `add.color=red`,
    /// `with_prefix("add.")` yields `("color", "red")`.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.iter()
            .filter_map(move |(k, v)| k.strip_prefix(prefix).map(|rest| (rest, v)))
    }

    /// How many pairs were given.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no pair was given.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Config {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Config {
            entries: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_value_wins_and_errors_name_the_key() {
        let config: Config = [("a", "1"), ("b", "x"), ("a", "2")].into_iter().collect();
        assert_eq!(config.get("a"), Some("2"));
        assert_eq!(config.parse::<u32>("a"), Ok(Some(2)));
        assert_eq!(config.parse::<u32>("missing"), Ok(None));
        let err = config.parse::<u32>("b").expect_err("`x` is not a number");
        assert!(err.message().contains("config key `b`"), "{err}");
        let err = config.require("c").expect_err("`c` was not given");
        assert_eq!(err.message(), "missing config key `c`");
    }

    #[test]
    fn with_prefix_strips_it() {
        let config: Config = [("add.color", "red"), ("other", "x"), ("add.size", "2")]
            .into_iter()
            .collect();
        let added: Vec<_> = config.with_prefix("add.").collect();
        assert_eq!(added, [("color", "red"), ("size", "2")]);
    }
}
