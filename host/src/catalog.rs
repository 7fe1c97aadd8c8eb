//! Topics: their definitions, persisted in the control Database (`DIR/control`, keyspace `topics`).
//!
//! The catalog is the source of truth for which topics exist. The data plane reads a snapshot of it
//! (an `ArcSwap`, so lookups take no lock); only the control plane changes it, one change at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};

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
    dir: PathBuf,
    topics: ArcSwap<HashMap<String, Arc<Topic>>>,
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
        Ok(Self {
            db,
            topics_ks,
            dir: dir.to_path_buf(),
            topics: ArcSwap::from_pointee(topics),
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
