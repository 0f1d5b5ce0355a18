//! Backing chains: open an image and everything under it, resolve names as
//! QEMU does, refuse what QEMU would do dangerously (cycles, `json:` names),
//! read through the chain and tell which layer serves each range.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::error::{Error, IoContext, Result};
use super::format::{open_image_file, probe_file, Format};
use super::layer::{Image, LayerStatus};

/// Deepest chain we open. QEMU has no limit and recurses until memory runs
/// out on a cycle it does not detect; real chains are a handful of layers.
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How a backing name is to be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingName {
    /// A file name; the resolved path (overlay directory + name).
    Path(PathBuf),
    /// `json:{...}`: reported, not followed.
    Json,
    /// `proto:...` (nbd://, http:, ...): reported, not followed.
    Protocol(String),
}

/// QEMU's `path_has_protocol` (a ':' before any '/') and the `json:` pseudo
/// protocol; otherwise the name joined to the overlay's directory.
pub fn classify_backing(overlay: &Path, name: &str) -> BackingName {
    if name.starts_with("json:") {
        return BackingName::Json;
    }
    if let Some(i) = name.find([':', '/']) {
        if name.as_bytes()[i] == b':' {
            return BackingName::Protocol(name[..i].to_string());
        }
    }
    BackingName::Path(combine_path(overlay, name))
}

/// Where QEMU looks for an image's external data file: the name as stored,
/// so a relative one is relative to the current directory, not to the
/// image's (tried with qemu-io 10: `sub/img.qcow2` with `data_file=img.data`
/// opened from the parent directory reads `./img.data`). Backing names, by
/// contrast, go through [`combine_path`].
pub fn data_file_path(name: &str) -> PathBuf {
    PathBuf::from(name)
}

/// QEMU's `path_combine`: an absolute name as is, a relative one appended to
/// the directory part of `base` as written (not normalised), so
/// `sub/ov.qcow2` + `../base.qcow2` = `sub/../base.qcow2`.
pub fn combine_path(base: &Path, name: &str) -> PathBuf {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let name_path = Path::new(name);
    if name_path.is_absolute() {
        return name_path.to_path_buf();
    }
    // Bytes, not str: directory names need not be UTF-8.
    let base_bytes = base.as_os_str().as_bytes();
    match base_bytes.iter().rposition(|&b| b == b'/') {
        Some(i) => {
            let mut joined = base_bytes[..=i].to_vec();
            joined.extend_from_slice(name.as_bytes());
            PathBuf::from(OsString::from_vec(joined))
        }
        None => name_path.to_path_buf(),
    }
}

/// A backing name for `target` to store in `image`: relative to the
/// image's directory, so that a chain keeps working when the directory
/// holding it is moved or mounted elsewhere as a whole. Both directories
/// must exist (the target itself need not yet); they are canonicalised, so
/// links in either path do not leave a name that climbs out through them.
/// `None` when a directory is missing or a path is not UTF-8 (a backing
/// name is stored as text).
pub fn relative_backing_name(image: &Path, target: &Path) -> Option<String> {
    let from = canonical_dir_of(image)?;
    let to = canonical_dir_of(target)?.join(target.file_name()?);
    relative_path(&from, &to)
        .into_os_string()
        .into_string()
        .ok()
}

/// `a/./b/../c` → `a/c` without asking the file system: for paths built
/// from canonical directories (no component is a link), and for key
/// presses, which may not touch the disk.
pub fn lexical_normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn canonical_dir_of(p: &Path) -> Option<PathBuf> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::canonicalize(dir).ok()
}

/// `to` as seen from the directory `from_dir`; both absolute and free of
/// `.` and `..`.
pub fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from_dir.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// Why a layer's format is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatSource {
    /// Given by the user (`-f`) or recorded in the overlay's header.
    Recorded,
    /// Probed from the file's magic: the overlay does not record its
    /// backing's format (QCOW2.md §8: a guest that writes a qcow2 header
    /// into a raw backing could then redirect reads).
    Probed,
}

pub struct Layer {
    /// As given (top) or as resolved from the overlay's backing name.
    pub path: PathBuf,
    pub image: Image,
    pub format_source: FormatSource,
}

pub struct Chain {
    layers: Vec<Layer>,
    /// Per layer, the last run its status returned. Deeper layers split a
    /// long run of an upper layer into many extents; without this, each
    /// extent would rescan the upper layer's run from its start.
    last_runs: Vec<Mutex<Option<Run>>>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    len: u64,
    status: LayerStatus,
}

impl Run {
    /// The status at `pos` inside this run, and how far it goes.
    fn at(&self, pos: u64) -> Option<(LayerStatus, u64)> {
        if pos < self.start || pos >= self.start + self.len {
            return None;
        }
        let delta = pos - self.start;
        let shift = |o: Option<u64>| o.map(|h| h + delta);
        let status = match self.status {
            LayerStatus::Data { offset, zero } => LayerStatus::Data {
                offset: shift(offset),
                zero,
            },
            LayerStatus::Zero { offset } => LayerStatus::Zero {
                offset: shift(offset),
            },
            LayerStatus::Unallocated { offset } => LayerStatus::Unallocated {
                offset: shift(offset),
            },
            LayerStatus::Compressed => LayerStatus::Compressed,
        };
        Some((status, self.start + self.len - pos))
    }
}

/// The answer of the whole chain for a guest range: QEMU's block status as
/// `qemu-img map` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    pub start: u64,
    pub length: u64,
    /// Index of the layer that answered (0 = top).
    pub depth: usize,
    /// Allocated in some layer (else reads zeros past the whole chain).
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the answering layer's file (or data file).
    pub offset: Option<u64>,
}

/// Open a file and decide its format: `given` wins, else the magic decides.
pub fn open_image(path: &Path, given: Option<Format>) -> Result<(Image, FormatSource)> {
    let file = open_image_file(path)?;
    let probed = probe_file(&file, path)?;
    let (format, source) = match given {
        Some(f) => (f, FormatSource::Recorded),
        None => (probed, FormatSource::Probed),
    };
    if let (Some(Format::Qcow2), f) = (given, probed) {
        if f != Format::Qcow2 {
            return Err(Error::FormatMismatch {
                path: path.to_path_buf(),
                given: "qcow2".into(),
                found: f.name(),
            });
        }
    }
    Ok((Image::open(path, file, format)?, source))
}

impl Chain {
    /// Open `path` (format `format`, or probed) and its whole backing chain.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Chain> {
        let (image, _) = open_image(path, format)?;
        let top = Layer {
            path: path.to_path_buf(),
            image,
            format_source: FormatSource::Recorded,
        };
        let mut seen = HashSet::new();
        seen.insert(file_id(&top)?);
        top.image.open_data_file()?;
        let mut layers = vec![top];
        loop {
            let layer = layers.last().expect("chain has a top layer");
            let Some(q) = layer.image.as_qcow2() else {
                break;
            };
            let h = q.header();
            let Some(name) = &h.backing_file else {
                break;
            };
            let next_path = match classify_backing(&layer.path, name) {
                BackingName::Path(p) => p,
                BackingName::Json => {
                    return Err(Error::UnfollowedBacking {
                        path: layer.path.clone(),
                        name: name.clone(),
                        kind: "json:",
                    })
                }
                BackingName::Protocol(_) => {
                    return Err(Error::UnfollowedBacking {
                        path: layer.path.clone(),
                        name: name.clone(),
                        kind: "protocol",
                    })
                }
            };
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::ChainTooDeep {
                    path: path.to_path_buf(),
                    limit: MAX_CHAIN_DEPTH,
                });
            }
            let recorded = match &h.extensions.backing_format {
                Some(f) => Some(Format::from_name(f).ok_or_else(|| Error::UnknownFormat {
                    path: layer.path.clone(),
                    format: f.clone(),
                })?),
                None => None,
            };
            let (image, source) = open_image(&next_path, recorded).map_err(|e| {
                let why = match e {
                    Error::Io { cause, .. } => cause.to_string(),
                    other => other.to_string(),
                };
                Error::invalid(
                    &layer.path,
                    format!(
                        "Could not open backing file '{}': {why}",
                        next_path.display()
                    ),
                )
            })?;
            let next = Layer {
                path: next_path,
                image,
                format_source: source,
            };
            next.image.open_data_file()?;
            if !seen.insert(file_id(&next)?) {
                return Err(Error::BackingCycle {
                    path: layers[0].path.clone(),
                    backing: next.path,
                });
            }
            layers.push(next);
        }
        let last_runs = layers.iter().map(|_| Mutex::new(None)).collect();
        Ok(Chain { layers, last_runs })
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.top().image.virtual_size()
    }

    /// Block status at `offset`, covering at most `max_len` bytes.
    pub fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let size = self.virtual_size();
        debug_assert!(offset < size && max_len > 0);
        let mut len = max_len.min(size - offset);
        for (depth, layer) in self.layers.iter().enumerate() {
            let (st, n) = self.layer_status(depth, layer, offset, len)?;
            len = n;
            let unalloc_offset = match st {
                LayerStatus::Unallocated { offset } => offset,
                _ => {
                    let (zero, data, compressed, host) = match st {
                        LayerStatus::Data { offset, zero } => (zero, true, false, offset),
                        LayerStatus::Zero { offset } => (true, false, false, offset),
                        LayerStatus::Compressed => (false, true, true, None),
                        LayerStatus::Unallocated { .. } => unreachable!(),
                    };
                    return Ok(BlockStatus {
                        start: offset,
                        length: len,
                        depth,
                        present: true,
                        zero,
                        data,
                        compressed,
                        offset: host,
                    });
                }
            };
            // Not allocated here: zeros if nothing is below or the backing
            // ends before this range, else ask the backing.
            let below = self.layers.get(depth + 1);
            match below {
                Some(b) if offset < b.image.virtual_size() => {
                    len = len.min(b.image.virtual_size() - offset);
                }
                _ => {
                    return Ok(BlockStatus {
                        start: offset,
                        length: len,
                        depth,
                        present: false,
                        zero: true,
                        data: false,
                        compressed: false,
                        offset: unalloc_offset,
                    })
                }
            }
        }
        unreachable!("the bottom layer always answers")
    }

    fn layer_status(
        &self,
        depth: usize,
        layer: &Layer,
        offset: u64,
        len: u64,
    ) -> Result<(LayerStatus, u64)> {
        let mut last = self.last_runs[depth]
            .lock()
            .map_err(|_| Error::invalid(&layer.path, "internal lock poisoned"))?;
        if let Some((st, n)) = last.and_then(|r| r.at(offset)) {
            return Ok((st, n.min(len)));
        }
        let (status, n) = layer.image.status(offset, len)?;
        *last = Some(Run {
            start: offset,
            len: n,
            status,
        });
        Ok((status, n))
    }

    /// Read guest bytes at `offset` through the chain. Ranges past the end
    /// of the disk are an error; ranges past a shorter backing read zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.virtual_size();
        if offset + buf.len() as u64 > size {
            return Err(Error::invalid(
                &self.top().path,
                format!(
                    "read of {} bytes at offset {offset} is past the end of the disk ({size} bytes)",
                    buf.len()
                ),
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let st = self.block_status(pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + st.length as usize];
            self.read_extent(&st, chunk)?;
            done += st.length as usize;
        }
        Ok(())
    }

    /// Fill `buf` (exactly `st.length` bytes) with the guest data of extent
    /// `st`, as returned by [`Chain::block_status`].
    pub fn read_extent(&self, st: &BlockStatus, buf: &mut [u8]) -> Result<()> {
        debug_assert_eq!(buf.len() as u64, st.length);
        let image = &self.layers[st.depth].image;
        if st.compressed {
            let cs = image.as_qcow2().map_or(1, |q| q.header().cluster_size());
            let mut done = 0usize;
            while done < buf.len() {
                let g = st.start + done as u64;
                let n = ((cs - g % cs) as usize).min(buf.len() - done);
                image.read_compressed(g, &mut buf[done..done + n])?;
                done += n;
            }
            Ok(())
        } else if st.data {
            match st.offset {
                Some(host) => image.read_data(host, buf),
                // Data whose location the layer hides: encrypted.
                None => image.read_data(u64::MAX, buf),
            }
        } else {
            buf.fill(0);
            Ok(())
        }
    }
}

fn file_id(layer: &Layer) -> Result<(u64, u64)> {
    let m = layer.image.file().metadata().at(&layer.path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod relative_name_tests {
    use super::*;

    #[test]
    fn relative_paths_climb_only_as_far_as_needed() {
        let r = |a: &str, b: &str| relative_path(Path::new(a), Path::new(b));
        assert_eq!(
            r("/srv/img", "/srv/img/base.qcow2"),
            Path::new("base.qcow2")
        );
        assert_eq!(
            r("/srv/img/vms", "/srv/img/base.qcow2"),
            Path::new("../base.qcow2")
        );
        assert_eq!(
            r("/srv/img", "/srv/img/bases/b.qcow2"),
            Path::new("bases/b.qcow2")
        );
        assert_eq!(r("/a/b/c", "/x/y.qcow2"), Path::new("../../../x/y.qcow2"));
    }

    #[test]
    fn lexical_normalize_drops_dots() {
        assert_eq!(
            lexical_normalize(Path::new("/vm/./x/../base.qcow2")),
            Path::new("/vm/base.qcow2")
        );
    }

    #[test]
    fn a_relative_name_resolves_to_the_target_through_links() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("real/vms")).unwrap();
        std::os::unix::fs::symlink(t.path().join("real"), t.path().join("link")).unwrap();
        let image = t.path().join("link/vms/ov.qcow2");
        let target = t.path().join("real/base.qcow2");
        let name = relative_backing_name(&image, &target).unwrap();
        assert_eq!(name, "../base.qcow2");
        std::fs::write(&target, b"x").unwrap();
        let resolved = combine_path(&image, &name);
        assert_eq!(
            std::fs::canonicalize(resolved).unwrap(),
            std::fs::canonicalize(&target).unwrap()
        );
        assert_eq!(
            relative_backing_name(&t.path().join("gone/ov"), &target),
            None
        );
    }
}
