//! Processes the testbed recorded: a PID plus its start time, so a PID the
//! kernel has since given to an unrelated process is never signalled.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::sys;

/// One process as seen from the host: its PID and the start time
/// (`/proc/PID/stat` field 22, clock ticks since boot) that tells it apart
/// from a later process with the same PID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    /// PID in the host's PID namespace.
    pub pid: i32,
    /// Start time in clock ticks after boot.
    pub start: u64,
}

/// The fields of `/proc/PID/stat` the testbed uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// One-letter state: R, S, D, Z, X, ...
    pub state: char,
    /// Parent PID.
    pub ppid: i32,
    /// Start time in clock ticks after boot.
    pub start: u64,
}

/// Parses a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so parsing starts after its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), so field N is f[N - 3].
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// Reads `/proc/PID/stat` of the host's /proc.
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

impl ProcRef {
    /// Records the process now holding `pid`.
    pub fn of(pid: i32) -> Option<ProcRef> {
        stat(pid).map(|s| ProcRef {
            pid,
            start: s.start,
        })
    }

    /// Whether this very process still runs (exists, same start time, not
    /// a zombie).
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start == self.start && !matches!(s.state, 'Z' | 'X'))
    }

    /// Sends SIGKILL if this very process still runs. The PID is pinned
    /// with a pidfd before the start time is compared, so the signal cannot
    /// reach a process that took the PID in between. Returns whether a
    /// signal was sent.
    pub fn kill(&self) -> std::io::Result<bool> {
        let fd = match sys::pidfd_open(self.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !self.is_alive() {
            return Ok(false);
        }
        match sys::pidfd_send_signal(fd.as_fd(), Signal::SIGKILL) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until the process is gone (or a zombie); false on timeout.
    pub fn wait_dead(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// The PID this process has in its own (innermost) PID namespace.
    pub fn ns_pid(&self) -> Option<i32> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        ns_pids(&status)?.last().copied()
    }
}

/// The `NSpid:` line of `/proc/PID/status`: the PID in each namespace from
/// the reader's down to the process's own.
pub fn ns_pids(status: &str) -> Option<Vec<i32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// The identity of a namespace (the target of a `/proc/PID/ns/*` link,
/// e.g. `pid:[4026532301]`).
pub fn ns_id(pid: i32, kind: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// Finds the host PID of the process that has PID `ns_pid` inside the PID
/// namespace `pid_ns` (as [`ns_id`] names it).
pub fn host_pid_of(pid_ns: &str, ns_pid: i32) -> Option<i32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            ns_id(pid, "pid").as_deref() == Some(pid_ns)
                && std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| ns_pids(&s))
                    .and_then(|v| v.last().copied())
                    == Some(ns_pid)
        })
}

/// Processes of the cluster in `dir` found by their command line, for
/// `down` to catch what `cluster.json` may miss (a crash of `up` between
/// starting a process and recording it): a metadata server with
/// `--db DIR/meta/db`, or a node's init, `cluster --dir DIR init-ns`.
/// Node daemons need no search: they die with their init.
pub fn strays(dir: &Path) -> Vec<ProcRef> {
    let db = dir.join("meta").join("db");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            is_ours(&args, dir, &db)
        })
        .filter_map(ProcRef::of)
        .collect()
}

fn is_ours(args: &[&[u8]], dir: &Path, db: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (dir, db) = (dir.as_os_str().as_bytes(), db.as_os_str().as_bytes());
    let has = |pat: &[&[u8]]| args.windows(pat.len()).any(|w| w == pat);
    (args.get(1) == Some(&&b"meta"[..]) && has(&[b"--db", db]))
        || (args.get(1) == Some(&&b"cluster"[..]) && has(&[b"--dir", dir, b"init-ns"]))
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read(path) else {
        return format!("(no log at {})", path.display());
    };
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_names_with_spaces_and_parens() {
        let line = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                ppid: 1,
                start: 987654
            }
        );
    }

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        let me = ProcRef::of(std::process::id().try_into().unwrap()).unwrap();
        assert!(me.is_alive());
        let other = ProcRef {
            start: me.start + 1,
            ..me
        };
        assert!(
            !other.is_alive(),
            "a different start time is a different process"
        );
        assert!(
            !other.kill().unwrap(),
            "must not signal a process with another start time"
        );
    }

    #[test]
    fn strays_are_recognised_by_their_exact_command_line() {
        let dir = Path::new("/tmp/c");
        let db = dir.join("meta/db");
        let ours = |line: &str| {
            is_ours(
                &line.split(' ').map(str::as_bytes).collect::<Vec<_>>(),
                dir,
                &db,
            )
        };
        assert!(ours(
            "/bin/migfs meta --db /tmp/c/meta/db --listen 127.0.0.10:1"
        ));
        assert!(ours(
            "/bin/migfs cluster --dir /tmp/c init-ns --name n1 --mount /migfs"
        ));
        assert!(
            !ours("/bin/migfs meta --db /tmp/c2/meta/db"),
            "another cluster's"
        );
        assert!(!ours("/bin/migfs cluster --dir /tmp/c status"));
        assert!(
            !ours("vi /tmp/c/meta/db --db /tmp/c/meta/db"),
            "not a migfs meta"
        );
    }

    #[test]
    fn nspid_line_is_parsed() {
        let status = "Name:\tsleep\nNSpid:\t4242\t7\nNSsid:\t1\n";
        assert_eq!(ns_pids(status), Some(vec![4242, 7]));
    }

    #[test]
    fn host_pid_of_finds_this_process_in_its_own_namespace() {
        let me: i32 = std::process::id().try_into().unwrap();
        let ns = ns_id(me, "pid").unwrap();
        let inner = ProcRef::of(me).unwrap().ns_pid().unwrap();
        assert_eq!(host_pid_of(&ns, inner), Some(me));
    }
}
