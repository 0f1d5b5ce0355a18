//! The shared engine: everything that touches an image's bytes. Sync Rust,
//! no UI, no global state. The CLI and the TUI are shells around it.

pub mod buf;
pub mod chain;
pub mod dependents;
pub mod error;
pub mod fault;
pub mod format;
pub mod holders;
pub mod layer;
pub mod lock;
pub mod ops;
pub mod preflight;
pub mod progress;
pub mod qcow2;
pub mod raw;
pub mod size;
pub mod space;
pub mod trash;

pub use chain::{BlockStatus, Chain};
pub use error::{Error, Result};
pub use format::{probe, Format};
pub use lock::{lock_state, LockState};
pub use ops::check::{check, check_repair_all, check_repair_leaks, CheckReport};
pub use ops::commit::{commit, CommitOptions};
pub use ops::convert::{convert, convert_to_raw, CacheMode, ConvertOptions};
pub use ops::create::{create, CreateOptions};
pub use ops::info::{info, info_chain, inspect, inspect_file, HeaderSummary, ImageInfo};
pub use ops::map::map;
pub use ops::measure::{measure, Measure, MeasureOptions, MeasureSource};
pub use ops::move_image::{move_image, MoveOptions, MoveReport};
pub use ops::rebase::{rebase, rebase_space_needed, RebaseOptions};
pub use ops::remove::{remove, Removal, RemoveOptions};
pub use ops::reset::{reset, ResetOptions};
pub use progress::{Cancel, Progress};
