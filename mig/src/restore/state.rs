//! Process and thread state on the restoring side: signal handlers, the
//! other threads and everything per thread (clear_child_tid, robust list,
//! rseq, alternate stack, name, nice, policy, CPU mask), umask, rlimits, personality,
//! credentials, pending signals and the final registers.

use migfs_proto::image::{Creds, Image, Sched};
use nix::errno::Errno;

use super::files::cause;
use super::inject::{Call, CallError, Target, ThreadState};
use crate::error::{RestoreCause, RestoreError, Step};
use crate::sys::abi;

/// `SS_ONSTACK`: reported, never set.
const SS_ONSTACK: u32 = 1;
/// `SS_DISABLE`.
const SS_DISABLE: u32 = 2;

fn err(step: Step, what: String) -> impl FnOnce(super::inject::CallError) -> RestoreError {
    move |e| RestoreError::new(step, cause(what, e))
}

/// Sets the disposition of every signal: the captured one, else SIG_DFL
/// ("signal handlers" step).
pub fn sigactions<T: Target>(t: &mut T, img: &Image) -> Result<(), RestoreError> {
    for signo in 1..=64u32 {
        if signo == libc::SIGKILL as u32 || signo == libc::SIGSTOP as u32 {
            continue;
        }
        let call = match img.sigactions.iter().find(|a| a.signo == signo) {
            Some(a) => Call::SigAction {
                signo,
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            },
            None => Call::SigAction {
                signo,
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            },
        };
        t.call(0, &call)
            .map_err(err(Step::Signals, format!("rt_sigaction({signo})")))?;
    }
    Ok(())
}

/// Arms the interval timers again with the time they had left (after the
/// handlers are in place; "signal handlers" step).
pub fn itimers<T: Target>(t: &mut T, img: &Image) -> Result<(), RestoreError> {
    for it in &img.itimers {
        let call = Call::SetITimer {
            which: it.which,
            interval_us: it.interval_us,
            value_us: it.value_us,
        };
        t.call(0, &call)
            .map_err(err(Step::Signals, format!("setitimer({})", it.which)))?;
    }
    Ok(())
}

/// Creates the other threads (with their old ids when free) and sets the
/// per-thread state of all ("threads" step). Returns the thread ids.
pub fn threads<T: Target>(
    t: &mut T,
    img: &Image,
    require_ids: bool,
) -> Result<Vec<i32>, RestoreError> {
    let mut tids = vec![t.pid()];
    for th in img.threads.iter().skip(1) {
        let (idx, tid) = t.new_thread(th.tid, require_ids).map_err(|e| match e {
            super::inject::CallError::Errno(nix::errno::Errno::EEXIST) => {
                RestoreError::new(Step::Threads, RestoreCause::PidInUse { pid: th.tid })
            }
            e => RestoreError::new(Step::Threads, cause(format!("create thread {}", th.tid), e)),
        })?;
        debug_assert_eq!(idx, tids.len());
        tids.push(tid);
    }
    for (i, th) in img.threads.iter().enumerate() {
        let e = |what: &str| err(Step::Threads, format!("thread {}: {what}", th.tid));
        t.call(
            i,
            &Call::SetTidAddress {
                addr: th.clear_child_tid,
            },
        )
        .map_err(e("set_tid_address"))?;
        if th.robust_list_len == 24 {
            t.call(
                i,
                &Call::SetRobustList {
                    head: th.robust_list,
                    len: 24,
                },
            )
            .map_err(e("set_robust_list"))?;
        }
        if let Some(r) = &th.rseq {
            t.call(
                i,
                &Call::Rseq {
                    addr: r.addr,
                    len: r.len,
                    signature: r.signature,
                    flags: 0,
                },
            )
            .map_err(e("rseq"))?;
        }
        let (sp, flags, size) = match &th.altstack {
            Some(a) if a.flags & SS_DISABLE == 0 => (a.sp, a.flags & !SS_ONSTACK, a.size),
            _ => (0, SS_DISABLE, 0),
        };
        t.call(i, &Call::SigAltStack { sp, flags, size })
            .map_err(e("sigaltstack"))?;
        t.call(i, &Call::SetName { name: &th.comm })
            .map_err(e("prctl(PR_SET_NAME)"))?;
        if let Some(s) = &th.sched {
            sched(t, i, th.tid, s)?;
        }
    }
    Ok(tids)
}

/// A thread's nice, policy and CPU mask. A mask with no CPU this machine
/// has online becomes every CPU, with a warning; any other refusal fails
/// the restore.
fn sched<T: Target>(t: &mut T, i: usize, tid: i32, s: &Sched) -> Result<(), RestoreError> {
    let e = |what: &str| err(Step::Threads, format!("thread {tid}: {what}"));
    t.call(i, &Call::SetNice { nice: s.nice })
        .map_err(e(&format!("setpriority (nice {})", s.nice)))?;
    t.call(
        i,
        &Call::SetScheduler {
            policy: s.policy,
            priority: s.priority,
        },
    )
    .map_err(e(&format!(
        "sched_setscheduler (policy {}, priority {})",
        s.policy, s.priority
    )))?;
    if s.cpus.is_empty() {
        return Ok(());
    }
    match t.call(i, &Call::SetAffinity { mask: &s.cpus }) {
        Err(CallError::Errno(Errno::EINVAL)) => {
            tracing::warn!(
                tid,
                cpus = %cpu_list(&s.cpus),
                "none of the thread's CPUs is online here: it may run on any"
            );
            let all = vec![0xff; s.cpus.len()];
            t.call(i, &Call::SetAffinity { mask: &all })
                .map(drop)
                .map_err(e("sched_setaffinity (every CPU)"))
        }
        r => r.map(drop).map_err(e("sched_setaffinity")),
    }
}

/// "0-3,6" for a CPU mask.
pub fn cpu_list(mask: &[u8]) -> String {
    let on = |c: usize| mask.get(c / 8).is_some_and(|b| b & (1 << (c % 8)) != 0);
    let mut out: Vec<String> = Vec::new();
    let mut c = 0;
    while c < mask.len() * 8 {
        if !on(c) {
            c += 1;
            continue;
        }
        let first = c;
        while on(c + 1) {
            c += 1;
        }
        out.push(if first == c {
            first.to_string()
        } else {
            format!("{first}-{c}")
        });
        c += 1;
    }
    out.join(",")
}

/// umask, rlimits, personality, no_new_privs ("process state" step).
pub fn process_state<T: Target>(t: &mut T, img: &Image) -> Result<(), RestoreError> {
    let Some(p) = &img.process else { return Ok(()) };
    let e = |what: String| err(Step::ProcessState, what);
    t.call(0, &Call::Umask { mask: p.umask })
        .map_err(e("umask".into()))?;
    for l in &p.rlimits {
        let call = Call::Prlimit {
            resource: l.resource,
            cur: l.cur,
            max: l.max,
        };
        t.call(0, &call).map_err(e(format!(
            "rlimit {} (soft {}, hard {})",
            l.resource, l.cur, l.max
        )))?;
    }
    t.call(
        0,
        &Call::Personality {
            persona: p.personality,
        },
    )
    .map_err(e("personality".into()))?;
    if p.no_new_privs {
        t.call(0, &Call::NoNewPrivs)
            .map_err(e("no_new_privs".into()))?;
    }
    Ok(())
}

/// Groups, gids, uids and capabilities, exactly the captured ones, last
/// of all ("credentials" step). Nothing is done when they equal ours.
pub fn credentials<T: Target>(t: &mut T, img: &Image, ours: &Creds) -> Result<(), RestoreError> {
    let Some(c) = img.process.as_ref().and_then(|p| p.creds.as_ref()) else {
        return Ok(());
    };
    if c == ours {
        return Ok(());
    }
    let e = |what: &str| err(Step::Credentials, what.to_owned());
    let ids = |v: &[u32]| -> Result<[u32; 3], RestoreError> {
        match v {
            [r, e, s, ..] => Ok([*r, *e, *s]),
            _ => Err(RestoreError::new(
                Step::Credentials,
                RestoreCause::Refused("incomplete ids in the image".into()),
            )),
        }
    };
    for cap in 0..64u32 {
        if ours.cap_bnd & (1 << cap) != 0 && c.cap_bnd & (1 << cap) == 0 {
            t.call(0, &Call::CapBsetDrop { cap })
                .map_err(e("prctl(PR_CAPBSET_DROP)"))?;
        }
    }
    t.call(0, &Call::SetGroups { groups: &c.groups })
        .map_err(e("setgroups"))?;
    t.call(0, &Call::SetResGid { ids: ids(&c.gids)? })
        .map_err(e("setresgid"))?;
    t.call(0, &Call::SetResUid { ids: ids(&c.uids)? })
        .map_err(e("setresuid"))?;
    t.call(
        0,
        &Call::Capset {
            eff: c.cap_eff,
            prm: c.cap_prm,
            inh: c.cap_inh,
        },
    )
    .map_err(e("capset"))?;
    Ok(())
}

/// Queues the pending signals again, loads the final registers and masks
/// ("resume" step; the caller then lets the threads run).
pub fn resume<T: Target>(t: &mut T, img: &Image, tids: &[i32]) -> Result<(), RestoreError> {
    let tgid = t.pid();
    for (i, th) in img.threads.iter().enumerate() {
        for s in &th.pending {
            let call = Call::Queue {
                tgid,
                tid: tids[i],
                signo: s.signo,
                info: &s.siginfo,
            };
            t.call(i, &call).map_err(err(
                Step::Resume,
                format!("thread {}: queue signal {}", th.tid, s.signo),
            ))?;
        }
    }
    for s in &img.shared_pending {
        let call = Call::Queue {
            tgid,
            tid: 0,
            signo: s.signo,
            info: &s.siginfo,
        };
        t.call(0, &call)
            .map_err(err(Step::Resume, format!("queue signal {}", s.signo)))?;
    }
    let states: Vec<ThreadState<'_>> = img
        .threads
        .iter()
        .map(|th| {
            let mut regs = [0u64; abi::reg::COUNT];
            regs.copy_from_slice(&th.regs);
            ThreadState {
                regs,
                xsave: &th.xsave,
                sigmask: th.sigmask,
            }
        })
        .collect();
    t.finish(&states)
        .map_err(err(Step::Resume, "load registers".into()))
}
