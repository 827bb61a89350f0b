//! The on-disk schema: tree names, key layouts and record encodings.
//!
//! Keys are big-endian so that a range scan returns them in numeric order.
//! Every record value starts with a version byte ([`RECORD_V1`]) so a later
//! format can read old records; the database as a whole carries
//! [`FORMAT_VERSION`] under the `format` key of the `meta` tree.

use crate::error::{MetaError, Result};

/// Version of the whole database layout, stored in `meta/format`.
pub const FORMAT_VERSION: u32 = 1;
/// Version byte at the start of every record written by this code.
pub const RECORD_V1: u8 = 1;

/// Key in the `meta` tree holding [`FORMAT_VERSION`] (u32 BE).
pub const META_FORMAT: &[u8] = b"format";
/// Key in the `meta` tree holding the [`Cluster`] record.
pub const META_CLUSTER: &[u8] = b"cluster";
/// Key in the `meta` tree holding the number of inodes (counter record).
pub const META_INODES: &[u8] = b"inode_count";

/// The trees of the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    /// ino → [`Inode`].
    Inodes,
    /// (parent ino, name) → [`Dentry`].
    Dentries,
    /// (parent ino, cookie) → name: the readdir order.
    DirOrder,
    /// (ino, chunk index) → [`BlockEntry`].
    Blocks,
    /// hash → [`BlockRef`]: how many block entries name the hash, who holds it.
    BlockRefs,
    /// hash → [`Holders`]: unreferenced blocks waiting for deletion.
    Gc,
    /// (ino, name) → value.
    Xattrs,
    /// session → [`Session`].
    Sessions,
    /// (session, ino) → open count.
    Opens,
    /// (ino, session) → (): index of `opens` by inode.
    Openers,
    /// ino → (): inodes with no name left, kept because they are open.
    Orphans,
    /// ino → [`LockRec`] list: every lock on the inode.
    Locks,
    /// (session, ino) → (): index of `locks` by session.
    SessLocks,
    /// node id → [`Node`].
    Nodes,
    /// node name → node id.
    NodeNames,
    /// Format version, cluster constants, counters.
    Meta,
    /// task id → `TaskInfo` (protobuf): global names of processes.
    Tasks,
}

impl Tree {
    /// Every tree, in a fixed order.
    pub const ALL: [Tree; 17] = [
        Tree::Inodes,
        Tree::Dentries,
        Tree::DirOrder,
        Tree::Blocks,
        Tree::BlockRefs,
        Tree::Gc,
        Tree::Xattrs,
        Tree::Sessions,
        Tree::Opens,
        Tree::Openers,
        Tree::Orphans,
        Tree::Locks,
        Tree::SessLocks,
        Tree::Nodes,
        Tree::NodeNames,
        Tree::Meta,
        Tree::Tasks,
    ];

    /// The tree's name in the store.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Inodes => "inodes",
            Tree::Dentries => "dentries",
            Tree::DirOrder => "dirorder",
            Tree::Blocks => "blocks",
            Tree::BlockRefs => "blockrefs",
            Tree::Gc => "gc",
            Tree::Xattrs => "xattrs",
            Tree::Sessions => "sessions",
            Tree::Opens => "opens",
            Tree::Openers => "openers",
            Tree::Orphans => "orphans",
            Tree::Locks => "locks",
            Tree::SessLocks => "sesslocks",
            Tree::Nodes => "nodes",
            Tree::NodeNames => "nodenames",
            Tree::Meta => "meta",
            Tree::Tasks => "tasks",
        }
    }

    /// Position in [`Tree::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

// ---------------------------------------------------------------- keys

/// Key of a single u64 (ino, session, node id).
pub fn k1(a: u64) -> [u8; 8] {
    a.to_be_bytes()
}

/// Key of two u64s ((ino, index), (session, ino), (parent, cookie), ...).
pub fn k2(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

/// Key of a u64 followed by a name ((parent, name), (ino, xattr name)).
pub fn k_name(a: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&a.to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// The leading u64 of a key.
pub fn key_u64(key: &[u8], tree: Tree) -> Result<u64> {
    key.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(tree, format!("key of {} bytes", key.len())))
}

/// The two u64s of a [`k2`] key.
pub fn key_pair(key: &[u8], tree: Tree) -> Result<(u64, u64)> {
    if key.len() != 16 {
        return Err(corrupt(tree, format!("key of {} bytes", key.len())));
    }
    Ok((key_u64(key, tree)?, key_u64(&key[8..], tree)?))
}

/// The key range holding every key that starts with the u64 `a`:
/// `(start, end)` with `end` exclusive (`None` = to the end of the tree).
pub fn prefix_range(a: u64) -> (Vec<u8>, Option<Vec<u8>>) {
    let end = a.checked_add(1).map(|n| n.to_be_bytes().to_vec());
    (a.to_be_bytes().to_vec(), end)
}

fn corrupt(tree: Tree, what: String) -> MetaError {
    MetaError::Corrupt {
        tree: tree.name(),
        what,
    }
}

// ---------------------------------------------------------------- codec

/// Appends fields to a record.
pub struct Enc(Vec<u8>);

impl Enc {
    /// A record starting with the current version byte.
    pub fn new() -> Enc {
        Enc(vec![RECORD_V1])
    }
    /// Appends a byte.
    pub fn u8(mut self, v: u8) -> Enc {
        self.0.push(v);
        self
    }
    /// Appends a u32 (big-endian).
    pub fn u32(mut self, v: u32) -> Enc {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a u64 (big-endian).
    pub fn u64(mut self, v: u64) -> Enc {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends an i64 (big-endian).
    pub fn i64(mut self, v: i64) -> Enc {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a length-prefixed (u32) byte string.
    pub fn bytes(mut self, v: &[u8]) -> Enc {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&v[..v.len().min(len as usize)]);
        self
    }
    /// Appends raw bytes (the rest of the record).
    pub fn raw(mut self, v: &[u8]) -> Enc {
        self.0.extend_from_slice(v);
        self
    }
    /// The finished record.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

impl Default for Enc {
    fn default() -> Self {
        Enc::new()
    }
}

/// Reads fields from a record, checking its version byte first.
pub struct Dec<'a> {
    buf: &'a [u8],
    tree: Tree,
}

impl<'a> Dec<'a> {
    /// Starts decoding a record of `tree`.
    pub fn new(buf: &'a [u8], tree: Tree) -> Result<Dec<'a>> {
        match buf.first() {
            Some(&RECORD_V1) => Ok(Dec {
                buf: &buf[1..],
                tree,
            }),
            Some(v) => Err(corrupt(tree, format!("unknown record version {v}"))),
            None => Err(corrupt(tree, "empty record".into())),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(corrupt(self.tree, "record too short".into()));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.take(N)?;
        <[u8; N]>::try_from(b).map_err(|_| corrupt(self.tree, "record too short".into()))
    }
    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }
    /// Reads a u32.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    /// Reads a u64.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    /// Reads an i64.
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.arr()?))
    }
    /// Reads a length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// Reads a fixed-size array.
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.arr()
    }
    /// The rest of the record.
    pub fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }
}

/// A record that only marks presence (orphans, openers, sesslocks).
pub fn marker() -> Vec<u8> {
    Enc::new().done()
}

// ---------------------------------------------------------------- records

/// An inode: the attributes plus what the tree structure needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// The inode number (the key; not stored in the value).
    pub ino: u64,
    /// File type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Number of names (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Length in bytes.
    pub size: u64,
    /// Access time, ns since the epoch.
    pub atime: i64,
    /// Modification time.
    pub mtime: i64,
    /// Status change time.
    pub ctime: i64,
    /// Creation time.
    pub crtime: i64,
    /// Bumped on every data change.
    pub data_version: u64,
    /// Directories: the parent directory (the root is its own parent).
    pub parent: u64,
    /// Directories: number of entries.
    pub children: u64,
    /// Symlinks: the target.
    pub target: Vec<u8>,
}

/// File type mask and types (Linux values).
pub mod mode {
    /// Type bits.
    pub const S_IFMT: u32 = 0o170_000;
    /// Directory.
    pub const S_IFDIR: u32 = 0o040_000;
    /// Regular file.
    pub const S_IFREG: u32 = 0o100_000;
    /// Symbolic link.
    pub const S_IFLNK: u32 = 0o120_000;
    /// FIFO.
    pub const S_IFIFO: u32 = 0o010_000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020_000;
    /// Block device.
    pub const S_IFBLK: u32 = 0o060_000;
    /// Socket.
    pub const S_IFSOCK: u32 = 0o140_000;
    /// Set-group-id bit.
    pub const S_ISGID: u32 = 0o2000;
    /// Permission bits settable by chmod.
    pub const PERM: u32 = 0o7777;
}

impl Inode {
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & mode::S_IFMT == mode::S_IFDIR
    }
    /// Whether this is a regular file.
    pub fn is_reg(&self) -> bool {
        self.mode & mode::S_IFMT == mode::S_IFREG
    }
    /// Whether this is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.mode & mode::S_IFMT == mode::S_IFLNK
    }

    /// Encodes the value (the ino is the key).
    pub fn encode(&self) -> Vec<u8> {
        Enc::new()
            .u32(self.mode)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.rdev)
            .u32(self.nlink)
            .u64(self.size)
            .i64(self.atime)
            .i64(self.mtime)
            .i64(self.ctime)
            .i64(self.crtime)
            .u64(self.data_version)
            .u64(self.parent)
            .u64(self.children)
            .bytes(&self.target)
            .done()
    }

    /// Decodes the value stored under `ino`.
    pub fn decode(ino: u64, v: &[u8]) -> Result<Inode> {
        let mut d = Dec::new(v, Tree::Inodes)?;
        Ok(Inode {
            ino,
            mode: d.u32()?,
            uid: d.u32()?,
            gid: d.u32()?,
            rdev: d.u32()?,
            nlink: d.u32()?,
            size: d.u64()?,
            atime: d.i64()?,
            mtime: d.i64()?,
            ctime: d.i64()?,
            crtime: d.i64()?,
            data_version: d.u64()?,
            parent: d.u64()?,
            children: d.u64()?,
            target: d.bytes()?,
        })
    }
}

/// A directory entry: the inode it names and its readdir cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dentry {
    /// The inode.
    pub ino: u64,
    /// Position in the directory's `dirorder`.
    pub cookie: u64,
}

impl Dentry {
    /// Encodes the value.
    pub fn encode(&self) -> Vec<u8> {
        Enc::new().u64(self.ino).u64(self.cookie).done()
    }
    /// Decodes the value.
    pub fn decode(v: &[u8]) -> Result<Dentry> {
        let mut d = Dec::new(v, Tree::Dentries)?;
        Ok(Dentry {
            ino: d.u64()?,
            cookie: d.u64()?,
        })
    }
}

/// One chunk of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// blake3 hash of the block.
    pub hash: [u8; 32],
    /// Bytes of the chunk that are file data.
    pub len: u32,
}

impl BlockEntry {
    /// Encodes the value.
    pub fn encode(&self) -> Vec<u8> {
        Enc::new().raw(&self.hash).u32(self.len).done()
    }
    /// Decodes the value.
    pub fn decode(v: &[u8]) -> Result<BlockEntry> {
        let mut d = Dec::new(v, Tree::Blocks)?;
        Ok(BlockEntry {
            hash: d.fixed()?,
            len: d.u32()?,
        })
    }
}

/// A set of node ids (block holders), sorted, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holders(pub Vec<u64>);

impl Holders {
    /// Adds nodes, keeping the set sorted.
    pub fn add(&mut self, nodes: &[u64]) {
        self.0.extend_from_slice(nodes);
        self.0.sort_unstable();
        self.0.dedup();
    }
    fn enc(&self, mut e: Enc) -> Enc {
        e = e.u32(u32::try_from(self.0.len()).unwrap_or(u32::MAX));
        for n in &self.0 {
            e = e.u64(*n);
        }
        e
    }
    fn dec(d: &mut Dec<'_>) -> Result<Holders> {
        let n = d.u32()?;
        let mut v = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            v.push(d.u64()?);
        }
        Ok(Holders(v))
    }
    /// Encodes a `gc` value.
    pub fn encode(&self) -> Vec<u8> {
        self.enc(Enc::new()).done()
    }
    /// Decodes a `gc` value.
    pub fn decode(v: &[u8]) -> Result<Holders> {
        Holders::dec(&mut Dec::new(v, Tree::Gc)?)
    }
}

/// Reference count and holders of a block hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockRef {
    /// Number of block entries naming the hash.
    pub refs: u64,
    /// Nodes known to hold the block.
    pub holders: Holders,
}

impl BlockRef {
    /// Encodes the value.
    pub fn encode(&self) -> Vec<u8> {
        self.holders.enc(Enc::new().u64(self.refs)).done()
    }
    /// Decodes the value.
    pub fn decode(v: &[u8]) -> Result<BlockRef> {
        let mut d = Dec::new(v, Tree::BlockRefs)?;
        Ok(BlockRef {
            refs: d.u64()?,
            holders: Holders::dec(&mut d)?,
        })
    }
}

/// A node's session: its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// The node the session belongs to.
    pub node: u64,
    /// Lease expiry, ms since the epoch.
    pub expires_ms: i64,
}

impl Session {
    /// Encodes the value.
    pub fn encode(&self) -> Vec<u8> {
        Enc::new().u64(self.node).i64(self.expires_ms).done()
    }
    /// Decodes the value.
    pub fn decode(v: &[u8]) -> Result<Session> {
        let mut d = Dec::new(v, Tree::Sessions)?;
        Ok(Session {
            node: d.u64()?,
            expires_ms: d.i64()?,
        })
    }
}

/// A node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The node's name (unique).
    pub name: String,
    /// Address of its services.
    pub addr: String,
    /// Block store capacity.
    pub capacity: u64,
    /// Block store free space.
    pub free: u64,
    /// Last register or heartbeat, ms since the epoch.
    pub last_heartbeat_ms: i64,
    /// The node's current session (0: none).
    pub session: u64,
}

impl Node {
    /// Encodes the value.
    pub fn encode(&self) -> Vec<u8> {
        Enc::new()
            .bytes(self.name.as_bytes())
            .bytes(self.addr.as_bytes())
            .u64(self.capacity)
            .u64(self.free)
            .i64(self.last_heartbeat_ms)
            .u64(self.session)
            .done()
    }
    /// Decodes the value.
    pub fn decode(v: &[u8]) -> Result<Node> {
        let mut d = Dec::new(v, Tree::Nodes)?;
        let text = |b: Vec<u8>| {
            String::from_utf8(b).map_err(|_| corrupt(Tree::Nodes, "name is not UTF-8".into()))
        };
        Ok(Node {
            name: text(d.bytes()?)?,
            addr: text(d.bytes()?)?,
            capacity: d.u64()?,
            free: d.u64()?,
            last_heartbeat_ms: d.i64()?,
            session: d.u64()?,
        })
    }
}

/// One granted lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRec {
    /// Holder: the session ...
    pub session: u64,
    /// ... and the kernel's lock owner within it.
    pub owner: u64,
    /// flock(2) lock (else fcntl byte range).
    pub flock: bool,
    /// F_RDLCK (0) or F_WRLCK (1).
    pub typ: u8,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// pid reported by F_GETLK.
    pub pid: u32,
    /// Handed over by a migration: `session` holds it for process `pid`,
    /// which takes it (becoming `owner`) with its first lock request.
    pub pending: bool,
}

/// Encodes a `locks` value.
pub fn encode_locks(locks: &[LockRec]) -> Vec<u8> {
    let mut e = Enc::new().u32(u32::try_from(locks.len()).unwrap_or(u32::MAX));
    for l in locks {
        e = e
            .u64(l.session)
            .u64(l.owner)
            .u8(u8::from(l.flock) | (u8::from(l.pending) << 1))
            .u8(l.typ)
            .u64(l.start)
            .u64(l.end)
            .u32(l.pid);
    }
    e.done()
}

/// Decodes a `locks` value.
pub fn decode_locks(v: &[u8]) -> Result<Vec<LockRec>> {
    let mut d = Dec::new(v, Tree::Locks)?;
    let n = d.u32()?;
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        let session = d.u64()?;
        let owner = d.u64()?;
        let bits = d.u8()?;
        out.push(LockRec {
            session,
            owner,
            flock: bits & 1 != 0,
            pending: bits & 2 != 0,
            typ: d.u8()?,
            start: d.u64()?,
            end: d.u64()?,
            pid: d.u32()?,
        });
    }
    Ok(out)
}

/// Cluster constants fixed when the database is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Chunk size of every file.
    pub block_size: u32,
    /// Copies of each block nodes should keep.
    pub replicas: u32,
}

impl Cluster {
    /// Encodes the value.
    pub fn encode(&self) -> Vec<u8> {
        Enc::new().u32(self.block_size).u32(self.replicas).done()
    }
    /// Decodes the value.
    pub fn decode(v: &[u8]) -> Result<Cluster> {
        let mut d = Dec::new(v, Tree::Meta)?;
        Ok(Cluster {
            block_size: d.u32()?,
            replicas: d.u32()?,
        })
    }
}

/// Encodes a u64 record (counters, node ids, open counts).
pub fn encode_u64(v: u64) -> Vec<u8> {
    Enc::new().u64(v).done()
}

/// Decodes a u64 record.
pub fn decode_u64(v: &[u8], tree: Tree) -> Result<u64> {
    Dec::new(v, tree)?.u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_unknown_versions() {
        let ino = Inode {
            ino: 7,
            mode: 0o120_777,
            uid: 1,
            gid: 2,
            rdev: 3,
            nlink: 1,
            size: 4,
            atime: -5,
            mtime: 6,
            ctime: 7,
            crtime: 8,
            data_version: 9,
            parent: 0,
            children: 0,
            target: b"/x/y".to_vec(),
        };
        assert_eq!(Inode::decode(7, &ino.encode()).unwrap(), ino);
        let mut bad = ino.encode();
        bad[0] = 9;
        assert!(matches!(
            Inode::decode(7, &bad),
            Err(MetaError::Corrupt { .. })
        ));
        assert!(Inode::decode(7, &ino.encode()[..20]).is_err());
        let r = BlockRef {
            refs: 3,
            holders: Holders(vec![1, 5]),
        };
        assert_eq!(BlockRef::decode(&r.encode()).unwrap(), r);
        let l = LockRec {
            session: 1,
            owner: 2,
            flock: true,
            typ: 1,
            start: 0,
            end: u64::MAX,
            pid: 9,
            pending: false,
        };
        let p = LockRec {
            pending: true,
            flock: false,
            ..l
        };
        assert_eq!(decode_locks(&encode_locks(&[l, p])).unwrap(), vec![l, p]);
    }

    #[test]
    fn keys_sort_numerically() {
        assert!(k2(1, 300) < k2(2, 0));
        assert!(k_name(1, b"zzz") < k_name(2, b""));
        assert_eq!(key_pair(&k2(5, 6), Tree::Blocks).unwrap(), (5, 6));
        assert_eq!(prefix_range(u64::MAX).1, None);
    }
}
