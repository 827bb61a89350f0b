//! Process-wide state: umask, resource limits, credentials, personality,
//! no_new_privs, command line.

use migfs_proto::image::{Creds, FileRef, Process, Rlimit};
use nix::unistd::Pid;

use crate::error::CaptureError;
use crate::sys::procfs;

/// `RLIMIT_NLIMITS`.
const NLIMITS: u32 = 16;

/// Captures the process-wide state of `pid`.
pub fn process(pid: Pid, cwd: FileRef, exe: FileRef) -> Result<Process, CaptureError> {
    let p = pid.as_raw();
    let st = procfs::status(&p.to_string()).map_err(|source| CaptureError::Io {
        pid: p,
        what: "status".into(),
        source,
    })?;
    let field = |k: &str| st.get(k).cloned().unwrap_or_default();
    // /proc/PID/limits, not prlimit(): reading another user's limits with
    // prlimit needs CAP_SYS_RESOURCE.
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).map_err(|source| {
        CaptureError::Io {
            pid: p,
            what: "limits".into(),
            source,
        }
    })?;
    let rlimits = parse_limits(&text).ok_or_else(|| CaptureError::Unsupported {
        pid: p,
        what: format!("cannot read /proc/{pid}/limits: {text:?}"),
    })?;
    let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let creds = creds_of(&st);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline)
        .trim_end_matches('\0')
        .replace('\0', " ");
    Ok(Process {
        pid: p,
        cmdline,
        exe: Some(exe),
        cwd: Some(cwd),
        umask: u32::from_str_radix(&field("Umask"), 8).unwrap_or(0o022),
        rlimits,
        creds: Some(creds),
        personality,
        no_new_privs: field("NoNewPrivs") == "1",
        dumpable: 1,
    })
}

/// `/proc/PID/limits`: a header, then one line per resource in
/// RLIMIT_* order, the name in a 26-column field, then soft and hard.
pub fn parse_limits(text: &str) -> Option<Vec<Rlimit>> {
    let value = |v: &str| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    };
    let out: Option<Vec<Rlimit>> = text
        .lines()
        .skip(1)
        .zip(0..NLIMITS)
        .map(|(line, resource)| {
            let mut f = line.get(26..)?.split_whitespace();
            Some(Rlimit {
                resource,
                cur: value(f.next()?)?,
                max: value(f.next()?)?,
            })
        })
        .collect();
    out.filter(|v| v.len() == NLIMITS as usize)
}

/// The credentials in a /proc status map.
pub fn creds_of(st: &std::collections::HashMap<String, String>) -> Creds {
    let field = |k: &str| st.get(k).cloned().unwrap_or_default();
    let nums = |k: &str| -> Vec<u32> {
        field(k)
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    let hex = |k: &str| u64::from_str_radix(&field(k), 16).unwrap_or(0);
    Creds {
        uids: nums("Uid"),
        gids: nums("Gid"),
        groups: nums("Groups"),
        cap_inh: hex("CapInh"),
        cap_prm: hex("CapPrm"),
        cap_eff: hex("CapEff"),
        cap_bnd: hex("CapBnd"),
        cap_amb: hex("CapAmb"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_own_limits_like_prlimit() {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let got = super::parse_limits(&text).unwrap();
        for l in got {
            let want = crate::sys::task::get_rlimit(nix::unistd::getpid(), l.resource).unwrap();
            assert_eq!((l.cur, l.max), want, "resource {}", l.resource);
        }
    }
}
