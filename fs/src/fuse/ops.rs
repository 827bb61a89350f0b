//! Namespace and file operations as async helpers returning `Result`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;

use fuser::{FileHandle, Request};
use migfs_proto::meta::{
    Attr, Empty, EntryReply, FallocateRequest, InoRequest, LinkRequest, LookupRequest,
    MknodRequest, NameRequest, OpenRequest, ReadDirRequest, RenameRequest, SetAttrRequest,
    SetXattrRequest, StatFsReply, SymlinkRequest, XattrRequest,
};

use super::Shared;
use super::control;
use super::data::Handle;
use super::lock;
use crate::error::{FsError, Result};

/// Longest name the metadata server accepts.
const NAME_MAX: usize = 255;

/// Directory entries asked for per `ReadDir` call.
const READDIR_BATCH: u32 = 512;

/// What a create-like request carries.
#[derive(Debug, Clone)]
pub struct Make {
    parent: u64,
    name: Vec<u8>,
    mode: u32,
    rdev: u32,
    uid: u32,
    gid: u32,
}

impl Make {
    /// From a kernel request (the mode already has the umask applied).
    pub fn new(req: &Request, parent: u64, name: &OsStr, mode: u32, rdev: u32) -> Make {
        Make {
            parent,
            name: name.as_bytes().to_vec(),
            mode,
            rdev,
            uid: req.uid(),
            gid: req.gid(),
        }
    }
}

fn name_bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// Looks `name` up in `parent`.
pub async fn lookup(sh: &Shared, parent: u64, name: &OsStr) -> Result<Attr> {
    if let Some(a) = control::lookup(sh, parent, name).await? {
        return Ok(a);
    }
    if let Some(a) = sh.cache.lookup(parent, name) {
        return Ok(sh.patch_local(a));
    }
    // A name too long for the server is its error to give (ENAMETOOLONG).
    if name.len() <= NAME_MAX && sh.cache.absent(parent, name) {
        return Err(FsError::Local {
            op: "lookup",
            errno: libc::ENOENT,
        });
    }
    let req = LookupRequest {
        parent,
        name: name_bytes(name),
        session_id: sh.data.meta.session(),
    };
    let a = sh
        .data
        .meta
        .call("lookup", |mut c| {
            let req = req.clone();
            async move { c.lookup(req).await }
        })
        .await?;
    sh.cache.put_entry(parent, name, &a);
    Ok(sh.patch_local(a))
}

/// The attributes of `ino`.
pub async fn getattr(sh: &Shared, ino: u64) -> Result<Attr> {
    if let Some(a) = control::attr(ino) {
        return Ok(a);
    }
    if let Some(a) = sh.cache.attr(ino) {
        return Ok(sh.patch_local(a));
    }
    let a = fetch_attr(sh, ino).await?;
    sh.cache.put_attr(&a);
    Ok(sh.patch_local(a))
}

/// The attributes of `ino` from the metadata server, bypassing the cache.
pub async fn fetch_attr(sh: &Shared, ino: u64) -> Result<Attr> {
    sh.data
        .meta
        .call("getattr", |mut c| async move {
            c.get_attr(InoRequest { ino }).await
        })
        .await
}

/// Changes attributes; a size change first publishes this node's writes.
pub async fn setattr(sh: &Shared, mut req: SetAttrRequest) -> Result<Attr> {
    if control::is_control(req.ino) {
        return Err(FsError::Local {
            op: "setattr",
            errno: libc::EPERM,
        });
    }
    if req.size.is_some_and(|s| s > sh.data.max_file_size()) {
        return Err(FsError::Local {
            op: "truncate",
            errno: libc::EFBIG,
        });
    }
    let fd = sh.files.lock().get(&req.ino).cloned();
    if let (Some(fd), Some(_)) = (&fd, req.size) {
        sh.data.flush(fd).await?;
    }
    req.session_id = sh.data.meta.session();
    let a = sh
        .data
        .meta
        .call("setattr", |mut c| async move { c.set_attr(req).await })
        .await?;
    if let (Some(fd), Some(_)) = (&fd, req.size) {
        fd.truncated(&a);
    }
    sh.cache.put_attr(&a);
    Ok(a)
}

/// The target of a symlink.
pub async fn readlink(sh: &Shared, ino: u64) -> Result<Vec<u8>> {
    let r = sh
        .data
        .meta
        .call("readlink", |mut c| async move {
            c.readlink(InoRequest { ino }).await
        })
        .await?;
    Ok(r.target)
}

fn mknod_req(sh: &Shared, mk: &Make, open: bool) -> MknodRequest {
    MknodRequest {
        session_id: sh.data.meta.session(),
        parent: mk.parent,
        name: mk.name.clone(),
        mode: mk.mode,
        rdev: mk.rdev,
        uid: mk.uid,
        gid: mk.gid,
        open,
        want_delegation: false,
    }
}

/// Now, in ns since the epoch.
fn now_ns() -> i64 {
    super::attr::ns_of(std::time::SystemTime::now())
}

/// open(O_CREAT) of a new regular file answered here, in a directory this
/// node holds delegated ([`crate::dirops`]); `None` when the server must
/// answer (not delegated, name not known absent, no inode number left).
fn create_here(sh: &Shared, mk: &Make) -> Option<Attr> {
    let name = OsStr::from_bytes(&mk.name);
    if mk.name.len() > NAME_MAX
        || mk.mode & libc::S_IFMT != libc::S_IFREG
        || !sh.dirops.holds(mk.parent)
        || !sh.cache.absent(mk.parent, name)
    {
        return None;
    }
    let mut p = sh.cache.attr(mk.parent)?;
    let now = now_ns();
    // The server's rule (metadata::ops::namei): a set-gid directory gives
    // its group to what is made in it.
    let gid = if p.mode & libc::S_ISGID != 0 {
        p.gid
    } else {
        mk.gid
    };
    let a = sh.dirops.create(mk.parent, &mk.name, |ino| Attr {
        ino,
        size: 0,
        mode: libc::S_IFREG | (mk.mode & 0o7777),
        nlink: 1,
        uid: mk.uid,
        gid,
        rdev: 0,
        atime_ns: now,
        mtime_ns: now,
        ctime_ns: now,
        crtime_ns: now,
        data_version: 0,
    })?;
    p.mtime_ns = now;
    p.ctime_ns = now;
    sh.cache.put_attr(&p);
    sh.cache.put_entry(mk.parent, name, &a);
    sh.cache.listing_add(mk.parent, name);
    Some(a)
}

/// unlink(2) answered here (see [`create_here`]); false when the server
/// must answer.
fn unlink_here(sh: &Shared, parent: u64, name: &OsStr) -> bool {
    if !sh.dirops.holds(parent) {
        return false;
    }
    let (Some(a), Some(mut p)) = (sh.cache.lookup(parent, name), sh.cache.attr(parent)) else {
        return false;
    };
    if super::attr::is_dir(&a) {
        return false;
    }
    let now = now_ns();
    if !sh.dirops.unlink(parent, name.as_bytes(), a.ino, now) {
        return false;
    }
    sh.cache.drop_entry(parent, name);
    sh.cache.listing_remove(parent, name);
    if a.nlink > 1 {
        let mut a = a;
        a.nlink -= 1;
        a.ctime_ns = now;
        sh.cache.put_attr(&a);
    } else {
        sh.cache.drop_attr(a.ino);
    }
    p.mtime_ns = now;
    p.ctime_ns = now;
    sh.cache.put_attr(&p);
    true
}

/// Caches what a create-like call answered: the new entry, and the
/// directory's new attributes (the kernel asks for them next: it drops its
/// copy after every change to a directory).
fn created(sh: &Shared, op: &'static str, parent: u64, name: &[u8], r: EntryReply) -> Result<Attr> {
    let a = r.attr.ok_or_else(|| incomplete(op))?;
    match r.parent {
        Some(p) => sh.cache.put_attr(&p),
        None => sh.cache.drop_attr(parent),
    }
    sh.cache.put_entry(parent, OsStr::from_bytes(name), &a);
    sh.cache.listing_add(parent, OsStr::from_bytes(name));
    if super::attr::is_dir(&a) {
        sh.cache.listing_empty(a.ino);
    }
    Ok(a)
}

/// Notes what a failed create-like call says about the name: EEXIST means
/// it is there after all (another node made it).
fn exists_if_eexist<T>(sh: &Shared, parent: u64, name: &[u8], r: Result<T>) -> Result<T> {
    if r.as_ref().is_err_and(|e| e.errno() == libc::EEXIST) {
        sh.cache.listing_add(parent, OsStr::from_bytes(name));
    }
    r
}

/// A reply without the attributes it must carry.
fn incomplete(op: &'static str) -> FsError {
    FsError::Meta {
        op,
        status: tonic::Status::internal("the metadata server's reply lacks attributes"),
    }
}

/// Caches a directory's attributes after a removal or rename from it.
fn parent_changed(sh: &Shared, parent: u64, attr: Option<Attr>) {
    match attr {
        Some(p) => sh.cache.put_attr(&p),
        None => sh.cache.drop_attr(parent),
    }
}

/// Creates a node (regular file, fifo, device...); `open` also opens it.
pub async fn mknod(sh: &Shared, mk: Make, open: bool) -> Result<Attr> {
    control::refuse_in_control(mk.parent)?;
    if open && let Some(a) = create_here(sh, &mk) {
        return Ok(a);
    }
    let mut req = mknod_req(sh, &mk, open);
    // Knowing every name in the directory, this node could answer the
    // next creates there itself.
    req.want_delegation = open
        && !sh.dirops.holds(mk.parent)
        && sh.cache.absent(mk.parent, OsStr::from_bytes(&mk.name));
    let r = sh
        .data
        .meta
        .call("mknod", |mut c| {
            let req = req.clone();
            async move { c.mknod(req).await }
        })
        .await;
    let r = exists_if_eexist(sh, mk.parent, &mk.name, r)?;
    let delegated = r.delegated;
    let a = created(sh, "mknod", mk.parent, &mk.name, r)?;
    if delegated {
        sh.dirops.granted(mk.parent);
    }
    Ok(a)
}

/// Who asks (for the access checks the kernel cannot make itself).
#[derive(Debug, Clone, Copy)]
pub struct Who {
    /// User.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Process (its supplementary groups are read from /proc).
    pub pid: u32,
}

impl Who {
    /// Whether `who` may access a node of `a` for `want` (`R_OK`/`W_OK`
    /// bits), by the owner / group / other bits as the kernel decides.
    fn may(&self, a: &Attr, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let bits = if self.uid == a.uid {
            a.mode >> 6
        } else if self.gid == a.gid || self.in_group(a.gid) {
            a.mode >> 3
        } else {
            a.mode
        } & 0o7;
        bits & want == want
    }

    fn in_group(&self, gid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid)).is_ok_and(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
        })
    }
}

/// open(O_CREAT) without O_EXCL of a name another node made after this one
/// looked (the create said EEXIST): opens the file that is there, as
/// open(2) would have, with the access check the kernel skips for a file it
/// believes it created.
pub async fn open_existing(
    sh: &Shared,
    parent: u64,
    name: &OsStr,
    who: Who,
    flags: i32,
) -> Result<(Attr, u64)> {
    let local = |errno| FsError::Local { op: "open", errno };
    sh.cache.drop_entry(parent, name);
    let a = lookup(sh, parent, name).await?;
    match a.mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(local(libc::EISDIR)),
        _ => return Err(local(libc::EEXIST)),
    }
    let mut want = match flags & libc::O_ACCMODE {
        libc::O_WRONLY => 2,
        libc::O_RDWR => 6,
        _ => 4,
    };
    if flags & libc::O_TRUNC != 0 {
        want |= 2;
    }
    if !who.may(&a, want) {
        return Err(local(libc::EACCES));
    }
    let (fh, _) = open(sh, a.ino).await?;
    if flags & libc::O_TRUNC == 0 || a.size == 0 {
        return Ok((a, fh));
    }
    let req = SetAttrRequest {
        session_id: sh.data.meta.session(),
        ino: a.ino,
        size: Some(0),
        ..SetAttrRequest::default()
    };
    match setattr(sh, req).await {
        Ok(a) => Ok((a, fh)),
        Err(e) => {
            let _ = release(sh, a.ino, FileHandle(fh), None).await;
            Err(e)
        }
    }
}

/// Creates a directory.
pub async fn mkdir(sh: &Shared, mk: Make) -> Result<Attr> {
    control::refuse_in_control(mk.parent)?;
    let req = mknod_req(sh, &mk, false);
    let r = sh
        .data
        .meta
        .call("mkdir", |mut c| {
            let req = req.clone();
            async move { c.mkdir(req).await }
        })
        .await;
    let r = exists_if_eexist(sh, mk.parent, &mk.name, r)?;
    created(sh, "mkdir", mk.parent, &mk.name, r)
}

/// Creates a symlink to `target`.
pub async fn symlink(sh: &Shared, mk: Make, target: &OsStr) -> Result<Attr> {
    control::refuse_in_control(mk.parent)?;
    let req = SymlinkRequest {
        session_id: sh.data.meta.session(),
        parent: mk.parent,
        name: mk.name.clone(),
        target: name_bytes(target),
        uid: mk.uid,
        gid: mk.gid,
    };
    let r = sh
        .data
        .meta
        .call("symlink", |mut c| {
            let req = req.clone();
            async move { c.symlink(req).await }
        })
        .await;
    let r = exists_if_eexist(sh, mk.parent, &mk.name, r)?;
    created(sh, "symlink", mk.parent, &mk.name, r)
}

/// Adds a hard link.
pub async fn link(sh: &Shared, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<Attr> {
    control::refuse_in_control(new_parent)?;
    let req = LinkRequest {
        session_id: sh.data.meta.session(),
        ino,
        new_parent,
        new_name: name_bytes(new_name),
    };
    let r = sh
        .data
        .meta
        .call("link", |mut c| {
            let req = req.clone();
            async move { c.link(req).await }
        })
        .await;
    let r = exists_if_eexist(sh, new_parent, new_name.as_bytes(), r)?;
    created(sh, "link", new_parent, new_name.as_bytes(), r)
}

fn forget_name(sh: &Shared, parent: u64, name: &OsStr) {
    if let Some(a) = sh.cache.lookup(parent, name) {
        sh.cache.drop_attr(a.ino);
    }
    sh.cache.drop_entry(parent, name);
    sh.cache.drop_attr(parent);
}

/// Unlinks a file (`dir` false) or removes an empty directory.
pub async fn remove(sh: &Shared, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
    control::refuse_in_control(parent)?;
    let req = NameRequest {
        session_id: sh.data.meta.session(),
        parent,
        name: name_bytes(name),
    };
    let op = if dir { "rmdir" } else { "unlink" };
    if !dir && unlink_here(sh, parent, name) {
        return Ok(());
    }
    let child = sh.cache.lookup(parent, name).map(|a| a.ino);
    forget_name(sh, parent, name);
    let r = sh
        .data
        .meta
        .call(op, |mut c| {
            let req = req.clone();
            async move {
                if dir {
                    c.rmdir(req).await
                } else {
                    c.unlink(req).await
                }
            }
        })
        .await;
    if r.as_ref().is_err_and(|e| e.errno() == libc::ENOENT) {
        sh.cache.listing_remove(parent, name);
    }
    let r = r?;
    forget_name(sh, parent, name);
    sh.cache.listing_remove(parent, name);
    parent_changed(sh, parent, r.parent);
    if dir && let Some(c) = child {
        // A removed directory's delegation is of no use any more.
        sh.dirops.recall(c);
    }
    Ok(())
}

/// Renames (flags: RENAME_NOREPLACE, RENAME_EXCHANGE).
pub async fn rename(
    sh: &Shared,
    parent: u64,
    name: &OsStr,
    new_parent: u64,
    new_name: &OsStr,
    flags: u32,
) -> Result<()> {
    control::refuse_in_control(parent)?;
    control::refuse_in_control(new_parent)?;
    let req = RenameRequest {
        session_id: sh.data.meta.session(),
        parent,
        name: name_bytes(name),
        new_parent,
        new_name: name_bytes(new_name),
        flags,
    };
    forget_name(sh, parent, name);
    forget_name(sh, new_parent, new_name);
    let r = sh
        .data
        .meta
        .call("rename", |mut c| {
            let req = req.clone();
            async move { c.rename(req).await }
        })
        .await?;
    forget_name(sh, parent, name);
    forget_name(sh, new_parent, new_name);
    if flags & libc::RENAME_EXCHANGE == 0 {
        sh.cache.listing_remove(parent, name);
    }
    sh.cache.listing_add(new_parent, new_name);
    parent_changed(sh, parent, r.parent);
    parent_changed(sh, new_parent, r.new_parent);
    Ok(())
}

/// Opens a file: registers the open with the session and returns the
/// handle and whether the kernel may keep its cached pages.
pub async fn open(sh: &Shared, ino: u64) -> Result<(u64, bool)> {
    let req = OpenRequest {
        session_id: sh.data.meta.session(),
        ino,
    };
    let a = sh
        .data
        .meta
        .call("open", |mut c| async move { c.open(req).await })
        .await?;
    sh.cache.put_attr(&a);
    Ok(sh.add_handle(&a))
}

/// close(2): publishes what this handle's inode has written and drops the
/// closing process's fcntl locks on the inode (POSIX: any close does).
/// It reports an upload error this handle's writes and closes have not
/// (fsync reports it again).
pub async fn flush(sh: &Shared, ino: u64, fh: FileHandle, owner: u64) -> Result<()> {
    let h = sh.handle(fh)?;
    let res = if h.data.is_dirty() {
        sh.data.flush(&h.data).await
    } else {
        Ok(())
    };
    lock::drop_at_close(sh, ino, owner).await?;
    let told = h.unreported();
    match res {
        Err(FsError::Lost { .. }) | Ok(()) => told,
        Err(e) => Err(e),
    }
}

/// The last close of a handle: publish, drop locks of its owner, end the open.
pub async fn release(sh: &Shared, ino: u64, fh: FileHandle, owner: Option<u64>) -> Result<()> {
    let h = sh.handles.lock().remove(&fh.0);
    let Some(Handle { data: fd, .. }) = h.as_deref() else {
        return Err(FsError::Local {
            op: "release",
            errno: libc::EBADF,
        });
    };
    let res = if fd.is_dirty() {
        sh.data.flush(fd).await
    } else {
        Ok(())
    };
    lock::drop_at_release(sh, ino, fh, owner).await;
    let last = {
        let mut st = fd.st.lock();
        st.opens = st.opens.saturating_sub(1);
        st.opens == 0
    };
    if last && !fd.is_dirty() {
        let mut files = sh.files.lock();
        if files.get(&ino).is_some_and(|f| Arc::ptr_eq(f, fd)) {
            files.remove(&ino);
        }
    }
    sh.closes.release(ino);
    res
}

/// fsync: publish the handle's data (all open files for a directory
/// fsync), make the block store and the metadata durable. It fails if any
/// upload of the inode failed since this handle's last fsync, whoever
/// flushed since.
pub async fn fsync(sh: &Shared, fh: Option<FileHandle>) -> Result<()> {
    if let Some(fh) = fh {
        let h = sh.handle(fh)?;
        let res = sh.data.flush(&h.data).await;
        let synced = h.unsynced();
        match res {
            Err(FsError::Lost { .. }) | Ok(()) => synced?,
            Err(e) => return Err(e),
        }
    }
    if sh.data.fsync_blocks {
        let blocks = Arc::clone(&sh.data.blocks);
        tokio::task::spawn_blocking(move || blocks.local.sync())
            .await
            .map_err(|e| FsError::Invalid(format!("sync task: {e}")))??;
    }
    sh.data
        .meta
        .call("sync", |mut c| async move { c.sync(Empty {}).await })
        .await?;
    Ok(())
}

/// Lists `ino` from `offset`; `add` returns true when the kernel buffer is full.
pub async fn readdir(
    sh: &Shared,
    ino: u64,
    offset: u64,
    add: &mut dyn FnMut(&OsStr, u64, &Attr) -> bool,
) -> Result<()> {
    let me = getattr(sh, ino).await?;
    if !super::attr::is_dir(&me) {
        return Err(FsError::Local {
            op: "readdir",
            errno: libc::ENOTDIR,
        });
    }
    if offset < 1 && add(OsStr::new("."), 1, &me) {
        return Ok(());
    }
    if offset < 2 && add(OsStr::new(".."), 2, &me) {
        return Ok(());
    }
    if control::is_control(ino) {
        if ino == control::CTL_DIR {
            control::readdir(offset, add);
        }
        return Ok(());
    }
    let mut after = if offset <= 2 { 0 } else { offset };
    loop {
        let req = ReadDirRequest {
            ino,
            after_cookie: after,
            limit: READDIR_BATCH,
            session_id: sh.data.meta.session(),
        };
        let r = sh
            .data
            .meta
            .call("readdir", |mut c| async move { c.read_dir(req).await })
            .await?;
        for e in &r.entries {
            let Some(a) = &e.attr else { continue };
            let name = OsString::from_vec(e.name.clone());
            if add(&name, e.cookie, a) {
                return Ok(());
            }
            sh.cache.put_entry(ino, &name, a);
            after = e.cookie;
        }
        if r.eof || r.entries.is_empty() {
            return Ok(());
        }
    }
}

/// Filesystem usage.
pub async fn statfs(sh: &Shared) -> Result<StatFsReply> {
    sh.data
        .meta
        .call("statfs", |mut c| async move { c.stat_fs(Empty {}).await })
        .await
}

/// Sets an extended attribute.
pub async fn setxattr(sh: &Shared, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
    let req = SetXattrRequest {
        session_id: sh.data.meta.session(),
        ino,
        name: name_bytes(name),
        value: value.to_vec(),
        flags,
    };
    sh.data
        .meta
        .call("setxattr", |mut c| {
            let req = req.clone();
            async move { c.set_xattr(req).await }
        })
        .await?;
    sh.cache.drop_attr(ino);
    Ok(())
}

fn xattr_req(sh: &Shared, ino: u64, name: &OsStr) -> XattrRequest {
    XattrRequest {
        session_id: sh.data.meta.session(),
        ino,
        name: name_bytes(name),
    }
}

/// Reads an extended attribute.
pub async fn getxattr(sh: &Shared, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
    let req = xattr_req(sh, ino, name);
    let r = sh
        .data
        .meta
        .call("getxattr", |mut c| {
            let req = req.clone();
            async move { c.get_xattr(req).await }
        })
        .await?;
    Ok(r.value)
}

/// The names of the extended attributes, NUL-separated.
pub async fn listxattr(sh: &Shared, ino: u64) -> Result<Vec<u8>> {
    let r = sh
        .data
        .meta
        .call("listxattr", |mut c| async move {
            c.list_xattr(InoRequest { ino }).await
        })
        .await?;
    let mut out = Vec::new();
    for n in r.names {
        out.extend_from_slice(&n);
        out.push(0);
    }
    Ok(out)
}

/// Removes an extended attribute.
pub async fn removexattr(sh: &Shared, ino: u64, name: &OsStr) -> Result<()> {
    let req = xattr_req(sh, ino, name);
    sh.data
        .meta
        .call("removexattr", |mut c| {
            let req = req.clone();
            async move { c.remove_xattr(req).await }
        })
        .await?;
    sh.cache.drop_attr(ino);
    Ok(())
}

/// Preallocates (mode 0 extends the size; KEEP_SIZE is accepted).
pub async fn fallocate(sh: &Shared, ino: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
    if offset
        .checked_add(length)
        .is_none_or(|e| e > sh.data.max_file_size())
    {
        return Err(FsError::Local {
            op: "fallocate",
            errno: libc::EFBIG,
        });
    }
    let req = FallocateRequest {
        session_id: sh.data.meta.session(),
        ino,
        offset,
        length,
        mode,
    };
    let a = sh
        .data
        .meta
        .call("fallocate", |mut c| async move { c.fallocate(req).await })
        .await?;
    if let Some(fd) = sh.files.lock().get(&ino) {
        let mut st = fd.st.lock();
        st.size = st.size.max(a.size);
    }
    sh.cache.put_attr(&a);
    Ok(())
}
