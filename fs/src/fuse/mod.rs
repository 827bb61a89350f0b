//! The FUSE client: kernel requests → metadata calls and the data path.
//!
//! Each `Filesystem` method calls one async helper returning `Result` and
//! ends in one `match` that replies. Helpers run on the node's tokio
//! runtime; FUSE worker threads wait on them with `block_on`.
//!
//! # Layout
//! - [`attr`]: wire attributes → kernel attributes.
//! - [`data`]: write buffers, uploads, commits, reads.
//! - [`ops`]: namespace operations (lookup, create, rename, ...).
//! - [`lock`]: fcntl and flock locks (told apart by the caller's system call).
//! - [`control`]: the hidden `/.migfs` directory (`by-inode/<ino>`, `stats`).

pub mod attr;
pub mod closes;
pub mod control;
pub mod data;
pub mod lock;
pub mod ops;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, IoctlFlags,
    KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use migfs_proto::control::{FlockHeld, IOC_FLOCK_HELD};
use migfs_proto::meta::Attr;
use parking_lot::Mutex;

use crate::cache::MetaCache;
use crate::error::{FsError, Result};
use attr::to_file_attr;
use data::{DataCtx, FileData, Handle};

/// Kernel-facing cache lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    /// How long the kernel may keep a name → inode entry.
    pub entry: Duration,
    /// How long the kernel may keep attributes.
    pub attr: Duration,
}

/// State shared by the FUSE handlers and the node's background loops.
#[derive(Debug)]
pub struct Shared {
    /// Data path (metadata client, block store).
    pub data: DataCtx,
    /// User-space metadata cache (shared with the data path).
    pub cache: Arc<MetaCache>,
    /// Inodes with open handles on this node.
    pub files: Mutex<HashMap<u64, Arc<FileData>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Set once the session is mounted: pushes invalidations to the kernel.
    pub notifier: OnceLock<Notifier>,
    /// Kernel TTLs.
    pub ttls: Ttls,
    /// (inode, lock owner) pairs that took a lock here: their locks are
    /// dropped at close (FUSE flush), since the kernel does not track
    /// locks a FUSE filesystem manages itself.
    locked: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// The flock lock each open file holds, by file handle.
    flocks: Mutex<HashMap<u64, migfs_proto::control::FlockHeld>>,
    /// Extra `name value` lines of `/.migfs/stats` (node name, agent socket).
    pub info: Vec<(String, String)>,
    /// Releases of closed files on their way to the metadata server.
    pub closes: closes::Closes,
    /// Delegated directories and their queue of operations.
    pub dirops: Arc<crate::dirops::DirOps>,
}

impl Shared {
    /// State over `data` (whose cache is the user-space metadata cache).
    pub fn new(data: DataCtx, ttls: Ttls) -> Shared {
        Shared {
            closes: closes::Closes::new(Arc::clone(&data.meta)),
            dirops: Arc::new(crate::dirops::DirOps::new(
                Arc::clone(&data.meta),
                Arc::clone(&data.cache),
            )),
            cache: Arc::clone(&data.cache),
            data,
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            notifier: OnceLock::new(),
            ttls,
            locked: Mutex::new(std::collections::HashSet::new()),
            flocks: Mutex::new(HashMap::new()),
            info: Vec::new(),
        }
    }

    /// Attributes as this node sees them: a file with unpublished local
    /// writes is at least as long as what was written.
    pub fn patch_local(&self, mut a: Attr) -> Attr {
        if let Some(fd) = self.files.lock().get(&a.ino) {
            let st = fd.st.lock();
            if st.size > a.size {
                a.size = st.size;
            }
        }
        a
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>> {
        self.handles
            .lock()
            .get(&fh.0)
            .cloned()
            .ok_or(FsError::Local {
                op: "file handle",
                errno: libc::EBADF,
            })
    }

    fn add_handle(&self, attr: &Attr) -> (u64, bool) {
        let fd = Arc::clone(
            self.files
                .lock()
                .entry(attr.ino)
                .or_insert_with(|| Arc::new(FileData::new(attr))),
        );
        let keep = fd.revalidate(attr);
        fd.st.lock().opens += 1;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(Handle::new(fd)));
        (fh, keep)
    }
}

/// The filesystem handed to fuser.
#[derive(Debug)]
pub struct MigFs {
    rt: tokio::runtime::Handle,
    sh: Arc<Shared>,
}

impl MigFs {
    /// A filesystem running its work on `rt`.
    pub fn new(rt: tokio::runtime::Handle, sh: Arc<Shared>) -> MigFs {
        MigFs { rt, sh }
    }

    fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> std::result::Result<T, Errno> {
        self.rt.block_on(f).map_err(|e| {
            let errno = e.errno();
            if errno == libc::EIO {
                tracing::warn!(error = %e, "request failed with EIO");
            } else {
                tracing::debug!(error = %e, "request failed");
            }
            Errno::from_i32(errno)
        })
    }

    fn entry(&self, reply: ReplyEntry, a: &Attr) {
        let t = &self.sh.ttls;
        reply.entry_with_ttls(&t.attr, &t.entry, &to_file_attr(a), Generation(0));
    }
}

fn time_arg(t: Option<TimeOrNow>) -> (Option<i64>, bool) {
    match t {
        None => (None, false),
        Some(TimeOrNow::Now) => (None, true),
        Some(TimeOrNow::SpecificTime(t)) => (Some(attr::ns_of(t)), false),
    }
}

impl Filesystem for MigFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags as F;
        let want = F::FUSE_POSIX_LOCKS
            | F::FUSE_FLOCK_LOCKS
            | F::FUSE_DO_READDIRPLUS
            | F::FUSE_READDIRPLUS_AUTO
            | F::FUSE_PARALLEL_DIROPS
            | F::FUSE_AUTO_INVAL_DATA
            | F::FUSE_EXPORT_SUPPORT;
        let _ = config.add_capabilities(want & config.capabilities());
        let _ = config.set_max_write(1 << 20);
        let _ = config
            .set_max_readahead(1 << 20)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.run(ops::lookup(&self.sh, parent.0, name)) {
            Ok(a) => self.entry(reply, &a),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.run(ops::getattr(&self.sh, ino.0)) {
            Ok(a) => reply.attr(&self.sh.ttls.attr, &to_file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (atime_ns, atime_now) = time_arg(atime);
        let (mtime_ns, mtime_now) = time_arg(mtime);
        let req = migfs_proto::meta::SetAttrRequest {
            session_id: 0,
            ino: ino.0,
            mode,
            uid,
            gid,
            size,
            atime_ns,
            mtime_ns,
            atime_now,
            mtime_now,
            ctime_ns: ctime.map(attr::ns_of),
        };
        match self.run(ops::setattr(&self.sh, req)) {
            Ok(a) => reply.attr(&self.sh.ttls.attr, &to_file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.run(ops::readlink(&self.sh, ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mk = ops::Make::new(
            req,
            parent.0,
            name,
            mode & !umask | (mode & libc::S_IFMT),
            rdev,
        );
        match self.run(ops::mknod(&self.sh, mk, false)) {
            Ok(a) => self.entry(reply, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mk = ops::Make::new(
            req,
            parent.0,
            name,
            (mode & !umask & 0o7777) | libc::S_IFDIR,
            0,
        );
        match self.run(ops::mkdir(&self.sh, mk)) {
            Ok(a) => self.entry(reply, &a),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(ops::remove(&self.sh, parent.0, name, false)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(ops::remove(&self.sh, parent.0, name, true)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mk = ops::Make::new(req, parent.0, link_name, libc::S_IFLNK | 0o777, 0);
        match self.run(ops::symlink(&self.sh, mk, target.as_os_str())) {
            Ok(a) => self.entry(reply, &a),
            Err(e) => reply.error(e),
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
        match self.run(ops::rename(
            &self.sh,
            parent.0,
            name,
            newparent.0,
            newname,
            flags.bits(),
        )) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.run(ops::link(&self.sh, ino.0, newparent.0, newname)) {
            Ok(a) => self.entry(reply, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if control::is_control(ino.0) {
            return match control::open(ino.0, flags) {
                Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
                Err(e) => reply.error(Errno::from_i32(e)),
            };
        }
        match self.run(ops::open(&self.sh, ino.0)) {
            Ok((fh, keep)) => {
                // Close-to-open: the kernel may still hold attributes from
                // before another node's last close (the pushed
                // invalidation travels on its own and may come later), and
                // it reads no further than the size it holds. Drop them
                // (attributes only: no page is touched), so the next read
                // past that size or stat asks again; the answer is in the
                // cache that `open` just filled.
                if let Some(n) = self.sh.notifier.get() {
                    let _ = n.inval_inode(ino, -1, 0);
                }
                let f = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), f);
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if control::is_control(ino.0) {
            let text = control::read(&self.sh, ino.0);
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(text.len());
            let end = start.saturating_add(size as usize).min(text.len());
            return reply.data(&text[start..end]);
        }
        let res = self.run(async {
            let h = self.sh.handle(fh)?;
            self.sh.data.read(&h.data, offset, size).await
        });
        match res {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let res = self.run(async {
            let h = self.sh.handle(fh)?;
            // O_APPEND lands at the end as this node knows it (refreshed
            // at open from the server), not at the kernel's cached size,
            // which may predate another node's appends.
            let offset = if flags.0 & libc::O_APPEND != 0 {
                offset.max(h.data.st.lock().size)
            } else {
                offset
            };
            self.sh.data.write(&h, offset, data).await
        });
        match res {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if control::is_control(ino.0) {
            return reply.ok();
        }
        match self.run(ops::flush(&self.sh, ino.0, fh, lock_owner.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if control::is_control(ino.0) {
            return reply.ok();
        }
        match self.run(ops::release(&self.sh, ino.0, fh, lock_owner.map(|o| o.0))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.run(ops::fsync(&self.sh, Some(fh))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if control::is_control(ino.0) && ino.0 != control::CTL_DIR {
            return reply.error(Errno::ENOTDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self.run(ops::readdir(
            &self.sh,
            ino.0,
            offset,
            &mut |name, cookie, a| reply.add(INodeNo(a.ino), cookie, attr::kind_of(a.mode), name),
        ));
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.sh.ttls.attr;
        let res = self.run(ops::readdir(
            &self.sh,
            ino.0,
            offset,
            &mut |name, cookie, a| {
                reply.add(
                    INodeNo(a.ino),
                    cookie,
                    name,
                    &ttl,
                    &to_file_attr(a),
                    Generation(0),
                )
            },
        ));
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.run(ops::fsync(&self.sh, None)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.run(ops::statfs(&self.sh)) {
            Ok(s) => {
                let bs = s.block_size.max(512);
                reply.statfs(
                    s.total_bytes / bs,
                    s.free_bytes / bs,
                    s.free_bytes / bs,
                    s.files,
                    s.files_free,
                    u32::try_from(bs).unwrap_or(u32::MAX),
                    s.name_max,
                    u32::try_from(bs).unwrap_or(u32::MAX),
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.run(ops::setxattr(&self.sh, ino.0, name, value, flags)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.run(ops::getxattr(&self.sh, ino.0, name)) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.run(ops::listxattr(&self.sh, ino.0)) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.run(ops::removexattr(&self.sh, ino.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The mount uses default_permissions: the kernel checks access itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let who = ops::Who {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        };
        let mk = ops::Make::new(
            req,
            parent.0,
            name,
            (mode & !umask & 0o7777) | libc::S_IFREG,
            0,
        );
        let res = self.run(async {
            match ops::mknod(&self.sh, mk, true).await {
                Ok(a) => {
                    let (fh, _) = self.sh.add_handle(&a);
                    Ok((a, fh))
                }
                // Made by another node since the kernel looked the name up.
                Err(e) if e.errno() == libc::EEXIST && flags & libc::O_EXCL == 0 => {
                    ops::open_existing(&self.sh, parent.0, name, who, flags).await
                }
                Err(e) => Err(e),
            }
        });
        match res {
            Ok((a, fh)) => {
                let t = &self.sh.ttls;
                reply.created(
                    &t.entry,
                    &to_file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let l = lock::Lock {
            ino: ino.0,
            owner: lock_owner.0,
            start,
            end,
            typ,
            pid,
            flock: false,
        };
        match self.run(lock::getlk(&self.sh, l)) {
            Ok(r) => reply.locked(r.start, r.end, r.typ, r.pid),
            Err(e) => reply.error(e),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let l = lock::Lock {
            ino: ino.0,
            owner: lock_owner.0,
            start,
            end,
            typ,
            pid,
            flock: lock::in_flock_call(req.pid()),
        };
        match self.run(lock::setlk(&self.sh, fh, l, sleep)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        let size_ok = usize::try_from(out_size).is_ok_and(|n| n == FlockHeld::LEN);
        if control::is_control(ino.0) || cmd != IOC_FLOCK_HELD || !size_ok {
            return reply.error(Errno::ENOTTY);
        }
        // A checkpoint asks this of every migfs file before the process
        // leaves: what this node answered itself (delegated directories)
        // reaches the server first, so the target finds those inodes.
        if let Err(e) = self.run(self.sh.dirops.drain()) {
            return reply.error(e);
        }
        reply.ioctl(0, &lock::flock_held(&self.sh, fh).encode());
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.run(ops::fallocate(&self.sh, ino.0, offset, length, mode)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX));
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}
