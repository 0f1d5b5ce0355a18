//! One function per qemu-img operation.

pub mod amend;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod convert_qcow2;
pub mod create;
pub mod info;
pub mod map;
pub mod measure;
pub mod move_image;
pub mod protect;
pub mod rebase;
pub mod remove;
pub mod reset;
pub mod resize;
pub mod snapshot;
