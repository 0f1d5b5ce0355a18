//! The agent protocol: what `cowshed agent --stdio` on another host and the
//! local cowshed say to each other over ssh. One JSON object per line, in
//! both directions; the `type` field names the message.
//!
//! A session: the client sends `hello` with its [`PROTOCOL_VERSION`]; the
//! agent answers `hello` with its own (and its cowshed version and host
//! name), or `refused` and ends when they differ. Then the client asks:
//! `watch` (scan roots: a `snapshot` of the forest and `vms`, the host's
//! domains using its images; then, when live, `sizes`/`modified` for a
//! guest writing, `changes` (only the nodes that differ) whenever an image
//! appears, vanishes or changes its header, and `vms` again when the
//! domains change), `info` (the details pane's facts of one image,
//! computed there), `check` (what uses some files there now: asked of
//! every other host that sees a shared file before a job changes it),
//! `job` (run an operation: `job-state` messages follow, with progress
//! while it runs, ending with its outcome), `cancel`, `outcome` (what
//! became of a job started over an earlier connection: its end is
//! recorded on the host, so a lost connection never leaves the client
//! guessing, and nothing is run twice), `list` (an image's internal
//! snapshots and persistent bitmaps, read there, answered with a
//! `listing`) and `refresh` (images a job changed, read again and sent).
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
use crate::engine::chain::FormatSource;
use crate::engine::ops::info::{BitmapInfo, ImageInfo, Qcow2Info};
use crate::engine::preflight::VmUser;
use crate::engine::qcow2::header::{CompressionType, CryptMethod};
use crate::engine::qcow2::snapshot::Snapshot;
use crate::engine::{Format, HeaderSummary, LockState};

/// Both ends must speak the same version; there is no negotiation.
pub const PROTOCOL_VERSION: u32 = 3;

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
    /// The details pane's facts of one image on the agent's host: answered
    /// with `info`.
    Info {
        path: PathBuf,
    },
    /// Look again, now, at what uses these files on the agent's host
    /// (locks, holders, domains): answered with `checked`. Sent to every
    /// other host that sees a shared file before a job changes it.
    Check {
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
    /// What changed in the forest since the last `snapshot` or `changes`
    /// (images that appeared or whose header, flags or parent changed, and
    /// the keys of those gone), instead of the whole forest again: a header
    /// rewritten among 10,000 images is one image's worth of bytes.
    Changes {
        nodes: Vec<WireChange>,
        removed: Vec<PathBuf>,
        /// The scan's errors now (all of them; usually none).
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
    /// The defined libvirt domains of the agent's host that use the
    /// watched images (only images some domain uses are listed); the whole
    /// set each time, after every snapshot and whenever a reading changes.
    Vms {
        users: Vec<WireVmUse>,
        /// Connections the agent's host names that could not be read.
        unreadable: Vec<WireError>,
    },
    /// The answer to `info`.
    Info {
        path: PathBuf,
        details: Box<WireDetails>,
    },
    /// The answer to `check`, one entry per path asked, in order.
    Checked {
        images: Vec<WireCheck>,
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
            snapshots: q.snapshots.iter().map(WireSnapshot::from).collect(),
            bitmaps: q.bitmaps.iter().map(WireBitmap::from).collect(),
        }
    }
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
    /// Whether the job changes files that other hosts may use too (shared
    /// storage), so they are asked first: what the engine checks domains
    /// for on the host that runs it.
    pub fn changes_shared_files(&self) -> bool {
        match self {
            JobOp::Commit { .. }
            | JobOp::Rebase { .. }
            | JobOp::Delete { .. }
            | JobOp::Move { .. }
            | JobOp::Reset { .. }
            | JobOp::Snapshot { .. }
            | JobOp::Bitmap { .. }
            | JobOp::HeaderFix { .. } => true,
            // Protect changes no content and checks no domains here either.
            JobOp::Clone { .. } | JobOp::Convert { .. } | JobOp::Protect { .. } => false,
        }
    }

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
    /// Names the file the same way on every host that sees it (see
    /// `remote::identity`); `None` when the host cannot say.
    pub identity: Option<String>,
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
            identity: r.identity.clone(),
        }
    }
}

impl WireImage {
    /// The record on the client's side, for `host`. A format or lock the
    /// client does not know is an error: it means another protocol.
    pub fn into_record(self, host: &str) -> Result<ImageRecord, String> {
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
                compression: s
                    .compression
                    .as_deref()
                    .map(compression_from_name)
                    .transpose()?,
                extended_l2: s.extended_l2,
                snapshots: s.snapshots,
            }),
        };
        let lock = lock_from_name(&self.lock)?;
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
            identity: self.identity,
            vms: Vec::new(),
            seen_on: Vec::new(),
        })
    }
}

/// One node of a `changes` message: its parent named by key, as indices
/// of a forest the message does not carry mean nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireChange {
    pub image: WireImage,
    pub parent: Option<PathBuf>,
    pub flags: Vec<Flag>,
}

/// A defined domain on the agent's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireVm {
    pub name: String,
    pub uuid: String,
    pub state: String,
    pub connection: String,
}

impl From<&VmUser> for WireVm {
    fn from(v: &VmUser) -> Self {
        WireVm {
            name: v.name.clone(),
            uuid: v.uuid.clone(),
            state: v.state.clone(),
            connection: v.connection.clone(),
        }
    }
}

impl From<WireVm> for VmUser {
    fn from(v: WireVm) -> Self {
        VmUser {
            name: v.name,
            uuid: v.uuid,
            state: v.state,
            connection: v.connection,
        }
    }
}

/// The domains using one image (by its key on the agent's host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireVmUse {
    pub key: PathBuf,
    pub vms: Vec<WireVm>,
}

/// What uses one file on the agent's host, looked at just now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCheck {
    pub path: PathBuf,
    /// `none`, `reader` or `writer`.
    pub lock: String,
    pub holders: Vec<Holder>,
    pub vms: Vec<WireVm>,
    /// Why the file or the host's domains could not be looked at: the
    /// check could not be made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The details pane's facts: the engine's `info` of the image and how its
/// chain serves the disk, computed on the agent's host. Every field of
/// [`ImageInfo`] travels, so the client's copy is the engine's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDetails {
    pub info: Option<WireInfo>,
    pub info_error: Option<String>,
    pub chain: Vec<PathBuf>,
    pub served: Vec<u64>,
    pub empty: u64,
    pub chain_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireInfo {
    pub filename: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: u64,
    pub apparent_size: u64,
    pub lock: String,
    /// `recorded` or `probed`.
    pub format_source: String,
    pub qcow2: Option<WireQcow2Info>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireQcow2Info {
    pub version: u32,
    pub cluster_size: u64,
    pub backing_filename: Option<String>,
    pub full_backing_filename: Option<PathBuf>,
    pub backing_format: Option<String>,
    pub dirty: bool,
    pub corrupt: bool,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    /// `zlib` or `zstd`.
    pub compression_type: String,
    pub extended_l2: bool,
    /// `none`, `aes` or `luks`.
    pub encryption: String,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    pub bitmaps: Vec<WireBitmap>,
    pub snapshots: Vec<WireSnapshot>,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBitmap {
    pub name: String,
    pub table_offset: u64,
    pub table_entries: u32,
    pub granularity: u64,
    pub in_use: bool,
    pub auto: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSnapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<i64>,
    pub entry_bytes: u64,
    pub raw_id: Vec<u8>,
    pub raw_name: Vec<u8>,
    pub unknown_extra: Vec<u8>,
}

impl From<&BitmapInfo> for WireBitmap {
    fn from(b: &BitmapInfo) -> Self {
        WireBitmap {
            name: b.name.clone(),
            table_offset: b.table_offset,
            table_entries: b.table_entries,
            granularity: b.granularity,
            in_use: b.in_use,
            auto: b.auto,
        }
    }
}

impl From<&Snapshot> for WireSnapshot {
    fn from(s: &Snapshot) -> Self {
        WireSnapshot {
            l1_table_offset: s.l1_table_offset,
            l1_size: s.l1_size,
            id: s.id.clone(),
            name: s.name.clone(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            vm_state_size: s.vm_state_size,
            disk_size: s.disk_size,
            icount: s.icount,
            entry_bytes: s.entry_bytes,
            raw_id: s.raw_id.clone(),
            raw_name: s.raw_name.clone(),
            unknown_extra: s.unknown_extra.clone(),
        }
    }
}

fn lock_from_name(name: &str) -> Result<LockState, String> {
    match name {
        "none" => Ok(LockState::None),
        "reader" => Ok(LockState::Reader),
        "writer" => Ok(LockState::Writer),
        other => Err(format!("unknown lock state {other:?}")),
    }
}

fn compression_from_name(name: &str) -> Result<CompressionType, String> {
    match name {
        "zlib" => Ok(CompressionType::Deflate),
        "zstd" => Ok(CompressionType::Zstd),
        other => Err(format!("unknown compression {other:?}")),
    }
}

impl From<&ImageInfo> for WireInfo {
    fn from(i: &ImageInfo) -> Self {
        WireInfo {
            filename: i.filename.clone(),
            format: i.format.name().to_string(),
            virtual_size: i.virtual_size,
            actual_size: i.actual_size,
            apparent_size: i.apparent_size,
            lock: i.lock.name().to_string(),
            format_source: match i.format_source {
                FormatSource::Recorded => "recorded",
                FormatSource::Probed => "probed",
            }
            .to_string(),
            qcow2: i.qcow2.as_ref().map(|q| WireQcow2Info {
                version: q.version,
                cluster_size: q.cluster_size,
                backing_filename: q.backing_filename.clone(),
                full_backing_filename: q.full_backing_filename.clone(),
                backing_format: q.backing_format.clone(),
                dirty: q.dirty,
                corrupt: q.corrupt,
                lazy_refcounts: q.lazy_refcounts,
                refcount_bits: q.refcount_bits,
                compression_type: q.compression_type.name().to_string(),
                extended_l2: q.extended_l2,
                encryption: q.encryption.name().to_string(),
                data_file: q.data_file.clone(),
                data_file_raw: q.data_file_raw,
                bitmaps: q.bitmaps.iter().map(WireBitmap::from).collect(),
                snapshots: q.snapshots.iter().map(WireSnapshot::from).collect(),
                incompatible_features: q.incompatible_features,
                compatible_features: q.compatible_features,
                autoclear_features: q.autoclear_features,
            }),
        }
    }
}

impl WireInfo {
    /// The engine's record again; names the client does not know are an
    /// error (another protocol).
    pub fn into_info(self) -> Result<ImageInfo, String> {
        let qcow2 = match self.qcow2 {
            None => None,
            Some(q) => Some(Qcow2Info {
                version: q.version,
                cluster_size: q.cluster_size,
                backing_filename: q.backing_filename,
                full_backing_filename: q.full_backing_filename,
                backing_format: q.backing_format,
                dirty: q.dirty,
                corrupt: q.corrupt,
                lazy_refcounts: q.lazy_refcounts,
                refcount_bits: q.refcount_bits,
                compression_type: compression_from_name(&q.compression_type)?,
                extended_l2: q.extended_l2,
                encryption: match q.encryption.as_str() {
                    "none" => CryptMethod::None,
                    "aes" => CryptMethod::Aes,
                    "luks" => CryptMethod::Luks,
                    other => return Err(format!("unknown encryption {other:?}")),
                },
                data_file: q.data_file,
                data_file_raw: q.data_file_raw,
                bitmaps: q
                    .bitmaps
                    .into_iter()
                    .map(|b| BitmapInfo {
                        name: b.name,
                        table_offset: b.table_offset,
                        table_entries: b.table_entries,
                        granularity: b.granularity,
                        in_use: b.in_use,
                        auto: b.auto,
                    })
                    .collect(),
                snapshots: q
                    .snapshots
                    .into_iter()
                    .map(|s| Snapshot {
                        l1_table_offset: s.l1_table_offset,
                        l1_size: s.l1_size,
                        id: s.id,
                        name: s.name,
                        date_sec: s.date_sec,
                        date_nsec: s.date_nsec,
                        vm_clock_nsec: s.vm_clock_nsec,
                        vm_state_size: s.vm_state_size,
                        disk_size: s.disk_size,
                        icount: s.icount,
                        entry_bytes: s.entry_bytes,
                        raw_id: s.raw_id,
                        raw_name: s.raw_name,
                        unknown_extra: s.unknown_extra,
                    })
                    .collect(),
                incompatible_features: q.incompatible_features,
                compatible_features: q.compatible_features,
                autoclear_features: q.autoclear_features,
            }),
        };
        Ok(ImageInfo {
            filename: self.filename,
            format: Format::from_name(&self.format)
                .ok_or_else(|| format!("unknown format {:?}", self.format))?,
            virtual_size: self.virtual_size,
            actual_size: self.actual_size,
            apparent_size: self.apparent_size,
            lock: lock_from_name(&self.lock)?,
            format_source: match self.format_source.as_str() {
                "recorded" => FormatSource::Recorded,
                "probed" => FormatSource::Probed,
                other => return Err(format!("unknown format source {other:?}")),
            },
            qcow2,
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
            identity: Some("local 4f1c 2049 131".into()),
        }
    }

    /// The protocol's JSON, pinned: a failure here means the wire format
    /// changed, and PROTOCOL_VERSION must change with it (then update
    /// this text).
    #[test]
    fn golden_lines() {
        assert_eq!(PROTOCOL_VERSION, 3);
        let hello = encode(&Request::Hello { protocol: 3 });
        assert_eq!(hello, b"{\"type\":\"hello\",\"protocol\":3}\n");
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
             \"writable\":true}],\"identity\":\"local 4f1c 2049 131\"},\"parent\":0,\"flags\":[{\"kind\":\"missing-backing\",\
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

    /// Protocol 3's messages: listing an image's snapshots and bitmaps,
    /// refresh, the jobs that change snapshots and bitmaps, reset, the
    /// doctor's header fix, protect, and convert's options.
    #[test]
    fn golden_lines_of_listing_refresh_and_jobs() {
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
                        l1_table_offset: 327680,
                        l1_size: 16,
                        id: "1".into(),
                        name: "before".into(),
                        date_sec: 1_700_000_000,
                        date_nsec: 7,
                        vm_clock_nsec: 0,
                        vm_state_size: 0,
                        disk_size: Some(1 << 30),
                        icount: None,
                        entry_bytes: 48,
                        raw_id: b"1".to_vec(),
                        raw_name: b"before".to_vec(),
                        unknown_extra: Vec::new(),
                    }],
                    bitmaps: vec![WireBitmap {
                        name: "b0".into(),
                        table_offset: 393216,
                        table_entries: 1,
                        granularity: 65536,
                        in_use: false,
                        auto: true,
                    }],
                }),
                error: None,
            })),
            "{\"type\":\"listing\",\"id\":\"l1\",\"listing\":{\"version\":3,\
             \"data_file\":false,\"snapshots\":[{\"l1_table_offset\":327680,\"l1_size\":16,\
             \"id\":\"1\",\"name\":\"before\",\"date_sec\":1700000000,\"date_nsec\":7,\
             \"vm_clock_nsec\":0,\"vm_state_size\":0,\"disk_size\":1073741824,\"icount\":null,\
             \"entry_bytes\":48,\"raw_id\":[49],\"raw_name\":[98,101,102,111,114,101],\
             \"unknown_extra\":[]}],\"bitmaps\":[{\"name\":\"b0\",\"table_offset\":393216,\
             \"table_entries\":1,\"granularity\":65536,\"in_use\":false,\"auto\":true}]}}\n"
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

    /// Protocol 2's messages: domains, details, the peers' check.
    #[test]
    fn golden_lines_of_vms_info_and_check() {
        let vm = WireVm {
            name: "web-1".into(),
            uuid: "eba2a67b-e235-4756-a7b7-879e92283673".into(),
            state: "shut off".into(),
            connection: "qemu:///system".into(),
        };
        let vms = encode(&Reply::Vms {
            users: vec![WireVmUse {
                key: "/srv/a.qcow2".into(),
                vms: vec![vm.clone()],
            }],
            unreadable: vec![WireError {
                path: "qemu+ssh://x/system".into(),
                message: "no route".into(),
            }],
        });
        assert_eq!(
            String::from_utf8(vms).expect("utf-8"),
            "{\"type\":\"vms\",\"users\":[{\"key\":\"/srv/a.qcow2\",\"vms\":[{\
             \"name\":\"web-1\",\"uuid\":\"eba2a67b-e235-4756-a7b7-879e92283673\",\
             \"state\":\"shut off\",\"connection\":\"qemu:///system\"}]}],\
             \"unreadable\":[{\"path\":\"qemu+ssh://x/system\",\"message\":\"no route\"}]}\n"
        );
        let changes = encode(&Reply::Changes {
            nodes: vec![WireChange {
                image: WireImage {
                    holders: Vec::new(),
                    summary: None,
                    identity: None,
                    ..sample_image()
                },
                parent: Some("/srv/images/base.qcow2".into()),
                flags: Vec::new(),
            }],
            removed: vec!["/srv/images/old.qcow2".into()],
            errors: Vec::new(),
        });
        assert_eq!(
            String::from_utf8(changes).expect("utf-8"),
            "{\"type\":\"changes\",\"nodes\":[{\"image\":{\"path\":\"/srv/images/web-1.qcow2\",\
             \"key\":\"/srv/images/web-1.qcow2\",\"dev\":2049,\"ino\":131,\"summary\":null,\
             \"error\":null,\"sizes\":{\"virtual_size\":1073741824,\"allocated\":200704,\
             \"apparent\":196608},\"mtime\":{\"secs\":1700000000,\"nanos\":5},\"created\":null,\
             \"mode\":420,\"lock\":\"writer\",\"holders\":[],\"identity\":null},\
             \"parent\":\"/srv/images/base.qcow2\",\"flags\":[]}],\
             \"removed\":[\"/srv/images/old.qcow2\"],\"errors\":[]}\n"
        );
        assert_eq!(
            String::from_utf8(encode(&Request::Info {
                path: "/srv/a.qcow2".into()
            }))
            .expect("utf-8"),
            "{\"type\":\"info\",\"path\":\"/srv/a.qcow2\"}\n"
        );
        assert_eq!(
            String::from_utf8(encode(&Request::Check {
                paths: vec!["/srv/a.qcow2".into()]
            }))
            .expect("utf-8"),
            "{\"type\":\"check\",\"paths\":[\"/srv/a.qcow2\"]}\n"
        );
        let checked = encode(&Reply::Checked {
            images: vec![WireCheck {
                path: "/srv/a.qcow2".into(),
                lock: "none".into(),
                holders: Vec::new(),
                vms: vec![vm],
                error: None,
            }],
        });
        assert_eq!(
            String::from_utf8(checked).expect("utf-8"),
            "{\"type\":\"checked\",\"images\":[{\"path\":\"/srv/a.qcow2\",\"lock\":\"none\",\
             \"holders\":[],\"vms\":[{\"name\":\"web-1\",\
             \"uuid\":\"eba2a67b-e235-4756-a7b7-879e92283673\",\"state\":\"shut off\",\
             \"connection\":\"qemu:///system\"}]}]}\n"
        );
    }

    /// The details travel whole: the engine's info of a real image (made
    /// by qemu-img) comes back from the wire field for field.
    #[test]
    fn details_survive_the_wire() {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = dir.path().join("a.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let st = std::process::Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&img)
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let st = std::process::Command::new("qemu-img")
            .args(["bitmap", "--add", "-g", "128K"])
            .arg(&img)
            .arg("b0")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let info = crate::engine::info(&img, None).expect("info");
        let wire = WireInfo::from(&info);
        let line = encode(&wire);
        let back: WireInfo = decode(std::str::from_utf8(&line).expect("utf-8")).expect("decode");
        let again = back.into_info().expect("info again");
        let q = again.qcow2.as_ref().expect("qcow2");
        assert_eq!(q.snapshots.len(), 1);
        assert_eq!(q.snapshots[0].name, "s1");
        assert_eq!(q.bitmaps.len(), 1);
        assert_eq!(q.bitmaps[0].granularity, 128 * 1024);
        // Every field: the wire copy of the copy is the wire copy.
        assert_eq!(WireInfo::from(&again), wire);
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
