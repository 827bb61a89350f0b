//! `migfs checkpoint --check`: can this process be moved, and if not,
//! which resources stop it. Reads /proc only and changes nothing; the
//! checkpoint runs the same analysis before it freezes anything, and again
//! on the frozen process.

use std::fs::Metadata;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::unistd::Pid;

use crate::error::FreezeError;
use crate::sys::procfs::{self, MapEntry, Mount};

/// The filesystem type of a migfs mount in mountinfo.
pub const MIGFS_FSTYPE: &str = "fuse.migfs";

/// Character devices a process may hold: reopened by path.
const PLAIN_DEVICES: [(u64, u64, &str); 5] = [
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

/// What an open descriptor is, when it can be moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Movable {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// One of [`PLAIN_DEVICES`].
    PlainDevice,
}

/// Every resource of `pid` that stops a move, one line each (empty: the
/// process can be moved).
pub fn check(pid: Pid) -> Result<Vec<String>, FreezeError> {
    check_allowing(pid, &[])
}

/// [`check`], where the pipes with inode numbers in `relay_pipes` (a
/// migration agent's stdin relay) do not stop the move.
pub fn check_allowing(pid: Pid, relay_pipes: &[u64]) -> Result<Vec<String>, FreezeError> {
    check_with(pid, relay_pipes, None)
}

/// VmFlags of each mapping by start address (`/proc/PID/smaps`).
pub type VmFlags = std::collections::HashMap<u64, Vec<String>>;

/// [`check_allowing`] with the mappings' flags already read (reading
/// smaps walks every page table: a capture reads it once).
pub fn check_with(
    pid: Pid,
    relay_pipes: &[u64],
    flags: Option<&VmFlags>,
) -> Result<Vec<String>, FreezeError> {
    let p = pid.as_raw();
    let inspect = |what: &str| {
        let what = what.to_owned();
        move |source| FreezeError::Inspect {
            pid: p,
            what,
            source,
        }
    };
    let status = procfs::status(&p.to_string()).map_err(|_| FreezeError::NoProcess { pid: p })?;
    if status
        .get("State")
        .is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
    {
        return Err(FreezeError::NoProcess { pid: p });
    }
    let mut out = Vec::new();
    process_level(pid, &status, &mut out);
    if !out.is_empty() && !status.contains_key("VmSize") {
        return Ok(out);
    }
    threads(pid, &mut out).map_err(inspect("threads"))?;
    let mounts = procfs::mountinfo(pid).map_err(inspect("mountinfo"))?;
    fds(pid, &mounts, relay_pipes, &mut out).map_err(inspect("descriptors"))?;
    mappings(pid, &mounts, flags, &mut out).map_err(inspect("maps"))?;
    Ok(out)
}

fn process_level(
    pid: Pid,
    status: &std::collections::HashMap<String, String>,
    out: &mut Vec<String>,
) {
    if status.get("VmSize").is_none() {
        out.push("it is a kernel thread (no address space)".into());
        return;
    }
    if pid == nix::unistd::getpid() {
        out.push("it is the checkpointing process itself".into());
    }
    if let Some(mode) = status.get("Seccomp").filter(|m| m.as_str() != "0") {
        out.push(format!("seccomp filter (mode {mode}) is not supported"));
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    if ns(&pid.to_string()) != ns("self") {
        out.push(
            "it lives in another PID namespace: run the checkpoint inside it (migfs cluster exec)"
                .into(),
        );
    }
    match std::fs::read_link(format!("/proc/{pid}/root")) {
        Ok(r) if r.as_os_str() != "/" => {
            out.push(format!("its root directory is {} (chroot)", r.display()))
        }
        _ => {}
    }
    if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/timers")) {
        for id in t.lines().filter_map(|l| l.strip_prefix("ID: ")) {
            out.push(format!("POSIX timer {id} (timer_create) is not supported"));
        }
    }
}

/// `SCHED_RESET_ON_FORK`, or'ed into a policy.
const SCHED_RESET_ON_FORK: i32 = 0x4000_0000;

fn threads(pid: Pid, out: &mut Vec<String>) -> std::io::Result<()> {
    // The tracer may be any thread of ours (the agent freezes on a thread
    // of its own).
    let ours = procfs::tasks(nix::unistd::getpid()).unwrap_or_default();
    let me = |t: &str| t.parse().is_ok_and(|t| ours.contains(&Pid::from_raw(t)));
    for tid in procfs::tasks(pid)? {
        let Ok(st) = procfs::status(&format!("{pid}/task/{tid}")) else {
            continue;
        };
        if let Some(tracer) = st.get("TracerPid").filter(|t| t.as_str() != "0" && !me(t)) {
            out.push(format!("thread {tid} is ptraced by {tracer}"));
        }
        // Its runtime, deadline and period are not captured.
        if crate::sys::task::sched(tid).is_ok_and(|s| s.policy & !SCHED_RESET_ON_FORK == 6) {
            out.push(format!(
                "thread {tid} runs under SCHED_DEADLINE, which is not supported"
            ));
        }
        // Processes move one at a time: a child would stay behind and the
        // moved parent could no longer wait for it.
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"));
        for child in children.unwrap_or_default().split_whitespace() {
            out.push(format!("child process {child} would not move with it"));
        }
    }
    Ok(())
}

fn fds(
    pid: Pid,
    mounts: &[Mount],
    relay_pipes: &[u64],
    out: &mut Vec<String>,
) -> std::io::Result<()> {
    for fd in procfs::numeric_dir(&format!("/proc/{pid}/fd"))? {
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")) else {
            out.push(format!("fd {fd}: {link} cannot be inspected"));
            continue;
        };
        if meta.file_type().is_fifo() && relay_pipes.contains(&meta.ino()) {
            continue;
        }
        let mnt = procfs::fdinfo(pid, fd).map(|i| i.mnt_id).unwrap_or(0);
        if let Err(why) = classify_fd(pid, &link, &meta, on_migfs(mounts, mnt)) {
            out.push(format!("fd {fd}: {why}"));
        }
    }
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) if cwd.to_string_lossy().ends_with(" (deleted)") => {
            out.push(format!(
                "its working directory {} was deleted",
                cwd.display()
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Whether mount `mnt_id` is a migfs mount.
pub fn on_migfs(mounts: &[Mount], mnt_id: u64) -> Option<&Mount> {
    mounts
        .iter()
        .find(|m| m.id == mnt_id && m.fstype == MIGFS_FSTYPE)
}

/// Decides whether the descriptor whose /proc link is `link` and whose
/// target is `meta` can be moved; if not, says what it is.
pub fn classify_fd(
    pid: Pid,
    link: &str,
    meta: &Metadata,
    migfs: Option<&Mount>,
) -> Result<Movable, String> {
    let ft = meta.file_type();
    if ft.is_socket() {
        return Err(describe_socket(pid, meta.ino()));
    }
    if ft.is_fifo() {
        return Err(if link.starts_with("pipe:") {
            format!("pipe {link}")
        } else {
            format!("FIFO {link}")
        });
    }
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        let kind = kind.trim_matches(|c| c == '[' || c == ']');
        return Err(match kind {
            "io_uring" => "io_uring instance".to_owned(),
            k => format!("{k} descriptor (anon inode) is not supported"),
        });
    }
    if link.starts_with("/memfd:") {
        return Err(format!("memfd {link}"));
    }
    if ft.is_char_device() || ft.is_block_device() {
        let (maj, min) = (
            libc::major(meta.rdev()) as u64,
            libc::minor(meta.rdev()) as u64,
        );
        if ft.is_char_device() && PLAIN_DEVICES.iter().any(|&(a, b, _)| (a, b) == (maj, min)) {
            return Ok(Movable::PlainDevice);
        }
        let t = if ft.is_char_device() { "char" } else { "block" };
        return Err(format!("device {link} ({t} {maj}:{min})"));
    }
    if link.ends_with(" (deleted)") && migfs.is_none() {
        return Err(format!("{link}: the file was deleted and is not on migfs"));
    }
    if ft.is_dir() {
        return Ok(Movable::Directory);
    }
    if ft.is_file() {
        return Ok(Movable::Regular);
    }
    Err(format!("{link}: unsupported file type"))
}

fn mappings(
    pid: Pid,
    mounts: &[Mount],
    flags: Option<&VmFlags>,
    out: &mut Vec<String>,
) -> std::io::Result<()> {
    let read;
    let flags = match flags {
        Some(f) => f,
        None => {
            read = procfs::vm_flags(pid)?;
            &read
        }
    };
    for m in procfs::maps(pid)? {
        let range = format!("mapping {:x}-{:x}", m.start, m.end);
        if let Some(why) = mapping_blocker(&m, mounts) {
            out.push(format!("{range}: {why}"));
        } else if flags
            .get(&m.start)
            .is_some_and(|f| f.iter().any(|x| x == "ht"))
        {
            out.push(format!("{range}: hugetlbfs pages are not supported"));
        }
    }
    Ok(())
}

/// Why a mapping cannot be moved, if it cannot.
pub fn mapping_blocker(m: &MapEntry, mounts: &[Mount]) -> Option<String> {
    let (path, deleted) = m.file_path();
    if m.inode == 0 || path.starts_with('[') {
        return (path == "[uprobes]").then(|| "uprobes are attached".to_owned());
    }
    if path.starts_with("/SYSV") {
        return Some("System V shared memory".into());
    }
    if path.starts_with("/memfd:") {
        return Some(format!("memfd {path}"));
    }
    if path == "/dev/zero" && deleted {
        return None; // shared anonymous memory
    }
    if path.starts_with("/dev/") {
        return Some(format!("device {path}"));
    }
    if path.starts_with("/dev/shm/") && m.shared {
        return None;
    }
    let migfs = mounts
        .iter()
        .any(|mt| mt.dev == (m.major, m.minor) && mt.fstype == MIGFS_FSTYPE);
    (deleted && !migfs).then(|| format!("{path} was deleted and is not on migfs"))
}

/// A one-line description of socket inode `ino` from the process's
/// network namespace tables.
fn describe_socket(pid: Pid, ino: u64) -> String {
    let ino_s = ino.to_string();
    for (file, proto) in [
        ("tcp", "TCP"),
        ("tcp6", "TCP"),
        ("udp", "UDP"),
        ("udp6", "UDP"),
    ] {
        let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(9) != Some(&ino_s.as_str()) {
                continue;
            }
            let local = inet_addr(f.get(1).unwrap_or(&""));
            let remote = inet_addr(f.get(2).unwrap_or(&""));
            return match (proto, f.get(3).copied()) {
                ("TCP", Some("0A")) => format!("TCP listening socket {local}"),
                (_, _) if remote.ends_with(":0") => format!("{proto} socket {local}"),
                _ => format!("{proto} socket {local} -> {remote}"),
            };
        }
    }
    if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) {
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(6) == Some(&ino_s.as_str()) {
                return match f.get(7) {
                    Some(p) => format!("Unix socket {p}"),
                    None => "Unix socket (unnamed)".into(),
                };
            }
        }
    }
    format!("socket socket:[{ino}]")
}

/// `0100007F:1F90` → `127.0.0.1:8080`; 32 hex digits for IPv6.
fn inet_addr(hex: &str) -> String {
    let Some((addr, port)) = hex.split_once(':') else {
        return hex.to_owned();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    let words: Vec<u32> = (0..addr.len() / 8)
        .filter_map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok())
        .collect();
    match words.as_slice() {
        [w] => format!("{}:{port}", Ipv4Addr::from(w.to_le_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            format!("[{}]:{port}", Ipv6Addr::from(bytes))
        }
        _ => hex.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_inet_addresses() {
        assert_eq!(inet_addr("0100007F:9C40"), "127.0.0.1:40000");
        assert_eq!(
            inet_addr("00000000000000000000000001000000:1F90"),
            "[::1]:8080"
        );
    }

    #[test]
    fn names_blocking_mappings() {
        let m = |l: &str| MapEntry::parse(l).unwrap();
        assert_eq!(
            mapping_blocker(&m("1000-2000 rw-s 0 00:01 5 /SYSV00000000 (deleted)"), &[]).as_deref(),
            Some("System V shared memory")
        );
        assert_eq!(
            mapping_blocker(&m("1000-2000 rw-s 0 00:01 5 /dev/zero (deleted)"), &[]),
            None
        );
        assert_eq!(
            mapping_blocker(&m("1000-2000 rw-s 0 00:06 5 /dev/dri/card0"), &[]).as_deref(),
            Some("device /dev/dri/card0")
        );
        assert_eq!(
            mapping_blocker(&m("1000-2000 r--p 0 08:01 5 /tmp/x.so (deleted)"), &[]).as_deref(),
            Some("/tmp/x.so was deleted and is not on migfs")
        );
        let migfs = Mount {
            id: 1,
            mountpoint: "/migfs".into(),
            fstype: MIGFS_FSTYPE.into(),
            dev: (0, 0x30),
        };
        assert_eq!(
            mapping_blocker(&m("1000-2000 r--p 0 00:30 5 /migfs/x (deleted)"), &[migfs]),
            None
        );
        assert_eq!(
            mapping_blocker(&m("1000-2000 r--p 0 00:00 0 [uprobes]"), &[]).as_deref(),
            Some("uprobes are attached")
        );
    }

    #[test]
    fn this_process_with_a_pipe_is_refused() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let blockers = check(nix::unistd::getpid()).unwrap();
        use std::os::fd::AsRawFd;
        let fd = r.as_raw_fd();
        assert!(
            blockers
                .iter()
                .any(|b| b.starts_with(&format!("fd {fd}: pipe pipe:["))),
            "{blockers:?}"
        );
        assert!(
            blockers
                .iter()
                .any(|b| b == "it is the checkpointing process itself"),
            "{blockers:?}"
        );
    }
}
