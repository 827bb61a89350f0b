//! VmFlags of a process's mappings without walking its page tables in the
//! downtime.
//!
//! VmFlags (dontfork, wipeonfork, locked, hugepage hints, ...) are only in
//! `/proc/PID/smaps`, and reading smaps walks every page table of the
//! process to count its pages: ~20 ms for 4 GiB of touched memory here,
//! growing with memory. A move reads them while the process still runs
//! ([`FlagsSnapshot::take`]); once it is frozen, `/proc/PID/maps` (no walk)
//! tells whether the mappings are still those of the snapshot, and only
//! if not is smaps read again ([`FlagsSnapshot::for_frozen`]). A flag set
//! on a whole mapping in between (`madvise`, `mlock` of exactly one
//! mapping) does not show in maps, so the caller reads smaps of the frozen
//! process again while the image travels ([`FlagsSnapshot::verify`]) and
//! fails the move before its commit if they differ.

use std::collections::HashMap;

use nix::unistd::Pid;

use crate::check::VmFlags;

/// The mappings and their VmFlags as one smaps read saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlagsSnapshot {
    pid: Pid,
    /// The smaps header lines: exactly the text of `/proc/PID/maps` then.
    maps: String,
    flags: VmFlags,
}

impl FlagsSnapshot {
    /// Reads `/proc/PID/smaps` of `pid` (running or not).
    pub fn take(pid: Pid) -> std::io::Result<FlagsSnapshot> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
        Ok(parse(pid, &text))
    }

    /// The VmFlags of frozen `pid`: the snapshot's when its mappings are
    /// unchanged (`true`: then [`FlagsSnapshot::verify`] must follow), else
    /// read again now (`false`).
    pub fn for_frozen(&self, pid: Pid) -> std::io::Result<(VmFlags, bool)> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        if pid == self.pid && maps == self.maps {
            return Ok((self.flags.clone(), true));
        }
        Ok((FlagsSnapshot::take(pid)?.flags, false))
    }

    /// Reads smaps of the frozen process again: `None` if the flags are the
    /// snapshot's, else the first mapping whose flags changed.
    pub fn verify(&self) -> std::io::Result<Option<String>> {
        let now = FlagsSnapshot::take(self.pid)?;
        Ok(differs(self, &now))
    }
}

fn differs(before: &FlagsSnapshot, now: &FlagsSnapshot) -> Option<String> {
    if now.maps != before.maps {
        return Some("the mappings changed".into());
    }
    let mut starts: Vec<&u64> = before.flags.keys().chain(now.flags.keys()).collect();
    starts.sort_unstable();
    starts.dedup();
    starts.into_iter().find_map(|s| {
        let (a, b) = (before.flags.get(s), now.flags.get(s));
        (a != b).then(|| {
            format!(
                "mapping at {s:#x}: VmFlags {} became {}",
                a.map_or(String::new(), |f| f.join(" ")),
                b.map_or(String::new(), |f| f.join(" "))
            )
        })
    })
}

/// A smaps text as a snapshot: header lines ("start-end perms ...") make
/// up the maps text, each mapping's `VmFlags:` line its flags.
fn parse(pid: Pid, text: &str) -> FlagsSnapshot {
    let mut maps = String::new();
    let mut flags = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.take() {
                flags.insert(start, f.split_whitespace().map(str::to_owned).collect());
            }
        } else if let Some(start) = header_start(line) {
            maps.push_str(line);
            maps.push('\n');
            current = Some(start);
        }
    }
    FlagsSnapshot { pid, maps, flags }
}

/// The start address of a mapping's header line ("start-end perms ...").
fn header_start(line: &str) -> Option<u64> {
    let (range, _) = line.split_once(' ')?;
    let (s, e) = range.split_once('-')?;
    let hex = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(s) && hex(e)).then(|| u64::from_str_radix(s, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                   8 kB
VmFlags: rd wr mr mw me ac
7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]
Size:                  4 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn headers_make_the_maps_text_and_flags_go_by_start() {
        let s = parse(Pid::from_raw(1), SMAPS);
        assert_eq!(s.maps.lines().count(), 2);
        assert!(s.maps.starts_with("55d0c0000000-55d0c0021000 rw-p"));
        assert_eq!(s.flags[&0x55d0_c000_0000].len(), 6);
        assert!(s.flags[&0x7ffd_1000].contains(&"gd".to_owned()));
    }

    #[test]
    fn a_flag_set_without_a_maps_change_is_found() {
        let before = parse(Pid::from_raw(1), SMAPS);
        assert_eq!(differs(&before, &before.clone()), None);
        let locked = parse(
            Pid::from_raw(1),
            &SMAPS.replace("me ac\n7ffd", "me ac lo\n7ffd"),
        );
        let why = differs(&before, &locked).unwrap();
        assert!(
            why.contains("0x55d0c0000000") && why.contains("became rd wr mr mw me ac lo"),
            "{why}"
        );
        let moved = parse(Pid::from_raw(1), &SMAPS.replace("7ffd1000-", "7ffd0000-"));
        assert_eq!(
            differs(&before, &moved).as_deref(),
            Some("the mappings changed")
        );
    }

    #[test]
    fn a_running_process_reads_the_same_twice_and_matches_its_maps() {
        let me = Pid::this();
        let a = FlagsSnapshot::take(me).unwrap();
        assert!(!a.flags.is_empty());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        // Allocations of the test harness may add a mapping in between.
        if maps == a.maps {
            assert!(a.for_frozen(me).unwrap().1);
        }
    }
}
