//! Persistent bitmaps as QEMU sees them, for the tests that compare
//! cowshed's bitmaps with qemu-img's: listed by `qemu-img info`, their
//! directory entries and tables as stored, and their dirty ranges as QEMU
//! reads them (through qemu-nbd).

use serde_json::Value;

use cowshed::engine::qcow2::bitmap::read_directory;
use cowshed::engine::qcow2::l2::bitmap_table_data_offset;
use cowshed::engine::qcow2::Header;

use super::Work;

/// The bitmaps `qemu-img info --output json` lists.
pub fn listed(w: &Work, img: &str) -> Value {
    w.info_json(img)["format-specific"]["data"]
        .get("bitmaps")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()))
}

/// Per bitmap (by name): whether its table points at any data cluster
/// (QEMU stores a bitmap with no bit set as a table of zeros).
pub fn holding_data(w: &Work, img: &str) -> Vec<(String, bool)> {
    holding_data_at(&w.path(img))
}

pub fn holding_data_at(path: &std::path::Path) -> Vec<(String, bool)> {
    let path = path.to_path_buf();
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let h = Header::read(&file, &path, len).unwrap();
    let Some(ext) = &h.extensions.bitmaps else {
        return Vec::new();
    };
    let bytes = std::fs::read(&path).unwrap();
    read_directory(&file, &path, ext)
        .unwrap()
        .into_iter()
        .map(|b| {
            let at = b.table_offset as usize;
            let table = &bytes[at..at + b.table_size as usize * 8];
            let any = table
                .chunks_exact(8)
                .any(|e| bitmap_table_data_offset(u64::from_be_bytes(e.try_into().unwrap())) != 0);
            (String::from_utf8_lossy(&b.name).into_owned(), any)
        })
        .collect()
}

/// The dirty ranges of bitmap `name` of `img` as QEMU reads them: a copy
/// exported by qemu-nbd (which serves one client and exits; the copy is
/// touched by nothing else afterwards) and mapped by qemu-img, where a
/// dirty extent shows as "data": false. The copy is opened without its
/// backing chain, so that no other image stays locked by the exiting
/// server.
pub fn dirty_by_qemu(w: &Work, img: &str, name: &str) -> Vec<(u64, u64)> {
    // A new name each time: a served copy may still be open while its
    // qemu-nbd exits.
    static VIEWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = VIEWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let copy = format!("{img}.{name}.{n}.view");
    w.copy(img, &copy);
    let sock = w.path(&format!("{copy}.sock")).display().to_string();
    let r = w.run(
        "qemu-nbd",
        &[
            "--fork",
            "-r",
            "-B",
            name,
            "--socket",
            &sock,
            &format!(
                r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{copy}"}}}}"#
            ),
        ],
    );
    assert!(r.ok(), "{r}");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
    );
    let r = w.qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in w.json(&r).as_array().unwrap() {
        if e["data"] != Value::Bool(false) {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// Set the in-use flag of bitmap `name`, as a QEMU that died with the
/// bitmap loaded leaves it.
pub fn mark_in_use(w: &Work, img: &str, name: &str) {
    let path = w.path(img);
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let h = Header::read(&file, &path, len).unwrap();
    let ext = h.extensions.bitmaps.clone().unwrap();
    let dir = read_directory(&file, &path, &ext).unwrap();
    let mut bytes = w.read_file(img);
    let mut pos = ext.directory_offset as usize;
    for b in dir {
        if b.name == name.as_bytes() {
            bytes[pos + 15] |= 1;
        }
        pos += (24 + b.extra.len() + b.name.len()).next_multiple_of(8);
    }
    w.write_file(img, &bytes);
}

/// A bitmap as its directory entry stores it: name, table size (entries),
/// flags and granularity bits.
pub type DirEntry = (String, u32, u32, u8);

/// Per bitmap, its directory entry.
pub fn directory(w: &Work, img: &str) -> Vec<DirEntry> {
    let path = w.path(img);
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let h = Header::read(&file, &path, len).unwrap();
    let Some(ext) = &h.extensions.bitmaps else {
        return Vec::new();
    };
    read_directory(&file, &path, ext)
        .unwrap()
        .into_iter()
        .map(|b| {
            let name = String::from_utf8_lossy(&b.name).into_owned();
            (name, b.table_size, b.flags, b.granularity_bits)
        })
        .collect()
}
