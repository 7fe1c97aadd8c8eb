//! The one `bindgen!` of the host: Rust types and traits for the `procd:handler` world in `wit/`.
//!
//! State functions are trappable: a storage error while a guest reads state is the host's failure, not
//! the guest's, so it traps the call (and the batch is retried) instead of handing the guest an error.
//!
//! The `input` interface is generated but not implemented through its `Host` trait, which would return
//! the batch's values as an owned `Vec<u8>` (one more copy per batch): `instance` links it by hand.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handler",
    imports: {
        "procd:handler/state": trappable,
    },
});

pub use self::procd::handler::types::{Level, StateValues};
