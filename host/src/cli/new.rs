//! `procd new NAME`: scaffolds a handler crate ready for `procd dev` — a `Cargo.toml` depending on the
//! SDK, a documented example handler with unit tests on the SDK's `TestDriver`, a sample
//! `events.ndjson`, a `cargo wasm` alias for the component build, a README and a `.gitignore`.
//!
//! The SDK dependency is a path when the SDK's sources are at hand (`--sdk-path`, by default the `sdk/`
//! of the procd checkout this binary was built from, if it still exists) and a registry version
//! otherwise (`--sdk-version`, default this procd's version). The templates live in `new/*.tmpl`.
//! It refuses to write into an existing non-empty directory, and writes nothing before every check
//! has passed.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

/// Where the SDK was when this binary was built (a procd checkout).
const BUILT_SDK_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk");

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Directory to create; its last component is the crate's (and the handler's) name.
    path: PathBuf,
    /// Depend on the SDK at this path (a procd checkout's `sdk/` directory) [default: the checkout
    /// this procd was built from, when it exists].
    #[arg(long, value_name = "DIR", conflicts_with = "sdk_version")]
    sdk_path: Option<PathBuf>,
    /// Depend on this version of `procd-sdk` from the crates registry instead of a path.
    #[arg(long, value_name = "VERSION")]
    sdk_version: Option<String>,
}

/// How the new crate depends on the SDK.
#[derive(Debug, PartialEq)]
enum Sdk {
    Path(PathBuf),
    Version(String),
}

impl Sdk {
    fn dependency_line(&self) -> String {
        match self {
            // Debug formatting of a str is a valid TOML basic string (quotes and backslashes escaped).
            Sdk::Path(p) => format!("procd-sdk = {{ path = {:?} }}", p.display().to_string()),
            Sdk::Version(v) => format!("procd-sdk = {v:?}"),
        }
    }
}

fn choose_sdk(args: &NewArgs) -> anyhow::Result<Sdk> {
    if let Some(v) = &args.sdk_version {
        if v.trim().is_empty() {
            bail!(
                "--sdk-version is empty; give a version such as {}",
                env!("CARGO_PKG_VERSION")
            );
        }
        return Ok(Sdk::Version(v.clone()));
    }
    let (dir, explicit) = match &args.sdk_path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(BUILT_SDK_PATH), false),
    };
    if dir.join("Cargo.toml").is_file() {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve --sdk-path {}", dir.display()))?;
        return Ok(Sdk::Path(dir));
    }
    if explicit {
        bail!(
            "--sdk-path {}: no Cargo.toml there; point it at the sdk/ directory of a procd checkout",
            dir.display()
        );
    }
    Ok(Sdk::Version(env!("CARGO_PKG_VERSION").to_string()))
}

/// Checks a crate name: what cargo accepts, minus what would clash with the SDK.
fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!(
            "invalid handler name {name:?}: use 1 to 64 letters, digits, '-' or '_', starting with a \
             letter (e.g. procd new order-counter)"
        );
    }
    if matches!(
        name,
        "procd-sdk" | "procd_sdk" | "test" | "core" | "std" | "alloc"
    ) {
        bail!("invalid handler name {name:?}: it clashes with a crate it depends on; pick another");
    }
    Ok(())
}

/// `order-counter` → `OrderCounter`; names the SDK exports get a `Handler` suffix so they do not clash
/// with its imports.
fn struct_name(name: &str) -> String {
    let mut out = String::new();
    for part in name.split(['-', '_']).filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.push_str(chars.as_str());
        }
    }
    const SDK_NAMES: [&str; 8] = [
        "Config",
        "Context",
        "Event",
        "Handler",
        "Result",
        "Output",
        "Serialize",
        "Error",
    ];
    if SDK_NAMES.contains(&out.as_str()) {
        out.push_str("Handler");
    }
    out
}

/// The files of a new crate, relative to its directory.
fn files(name: &str, sdk: &Sdk) -> Vec<(&'static str, String)> {
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{lib}}", &name.replace('-', "_"))
            .replace("{{struct}}", &struct_name(name))
            .replace("{{sdk}}", &sdk.dependency_line())
    };
    vec![
        ("Cargo.toml", fill(include_str!("new/Cargo.toml.tmpl"))),
        (
            ".cargo/config.toml",
            fill(include_str!("new/config.toml.tmpl")),
        ),
        ("src/lib.rs", fill(include_str!("new/lib.rs.tmpl"))),
        (
            "events.ndjson",
            fill(include_str!("new/events.ndjson.tmpl")),
        ),
        ("README.md", fill(include_str!("new/README.md.tmpl"))),
        (".gitignore", fill(include_str!("new/gitignore.tmpl"))),
    ]
}

pub(super) fn run(args: NewArgs) -> anyhow::Result<()> {
    let dir = &args.path;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| {
            format!(
                "cannot name a crate after {}; pass a directory name such as my-handler",
                dir.display()
            )
        })?
        .to_string();
    check_name(&name)?;
    let sdk = choose_sdk(&args)?;
    refuse_non_empty(dir)?;
    for (file, contents) in files(&name, &sdk) {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("created handler crate {name} in {}", dir.display());
    match &sdk {
        Sdk::Path(p) => println!("  procd-sdk from {}", p.display()),
        Sdk::Version(v) => println!(
            "  procd-sdk {v} from the crates registry (use --sdk-path DIR to build against a procd checkout)"
        ),
    }
    println!(
        "next:\n  cd {}\n  cargo test     # the example's unit tests\n  procd dev      # build, deploy and hot-reload on a local server",
        dir.display()
    );
    Ok(())
}

fn refuse_non_empty(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} exists and is not empty; pick a new directory name or empty it",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            bail!(
                "{} exists and is a file; pick a new directory name",
                dir.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_rust_type_names() {
        assert_eq!(struct_name("order-counter"), "OrderCounter");
        assert_eq!(struct_name("my_handler2"), "MyHandler2");
        assert_eq!(struct_name("handler"), "HandlerHandler");
        assert_eq!(struct_name("event"), "EventHandler");
    }

    #[test]
    fn bad_names_are_refused_with_a_hint() {
        for bad in ["", "1st", "a b", "ünïcode", "procd-sdk", "x/y"] {
            let err = check_name(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("invalid handler name"), "{bad:?}: {err}");
        }
        assert!(check_name("order-counter").is_ok());
    }

    #[test]
    fn sdk_dependencies_are_valid_toml() -> anyhow::Result<()> {
        for sdk in [
            Sdk::Path(PathBuf::from(r#"/tmp/we"ird\path/sdk"#)),
            Sdk::Version("0.1.0".into()),
        ] {
            let manifest = files("my-handler", &sdk)
                .into_iter()
                .find(|(f, _)| *f == "Cargo.toml")
                .map(|(_, c)| c)
                .unwrap_or_default();
            let parsed: toml::Table = toml::from_str(&manifest)?;
            let dep = &parsed["dependencies"]["procd-sdk"];
            match &sdk {
                Sdk::Path(p) => assert_eq!(dep["path"].as_str(), p.to_str()),
                Sdk::Version(v) => assert_eq!(dep.as_str(), Some(v.as_str())),
            }
            assert_eq!(parsed["package"]["name"].as_str(), Some("my-handler"));
        }
        Ok(())
    }

    #[test]
    fn every_placeholder_is_filled() {
        for (file, contents) in files("x-y", &Sdk::Version("1".into())) {
            assert!(
                !contents.contains("{{"),
                "{file} has an unfilled placeholder"
            );
        }
    }
}
