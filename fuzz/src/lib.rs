//! cargo-fuzz targets for cowshed's engine. Each target's body is a module
//! here (`run(data)`), shared with `tests/fuzz_regressions.rs`, which
//! replays the committed crash cases under plain `cargo test`.

pub mod harness;

pub mod check;
pub mod check_repair;
pub mod commit;
pub mod convert;
pub mod map;
pub mod open_info;
pub mod read;
pub mod rebase;
pub mod writer;

#[global_allocator]
static ALLOCATOR: harness::CountingAlloc = harness::CountingAlloc;
