//! Deploy-time configuration.

use std::fmt::Display;
use std::str::FromStr;

/// The deploy-time configuration of a plugin: the `--config key=value` pairs
/// given to `msmq plugin deploy`, in the order they were given.
///
/// When a key is given more than once, the lookups return the last value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    entries: Vec<(String, String)>,
}

impl Config {
    /// Creates a configuration from `(key, value)` pairs (useful in tests).
    pub fn new(entries: Vec<(String, String)>) -> Self {
        Config { entries }
    }

    /// Returns the value of `key`, or `None` if it is not set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Returns the value of `key`, or `default` if it is not set.
    pub fn get_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.get(key).unwrap_or(default)
    }

    /// Returns the value of `key`, or an error message naming the missing key
    /// (handy as `config.require("x")?` in [`Plugin::init`](crate::Plugin::init)).
    pub fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("missing required config key `{key}`"))
    }

    /// Parses the value of `key` with [`FromStr`]: `Ok(None)` if it is not
    /// set, `Err` with a message naming the key if it does not parse.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, String>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(key) {
            None => Ok(None),
            Some(raw) => raw
                .parse()
                .map(Some)
                .map_err(|e| format!("config key `{key}` = `{raw}`: {e}")),
        }
    }

    /// Iterates over all `(key, value)` pairs in the order they were given.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Returns the number of pairs (counting repeated keys).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns `true` if no configuration was given.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl From<Vec<(String, String)>> for Config {
    fn from(entries: Vec<(String, String)>) -> Self {
        Config::new(entries)
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Config {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Config::new(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let c: Config = [("a", "1"), ("b", "x"), ("a", "2")].into_iter().collect();
        assert_eq!(c.get("a"), Some("2"));
        assert_eq!(c.get("zz"), None);
        assert_eq!(c.get_or("zz", "d"), "d");
        assert_eq!(c.require("b"), Ok("x"));
        assert!(c.require("zz").unwrap_err().contains("zz"));
        assert_eq!(c.parse::<u32>("a"), Ok(Some(2)));
        assert_eq!(c.parse::<u32>("zz"), Ok(None));
        assert!(c.parse::<u32>("b").is_err());
        assert_eq!(c.len(), 3);
        assert!(!c.is_empty());
        assert_eq!(c.iter().next(), Some(("a", "1")));
    }
}
