//! Builds the example handlers in `guest-examples/` (and the test-only guests in `tests/guests/`) as
//! real wasm components, once per test process.
//!
//! Tests never use committed `.wasm` files: they run `cargo build --release --target wasm32-wasip2` in
//! `guest-examples/` with its own target directory (so the host's build lock is not contended:
//! `guest-examples/target`, or `$CARGO_TARGET_DIR/guest-examples` when that is set), and read the
//! components from there.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The example handlers.
pub const EXAMPLES: [&str; 4] = ["passthrough", "filter", "enrich", "counter"];

fn repo_root() -> PathBuf {
    // host/ is the package directory of these tests.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

static EXAMPLES_BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static TEST_GUESTS_BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Builds the cargo workspace in `dir` (relative to the repository) for wasm32-wasip2 in release, under
/// its own target directory, and returns the directory holding its components.
fn build(dir: &str) -> Result<PathBuf, String> {
    let root = repo_root().join(dir);
    // CI points CARGO_TARGET_DIR outside the clone so builds stay warm; follow it.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| PathBuf::from(d).join(dir.replace('/', "-")))
        .unwrap_or_else(|| root.join("target"));
    let out = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-j", "2"])
        .env("CARGO_TARGET_DIR", &target)
        // Cargo sets these for the test process; the guest build must not inherit them.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run cargo to build {dir}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building {dir} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target.join("wasm32-wasip2").join("release"))
}

/// Builds every example (once) and returns the directory holding `<name>.wasm`.
pub fn examples_dir() -> Result<PathBuf, String> {
    EXAMPLES_BUILT
        .get_or_init(|| build("guest-examples"))
        .clone()
}

/// Builds the test-only guests in `tests/guests` (once) and returns the component bytes of crate `name`.
pub fn test_guest(name: &str) -> Result<Vec<u8>, String> {
    let dir = TEST_GUESTS_BUILT
        .get_or_init(|| build("tests/guests"))
        .clone()?;
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The component bytes of example `name`.
pub fn example(name: &str) -> Result<Vec<u8>, String> {
    let path = examples_dir()?.join(format!("{name}.wasm"));
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The path of example `name`'s component.
pub fn example_path(name: &str) -> Result<PathBuf, String> {
    Ok(examples_dir()?.join(format!("{name}.wasm")))
}
