//! Process-wide state: umask, resource limits, credentials, personality,
//! no_new_privs, command line.

use migfs_proto::image::{Creds, FileRef, Process, Rlimit};
use nix::unistd::Pid;

use crate::error::CaptureError;
use crate::sys::{procfs, task};

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
    let mut rlimits = Vec::new();
    for resource in 0..NLIMITS {
        let (cur, max) = task::get_rlimit(pid, resource).map_err(|errno| CaptureError::Sys {
            pid: p,
            what: format!("prlimit({resource})"),
            errno,
        })?;
        rlimits.push(Rlimit { resource, cur, max });
    }
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
