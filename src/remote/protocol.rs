//! The agent protocol: what `cowshed agent --stdio` on another host and the
//! local cowshed say to each other over ssh. One JSON object per line, in
//! both directions; the `type` field names the message.
//!
//! A session: the client sends `hello` with its [`PROTOCOL_VERSION`]; the
//! agent answers `hello` with its own (and its cowshed version and host
//! name), or `refused` and ends when they differ. Then the client asks:
//! `watch` (scan roots: a `snapshot` of the forest, then, when live,
//! `sizes`/`modified` for a guest writing and a new `snapshot` whenever
//! an image appears, vanishes or changes its header), `job` (run an
//! operation: `job-state` messages follow, with progress while it runs,
//! ending with its outcome), `cancel`, `outcome` (what became of a job
//! started over an earlier connection: its end is recorded on the host,
//! so a lost connection never leaves the client guessing, and nothing is
//! run twice), `list` (an image's internal snapshots and persistent
//! bitmaps, read there, answered with a `listing`) and `refresh` (images a
//! job changed, read again and the forest sent).
//!
//! The wire types are spelled out here rather than derived on the
//! catalog's records, so that a change to those cannot change the protocol
//! unnoticed; only flags and holders travel as the catalog's own
//! (serde-derived, a flag tagged by its `kind`). The golden test below
//! pins the JSON: any change to a message bumps [`PROTOCOL_VERSION`].

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::catalog::{Flag, Holder, ImageRecord, Sizes};
use crate::engine::{Format, HeaderSummary, LockState};

/// Both ends must speak the same version; there is no negotiation.
pub const PROTOCOL_VERSION: u32 = 2;

/// Client to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Request {
    Hello {
        protocol: u32,
    },
    /// Scan these directories on the agent's host and send the forest;
    /// with `live`, keep watching and send changes.
    Watch {
        roots: Vec<PathBuf>,
        live: bool,
    },
    /// Run an operation. `id` is chosen by the client, unique across its
    /// connections (it names the job's record on the host).
    Job {
        id: String,
        op: JobOp,
    },
    Cancel {
        id: String,
    },
    /// The end of a job started over an earlier connection: answered with
    /// a `job-state` (its outcome, or `running` until it ends).
    Outcome {
        id: String,
    },
    /// The internal snapshots and persistent bitmaps of one image there:
    /// answered with a `listing` of the same `id` (the TUI's snapshots and
    /// bitmaps dialogs list them from it, never from a local file).
    List {
        id: String,
        image: PathBuf,
    },
    /// Read these images again now and send the forest (a job of the
    /// client's on them ended, over another connection): what a local
    /// job's end does for local images, so that the tree does not show
    /// the job's own lock, or the old header, until the next poll.
    Refresh {
        paths: Vec<PathBuf>,
    },
}

/// Agent to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Hello {
        protocol: u32,
        /// The agent's cowshed version (`cowshed --version`).
        version: String,
        host: String,
    },
    /// The session cannot go on (another protocol version); the agent
    /// ends after sending it.
    Refused {
        message: String,
    },
    /// The whole forest under the watched roots, built on the agent's
    /// host (backing names resolved there).
    Snapshot {
        nodes: Vec<WireNode>,
        errors: Vec<WireError>,
    },
    /// Only sizes moved (a guest writing).
    Sizes {
        key: PathBuf,
        sizes: WireSizes,
    },
    /// The image's content was written (its mtime moved).
    Modified {
        key: PathBuf,
        mtime: Option<WireTime>,
    },
    PollingOnly {
        reason: String,
    },
    JobState {
        id: String,
        state: WireJobState,
        /// Set when the job ended with an error or was lost.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        progress: WireProgress,
        /// The image the job made (a clone's overlay, a convert's output).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created: Option<PathBuf>,
    },
    /// A request that could not be understood or served.
    Error {
        message: String,
    },
    /// The answer to `list`: the image's snapshots and bitmaps, or why
    /// they could not be read (`error`, the engine's message).
    Listing {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listing: Option<WireListing>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// What the snapshots and bitmaps dialogs show of a qcow2 image, and the
/// facts their refusals rest on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireListing {
    /// The qcow2 version (2: compat=0.10 holds no bitmaps).
    pub version: u32,
    /// An external data file: no internal snapshots then.
    pub data_file: bool,
    pub snapshots: Vec<WireSnapshot>,
    pub bitmaps: Vec<WireBitmap>,
}

impl WireListing {
    /// What the engine's `info` says of a qcow2 image: how the agent
    /// answers `list`, and what the dialogs list for a local image.
    pub fn from_qcow2(q: &crate::engine::ops::info::Qcow2Info) -> WireListing {
        WireListing {
            version: q.version,
            data_file: q.data_file.is_some(),
            snapshots: q
                .snapshots
                .iter()
                .map(|s| WireSnapshot {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_nsec: s.vm_clock_nsec,
                    vm_state_size: s.vm_state_size,
                    disk_size: s.disk_size,
                })
                .collect(),
            bitmaps: q
                .bitmaps
                .iter()
                .map(|b| WireBitmap {
                    name: b.name.clone(),
                    granularity: b.granularity,
                    auto: b.auto,
                    in_use: b.in_use,
                })
                .collect(),
        }
    }
}

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSnapshot {
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
}

/// One persistent dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBitmap {
    pub name: String,
    pub granularity: u64,
    /// Recording the guest's writes (`enabled`).
    pub auto: bool,
    /// Left in use by a QEMU that did not close it.
    pub in_use: bool,
}

/// What a `snapshot` job does (`cowshed snapshot -c/-a/-d`); apply and
/// delete name the snapshot by id, which is unique where names need not be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case")]
pub enum SnapshotAction {
    Create { name: String },
    Apply { id: String },
    Delete { id: String },
}

/// What a `bitmap` job does to the bitmap it names (`cowshed bitmap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case")]
pub enum BitmapAction {
    /// With a granularity in bytes, else the default.
    Add {
        granularity: Option<u64>,
    },
    Remove,
    Clear,
    Enable,
    Disable,
    /// Merge another bitmap of the same image into it.
    Merge {
        from: String,
    },
}

impl BitmapAction {
    pub fn verb(&self) -> &'static str {
        match self {
            BitmapAction::Add { .. } => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge { .. } => "merge",
        }
    }
}

/// An operation the agent runs with its engine, on its own files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum JobOp {
    /// A new empty qcow2 overlay `new` over `base` (backing name relative
    /// when both are in one directory, format recorded).
    Clone { base: PathBuf, new: PathBuf },
    /// `qemu-img commit` (the overlay emptied afterwards unless
    /// `keep_top`).
    Commit { image: PathBuf, keep_top: bool },
    /// `qemu-img rebase [-u] -b backing -F format`; `backing` "" flattens.
    Rebase {
        image: PathBuf,
        backing: String,
        backing_format: Option<String>,
        unsafe_header_only: bool,
    },
    /// `qemu-img convert -O format [-c] [-o cluster_size=,compression_type=]
    /// [-B backing -F backing_format]`; the options left out take the
    /// defaults of `cowshed convert`.
    Convert {
        src: PathBuf,
        dst: PathBuf,
        format: String,
        compress: bool,
        cluster_size: Option<u64>,
        /// `zlib` or `zstd`.
        compression_type: Option<String>,
        /// `-B`: the new image keeps this backing name (and format).
        backing: Option<String>,
        backing_format: Option<String>,
    },
    /// `cowshed rm [--trash]`: refused while anything depends on them.
    Delete { paths: Vec<PathBuf>, trash: bool },
    /// `cowshed mv`, re-pointing the dependents under `roots`.
    Move {
        src: PathBuf,
        dst: PathBuf,
        roots: Vec<PathBuf>,
    },
    /// The TUI's reset: a fresh empty overlay on the same backing replaces
    /// the image; refused while images under `roots` depend on it.
    Reset { image: PathBuf, roots: Vec<PathBuf> },
    /// `cowshed snapshot` on a qcow2 image.
    Snapshot {
        image: PathBuf,
        action: SnapshotAction,
    },
    /// `cowshed bitmap` on bitmap `name` of a qcow2 image.
    Bitmap {
        image: PathBuf,
        name: String,
        action: BitmapAction,
    },
    /// One of the doctor's header-only fixes, planned against the disk
    /// there (`cowshed doctor --fix`).
    HeaderFix { image: PathBuf, fix: HeaderFixKind },
    /// `cowshed protect [--off]`: the file's write permission.
    Protect { image: PathBuf, off: bool },
}

/// The doctor's fixes that change only a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeaderFixKind {
    RecordBackingFormat,
    MakeBackingNameRelative,
}

impl JobOp {
    /// The operation's name, as the TUI's job list and badges say it.
    pub fn kind(&self) -> &'static str {
        match self {
            JobOp::Clone { .. } => "clone",
            JobOp::Commit { .. } => "commit",
            JobOp::Rebase { .. } => "rebase",
            JobOp::Convert { .. } => "convert",
            JobOp::Delete { .. } => "delete",
            JobOp::Move { .. } => "move",
            JobOp::Reset { .. } => "reset",
            JobOp::Snapshot { .. } => "snapshot",
            JobOp::Bitmap { .. } => "bitmap",
            JobOp::HeaderFix { .. } => "doctor",
            JobOp::Protect { .. } => "protect",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WireJobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
    /// The job's agent ended before the job did (killed, the host
    /// rebooted): the images are as an interrupted operation leaves them.
    /// Never run again by itself.
    Lost,
}

impl WireJobState {
    pub fn is_finished(self) -> bool {
        !matches!(self, WireJobState::Queued | WireJobState::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WireProgress {
    pub done: u64,
    pub total: u64,
    pub copied: u64,
}

/// A point in time as seconds and nanoseconds since the Unix epoch; times
/// before it are not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTime {
    pub secs: u64,
    pub nanos: u32,
}

impl WireTime {
    pub fn from_system(t: Option<SystemTime>) -> Option<WireTime> {
        let d = t?.duration_since(UNIX_EPOCH).ok()?;
        Some(WireTime {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        })
    }

    pub fn to_system(t: Option<WireTime>) -> Option<SystemTime> {
        let t = t?;
        UNIX_EPOCH.checked_add(Duration::new(t.secs, t.nanos.min(999_999_999)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSizes {
    pub virtual_size: u64,
    pub allocated: u64,
    pub apparent: u64,
}

impl From<Sizes> for WireSizes {
    fn from(s: Sizes) -> Self {
        WireSizes {
            virtual_size: s.virtual_size,
            allocated: s.allocated,
            apparent: s.apparent,
        }
    }
}

impl From<WireSizes> for Sizes {
    fn from(s: WireSizes) -> Self {
        Sizes {
            virtual_size: s.virtual_size,
            allocated: s.allocated,
            apparent: s.apparent,
        }
    }
}

/// The header facts the tree shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSummary {
    pub format: String,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    pub backing_filename: Option<String>,
    pub backing_format: Option<String>,
    pub version: Option<u32>,
    pub dirty: bool,
    pub corrupt: bool,
    pub encrypted: bool,
    /// `zlib` or `zstd`.
    pub compression: Option<String>,
    pub extended_l2: bool,
    pub snapshots: u32,
}

/// One image file, as the agent's scan found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireImage {
    pub path: PathBuf,
    pub key: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub summary: Option<WireSummary>,
    pub error: Option<String>,
    pub sizes: WireSizes,
    pub mtime: Option<WireTime>,
    pub created: Option<WireTime>,
    pub mode: u32,
    /// `none`, `reader` or `writer`.
    pub lock: String,
    pub holders: Vec<Holder>,
}

/// One node of the agent's forest: `parent` indexes `nodes` of the same
/// snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireNode {
    pub image: WireImage,
    pub parent: Option<usize>,
    pub flags: Vec<Flag>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub path: PathBuf,
    pub message: String,
}

impl From<&ImageRecord> for WireImage {
    fn from(r: &ImageRecord) -> Self {
        WireImage {
            path: r.path.clone(),
            key: r.key.clone(),
            dev: r.dev_ino.0,
            ino: r.dev_ino.1,
            summary: r.summary.as_ref().map(|s| WireSummary {
                format: s.format.name().to_string(),
                virtual_size: s.virtual_size,
                cluster_size: s.cluster_size,
                backing_filename: s.backing_filename.clone(),
                backing_format: s.backing_format.clone(),
                version: s.version,
                dirty: s.dirty,
                corrupt: s.corrupt,
                encrypted: s.encrypted,
                compression: s.compression.map(|c| c.name().to_string()),
                extended_l2: s.extended_l2,
                snapshots: s.snapshots,
            }),
            error: r.error.clone(),
            sizes: r.sizes.into(),
            mtime: WireTime::from_system(r.mtime),
            created: WireTime::from_system(r.created),
            mode: r.mode,
            lock: r.lock.name().to_string(),
            holders: r.holders.clone(),
        }
    }
}

impl WireImage {
    /// The record on the client's side, for `host`. A format or lock the
    /// client does not know is an error: it means another protocol.
    pub fn into_record(self, host: &str) -> Result<ImageRecord, String> {
        use crate::engine::qcow2::header::CompressionType;
        let summary = match self.summary {
            None => None,
            Some(s) => Some(HeaderSummary {
                format: Format::from_name(&s.format)
                    .ok_or_else(|| format!("unknown format {:?}", s.format))?,
                virtual_size: s.virtual_size,
                cluster_size: s.cluster_size,
                backing_filename: s.backing_filename,
                backing_format: s.backing_format,
                version: s.version,
                dirty: s.dirty,
                corrupt: s.corrupt,
                encrypted: s.encrypted,
                compression: match s.compression.as_deref() {
                    None => None,
                    Some("zlib") => Some(CompressionType::Deflate),
                    Some("zstd") => Some(CompressionType::Zstd),
                    Some(other) => return Err(format!("unknown compression {other:?}")),
                },
                extended_l2: s.extended_l2,
                snapshots: s.snapshots,
            }),
        };
        let lock = match self.lock.as_str() {
            "none" => LockState::None,
            "reader" => LockState::Reader,
            "writer" => LockState::Writer,
            other => return Err(format!("unknown lock state {other:?}")),
        };
        Ok(ImageRecord {
            path: self.path,
            // Keys are identities in one forest: the same path on two
            // hosts is two files.
            key: PathBuf::from(format!("{host}:{}", self.key.display())),
            host: Some(host.to_string()),
            dev_ino: (self.dev, self.ino),
            summary,
            error: self.error,
            sizes: self.sizes.into(),
            mtime: WireTime::to_system(self.mtime),
            created: WireTime::to_system(self.created),
            mode: self.mode,
            lock,
            holders: self.holders,
        })
    }
}

/// One message as its line (with the newline).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these types cannot fail: no maps with non-string keys,
    // no foreign Serialize impls.
    let mut line = serde_json::to_vec(msg).unwrap_or_else(|e| {
        serde_json::to_vec(&Reply::Error {
            message: format!("cannot encode a message: {e}"),
        })
        .unwrap_or_default()
    });
    line.push(b'\n');
    line
}

/// Parse one line.
pub fn decode<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, String> {
    serde_json::from_str(line.trim_end()).map_err(|e| format!("bad protocol message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_image() -> WireImage {
        WireImage {
            path: "/srv/images/web-1.qcow2".into(),
            key: "/srv/images/web-1.qcow2".into(),
            dev: 2049,
            ino: 131,
            summary: Some(WireSummary {
                format: "qcow2".into(),
                virtual_size: 1 << 30,
                cluster_size: Some(65536),
                backing_filename: Some("base.qcow2".into()),
                backing_format: Some("qcow2".into()),
                version: Some(3),
                dirty: false,
                corrupt: false,
                encrypted: false,
                compression: Some("zlib".into()),
                extended_l2: false,
                snapshots: 0,
            }),
            error: None,
            sizes: WireSizes {
                virtual_size: 1 << 30,
                allocated: 200704,
                apparent: 196608,
            },
            mtime: Some(WireTime {
                secs: 1_700_000_000,
                nanos: 5,
            }),
            created: None,
            mode: 0o644,
            lock: "writer".into(),
            holders: vec![Holder {
                pid: 4121,
                command: "qemu-system-x86".into(),
                writable: true,
            }],
        }
    }

    /// The protocol's JSON, pinned: a failure here means the wire format
    /// changed, and PROTOCOL_VERSION must change with it (then update
    /// this text).
    #[test]
    fn golden_lines() {
        assert_eq!(PROTOCOL_VERSION, 2);
        let hello = encode(&Request::Hello { protocol: 2 });
        assert_eq!(hello, b"{\"type\":\"hello\",\"protocol\":2}\n");
        let snapshot = Reply::Snapshot {
            nodes: vec![WireNode {
                image: sample_image(),
                parent: Some(0),
                flags: vec![Flag::MissingBacking {
                    wanted: "old.qcow2".into(),
                }],
            }],
            errors: vec![WireError {
                path: "/srv/images/lost+found".into(),
                message: "Permission denied".into(),
            }],
        };
        let text = String::from_utf8(encode(&snapshot)).expect("utf-8");
        assert_eq!(
            text,
            "{\"type\":\"snapshot\",\"nodes\":[{\"image\":{\"path\":\"/srv/images/web-1.qcow2\",\
             \"key\":\"/srv/images/web-1.qcow2\",\"dev\":2049,\"ino\":131,\"summary\":{\
             \"format\":\"qcow2\",\"virtual_size\":1073741824,\"cluster_size\":65536,\
             \"backing_filename\":\"base.qcow2\",\"backing_format\":\"qcow2\",\"version\":3,\
             \"dirty\":false,\"corrupt\":false,\"encrypted\":false,\"compression\":\"zlib\",\
             \"extended_l2\":false,\"snapshots\":0},\"error\":null,\"sizes\":{\
             \"virtual_size\":1073741824,\"allocated\":200704,\"apparent\":196608},\
             \"mtime\":{\"secs\":1700000000,\"nanos\":5},\"created\":null,\"mode\":420,\
             \"lock\":\"writer\",\"holders\":[{\"pid\":4121,\"command\":\"qemu-system-x86\",\
             \"writable\":true}]},\"parent\":0,\"flags\":[{\"kind\":\"missing-backing\",\
             \"wanted\":\"old.qcow2\"}]}],\"errors\":[{\"path\":\"/srv/images/lost+found\",\
             \"message\":\"Permission denied\"}]}\n"
        );
        let job = encode(&Request::Job {
            id: "c1".into(),
            op: JobOp::Commit {
                image: "/srv/a.qcow2".into(),
                keep_top: false,
            },
        });
        assert_eq!(
            String::from_utf8(job).expect("utf-8"),
            "{\"type\":\"job\",\"id\":\"c1\",\"op\":{\"op\":\"commit\",\
             \"image\":\"/srv/a.qcow2\",\"keep_top\":false}}\n"
        );
        let state = encode(&Reply::JobState {
            id: "c1".into(),
            state: WireJobState::Running,
            message: None,
            progress: WireProgress {
                done: 1,
                total: 2,
                copied: 1,
            },
            created: None,
        });
        assert_eq!(
            String::from_utf8(state).expect("utf-8"),
            "{\"type\":\"job-state\",\"id\":\"c1\",\"state\":\"running\",\
             \"progress\":{\"done\":1,\"total\":2,\"copied\":1}}\n"
        );
    }

    /// Version 2's additions, pinned like the rest: listing an image's
    /// snapshots and bitmaps, the jobs that change them, reset, and
    /// convert's options.
    #[test]
    fn golden_lines_of_version_2() {
        let line = |v: Vec<u8>| String::from_utf8(v).expect("utf-8");
        assert_eq!(
            line(encode(&Request::List {
                id: "l1".into(),
                image: "/srv/a.qcow2".into(),
            })),
            "{\"type\":\"list\",\"id\":\"l1\",\"image\":\"/srv/a.qcow2\"}\n"
        );
        assert_eq!(
            line(encode(&Request::Refresh {
                paths: vec!["/srv/a.qcow2".into()],
            })),
            "{\"type\":\"refresh\",\"paths\":[\"/srv/a.qcow2\"]}\n"
        );
        assert_eq!(
            line(encode(&Reply::Listing {
                id: "l1".into(),
                listing: Some(WireListing {
                    version: 3,
                    data_file: false,
                    snapshots: vec![WireSnapshot {
                        id: "1".into(),
                        name: "before".into(),
                        date_sec: 1_700_000_000,
                        date_nsec: 7,
                        vm_clock_nsec: 0,
                        vm_state_size: 0,
                        disk_size: Some(1 << 30),
                    }],
                    bitmaps: vec![WireBitmap {
                        name: "b0".into(),
                        granularity: 65536,
                        auto: true,
                        in_use: false,
                    }],
                }),
                error: None,
            })),
            "{\"type\":\"listing\",\"id\":\"l1\",\"listing\":{\"version\":3,\
             \"data_file\":false,\"snapshots\":[{\"id\":\"1\",\"name\":\"before\",\
             \"date_sec\":1700000000,\"date_nsec\":7,\"vm_clock_nsec\":0,\"vm_state_size\":0,\
             \"disk_size\":1073741824}],\"bitmaps\":[{\"name\":\"b0\",\"granularity\":65536,\
             \"auto\":true,\"in_use\":false}]}}\n"
        );
        assert_eq!(
            line(encode(&Reply::Listing {
                id: "l2".into(),
                listing: None,
                error: Some("not qcow2".into()),
            })),
            "{\"type\":\"listing\",\"id\":\"l2\",\"error\":\"not qcow2\"}\n"
        );
        let job = |op: JobOp| line(encode(&Request::Job { id: "j".into(), op }));
        assert_eq!(
            job(JobOp::Snapshot {
                image: "/a".into(),
                action: SnapshotAction::Create { name: "s".into() },
            }),
            "{\"type\":\"job\",\"id\":\"j\",\"op\":{\"op\":\"snapshot\",\"image\":\"/a\",\
             \"action\":{\"do\":\"create\",\"name\":\"s\"}}}\n"
        );
        assert_eq!(
            job(JobOp::Bitmap {
                image: "/a".into(),
                name: "b0".into(),
                action: BitmapAction::Merge { from: "b1".into() },
            }),
            "{\"type\":\"job\",\"id\":\"j\",\"op\":{\"op\":\"bitmap\",\"image\":\"/a\",\
             \"name\":\"b0\",\"action\":{\"do\":\"merge\",\"from\":\"b1\"}}}\n"
        );
        assert_eq!(
            job(JobOp::Reset {
                image: "/a".into(),
                roots: vec!["/r".into()],
            }),
            "{\"type\":\"job\",\"id\":\"j\",\"op\":{\"op\":\"reset\",\"image\":\"/a\",\
             \"roots\":[\"/r\"]}}\n"
        );
        assert_eq!(
            job(JobOp::HeaderFix {
                image: "/a".into(),
                fix: HeaderFixKind::MakeBackingNameRelative,
            }),
            "{\"type\":\"job\",\"id\":\"j\",\"op\":{\"op\":\"header-fix\",\"image\":\"/a\",\
             \"fix\":\"make-backing-name-relative\"}}\n"
        );
        assert_eq!(
            job(JobOp::Protect {
                image: "/a".into(),
                off: true,
            }),
            "{\"type\":\"job\",\"id\":\"j\",\"op\":{\"op\":\"protect\",\"image\":\"/a\",\
             \"off\":true}}\n"
        );
        assert_eq!(
            job(JobOp::Convert {
                src: "/a".into(),
                dst: "/b".into(),
                format: "qcow2".into(),
                compress: true,
                cluster_size: Some(1 << 20),
                compression_type: Some("zstd".into()),
                backing: Some("base.qcow2".into()),
                backing_format: Some("qcow2".into()),
            }),
            "{\"type\":\"job\",\"id\":\"j\",\"op\":{\"op\":\"convert\",\"src\":\"/a\",\
             \"dst\":\"/b\",\"format\":\"qcow2\",\"compress\":true,\"cluster_size\":1048576,\
             \"compression_type\":\"zstd\",\"backing\":\"base.qcow2\",\
             \"backing_format\":\"qcow2\"}}\n"
        );
    }

    #[test]
    fn every_message_round_trips() {
        let requests = vec![
            Request::Hello { protocol: 7 },
            Request::Watch {
                roots: vec!["/a".into(), "/b c".into()],
                live: true,
            },
            Request::Job {
                id: "x".into(),
                op: JobOp::Rebase {
                    image: "/a/o.qcow2".into(),
                    backing: "".into(),
                    backing_format: None,
                    unsafe_header_only: true,
                },
            },
            Request::Job {
                id: "y".into(),
                op: JobOp::Move {
                    src: "/a/x".into(),
                    dst: "/b/x".into(),
                    roots: vec!["/a".into()],
                },
            },
            Request::Cancel { id: "x".into() },
            Request::Outcome { id: "x".into() },
            Request::List {
                id: "x".into(),
                image: "/a/o.qcow2".into(),
            },
            Request::Refresh {
                paths: vec!["/a/o.qcow2".into()],
            },
        ];
        for action in [
            BitmapAction::Add {
                granularity: Some(1 << 16),
            },
            BitmapAction::Add { granularity: None },
            BitmapAction::Remove,
            BitmapAction::Clear,
            BitmapAction::Enable,
            BitmapAction::Disable,
        ] {
            let op = JobOp::Bitmap {
                image: "/i".into(),
                name: "n".into(),
                action,
            };
            let line = encode(&op);
            let back: JobOp = decode(std::str::from_utf8(&line).expect("utf-8")).expect("decode");
            assert_eq!(back, op);
        }
        for action in [
            SnapshotAction::Apply { id: "2".into() },
            SnapshotAction::Delete { id: "3".into() },
        ] {
            let op = JobOp::Snapshot {
                image: "/i".into(),
                action,
            };
            let line = encode(&op);
            let back: JobOp = decode(std::str::from_utf8(&line).expect("utf-8")).expect("decode");
            assert_eq!(back, op);
        }
        for r in requests {
            let line = encode(&r);
            let back: Request = decode(std::str::from_utf8(&line).expect("utf-8")).expect("decode");
            assert_eq!(back, r);
        }
        let replies = vec![
            Reply::Hello {
                protocol: 1,
                version: "0.1.0".into(),
                host: "h".into(),
            },
            Reply::Refused {
                message: "m".into(),
            },
            Reply::Sizes {
                key: "/k".into(),
                sizes: WireSizes {
                    virtual_size: 1,
                    allocated: 2,
                    apparent: 3,
                },
            },
            Reply::Modified {
                key: "/k".into(),
                mtime: None,
            },
            Reply::JobState {
                id: "x".into(),
                state: WireJobState::Lost,
                message: Some("gone".into()),
                progress: WireProgress::default(),
                created: Some("/n".into()),
            },
        ];
        for r in replies {
            let line = encode(&r);
            let back: Reply = decode(std::str::from_utf8(&line).expect("utf-8")).expect("decode");
            assert_eq!(back, r);
        }
    }

    #[test]
    fn records_survive_the_wire() {
        let record = sample_image().into_record("host1").expect("record");
        assert_eq!(record.host.as_deref(), Some("host1"));
        assert_eq!(record.lock, LockState::Writer);
        assert_eq!(
            record.summary.as_ref().map(|s| s.format),
            Some(Format::Qcow2)
        );
        assert_eq!(record.key, PathBuf::from("host1:/srv/images/web-1.qcow2"));
        assert_eq!(record.location(), "host1:/srv/images/web-1.qcow2");
        let mut again = WireImage::from(&record);
        again.key = sample_image().key;
        assert_eq!(again, sample_image());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for line in [
            "",
            "{",
            "{\"type\":\"nope\"}",
            "[1,2]",
            "{\"type\":\"hello\"}",
        ] {
            assert!(decode::<Request>(line).is_err(), "{line:?}");
            assert!(decode::<Reply>(line).is_err(), "{line:?}");
        }
        let mut bad = sample_image();
        bad.lock = "sideways".into();
        assert!(bad.into_record("h").is_err());
    }
}
