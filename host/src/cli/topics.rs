//! `procd topics create|list|show|delete`.

use clap::Subcommand;

use super::{Endpoints, check};
use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create a topic.
    Create {
        /// Topic name: 1 to 128 characters from [a-zA-Z0-9._-].
        name: String,
        /// Drop events older than this many milliseconds.
        #[arg(long)]
        max_age_ms: Option<u64>,
        /// Drop the oldest events once a partition's log exceeds this many bytes.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Let retention drop events that handlers have not processed yet.
        #[arg(long)]
        drop_unconsumed: bool,
    },
    /// List topics.
    List,
    /// Show a topic and its partitions' offsets.
    Show {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and all its events.
    Delete {
        /// Topic name.
        name: String,
    },
}

pub(super) async fn run(command: TopicsCommand, endpoints: &Endpoints) -> anyhow::Result<()> {
    let mut admin = Client::new(&endpoints.admin_url)?;
    match command {
        TopicsCommand::Create {
            name,
            max_age_ms,
            max_bytes,
            drop_unconsumed,
        } => {
            let body = serde_json::json!({
                "name": name,
                "retention": {"max_age_ms": max_age_ms, "max_bytes": max_bytes, "drop_unconsumed": drop_unconsumed},
            });
            check(admin.post_json("/v1/topics", &body).await?)?;
            println!("created topic {name}");
        }
        TopicsCommand::List => {
            let resp = check(admin.get("/v1/topics").await?)?.json()?;
            let topics = resp["topics"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<40} {:>10} {:>16} {:>16}",
                "NAME", "PARTITIONS", "MAX_AGE_MS", "MAX_BYTES"
            );
            for t in topics {
                let opt =
                    |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
                println!(
                    "{:<40} {:>10} {:>16} {:>16}",
                    t["name"].as_str().unwrap_or(""),
                    t["partitions"],
                    opt(&t["retention"]["max_age_ms"]),
                    opt(&t["retention"]["max_bytes"]),
                );
            }
        }
        TopicsCommand::Show { name } => {
            let resp = check(admin.get(&format!("/v1/topics/{name}")).await?)?.json()?;
            println!("{}", serde_json::to_string_pretty(&resp)?);
        }
        TopicsCommand::Delete { name } => {
            check(admin.delete(&format!("/v1/topics/{name}")).await?)?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}
