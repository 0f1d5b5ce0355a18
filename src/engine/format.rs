//! Probing: which format a file holds, decided from its first bytes only.
//!
//! qcow2 and raw are opened; the other formats are recognised and named so
//! that a scan can show them and an open can refuse them clearly.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::{Error, IoContext, Result};

/// Bytes read by a probe. VDI keeps its signature at 0x40; everything else
/// we recognise sits in the first 32 bytes.
pub const PROBE_BYTES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Qcow2,
    Raw,
    /// Recognised, not opened.
    Other(OtherFormat),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtherFormat {
    Qcow1,
    Qed,
    Vmdk,
    Vdi,
    Vhdx,
    Vpc,
    Luks,
}

impl Format {
    /// QEMU's driver name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Other(o) => o.name(),
        }
    }

    /// Parse a format name as given to `-f`/`-F` or recorded in a
    /// backing-format extension.
    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name {
            "qcow2" => Format::Qcow2,
            "raw" => Format::Raw,
            "qcow" => Format::Other(OtherFormat::Qcow1),
            "qed" => Format::Other(OtherFormat::Qed),
            "vmdk" => Format::Other(OtherFormat::Vmdk),
            "vdi" => Format::Other(OtherFormat::Vdi),
            "vhdx" => Format::Other(OtherFormat::Vhdx),
            "vpc" => Format::Other(OtherFormat::Vpc),
            "luks" => Format::Other(OtherFormat::Luks),
            _ => return None,
        })
    }
}

impl OtherFormat {
    pub fn name(self) -> &'static str {
        match self {
            OtherFormat::Qcow1 => "qcow",
            OtherFormat::Qed => "qed",
            OtherFormat::Vmdk => "vmdk",
            OtherFormat::Vdi => "vdi",
            OtherFormat::Vhdx => "vhdx",
            OtherFormat::Vpc => "vpc",
            OtherFormat::Luks => "luks",
        }
    }
}

const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";
const QED_MAGIC: &[u8; 4] = b"QED\0";
const VMDK_SPARSE_MAGIC: &[u8; 4] = b"KDMV";
const VMDK_COWD_MAGIC: &[u8; 4] = b"COWD";
const VMDK_DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";
const VDI_SIGNATURE_OFFSET: usize = 0x40;
const VDI_SIGNATURE: u32 = 0xbeda_107f;
const VHDX_MAGIC: &[u8; 8] = b"vhdxfile";
const VPC_MAGIC: &[u8; 8] = b"conectix";
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// Classify the first bytes of a file. Anything unrecognised is raw, as in
/// QEMU.
pub fn detect(head: &[u8]) -> Format {
    if head.starts_with(QCOW_MAGIC) && head.len() >= 8 {
        let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        return match version {
            1 => Format::Other(OtherFormat::Qcow1),
            // Any other version is still a qcow2 file to QEMU's probe; opening
            // it gives "Unsupported qcow2 version".
            _ => Format::Qcow2,
        };
    }
    if head.starts_with(QED_MAGIC) {
        return Format::Other(OtherFormat::Qed);
    }
    if head.starts_with(VMDK_SPARSE_MAGIC)
        || head.starts_with(VMDK_COWD_MAGIC)
        || head.starts_with(VMDK_DESCRIPTOR)
    {
        return Format::Other(OtherFormat::Vmdk);
    }
    if head.starts_with(VHDX_MAGIC) {
        return Format::Other(OtherFormat::Vhdx);
    }
    if head.starts_with(VPC_MAGIC) {
        return Format::Other(OtherFormat::Vpc);
    }
    if head.starts_with(LUKS_MAGIC) {
        return Format::Other(OtherFormat::Luks);
    }
    if let Some(sig) = head.get(VDI_SIGNATURE_OFFSET..VDI_SIGNATURE_OFFSET + 4) {
        if u32::from_le_bytes([sig[0], sig[1], sig[2], sig[3]]) == VDI_SIGNATURE {
            return Format::Other(OtherFormat::Vdi);
        }
    }
    Format::Raw
}

/// Unrecognised files count as raw images only with these extensions: a
/// raw image has no magic, and most files are not images.
pub const RAW_EXTENSIONS: &[&str] = &["raw", "img"];

/// Is a file that probes as raw named like a raw disk image?
pub fn named_like_an_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| RAW_EXTENSIONS.iter().any(|r| e.eq_ignore_ascii_case(r)))
}

/// Read at most [`PROBE_BYTES`] from `file` and classify them.
pub fn probe_file(file: &File, path: &Path) -> Result<Format> {
    let mut head = [0u8; PROBE_BYTES];
    let n = read_up_to(file, &mut head, 0).at(path)?;
    Ok(detect(&head[..n]))
}

/// Probe a path: open read-only, one small read.
pub fn probe(path: &Path) -> Result<Format> {
    let file = open_image_file(path)?;
    probe_file(&file, path)
}

/// Open an image read-only. Only regular files and block devices are
/// images: a FIFO or a character device would block a scan forever, so the
/// open does not wait (O_NONBLOCK) and anything else is refused.
pub fn open_image_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .at(path)?;
    let ty = file.metadata().at(path)?.file_type();
    if ty.is_dir() {
        return Err(Error::invalid(path, "is a directory, not an image"));
    }
    if !(ty.is_file() || ty.is_block_device()) {
        return Err(Error::invalid(
            path,
            "is not a regular file or a block device",
        ));
    }
    Ok(file)
}

/// `read_at` that tolerates short files: returns how many bytes were read.
pub(crate) fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_table() {
        let mut q2 = b"QFI\xfb\0\0\0\x03".to_vec();
        q2.resize(104, 0);
        assert_eq!(detect(&q2), Format::Qcow2);
        assert_eq!(
            detect(b"QFI\xfb\0\0\0\x01"),
            Format::Other(OtherFormat::Qcow1)
        );
        assert_eq!(detect(b"QED\0...."), Format::Other(OtherFormat::Qed));
        assert_eq!(detect(b"KDMV...."), Format::Other(OtherFormat::Vmdk));
        assert_eq!(detect(b"vhdxfile"), Format::Other(OtherFormat::Vhdx));
        assert_eq!(
            detect(b"LUKS\xba\xbe\0\x01"),
            Format::Other(OtherFormat::Luks)
        );
        let mut vdi = vec![0u8; 0x48];
        vdi[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        assert_eq!(detect(&vdi), Format::Other(OtherFormat::Vdi));
        assert_eq!(detect(b""), Format::Raw);
        assert_eq!(detect(b"hello world"), Format::Raw);
    }
}
