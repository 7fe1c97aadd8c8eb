//! Validating and compiling handler components, with an on-disk cache of compiled code.
//!
//! A component is checked before anything changes: it must be wasm, a component (not a core module),
//! and implement procd's `handler` world (export `init` and `handle` with the WIT's types, import
//! nothing of procd's with another shape). Compiled code is cached as
//! `<cache_dir>/<content hash>-<engine hash>.cwasm` (`Component::serialize`), so a restart loads it in
//! microseconds instead of compiling again (tens of milliseconds or more); the engine hash changes when
//! wasmtime or its settings do, and a stale or unreadable file is simply recompiled.

use std::hash::{Hash as _, Hasher as _};
use std::io::Write as _;
use std::path::PathBuf;

use wasmtime::component::Component;

use super::Runtime;
use super::bindings::HandlerPre;
use super::instance::HostState;

/// Why a component was refused.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Not a WebAssembly binary at all.
    #[error(
        "not a WebAssembly binary (no \\0asm header); build the handler with `cargo build --target wasm32-wasip2`"
    )]
    NotWasm,
    /// A core module instead of a component.
    #[error(
        "this is a core WebAssembly module, not a component; build for wasm32-wasip2 (which emits components) \
         or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    /// wasmtime could not compile it.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// An export of the `handler` world is missing.
    #[error(
        "the component does not export `{0}` of procd's world procd:handler/handler@0.3.0; \
         export your handler with `procd_sdk::export!`"
    )]
    MissingExport(&'static str),
    /// Exports or imports have other types than procd's world.
    #[error("the component does not implement procd's world procd:handler/handler@0.3.0: {0}")]
    WrongWorld(String),
}

/// A validated, compiled handler version, ready to instantiate (one `InstancePre` per version).
#[derive(Clone)]
pub struct Compiled {
    pub(super) pre: HandlerPre<HostState>,
}

impl Runtime {
    /// Validates and compiles component `bytes`, using the on-disk cache when possible.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, CompileError> {
        check_header(bytes)?;
        let path = self.cache_path(bytes);
        // SAFETY: the file is one this process family wrote with `Component::serialize` for an engine with
        // the same compatibility hash (part of its name); wasmtime checks the header and version too. A
        // file that fails to load is recompiled and rewritten.
        #[allow(unsafe_code)]
        let cached = path
            .exists()
            .then(|| unsafe { Component::deserialize_file(&self.engine, &path) });
        let component = match cached {
            Some(Ok(component)) => component,
            _ => {
                let component = Component::new(&self.engine, bytes)
                    .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
                self.link(&component)?;
                if let Err(e) = component
                    .serialize()
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| write_atomically(&path, &bytes).map_err(|e| e.to_string()))
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled component");
                }
                component
            }
        };
        self.link(&component)
    }

    fn link(&self, component: &Component) -> Result<Compiled, CompileError> {
        let ty = component.component_type();
        for name in ["init", "handle"] {
            if ty.get_export(&self.engine, name).is_none() {
                return Err(CompileError::MissingExport(name));
            }
        }
        let mut linker = self.linker.clone();
        // Everything the guest imports beyond procd's interfaces (std's WASI imports, typically) traps.
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(|e| CompileError::WrongWorld(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| CompileError::WrongWorld(format!("{e:#}")))?;
        let pre = HandlerPre::new(pre).map_err(|e| CompileError::WrongWorld(format!("{e:#}")))?;
        Ok(Compiled { pre })
    }

    fn cache_path(&self, bytes: &[u8]) -> PathBuf {
        // SipHash with fixed keys: stable across runs, which the cache needs.
        let mut content = std::hash::DefaultHasher::new();
        bytes.hash(&mut content);
        let mut engine = std::hash::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut engine);
        self.cache_dir.join(format!(
            "{:016x}-{:016x}.cwasm",
            content.finish(),
            engine.finish()
        ))
    }
}

/// Tells garbage, core modules and components apart from the preamble.
fn check_header(bytes: &[u8]) -> Result<(), CompileError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(CompileError::NotWasm);
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(CompileError::CoreModule);
    }
    Ok(())
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_told_apart() {
        assert!(matches!(
            check_header(b"hello world"),
            Err(CompileError::NotWasm)
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(CompileError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
