//! Building a handler crate for `wasm32-wasip2` with cargo, the way a person would, and finding the
//! component it produced.
//!
//! Cargo's own output (progress, compiler errors with their colours) goes straight to the terminal on
//! stderr as cargo prints it; stdout carries cargo's JSON messages (`--message-format
//! json-render-diagnostics`), from which the `.wasm` path is taken, so a custom `CARGO_TARGET_DIR` or
//! workspace layout needs no guessing. The child is killed if the build is abandoned (Ctrl-C).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use tokio::io::AsyncBufReadExt as _;

/// The target every handler is built for.
pub(super) const TARGET: &str = "wasm32-wasip2";

/// How a build ended.
pub(super) enum Outcome {
    /// The component, freshly built (or already up to date).
    Built(PathBuf),
    /// Cargo failed; its errors are already on the terminal.
    Failed,
}

/// The cargo to run: the one that started us when there is one (`cargo run`, tests), else `cargo`.
fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Runs `cargo build --release --target wasm32-wasip2` in `dir` and returns the component of the
/// package whose manifest is `manifest`.
pub(super) async fn build(dir: &Path, manifest: &Path) -> anyhow::Result<Outcome> {
    let mut child = tokio::process::Command::new(cargo())
        .current_dir(dir)
        .args(["build", "--release", "--target", TARGET])
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run cargo; is a Rust toolchain installed (https://rustup.rs)?")?;
    let stdout = child
        .stdout
        .take()
        .context("cargo's output was not captured")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut component = None;
    while let Some(line) = lines
        .next_line()
        .await
        .context("cannot read cargo's output")?
    {
        if let Some(path) = component_of(&line, manifest) {
            component = Some(path);
        }
    }
    let status = child.wait().await.context("cargo did not finish")?;
    if !status.success() {
        return Ok(Outcome::Failed);
    }
    component.map(Outcome::Built).with_context(|| {
        format!(
            "cargo built no .wasm for {}; is it a library with crate-type = [\"cdylib\"]? (procd new \
             creates one)",
            manifest.display()
        )
    })
}

/// The `.wasm` named by a `compiler-artifact` message of the package at `manifest`, if `line` is one.
fn component_of(line: &str, manifest: &Path) -> Option<PathBuf> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-artifact" {
        return None;
    }
    let from = Path::new(msg["manifest_path"].as_str()?);
    if from != manifest {
        return None;
    }
    msg["filenames"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))
        .map(PathBuf::from)
}

/// Whether the toolchain cargo uses in `dir` has the wasm32-wasip2 standard library; `None` when that
/// cannot be told (no rustc on PATH): the build will say.
pub(super) async fn target_installed(dir: &Path) -> Option<bool> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = tokio::process::Command::new(rustc)
        .current_dir(dir)
        .args(["--print", "sysroot"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let sysroot = String::from_utf8(out.stdout).ok()?;
    Some(
        Path::new(sysroot.trim())
            .join("lib/rustlib")
            .join(TARGET)
            .is_dir(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_component_comes_from_the_package_artifact() {
        let manifest = Path::new("/src/hello/Cargo.toml");
        let ours = r#"{"reason":"compiler-artifact","manifest_path":"/src/hello/Cargo.toml","target":{"kind":["cdylib"]},"filenames":["/t/wasm32-wasip2/release/hello.wasm"],"fresh":false}"#;
        let dep = r#"{"reason":"compiler-artifact","manifest_path":"/reg/serde/Cargo.toml","filenames":["/t/libserde.rlib"]}"#;
        assert_eq!(
            component_of(ours, manifest),
            Some(PathBuf::from("/t/wasm32-wasip2/release/hello.wasm"))
        );
        assert_eq!(component_of(dep, manifest), None);
        assert_eq!(component_of("not json", manifest), None);
        assert_eq!(
            component_of(r#"{"reason":"build-finished","success":true}"#, manifest),
            None
        );
    }
}
