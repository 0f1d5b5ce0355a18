//! cowshed: QEMU disk images and their copy-on-write backing chains.
//!
//! `engine` knows the formats and does all I/O on images; `cli` is the
//! scriptable face over it.

pub mod catalog;
pub mod cli;
pub mod engine;
pub mod inventory;
pub mod jobs;
pub mod remote;
pub mod tui;
