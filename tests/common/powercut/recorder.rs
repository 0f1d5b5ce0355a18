//! The recorder: a FUSE pass-through file system served from a thread of
//! the test process. Everything done under the mount point is done to a
//! backing directory, and every operation that changes data or names is
//! logged, in the order the daemon served it, with its bytes. cowshed and
//! qemu-img are recorded the same way, as the kernel sees them.
//!
//! The daemon runs one thread, so the log is one total order; requests a
//! program has in flight at once (qemu's thread pool) are logged in the
//! order served, which is one order the kernel could have seen. There is no
//! writeback cache: each write(2) reaches the daemon before it returns.
//! OFD locks stay with the kernel (no getlk/setlk), so QEMU's locking and
//! cowshed's lock probes work as on any local file system.
//!
//! Only the mount's root directory is served (flat scratch directories are
//! all the workloads need); `mkdir` and symlinks are refused.
//!
//! Mounting: `fuser` without its libfuse features mounts with mount(2)
//! itself, which works as root with `/dev/fuse`; only where that is
//! refused (EPERM, not root) does it run the `fusermount3` helper of the
//! `fuse3` package. A mount that fails fails the test, saying why.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

/// A file as the log knows it: a number given the first time the daemon
/// sees its backing inode (ext4 reuses inode numbers of deleted files, so
/// an inode whose last name goes gets a fresh number if it comes back).
pub type FileId = u64;

/// The root directory's id (FUSE's root inode).
pub const ROOT: FileId = 1;

/// One logged operation. Names are in the root directory.
#[derive(Debug, Clone)]
pub enum Entry {
    /// write, pwritev, or a copy_file_range (the bytes it copied).
    Write {
        file: FileId,
        offset: u64,
        data: Arc<Vec<u8>>,
    },
    /// fallocate PUNCH_HOLE or ZERO_RANGE: the range reads as zeros.
    /// `keep_size`: the range is clipped to the file's length.
    Zero {
        file: FileId,
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    /// truncate, ftruncate, or a fallocate that grew the file.
    SetLen {
        file: FileId,
        len: u64,
    },
    /// fsync or fdatasync of one file.
    Sync {
        file: FileId,
        data_only: bool,
    },
    Create {
        name: OsString,
        file: FileId,
    },
    Link {
        name: OsString,
        file: FileId,
    },
    Unlink {
        name: OsString,
    },
    Rename {
        from: OsString,
        to: OsString,
    },
    /// fsync of the root directory.
    SyncDir,
}

impl Entry {
    /// The file whose bytes or length this entry changes.
    pub fn data_file(&self) -> Option<FileId> {
        match self {
            Entry::Write { file, .. } | Entry::Zero { file, .. } | Entry::SetLen { file, .. } => {
                Some(*file)
            }
            _ => None,
        }
    }

    pub fn is_name_op(&self) -> bool {
        matches!(
            self,
            Entry::Create { .. } | Entry::Link { .. } | Entry::Unlink { .. } | Entry::Rename { .. }
        )
    }

    pub fn is_sync(&self) -> bool {
        matches!(self, Entry::Sync { .. } | Entry::SyncDir)
    }
}

/// What a recording session produced: the log, and the files as they were
/// when the mount started (copies under `pristine/<id>`), by name.
pub struct Recording {
    pub entries: Vec<Entry>,
    pub initial_names: Vec<(OsString, FileId)>,
    pub pristine: PathBuf,
}

impl Recording {
    /// One line per entry (POWERCUT_LOG=1 prints it), bytes summarized.
    pub fn describe(&self) -> String {
        let mut s = format!("initial files: {:?}\n", self.initial_names);
        for (i, e) in self.entries.iter().enumerate() {
            let line = match e {
                Entry::Write { file, offset, data } => {
                    format!("write file {file} at {offset} len {}", data.len())
                }
                other => format!("{other:?}"),
            };
            s.push_str(&format!("{i:>6} {line}\n"));
        }
        s
    }
}

struct Inner {
    backing: PathBuf,
    /// Current name of each id in the root (None once its last name went).
    names: HashMap<FileId, OsString>,
    ids: HashMap<u64, FileId>,
    next_id: FileId,
    handles: HashMap<u64, (FileId, File)>,
    next_fh: u64,
    log: Vec<Entry>,
    /// Answer copy_file_range with ENOSYS: the kernel then copies by
    /// reading and writing through the mount (splice), as it would on a
    /// file system without the call.
    refuse_copy_file_range: bool,
}

impl Inner {
    fn path(&self, name: &OsStr) -> PathBuf {
        self.backing.join(name)
    }

    fn id_for(&mut self, md: &Metadata, name: &OsStr) -> FileId {
        let id = match self.ids.get(&md.ino()) {
            Some(&id) => id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                self.ids.insert(md.ino(), id);
                id
            }
        };
        self.names.insert(id, name.to_os_string());
        id
    }

    /// Forget the backing inode behind `name` if this removal is its last link.
    fn forget_if_last(&mut self, name: &OsStr) {
        if let Ok(md) = std::fs::symlink_metadata(self.path(name)) {
            if md.nlink() <= 1 && md.is_file() {
                if let Some(id) = self.ids.remove(&md.ino()) {
                    self.names.remove(&id);
                }
            }
        }
    }

    fn handle(&self, fh: FileHandle) -> Result<&(FileId, File), Errno> {
        self.handles.get(&fh.0).ok_or(Errno::EBADF)
    }
}

fn attr(id: FileId, md: &Metadata) -> FileAttr {
    let time = |s: i64, ns: i64| {
        UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32)
    };
    FileAttr {
        ino: INodeNo(id),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: if md.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Attributes are never cached: every stat reaches the daemon, so sizes
/// seen by the programs are always the backing files'.
const TTL: Duration = Duration::ZERO;

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

struct PassThrough(Arc<Mutex<Inner>>);

impl PassThrough {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic in one request must not hide every later one.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn open_backing(path: &Path, flags: i32, create: Option<u32>) -> std::io::Result<File> {
    let acc = flags & libc::O_ACCMODE;
    let mut o = OpenOptions::new();
    o.read(acc != libc::O_WRONLY).write(acc != libc::O_RDONLY);
    if let Some(mode) = create {
        // The kernel asked for O_EXCL only when the program did.
        if flags & libc::O_EXCL != 0 {
            o.create_new(true);
        } else {
            o.create(true);
        }
        o.mode(mode);
    }
    o.open(path)
}

impl fuser::Filesystem for PassThrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Fewer, larger writes: 1 MiB (the kernel's page limit) instead of
        // 128 KiB. Tearing is modelled at 4 KiB anyway.
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let mut g = self.inner();
        match std::fs::symlink_metadata(g.path(name)) {
            Ok(md) if md.is_file() => {
                let id = g.id_for(&md, name);
                reply.entry(&TTL, &attr(id, &md), Generation(0));
            }
            Ok(_) => reply.error(Errno::EACCES),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let g = self.inner();
        let md = if let Some(fh) = fh.filter(|fh| g.handles.contains_key(&fh.0)) {
            g.handles[&fh.0].1.metadata()
        } else if ino.0 == ROOT {
            std::fs::metadata(&g.backing)
        } else {
            match g.names.get(&ino.0) {
                Some(n) => std::fs::metadata(g.path(n)),
                None => return reply.error(Errno::ENOENT),
            }
        };
        match md {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut g = self.inner();
        let file = if let Some(fh) = fh.filter(|fh| g.handles.contains_key(&fh.0)) {
            g.handles[&fh.0].1.try_clone()
        } else {
            match g.names.get(&ino.0) {
                Some(n) => OpenOptions::new()
                    .write(size.is_some())
                    .read(true)
                    .open(g.path(n)),
                None if ino.0 == ROOT => File::open(&g.backing),
                None => return reply.error(Errno::ENOENT),
            }
        };
        let file = match file {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        if let Some(len) = size {
            if let Err(e) = file.set_len(len) {
                return reply.error(errno(e));
            }
            g.log.push(Entry::SetLen { file: ino.0, len });
        }
        if let Some(mode) = mode {
            if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)) {
                return reply.error(errno(e));
            }
        }
        match file.metadata() {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let mut g = self.inner();
        let path = g.path(name);
        g.forget_if_last(name);
        match std::fs::remove_file(path) {
            Ok(()) => {
                g.log.push(Entry::Unlink {
                    name: name.to_os_string(),
                });
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if parent.0 != ROOT || newparent.0 != ROOT {
            return reply.error(Errno::EXDEV);
        }
        let mut g = self.inner();
        let (from, to) = (g.path(name), g.path(newname));
        let moving = std::fs::symlink_metadata(&from);
        if flags.is_empty() {
            g.forget_if_last(newname);
        }
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap_or_default();
        let (cf, ct) = (c(&from), c(&to));
        // SAFETY: two NUL-terminated paths that live across the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                cf.as_ptr(),
                libc::AT_FDCWD,
                ct.as_ptr(),
                flags.bits(),
            )
        };
        if rc != 0 {
            return reply.error(errno(std::io::Error::last_os_error()));
        }
        if let Ok(md) = moving {
            g.id_for(&md, newname);
        }
        g.log.push(Entry::Rename {
            from: name.to_os_string(),
            to: newname.to_os_string(),
        });
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if newparent.0 != ROOT {
            return reply.error(Errno::EXDEV);
        }
        let mut g = self.inner();
        let Some(old) = g.names.get(&ino.0).cloned() else {
            return reply.error(Errno::ENOENT);
        };
        let to = g.path(newname);
        if let Err(e) = std::fs::hard_link(g.path(&old), &to) {
            return reply.error(errno(e));
        }
        g.log.push(Entry::Link {
            name: newname.to_os_string(),
            file: ino.0,
        });
        match std::fs::metadata(&to) {
            Ok(md) => reply.entry(&TTL, &attr(ino.0, &md), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut g = self.inner();
        let Some(name) = g.names.get(&ino.0).cloned() else {
            return reply.error(Errno::ENOENT);
        };
        // O_TRUNC reaches us as a setattr(size) (no atomic_o_trunc).
        match open_backing(&g.path(&name), flags.0, None) {
            Ok(f) => {
                let fh = g.next_fh;
                g.next_fh += 1;
                g.handles.insert(fh, (ino.0, f));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let mut g = self.inner();
        let path = g.path(name);
        let existed = std::fs::symlink_metadata(&path).ok();
        let f = match open_backing(&path, flags, Some(mode & !umask & 0o7777)) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(e)),
        };
        let md = match f.metadata() {
            Ok(md) => md,
            Err(e) => return reply.error(errno(e)),
        };
        let id = g.id_for(&md, name);
        match existed {
            None => g.log.push(Entry::Create {
                name: name.to_os_string(),
                file: id,
            }),
            Some(old) if flags & libc::O_TRUNC != 0 && old.len() > 0 => {
                if let Err(e) = f.set_len(0) {
                    return reply.error(errno(e));
                }
                g.log.push(Entry::SetLen { file: id, len: 0 });
            }
            Some(_) => {}
        }
        let fh = g.next_fh;
        g.next_fh += 1;
        g.handles.insert(fh, (id, f));
        reply.created(
            &TTL,
            &attr(id, &md),
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty(),
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let g = self.inner();
        let f = match g.handle(fh) {
            Ok((_, f)) => f,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut g = self.inner();
        let (id, res) = match g.handle(fh) {
            Ok((id, f)) => (*id, f.write_all_at(data, offset)),
            Err(e) => return reply.error(e),
        };
        match res {
            Ok(()) => {
                g.log.push(Entry::Write {
                    file: id,
                    offset,
                    data: Arc::new(data.to_vec()),
                });
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner().handles.remove(&fh.0);
        reply.ok();
    }

    /// Logged only: durability is what the crash model decides, and the
    /// backing files never see a power cut.
    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut g = self.inner();
        let id = match g.handle(fh) {
            Ok((id, _)) => *id,
            Err(e) => return reply.error(e),
        };
        g.log.push(Entry::Sync {
            file: id,
            data_only: datasync,
        });
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut g = self.inner();
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (ROOT, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        let listing = match std::fs::read_dir(&g.backing) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        let mut names: Vec<OsString> = listing
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            if let Ok(md) = std::fs::symlink_metadata(g.path(&name)) {
                if md.is_file() {
                    let id = g.id_for(&md, &name);
                    entries.push((id, FileType::RegularFile, name));
                }
            }
        }
        for (i, (id, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(id), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        self.inner().log.push(Entry::SyncDir);
        reply.ok();
    }

    /// The backing file system's figures: cowshed checks free space.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let backing = self.inner().backing.clone();
        match nix::sys::statvfs::statvfs(&backing) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut g = self.inner();
        let (id, f) = match g.handle(fh) {
            Ok((id, f)) => (*id, f),
            Err(e) => return reply.error(e),
        };
        let before = f.metadata().map(|m| m.len()).unwrap_or(0);
        // SAFETY: a plain syscall on a descriptor the handle table keeps open.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc != 0 {
            return reply.error(errno(std::io::Error::last_os_error()));
        }
        let after = f.metadata().map(|m| m.len()).unwrap_or(before);
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            g.log.push(Entry::Zero {
                file: id,
                offset,
                len: length,
                keep_size,
            });
        } else if after != before {
            g.log.push(Entry::SetLen {
                file: id,
                len: after,
            });
        }
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let g = self.inner();
        let f = match g.handle(fh) {
            Ok((_, f)) => f,
            Err(e) => return reply.error(e),
        };
        // SAFETY: a plain syscall on a descriptor the handle table keeps open.
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
        if r < 0 {
            reply.error(errno(std::io::Error::last_os_error()));
        } else {
            reply.offset(r);
        }
    }

    /// Served as a read and a write, logged as a write of the bytes copied.
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let mut g = self.inner();
        if g.refuse_copy_file_range {
            return reply.error(Errno::ENOSYS);
        }
        let len = len.min(1 << 30) as usize;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        {
            let src = match g.handle(fh_in) {
                Ok((_, f)) => f,
                Err(e) => return reply.error(e),
            };
            while got < len {
                match src.read_at(&mut buf[got..], offset_in + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(errno(e)),
                }
            }
        }
        buf.truncate(got);
        let (id, res) = match g.handle(fh_out) {
            Ok((id, f)) => (*id, f.write_all_at(&buf, offset_out)),
            Err(e) => return reply.error(e),
        };
        if let Err(e) = res {
            return reply.error(errno(e));
        }
        if got > 0 {
            g.log.push(Entry::Write {
                file: id,
                offset: offset_out,
                data: Arc::new(buf),
            });
        }
        reply.written(got as u32);
    }
}

/// A mounted recorder. Dropping it unmounts.
pub struct Recorder {
    session: Option<BackgroundSession>,
    inner: Arc<Mutex<Inner>>,
    initial_names: Vec<(OsString, FileId)>,
    pristine: PathBuf,
    pub mount: PathBuf,
}

impl Recorder {
    /// Mount a recorder of `backing` on `mount`, copying the files already
    /// in `backing` to `pristine` first (the state before the first
    /// logged entry). Err says why FUSE could not be mounted.
    pub fn start(
        backing: &Path,
        mount: &Path,
        pristine: &Path,
        refuse_copy_file_range: bool,
    ) -> Result<Recorder, String> {
        std::fs::create_dir_all(pristine).map_err(|e| format!("{}: {e}", pristine.display()))?;
        let mut inner = Inner {
            backing: backing.to_path_buf(),
            names: HashMap::new(),
            ids: HashMap::new(),
            next_id: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            log: Vec::new(),
            refuse_copy_file_range,
        };
        let root_md =
            std::fs::metadata(backing).map_err(|e| format!("{}: {e}", backing.display()))?;
        inner.ids.insert(root_md.ino(), ROOT);
        let mut initial_names = Vec::new();
        let mut listing: Vec<_> = std::fs::read_dir(backing)
            .map_err(|e| format!("{}: {e}", backing.display()))?
            .filter_map(|e| e.ok())
            .collect();
        listing.sort_by_key(|e| e.file_name());
        for e in listing {
            let md = e.metadata().map_err(|e| e.to_string())?;
            if !md.is_file() {
                return Err(format!(
                    "{}: only plain files are recorded",
                    e.path().display()
                ));
            }
            let id = inner.id_for(&md, &e.file_name());
            std::fs::copy(e.path(), pristine.join(id.to_string()))
                .map_err(|err| format!("copy {}: {err}", e.path().display()))?;
            initial_names.push((e.file_name(), id));
        }
        std::fs::create_dir_all(mount).map_err(|e| format!("{}: {e}", mount.display()))?;
        let inner = Arc::new(Mutex::new(inner));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("cowshed-powercut".into())];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(1);
        let session =
            fuser::spawn_mount(PassThrough(inner.clone()), mount, &config).map_err(|e| {
                format!(
                "cannot mount the FUSE recorder on {}: {e} (it needs /dev/fuse and either root, \
                 for a direct mount(2), or the fusermount3 helper of Debian's fuse3 package)",
                mount.display()
            )
            })?;
        Ok(Recorder {
            session: Some(session),
            inner,
            initial_names,
            pristine: pristine.to_path_buf(),
            mount: mount.to_path_buf(),
        })
    }

    /// Entries logged so far (a mark to tie a point of a workload to the log).
    pub fn log_len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log
            .len()
    }

    /// Unmount and hand over the log.
    pub fn finish(mut self) -> Recording {
        if let Some(s) = self.session.take() {
            wait_until_unused(&self.mount);
            if let Err(e) = s.umount_and_join() {
                panic!("unmounting the recorder at {}: {e}", self.mount.display());
            }
        }
        let entries = std::mem::take(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()).log);
        Recording {
            entries,
            initial_names: std::mem::take(&mut self.initial_names),
            pristine: self.pristine.clone(),
        }
    }
}

/// Wait until no process has a descriptor or its working directory under
/// `mount`. A child that another test of this process forks (qemu-img,
/// cowshed) holds copies of all our descriptors until its exec closes
/// them; if the workload's files were open then, an unmount in that window
/// fails with EBUSY (seen with both cores busy). Once the workload closed
/// its files, no later fork can copy them, so the wait ends. A hang guard
/// only: after it, the unmount reports what is left.
fn wait_until_unused(mount: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let under = |link: std::io::Result<PathBuf>| link.is_ok_and(|t| t.starts_with(mount));
    loop {
        let busy = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|p| {
                let dir = p.path();
                under(std::fs::read_link(dir.join("cwd")))
                    || std::fs::read_dir(dir.join("fd"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|fd| under(std::fs::read_link(fd.path())))
            });
        if !busy || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
