//! Topics: their definitions, persisted in the control Database (`DIR/control`, keyspace `topics`).
//!
//! The catalog is the source of truth for which topics exist. The data plane reads a snapshot of it
//! (an `ArcSwap`, so lookups take no lock); only the control plane changes it, one change at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};

use crate::runtime::Limits;

/// Longest topic name accepted.
pub const MAX_TOPIC_NAME_LEN: usize = 128;

/// How long a topic keeps its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Drop events older than this (by log-append time). `None`: keep regardless of age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// Drop the oldest events once a partition's log exceeds this many bytes on disk. `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Allow dropping events that a handler reading this topic has not processed yet. By default retention
    /// never goes past the lowest committed offset of the topic's handlers.
    #[serde(default)]
    pub drop_unconsumed: bool,
}

/// A topic definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Unique name, `[a-zA-Z0-9._-]{1,128}`.
    pub name: String,
    /// Retention policy.
    #[serde(default)]
    pub retention: Retention,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// Where a handler starts reading a partition it has never committed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest retained event.
    Earliest,
    /// Only events appended after the handler first runs on the partition.
    Latest,
    /// A given offset (clamped to what is retained).
    Offset(u64),
}

impl std::str::FromStr for StartPosition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            n => n
                .parse()
                .map(Self::Offset)
                .map_err(|_| format!("{s:?} is not earliest, latest or an offset")),
        }
    }
}

impl std::fmt::Display for StartPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Earliest => f.write_str("earliest"),
            Self::Latest => f.write_str("latest"),
            Self::Offset(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for StartPosition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StartPosition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a reset moves a handler's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetTo {
    /// The oldest retained event.
    Earliest,
    /// The current end of each partition.
    Latest,
    /// A given offset on every partition.
    Offset(u64),
    /// The first event at or after a time (ms since the Unix epoch) on each partition.
    Timestamp(u64),
}

/// A requested reset, applied by each partition's processor at its next batch boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    /// Increases with every reset; a partition applies a reset whose generation it has not committed.
    pub generation: u64,
    /// Target position.
    pub to: ResetTo,
    /// Also delete the handler's state.
    pub clear_state: bool,
    /// For `latest`: each partition's end offset when the reset was asked for, so events appended after
    /// the request are processed (resolving it later would skip them).
    #[serde(default)]
    pub offsets: Vec<u64>,
}

/// The SHA-256 of component `bytes`, lowercase hex: how a deployed version is recognised.
pub fn component_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One deployed version of a handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerVersion {
    /// Version number, from 1.
    pub version: u32,
    /// Output topics, in the order the handler refers to them by index.
    pub outputs: Vec<String>,
    /// Configuration passed to `init`.
    pub config: Vec<(String, String)>,
    /// Component size.
    pub size_bytes: u64,
    /// SHA-256 of the component, lowercase hex (empty for versions deployed before procd recorded it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// Deploy time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Limits this version asked for, below the server's.
    #[serde(default, skip_serializing_if = "HandlerLimits::is_empty")]
    pub limits: HandlerLimits,
}

/// Limits a handler version asked for at deploy time (`limit.NAME=VALUE`), each at most the server's
/// `handler.*` setting; an unset one is the server's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerLimits {
    /// Linear memory per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    /// Wall-clock time per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Records one batch may emit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_outputs_per_batch: Option<u64>,
    /// Bytes of keys and values one batch may emit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes_per_batch: Option<u64>,
    /// Largest state value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_state_value_bytes: Option<u64>,
    /// State bytes (keys and values) per partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_state_bytes: Option<u64>,
    /// Log lines per second per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_lines_per_sec: Option<u64>,
}

impl HandlerLimits {
    /// Whether no limit was asked for.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Sets limit `name` (a field name) to `value`, which must be a whole number from 1 to the server's
    /// maximum for it.
    pub fn set(&mut self, name: &str, value: &str, server: &Limits) -> Result<(), String> {
        let max = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let (slot, max) = match name {
            "max_memory_bytes" => (&mut self.max_memory_bytes, as_u64(server.max_memory_bytes)),
            "deadline_ms" => (&mut self.deadline_ms, max(server.deadline)),
            "max_outputs_per_batch" => (
                &mut self.max_outputs_per_batch,
                as_u64(server.max_outputs_per_batch),
            ),
            "max_output_bytes_per_batch" => (
                &mut self.max_output_bytes_per_batch,
                as_u64(server.max_output_bytes_per_batch),
            ),
            "max_state_value_bytes" => (
                &mut self.max_state_value_bytes,
                as_u64(server.max_state_value_bytes),
            ),
            "max_state_bytes" => (&mut self.max_state_bytes, server.max_state_bytes),
            "log_lines_per_sec" => (
                &mut self.log_lines_per_sec,
                u64::from(server.log_lines_per_sec),
            ),
            other => {
                return Err(format!(
                    "unknown limit {other:?}; use max_memory_bytes, deadline_ms, max_outputs_per_batch, \
                     max_output_bytes_per_batch, max_state_value_bytes, max_state_bytes or log_lines_per_sec"
                ));
            }
        };
        let n = value
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                format!(
                    "limit.{name} must be in 1..={max} (the server's handler.{name}); got {value:?}"
                )
            })?;
        *slot = Some(n);
        Ok(())
    }

    /// The limits an instance of this version runs under: the server's, lowered where it asked.
    pub fn apply(&self, server: &Limits) -> Limits {
        let size = |asked: Option<u64>, server: usize| {
            asked.map_or(server, |n| {
                usize::try_from(n).unwrap_or(usize::MAX).min(server)
            })
        };
        Limits {
            max_memory_bytes: size(self.max_memory_bytes, server.max_memory_bytes),
            deadline: self.deadline_ms.map_or(server.deadline, |ms| {
                Duration::from_millis(ms).min(server.deadline)
            }),
            max_state_value_bytes: size(self.max_state_value_bytes, server.max_state_value_bytes),
            max_state_bytes: self
                .max_state_bytes
                .map_or(server.max_state_bytes, |n| n.min(server.max_state_bytes)),
            log_lines_per_sec: self
                .log_lines_per_sec
                .map_or(server.log_lines_per_sec, |n| {
                    u32::try_from(n)
                        .unwrap_or(u32::MAX)
                        .min(server.log_lines_per_sec)
                }),
            max_outputs_per_batch: size(self.max_outputs_per_batch, server.max_outputs_per_batch),
            max_output_bytes_per_batch: size(
                self.max_output_bytes_per_batch,
                server.max_output_bytes_per_batch,
            ),
        }
    }
}

/// A deployed handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerDef {
    /// Unique name, same rule as topic names.
    pub name: String,
    /// Input topic.
    pub input: String,
    /// Where new partitions start.
    pub start: StartPosition,
    /// Every version kept, oldest first (for rollback).
    pub versions: Vec<HandlerVersion>,
    /// The version that runs.
    pub active: u32,
    /// Paused handlers process nothing.
    pub paused: bool,
    /// The latest reset, if any.
    pub reset: Option<Reset>,
    /// Creation time.
    pub created_ms: u64,
    /// Identity of this handler's life: a handler removed and deployed again under the same name is
    /// another incarnation and starts from scratch (nanoseconds at creation).
    #[serde(default)]
    pub incarnation: u64,
    /// For `start: latest`: each partition's end offset at creation, so events appended after the
    /// deploy answered are processed.
    #[serde(default)]
    pub start_offsets: Vec<u64>,
}

impl HandlerDef {
    /// The definition of a version.
    pub fn version(&self, version: u32) -> Option<&HandlerVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The running version's definition.
    pub fn active_version(&self) -> Option<&HandlerVersion> {
        self.version(self.active)
    }
}

/// A catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The name breaks the naming rule.
    #[error(
        "invalid topic name {0:?}: use 1 to {MAX_TOPIC_NAME_LEN} characters from [a-zA-Z0-9._-]"
    )]
    InvalidName(String),
    /// A topic of that name exists.
    #[error("topic {0:?} already exists")]
    Exists(String),
    /// No handler of that name.
    #[error("handler {0:?} does not exist")]
    HandlerNotFound(String),
    /// No topic of that name.
    #[error("topic {0:?} does not exist")]
    NotFound(String),
    /// The control Database failed.
    #[error("control database {dir}: {cause}")]
    Storage { dir: PathBuf, cause: fjall::Error },
    /// A stored definition could not be decoded.
    #[error("control database {dir}: corrupt topic {name:?}: {detail}")]
    Corrupt {
        dir: PathBuf,
        name: String,
        detail: String,
    },
}

/// Checks a topic name against `[a-zA-Z0-9._-]{1,128}`.
pub fn validate_topic_name(name: &str) -> Result<(), CatalogError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::InvalidName(name.to_string()))
    }
}

/// The topic catalog.
pub struct Catalog {
    db: Database,
    topics_ks: Keyspace,
    handlers_ks: Keyspace,
    components_ks: Keyspace,
    dir: PathBuf,
    topics: ArcSwap<HashMap<String, Arc<Topic>>>,
    handlers: ArcSwap<HashMap<String, Arc<HandlerDef>>>,
}

fn component_key(name: &str, version: u32) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

impl Catalog {
    /// Opens the control Database in `dir` and loads every topic.
    pub fn open(dir: &Path) -> Result<Self, CatalogError> {
        let storage = |cause| CatalogError::Storage {
            dir: dir.to_path_buf(),
            cause,
        };
        let db = Database::builder(dir)
            .worker_threads(1)
            .cache_size(4 * 1024 * 1024)
            .max_cached_files(Some(32))
            .manual_journal_persist(true)
            .open()
            .map_err(storage)?;
        let topics_ks = db
            .keyspace("topics", KeyspaceCreateOptions::default)
            .map_err(storage)?;
        let mut topics = HashMap::new();
        for guard in topics_ks.iter() {
            let (key, value) = guard.into_inner().map_err(storage)?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let topic: Topic =
                serde_json::from_slice(&value).map_err(|e| CatalogError::Corrupt {
                    dir: dir.to_path_buf(),
                    name: name.clone(),
                    detail: e.to_string(),
                })?;
            topics.insert(name, Arc::new(topic));
        }
        let handlers_ks = db
            .keyspace("handlers", KeyspaceCreateOptions::default)
            .map_err(storage)?;
        let components_ks = db
            .keyspace("components", KeyspaceCreateOptions::default)
            .map_err(storage)?;
        let mut handlers = HashMap::new();
        for guard in handlers_ks.iter() {
            let (key, value) = guard.into_inner().map_err(storage)?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let def: HandlerDef =
                serde_json::from_slice(&value).map_err(|e| CatalogError::Corrupt {
                    dir: dir.to_path_buf(),
                    name: name.clone(),
                    detail: e.to_string(),
                })?;
            handlers.insert(name, Arc::new(def));
        }
        Ok(Self {
            db,
            topics_ks,
            handlers_ks,
            components_ks,
            dir: dir.to_path_buf(),
            topics: ArcSwap::from_pointee(topics),
            handlers: ArcSwap::from_pointee(handlers),
        })
    }

    /// Looks a topic up without locking.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.load().get(name).cloned()
    }

    /// All topics, sorted by name.
    pub fn list(&self) -> Vec<Arc<Topic>> {
        let mut all: Vec<_> = self.topics.load().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Durably records a new topic. It becomes visible to [`Catalog::get`] only on [`Catalog::publish`],
    /// which the server calls once every cell has created the topic's partitions.
    pub fn insert(&self, topic: &Topic) -> Result<(), CatalogError> {
        validate_topic_name(&topic.name)?;
        if self.get(&topic.name).is_some() {
            return Err(CatalogError::Exists(topic.name.clone()));
        }
        let bytes = serde_json::to_vec(topic).unwrap_or_default();
        self.write(|batch| batch.insert(&self.topics_ks, topic.name.as_bytes(), bytes))
    }

    /// Makes a recorded topic visible to the data plane.
    pub fn publish(&self, topic: Topic) {
        self.topics.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(topic.name.clone(), Arc::new(topic.clone()));
            map
        });
    }

    /// Hides a topic from the data plane and durably removes it. Its data is deleted by the cells after.
    pub fn remove(&self, name: &str) -> Result<Arc<Topic>, CatalogError> {
        let topic = self
            .get(name)
            .ok_or_else(|| CatalogError::NotFound(name.to_string()))?;
        self.write(|batch| batch.remove(&self.topics_ks, name.as_bytes()))?;
        self.topics.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(name);
            map
        });
        Ok(topic)
    }

    /// A handler's definition, without locking.
    pub fn handler(&self, name: &str) -> Option<Arc<HandlerDef>> {
        self.handlers.load().get(name).cloned()
    }

    /// Every handler, as one consistent snapshot.
    pub fn handlers(&self) -> Arc<HashMap<String, Arc<HandlerDef>>> {
        self.handlers.load_full()
    }

    /// Durably stores a handler definition (and, for a deploy, the new version's component) and makes it
    /// visible. Callers serialize changes (the control plane's lock).
    pub fn put_handler(
        &self,
        def: HandlerDef,
        component: Option<(u32, &[u8])>,
    ) -> Result<(), CatalogError> {
        validate_topic_name(&def.name)?;
        let bytes = serde_json::to_vec(&def).unwrap_or_default();
        self.write(|batch| {
            batch.insert(&self.handlers_ks, def.name.as_bytes(), bytes);
            if let Some((version, component)) = component {
                batch.insert(
                    &self.components_ks,
                    component_key(&def.name, version),
                    component,
                );
            }
        })?;
        self.handlers.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(def.name.clone(), Arc::new(def.clone()));
            map
        });
        Ok(())
    }

    /// The component bytes of a handler version.
    pub fn component(&self, name: &str, version: u32) -> Result<Option<Vec<u8>>, CatalogError> {
        let value = self
            .components_ks
            .get(component_key(name, version))
            .map_err(|cause| CatalogError::Storage {
                dir: self.dir.clone(),
                cause,
            })?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Removes a handler and all its versions.
    pub fn remove_handler(&self, name: &str) -> Result<Arc<HandlerDef>, CatalogError> {
        let def = self
            .handler(name)
            .ok_or_else(|| CatalogError::HandlerNotFound(name.to_string()))?;
        self.write(|batch| {
            batch.remove(&self.handlers_ks, name.as_bytes());
            for v in &def.versions {
                batch.remove(&self.components_ks, component_key(name, v.version));
            }
        })?;
        self.handlers.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(name);
            map
        });
        Ok(def)
    }

    fn write(&self, f: impl FnOnce(&mut fjall::OwnedWriteBatch)) -> Result<(), CatalogError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        f(&mut batch);
        batch.commit().map_err(|cause| CatalogError::Storage {
            dir: self.dir.clone(),
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "orders.v2", "A_b-c", &"x".repeat(128)] {
            assert!(validate_topic_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
            assert!(
                matches!(validate_topic_name(bad), Err(CatalogError::InvalidName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn topics_persist_across_reopen() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let topic = Topic {
            name: "t".into(),
            retention: Retention {
                max_age_ms: Some(5),
                ..Retention::default()
            },
            created_ms: 1,
        };
        {
            let catalog = Catalog::open(dir.path())?;
            catalog.insert(&topic)?;
            assert!(catalog.get("t").is_none(), "not visible before publish");
            catalog.publish(topic.clone());
            assert!(matches!(
                catalog.insert(&topic),
                Err(CatalogError::Exists(_))
            ));
        }
        let catalog = Catalog::open(dir.path())?;
        assert_eq!(catalog.get("t").as_deref(), Some(&topic));
        catalog.remove("t")?;
        assert!(matches!(
            catalog.remove("t"),
            Err(CatalogError::NotFound(_))
        ));
        drop(catalog);
        assert!(Catalog::open(dir.path())?.list().is_empty());
        Ok(())
    }
}
