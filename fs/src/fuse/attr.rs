//! Wire attributes → kernel attributes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use migfs_proto::meta::Attr;

/// `st_blksize` reported to programs (buffered I/O sizes itself on it).
pub const BLKSIZE: u32 = 65536;

/// A time in nanoseconds since the epoch (negative before it).
pub fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Nanoseconds since the epoch of a time.
pub fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// The file type of a mode's S_IFMT bits.
pub fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The kernel's view of an inode.
pub fn to_file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time_of(a.atime_ns),
        mtime: time_of(a.mtime_ns),
        ctime: time_of(a.ctime_ns),
        crtime: time_of(a.crtime_ns),
        kind: kind_of(a.mode),
        perm: u16::try_from(a.mode & 0o7777).unwrap_or(0),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Whether the attributes describe a directory.
pub fn is_dir(a: &Attr) -> bool {
    a.mode & libc::S_IFMT == libc::S_IFDIR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_both_sides_of_the_epoch() {
        for ns in [0, 1, 1_700_000_000_123_456_789, -5_000_000_001] {
            assert_eq!(ns_of(time_of(ns)), ns);
        }
    }

    #[test]
    fn mode_maps_to_kind_and_perm() {
        let a = Attr {
            ino: 5,
            mode: libc::S_IFDIR | 0o2755,
            size: 1000,
            ..Attr::default()
        };
        let f = to_file_attr(&a);
        assert_eq!(f.kind, FileType::Directory);
        assert_eq!(f.perm, 0o2755);
        assert_eq!(f.blocks, 2);
    }
}
