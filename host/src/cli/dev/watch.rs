//! Noticing that a handler's sources changed, by polling: a fingerprint (path, size, modification time
//! of every file under the watched roots) taken every [`POLL`]. Polling a handler crate's few files
//! costs microseconds, needs no dependency and behaves the same on every platform and file system
//! (editors that save by rename included).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often sources are checked.
pub(super) const POLL: Duration = Duration::from_millis(300);
/// After a change, how long the sources must stay still before a build starts: editors and
/// formatters often write several times in a row.
const SETTLE: Duration = Duration::from_millis(200);
/// Files looked at per fingerprint at most: a watched tree this big is a mistake (e.g. a `target/`
/// under `src/`), not sources.
const MAX_FILES: usize = 10_000;

/// The state of the watched files.
pub(super) type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// What to watch: files and directories (walked recursively, skipping hidden entries and `target`).
#[derive(Debug, Clone)]
pub(super) struct Watched {
    roots: Vec<PathBuf>,
}

impl Watched {
    pub(super) fn new(roots: Vec<PathBuf>) -> Self {
        Self { roots }
    }

    /// The current fingerprint (blocking file-system calls: small trees only).
    pub(super) fn fingerprint(&self) -> Fingerprint {
        let mut out = Vec::new();
        for root in &self.roots {
            walk(root, &mut out);
        }
        out.sort();
        out
    }

    /// Waits until the fingerprint differs from `since` and then stays the same for [`SETTLE`];
    /// returns the settled fingerprint.
    pub(super) async fn changed(&self, since: &Fingerprint) -> Fingerprint {
        let mut current = loop {
            tokio::time::sleep(POLL).await;
            let now = self.fingerprint();
            if &now != since {
                break now;
            }
        };
        loop {
            tokio::time::sleep(SETTLE).await;
            let now = self.fingerprint();
            if now == current {
                return current;
            }
            current = now;
        }
    }
}

fn walk(path: &Path, out: &mut Fingerprint) {
    if out.len() >= MAX_FILES {
        return;
    }
    let Ok(meta) = std::fs::metadata(path) else {
        // Gone (deleted, or mid-rename): its absence is part of the fingerprint.
        return;
    };
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let hidden = name.to_string_lossy().starts_with('.');
            if !hidden && name != "target" {
                walk(&entry.path(), out);
            }
        }
    } else {
        out.push((path.to_path_buf(), meta.len(), meta.modified().ok()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_additions_and_removals_change_the_fingerprint() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join(".hidden"))?;
        std::fs::write(src.join("lib.rs"), "fn a() {}")?;
        let watched = Watched::new(vec![src.clone(), dir.path().join("Cargo.toml")]);
        let first = watched.fingerprint();
        assert_eq!(first.len(), 1);

        std::fs::write(src.join(".hidden").join("swap"), "x")?;
        assert_eq!(watched.fingerprint(), first, "hidden files are not sources");

        std::fs::write(dir.path().join("Cargo.toml"), "[package]")?;
        let second = watched.fingerprint();
        assert_ne!(second, first);

        std::fs::write(src.join("lib.rs"), "fn a() { }")?;
        let third = watched.fingerprint();
        assert_ne!(third, second, "a size change is a change");

        std::fs::remove_file(src.join("lib.rs"))?;
        assert_eq!(watched.fingerprint().len(), 1);
        Ok(())
    }
}
