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

use nix::unistd::Pid;

use crate::check::VmFlags;

/// The mappings and their VmFlags as one smaps read saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlagsSnapshot {
    pid: Pid,
    /// The smaps header lines: exactly the text of `/proc/PID/maps` then.
    maps: String,
    /// (start, end, VmFlags) of each mapping.
    vmas: Vec<(u64, u64, Vec<String>)>,
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
            return Ok((self.flags(), true));
        }
        Ok((FlagsSnapshot::take(pid)?.flags(), false))
    }

    /// VmFlags by mapping start, as capture takes them.
    fn flags(&self) -> VmFlags {
        self.vmas
            .iter()
            .map(|(start, _, f)| (*start, f.clone()))
            .collect()
    }

    /// Reads smaps of the frozen process again: `None` if the flags are the
    /// snapshot's, else the first mapping whose flags changed.
    pub fn verify(&self) -> std::io::Result<Option<String>> {
        let now = FlagsSnapshot::take(self.pid)?;
        Ok(differs(self, &now))
    }
}

/// The VmFlags a capture or restore acts on: madvise hints and effects a
/// restore applies again (dontfork, wipeonfork, (no)hugepage, dontdump,
/// locked), the stack's grows-down, may-write, hugetlb. Others are the
/// kernel's bookkeeping or the mover's own (`uw`/`um`: a pre-copy's
/// userfaultfd, which it drops around the freeze).
const MEANINGFUL: [&str; 9] = ["dc", "wf", "hg", "nh", "dd", "lo", "gd", "mw", "ht"];

fn meaningful(f: Option<&Vec<String>>) -> Vec<&str> {
    f.into_iter()
        .flatten()
        .map(String::as_str)
        .filter(|x| MEANINGFUL.contains(x))
        .collect()
}

/// The first mapping of `before` whose meaningful flags differ in `now`
/// (the mapping of `now` that holds its start: the mover's own
/// userfaultfd may split or merge mappings meanwhile, the process cannot).
fn differs(before: &FlagsSnapshot, now: &FlagsSnapshot) -> Option<String> {
    before.vmas.iter().find_map(|(start, _, a)| {
        let Some((_, _, b)) = now.vmas.iter().find(|(s, e, _)| s <= start && start < e) else {
            return Some(format!("mapping at {start:#x} is gone"));
        };
        (meaningful(Some(a)) != meaningful(Some(b))).then(|| {
            format!(
                "mapping at {start:#x}: VmFlags {} became {}",
                a.join(" "),
                b.join(" ")
            )
        })
    })
}

/// A smaps text as a snapshot: header lines ("start-end perms ...") make
/// up the maps text, each mapping's `VmFlags:` line its flags.
fn parse(pid: Pid, text: &str) -> FlagsSnapshot {
    let mut maps = String::new();
    let mut vmas = Vec::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("VmFlags:") {
            if let Some((start, end)) = current.take() {
                vmas.push((
                    start,
                    end,
                    f.split_whitespace().map(str::to_owned).collect(),
                ));
            }
        } else if let Some(range) = header_range(line) {
            maps.push_str(line);
            maps.push('\n');
            current = Some(range);
        }
    }
    FlagsSnapshot { pid, maps, vmas }
}

/// The range of a mapping's header line ("start-end perms ...").
fn header_range(line: &str) -> Option<(u64, u64)> {
    let (range, _) = line.split_once(' ')?;
    let (s, e) = range.split_once('-')?;
    let hex = |x: &str| u64::from_str_radix(x, 16).ok().filter(|_| !x.is_empty());
    Some((hex(s)?, hex(e)?))
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
        let flags = s.flags();
        assert_eq!(flags[&0x55d0_c000_0000].len(), 6);
        assert!(flags[&0x7ffd_1000].contains(&"gd".to_owned()));
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
        let tracked = parse(
            Pid::from_raw(1),
            &SMAPS.replace("me ac\n7ffd", "me uw ac\n7ffd"),
        );
        assert_eq!(
            differs(&tracked, &before),
            None,
            "a pre-copy's uffd flag is not a change"
        );
        let merged = parse(Pid::from_raw(1), &SMAPS.replace("7ffd1000-", "7ffd0000-"));
        assert_eq!(
            differs(&before, &merged),
            None,
            "the stack's start is still mapped"
        );
        let gone = SMAPS.replace("7ffd1000-7ffd2000", "7ffd3000-7ffd4000");
        assert_eq!(
            differs(&before, &parse(Pid::from_raw(1), &gone)).as_deref(),
            Some("mapping at 0x7ffd1000 is gone")
        );
    }

    #[test]
    fn a_running_process_reads_the_same_twice_and_matches_its_maps() {
        let me = Pid::this();
        // Other tests' threads may map or unmap in between: one quiet try
        // of twenty is enough.
        let quiet = (0..20).any(|_| {
            let a = FlagsSnapshot::take(me).unwrap();
            assert!(!a.vmas.is_empty());
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            maps == a.maps && a.for_frozen(me).unwrap().1
        });
        assert!(quiet, "the flags never matched a second reading");
    }
}
