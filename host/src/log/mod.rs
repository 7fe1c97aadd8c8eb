//! Partitioned, durable storage on fjall.
//!
//! `log` owns everything that touches disk for the data plane: the data-directory layout and its recorded
//! shape ([`layout`]), the on-disk key, entry and record encodings ([`keys`], [`entry`], [`record`]),
//! records on their way to a writer ([`Records`]) and one fjall `Database` per cell ([`Store`]). It
//! knows nothing of HTTP, wasm or threads: `cell` decides *when* to write, `log` decides *how* bytes
//! are laid out.

pub mod consumer;
pub mod entry;
pub mod keys;
pub mod layout;
pub mod record;
mod records;
mod store;

pub use consumer::{Committed, ConsumerLog, DlqEntry};
pub use record::{Payload, PayloadRef, Record, RecordRef};
pub use records::Records;
pub use store::{Batch, DedupEntry, PartitionLog, Store, StoreError, StoreOptions};
