//! `cowshed snapshot`: a qcow2 image's internal snapshots, like `qemu-img
//! snapshot`. The listing is qemu-img's table byte for byte (also what
//! `info` prints), and its JSON the `snapshots` array of `qemu-img info
//! --output=json`.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use clap::{ArgGroup, Args};
use serde_json::{json, Value};

use super::{parse_format, Output};
use crate::engine::ops::snapshot;
use crate::engine::qcow2::snapshot::Snapshot;
use crate::engine::Format;

#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("action").args(["list", "create", "apply", "delete"])),
    after_help = "One of -l (the default), -c, -a, -d. -a takes a snapshot's id or name \
    (ids first), -d a name; a name may be used twice, as in qemu-img (-a and -d then take the \
    first). -a replaces the image's current state with the snapshot's: what no snapshot keeps \
    is lost; as in QEMU 10, it is refused while the image has persistent bitmaps (enabled, \
    disabled or in use). -c, -a and -d take QEMU's write lock and are refused while a QEMU holds the \
    image; -l reads without locks (-U is accepted for qemu-img compatibility). A crash or \
    kill leaves the image as before the command or as after it, never between: cowshed \
    builds the new metadata beside the old and switches the header in one write.\n\n\
    Exit codes: 0 done, 1 refused or failed."
)]
pub struct SnapshotArgs {
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Create a snapshot named NAME of the image's current state.
    #[arg(short = 'c', long = "create", value_name = "NAME")]
    create: Option<std::ffi::OsString>,
    /// Apply snapshot NAME (an id or a name): the image then reads as it did.
    #[arg(short = 'a', long = "apply", value_name = "NAME")]
    apply: Option<std::ffi::OsString>,
    /// Delete snapshot NAME.
    #[arg(short = 'd', long = "delete", value_name = "NAME")]
    delete: Option<std::ffi::OsString>,
    /// Image format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Accepted for qemu-img compatibility: listing never locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Accepted for qemu-img compatibility (nothing is printed but errors
    /// and the list).
    #[arg(short = 'q')]
    quiet: bool,
    /// Listing format: qemu-img's table, or the JSON array of qemu-img
    /// info's `snapshots`.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    file: PathBuf,
}

impl SnapshotArgs {
    pub(super) fn file(&self) -> &std::path::Path {
        &self.file
    }

    pub(super) fn writes(&self) -> bool {
        self.create.is_some() || self.apply.is_some() || self.delete.is_some()
    }
}

pub fn run(a: SnapshotArgs) -> color_eyre::Result<i32> {
    let _ = (a.force_share, a.quiet);
    if let Some(name) = &a.create {
        snapshot::create(&a.file, name.as_bytes(), a.format)?;
    } else if let Some(name) = &a.apply {
        snapshot::apply(&a.file, name.as_bytes(), a.format)?;
    } else if let Some(name) = &a.delete {
        snapshot::delete(&a.file, name.as_bytes(), a.format)?;
    } else {
        let snaps = snapshot::list(&a.file, a.format)?;
        let mut out = std::io::stdout().lock();
        match a.output {
            Output::Human => {
                if !snaps.is_empty() {
                    out.write_all(&snapshot_table(&snaps))?;
                }
            }
            Output::Json => {
                let array = Value::Array(snaps.iter().map(snapshot_json).collect());
                writeln!(out, "{}", serde_json::to_string_pretty(&array)?)?;
            }
        }
    }
    Ok(0)
}

/// One snapshot as `qemu-img info --output=json` shows it (icount only
/// when recorded).
pub(crate) fn snapshot_json(s: &Snapshot) -> Value {
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    });
    if let (Some(icount), Some(map)) = (s.icount.filter(|&i| i != -1), v.as_object_mut()) {
        map.insert("icount".into(), json!(icount));
    }
    v
}

/// "Snapshot list:" and the table under it, as qemu-img prints them
/// (`bdrv_snapshot_dump`: C widths, so counted in bytes; dates in local
/// time).
pub(crate) fn snapshot_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out: Vec<u8> = b"Snapshot list:\n".to_vec();
    let row = |out: &mut Vec<u8>, cells: [&[u8]; 6]| {
        let widths: [(usize, bool); 6] = [
            (7, true),
            (16, true),
            (8, false),
            (19, false),
            (15, false),
            (10, false),
        ];
        for (i, (cell, (width, left))) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            let pad = vec![b' '; width.saturating_sub(cell.len())];
            if left {
                out.extend_from_slice(cell);
                out.extend_from_slice(&pad);
            } else {
                out.extend_from_slice(&pad);
                out.extend_from_slice(cell);
            }
        }
        out.push(b'\n');
    };
    row(
        &mut out,
        [b"ID", b"TAG", b"VM_SIZE", b"DATE", b"VM_CLOCK", b"ICOUNT"],
    );
    for s in snaps {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000 % 1000
        );
        // qemu-img 10 prints "--" where no icount was recorded.
        let icount = match s.icount {
            Some(i) if i != -1 => i.to_string(),
            _ => "--".to_string(),
        };
        row(
            &mut out,
            [
                s.id_bytes(),
                s.name_bytes(),
                size_to_str(s.vm_state_size).as_bytes(),
                local_date(s.date_sec).as_bytes(),
                clock.as_bytes(),
                icount.as_bytes(),
            ],
        );
    }
    out
}

/// QEMU's `size_to_str`: binary units, "%0.3g", switching unit at 1000.
fn size_to_str(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp's exponent of bytes / (1000 / 1024): floor(log2) + 1.
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    let exp = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let unit = ((exp - 1).max(0) / 10) as usize;
    let unit = unit.min(SUFFIXES.len() - 1);
    let value = bytes as f64 / (1u64 << (unit * 10)) as f64;
    format!("{} {}B", format_g3(value), SUFFIXES[unit])
}

/// C's "%0.3g": three significant digits, trailing zeros dropped,
/// exponent notation below 1e-4 or from 1e3 on.
fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        let decimals = (2 - exp).max(0) as usize;
        trim(&format!("{v:.decimals$}"))
    }
}

/// "%Y-%m-%d %H:%M:%S" in local time, as QEMU formats snapshot dates.
fn local_date(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: a zeroed tm is a valid out-parameter; localtime_r only
    // writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_qemu_prints_them() {
        // What qemu-img 10.0.2 printed for these VM state sizes.
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(1_023_487), "999 KiB");
        assert_eq!(size_to_str(1_023_999), "1e+03 KiB");
        assert_eq!(size_to_str(1_048_575), "1 MiB");
        assert_eq!(size_to_str(123_456_789_012), "115 GiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }
}
