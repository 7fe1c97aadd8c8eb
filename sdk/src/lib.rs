//! procd guest SDK: write procd handlers in Rust and build them as WebAssembly components.
//!
//! The SDK arrives with the handler runtime (the WIT contract in `wit/`, the per-event API, the native
//! test harness). Until then this crate only reserves its place in the workspace layout.

#![deny(missing_docs)]
