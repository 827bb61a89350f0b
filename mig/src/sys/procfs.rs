//! Parsing `/proc/PID/...`: maps, smaps VmFlags, status, stat, fd and
//! fdinfo, mountinfo, pagemap. Plain reads; no unsafe.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::unistd::Pid;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `r`, `w`, `x` as PROT_* bits.
    pub prot: u32,
    /// `s` rather than `p`.
    pub shared: bool,
    /// File offset.
    pub offset: u64,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Inode number (0 for anonymous).
    pub inode: u64,
    /// Path or pseudo name (`[heap]`), may end in ` (deleted)`.
    pub path: String,
}

impl MapEntry {
    /// Parses one maps line.
    pub fn parse(line: &str) -> Option<MapEntry> {
        let mut rest = line;
        let mut field = || {
            let t = rest.trim_start();
            let end = t.find(' ').unwrap_or(t.len());
            let (f, r) = t.split_at(end);
            rest = r;
            f
        };
        let range = field();
        let perms = field().as_bytes().to_vec();
        let offset = u64::from_str_radix(field(), 16).ok()?;
        let dev = field();
        let inode = field().parse().ok()?;
        let (start, end) = range.split_once('-')?;
        let (major, minor) = dev.split_once(':')?;
        let mut prot = 0;
        for (i, bit) in [
            (0, libc::PROT_READ),
            (1, libc::PROT_WRITE),
            (2, libc::PROT_EXEC),
        ] {
            if perms.get(i).is_some_and(|&c| c != b'-') {
                prot |= bit.cast_unsigned();
            }
        }
        Some(MapEntry {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            prot,
            shared: perms.get(3) == Some(&b's'),
            offset,
            major: u32::from_str_radix(major, 16).ok()?,
            minor: u32::from_str_radix(minor, 16).ok()?,
            inode,
            path: rest.trim_start().to_owned(),
        })
    }

    /// The path without a ` (deleted)` suffix, and whether it had one.
    pub fn file_path(&self) -> (&str, bool) {
        match self.path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (&self.path, false),
        }
    }
}

/// `/proc/PID/maps`.
pub fn maps(pid: Pid) -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    text.lines()
        .map(|l| MapEntry::parse(l).ok_or_else(|| bad(format!("bad maps line {l:?}"))))
        .collect()
}

/// `VmFlags` of every VMA in `/proc/PID/smaps`, keyed by start address.
pub fn vm_flags(pid: Pid) -> io::Result<HashMap<u64, Vec<String>>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut out = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.take() {
                out.insert(start, flags.split_whitespace().map(str::to_owned).collect());
            }
        } else if let Some(e) = line
            .split_once(' ')
            .and_then(|(r, _)| r.split_once('-'))
            .filter(|(_, e)| {
                // A VMA header starts with "start-end " in hex.
                !e.is_empty() && e.bytes().all(|b| b.is_ascii_hexdigit())
            })
        {
            current = u64::from_str_radix(e.0, 16).ok();
        }
    }
    Ok(out)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `/proc/<path>/status` as key → value (value trimmed).
pub fn status(path: &str) -> io::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/{path}/status"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// The fields of `/proc/PID/stat` after the command name; index 0 is
/// field 3 (state) of proc(5).
pub fn stat_fields(pid: Pid) -> io::Result<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| bad("bad stat".into()))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat` as a number.
pub fn stat_field(fields: &[String], n: usize) -> io::Result<u64> {
    fields
        .get(n - 3)
        .and_then(|f| f.parse::<i64>().ok())
        .map(i64::cast_unsigned)
        .ok_or_else(|| bad(format!("stat field {n} missing")))
}

/// Numeric entries of a /proc directory (`task`, `fd`), sorted.
pub fn numeric_dir(path: &str) -> io::Result<Vec<i32>> {
    let mut out: Vec<i32> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// The threads of `pid`.
pub fn tasks(pid: Pid) -> io::Result<Vec<Pid>> {
    Ok(numeric_dir(&format!("/proc/{pid}/task"))?
        .into_iter()
        .map(Pid::from_raw)
        .collect())
}

/// One `lock:` line of fdinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockLine {
    /// `POSIX`, `FLOCK`, `OFDLCK`, `LEASE`, ...
    pub class: String,
    /// `WRITE` lock (else read).
    pub write: bool,
    /// Owner pid the kernel shows.
    pub pid: i64,
    /// First byte.
    pub start: u64,
    /// Last byte, or `None` for EOF.
    pub end: Option<u64>,
}

/// `/proc/PID/fdinfo/FD`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// File position.
    pub pos: u64,
    /// Open flags (with O_CLOEXEC), from the octal `flags:` line.
    pub flags: u32,
    /// Mount id.
    pub mnt_id: u64,
    /// Locks held through this descriptor.
    pub locks: Vec<LockLine>,
    /// Any other `key: value` lines (eventfd-count, tfd, ...).
    pub other: Vec<(String, String)>,
}

impl FdInfo {
    /// Parses an fdinfo text.
    pub fn parse(text: &str) -> FdInfo {
        let mut info = FdInfo::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k {
                "pos" => info.pos = v.parse().unwrap_or(0),
                "flags" => info.flags = u32::from_str_radix(v, 8).unwrap_or(0),
                "mnt_id" => info.mnt_id = v.parse().unwrap_or(0),
                "lock" => info.locks.extend(parse_lock(v)),
                _ => info.other.push((k.to_owned(), v.to_owned())),
            }
        }
        info
    }
}

/// `1: POSIX  ADVISORY  WRITE 1234 08:02:5678 0 EOF`
fn parse_lock(v: &str) -> Option<LockLine> {
    let f: Vec<&str> = v.split_whitespace().collect();
    let mut i = 1;
    let class = f.get(i)?.to_string();
    i += 1;
    if f.get(i) == Some(&"->") {
        i += 1;
    }
    let write = *f.get(i + 1)? == "WRITE";
    let pid = f.get(i + 2)?.parse().unwrap_or(-1);
    let start = f.get(i + 4)?.parse().ok()?;
    let end = match *f.get(i + 5)? {
        "EOF" => None,
        n => Some(n.parse().ok()?),
    };
    Some(LockLine {
        class,
        write,
        pid,
        start,
        end,
    })
}

/// `/proc/PID/fdinfo/FD`.
pub fn fdinfo(pid: Pid, fd: i32) -> io::Result<FdInfo> {
    Ok(FdInfo::parse(&std::fs::read_to_string(format!(
        "/proc/{pid}/fdinfo/{fd}"
    ))?))
}

/// One line of `/proc/PID/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Mount id.
    pub id: u64,
    /// Where it is mounted.
    pub mountpoint: String,
    /// Filesystem type (`fuse.migfs`, `ext4`, ...).
    pub fstype: String,
    /// The filesystem's device (major, minor), as `st_dev` shows it.
    pub dev: (u32, u32),
}

/// `/proc/PID/mountinfo`.
pub fn mountinfo(pid: Pid) -> io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f.iter().position(|&x| x == "-")?;
            let (major, minor) = f.get(2)?.split_once(':')?;
            Some(Mount {
                id: f.first()?.parse().ok()?,
                dev: (major.parse().ok()?, minor.parse().ok()?),
                mountpoint: unescape(f.get(4)?),
                fstype: f.get(sep + 1)?.to_string(),
            })
        })
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/proc/PID/pagemap`, read in page-entry units.
pub struct Pagemap(File);

/// pagemap bit 63: page present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// pagemap bit 62: page swapped.
pub const PM_SWAP: u64 = 1 << 62;
/// pagemap bit 61: file page or shared anonymous page.
pub const PM_FILE: u64 = 1 << 61;
/// pagemap bit 58: guard region (6.15).
pub const PM_GUARD: u64 = 1 << 58;

/// Whether a pagemap entry is a pte marker (the userfaultfd write-protect
/// marker of a never-populated page, a guard), not a swapped page: swap
/// type 31 (`SWP_PTE_MARKER`, the last of the 5-bit types). Only visible
/// with CAP_SYS_ADMIN (the swap type is in the frame bits).
pub fn is_pte_marker(entry: u64) -> bool {
    entry & PM_SWAP != 0 && entry & 0x1f == 0x1f
}

impl Pagemap {
    /// Opens `/proc/PID/pagemap`.
    pub fn open(pid: Pid) -> io::Result<Pagemap> {
        Ok(Pagemap(File::open(format!("/proc/{pid}/pagemap"))?))
    }

    /// The entries for `[start, end)`.
    pub fn entries(&self, start: u64, end: u64, page: u64) -> io::Result<Vec<u64>> {
        let n = usize::try_from((end - start) / page).map_err(|_| bad("range too large".into()))?;
        let mut raw = vec![0u8; n * 8];
        self.0.read_exact_at(&mut raw, start / page * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let e =
            MapEntry::parse("7f12a000-7f12c000 rw-s 00001000 fd:01 1234      /tmp/a b (deleted)")
                .unwrap();
        assert_eq!(
            (e.start, e.end, e.offset, e.inode),
            (0x7f12a000, 0x7f12c000, 0x1000, 1234)
        );
        assert_eq!(e.prot, (libc::PROT_READ | libc::PROT_WRITE) as u32);
        assert!(e.shared);
        assert_eq!((e.major, e.minor), (0xfd, 1));
        assert_eq!(e.file_path(), ("/tmp/a b", true));
        let v = MapEntry::parse(
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
        )
        .unwrap();
        assert_eq!(v.path, "[vsyscall]");
        let a = MapEntry::parse("7ffd1000-7ffd2000 ---p 00000000 00:00 0 ").unwrap();
        assert_eq!((a.prot, a.path.as_str()), (0, ""));
    }

    #[test]
    fn parses_fdinfo_with_locks() {
        let t = "pos:\t42\nflags:\t02102001\nmnt_id:\t25\nino:\t77\nlock:\t1: POSIX  ADVISORY  WRITE 4242 08:02:77 0 EOF\nlock:\t2: FLOCK  ADVISORY  READ 4242 08:02:77 10 19\n";
        let i = FdInfo::parse(t);
        assert_eq!((i.pos, i.flags, i.mnt_id), (42, 0o2102001, 25));
        assert_eq!(i.locks.len(), 2);
        assert_eq!(
            i.locks[0],
            LockLine {
                class: "POSIX".into(),
                write: true,
                pid: 4242,
                start: 0,
                end: None
            }
        );
        assert_eq!(
            i.locks[1],
            LockLine {
                class: "FLOCK".into(),
                write: false,
                pid: 4242,
                start: 10,
                end: Some(19)
            }
        );
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
