//! The data directory: where each Database lives, and the shape (partitions, cells) fixed at creation.
//!
//! ```text
//! DIR/procd.json     {"format": 1, "partitions": P, "cells": C}, written once, atomically
//! DIR/control/       fjall Database: topics (and later handlers)
//! DIR/cells/<k>/     fjall Database of cell k: partitions p with p % C == k
//! ```
//! P and C decide where every event lives, so reopening with other values would misroute reads and writes;
//! it is refused. Changing them is resharding, an explicit operation.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const META_FILE: &str = "procd.json";
const LAYOUT_FORMAT: u32 = 1;

/// The shape recorded in a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Number of partitions of every topic.
    pub partitions: u32,
    /// Number of cells the partitions are spread over.
    pub cells: u32,
}

impl Shape {
    /// The cell that owns a partition.
    pub fn cell_of(&self, partition: u32) -> u32 {
        partition % self.cells
    }

    /// The partitions a cell owns, ascending.
    pub fn partitions_of(&self, cell: u32) -> impl Iterator<Item = u32> + use<> {
        let (cells, partitions) = (self.cells, self.partitions);
        (cell..partitions).step_by(cells as usize)
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    partitions: u32,
    cells: u32,
}

/// The data directory could not be opened with the requested shape.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The directory was created with another shape.
    #[error(
        "data directory {dir} was created with partitions={have_p} cells={have_c}, but partitions={want_p} \
         cells={want_c} was requested; start with --partitions {have_p} --cells {have_c} (changing them is \
         resharding, which needs a new data directory)"
    )]
    ShapeMismatch {
        dir: PathBuf,
        have_p: u32,
        have_c: u32,
        want_p: u32,
        want_c: u32,
    },
    /// The metadata file is unreadable or of an unknown format.
    #[error("data directory metadata {path} is invalid: {detail}")]
    BadMeta { path: PathBuf, detail: String },
    /// An I/O error on the directory.
    #[error("data directory {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// An opened data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    shape: Shape,
}

impl DataDir {
    /// Opens `root`, creating it with `shape` if new, or checking `shape` against what it recorded.
    pub fn open(root: &Path, shape: Shape) -> Result<Self, LayoutError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |cause| LayoutError::Io { path, cause }
        };
        std::fs::create_dir_all(root).map_err(io(root))?;
        let meta_path = root.join(META_FILE);
        match std::fs::read(&meta_path) {
            Ok(bytes) => {
                let bad = |detail: String| LayoutError::BadMeta {
                    path: meta_path.clone(),
                    detail,
                };
                let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
                if meta.format != LAYOUT_FORMAT {
                    return Err(bad(format!("unknown layout format {}", meta.format)));
                }
                if (meta.partitions, meta.cells) != (shape.partitions, shape.cells) {
                    return Err(LayoutError::ShapeMismatch {
                        dir: root.to_path_buf(),
                        have_p: meta.partitions,
                        have_c: meta.cells,
                        want_p: shape.partitions,
                        want_c: shape.cells,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let meta = Meta {
                    format: LAYOUT_FORMAT,
                    partitions: shape.partitions,
                    cells: shape.cells,
                };
                write_atomically(
                    &meta_path,
                    &serde_json::to_vec_pretty(&meta).unwrap_or_default(),
                )
                .map_err(io(&meta_path))?;
            }
            Err(e) => return Err(io(&meta_path)(e)),
        }
        Ok(Self {
            root: root.to_path_buf(),
            shape,
        })
    }

    /// The recorded shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The control Database's directory.
    pub fn control_dir(&self) -> PathBuf {
        self.root.join("control")
    }

    /// Cell `k`'s Database directory.
    pub fn cell_dir(&self, cell: u32) -> PathBuf {
        self.root.join("cells").join(cell.to_string())
    }
}

/// Writes a file so that a crash leaves either the old or the new content, never a torn one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_own_partitions_modulo() {
        let shape = Shape {
            partitions: 8,
            cells: 3,
        };
        assert_eq!(shape.partitions_of(0).collect::<Vec<_>>(), [0, 3, 6]);
        assert_eq!(shape.partitions_of(2).collect::<Vec<_>>(), [2, 5]);
        assert!((0..8).all(|p| shape.partitions_of(shape.cell_of(p)).any(|q| q == p)));
    }

    #[test]
    fn reopening_with_another_shape_is_refused() -> Result<(), LayoutError> {
        let dir = tempfile::tempdir().map_err(|cause| LayoutError::Io {
            path: "tmp".into(),
            cause,
        })?;
        let shape = Shape {
            partitions: 4,
            cells: 2,
        };
        DataDir::open(dir.path(), shape)?;
        DataDir::open(dir.path(), shape)?;
        let err = DataDir::open(
            dir.path(),
            Shape {
                partitions: 8,
                cells: 2,
            },
        );
        assert!(matches!(
            err,
            Err(LayoutError::ShapeMismatch {
                have_p: 4,
                want_p: 8,
                ..
            })
        ));
        Ok(())
    }
}
