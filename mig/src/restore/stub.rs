//! The stub: a forked copy of this process (with the old PID when free)
//! that we seize and empty, then rebuild into the checkpointed process by
//! running system calls inside it (DESIGN "Migration" step 5).
//!
//! Preparation: find a `syscall` instruction in the stub's vDSO,
//! unregister the rseq area it inherited, map a small helper region (one
//! page `syscall; int3`, four scratch pages for call arguments) where the
//! image has nothing, and unmap everything else. Every later call runs on
//! the helper page; the last one unmaps it. The stub is seized with
//! `PTRACE_O_EXITKILL`, so it dies with us if we die half-way; any
//! failure kills it ([`PtraceStub::kill`], also on drop).

use nix::errno::Errno;
use nix::unistd::Pid;

use super::inject::{Call, CallError, Target, ThreadState};
use crate::error::{RestoreCause, RestoreError, Step};
use crate::sys::abi::{self, reg, sx};
use crate::sys::{clone3, inject, mem, procfs, ptrace, vdso};

/// Scratch pages after the code page.
const SCRATCH_PAGES: u64 = 4;
/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

/// A seized stub being rebuilt.
pub struct PtraceStub {
    pid: Pid,
    threads: Vec<Pid>,
    insn: u64,
    scratch: u64,
    helper: (u64, u64),
    /// Warm memory this stub was made from, until the fill takes it.
    warm: Option<(u64, u64)>,
    /// The holder it was made from, kept alive (detached, sharing the
    /// address space) for a lazy restore's staging ([`crate::pages`]).
    holder: Option<super::warm::Warm>,
    done: bool,
}

/// Waits for `pid`'s event stop (after PTRACE_INTERRUPT, or a new
/// clone's first stop); anything else fails the stub's creation.
fn wait_event(pid: Pid, who: &str) -> Result<(), RestoreError> {
    match ptrace::wait(pid).map_err(sys(Step::CreateStub, &format!("waitpid {who}")))? {
        ptrace::Stop::Event { .. } => Ok(()),
        other => Err(RestoreError::new(
            Step::CreateStub,
            RestoreCause::Refused(format!("{who} stopped with {other:?}")),
        )),
    }
}

/// What failed when no `syscall` instruction was found for `who`.
fn insn_cause(who: &str, e: inject::InsnError) -> RestoreCause {
    match e {
        inject::InsnError::Read(errno) => RestoreCause::Sys {
            what: format!("read {who}'s vDSO"),
            errno,
        },
        other => RestoreCause::Refused(format!("{who}: {other}")),
    }
}

fn sys(step: Step, what: &str) -> impl FnOnce(Errno) -> RestoreError + '_ {
    move |errno| {
        RestoreError::new(
            step,
            RestoreCause::Sys {
                what: what.to_owned(),
                errno,
            },
        )
    }
}

impl PtraceStub {
    /// Forks and seizes a stub with PID `want` when free (an error if
    /// taken and `require`), then empties it, keeping its helper region
    /// clear of `avoid` (the image's mappings). With `warm`, the stub is
    /// made from that holder and keeps its memory ([`super::warm`]); with
    /// `keep_holder` the holder lives on too ([`Target::take_holder`]). If
    /// the holder cannot be used, a fresh stub is forked instead.
    pub fn spawn(
        want: Option<i32>,
        require: bool,
        avoid: &[(u64, u64)],
        warm: Option<super::warm::Warm>,
        keep_holder: bool,
    ) -> Result<PtraceStub, RestoreError> {
        if let Some(w) = warm {
            let holder = w.pid();
            match PtraceStub::from_warm(w, want, require, keep_holder) {
                Ok(mut stub) => {
                    stub.prepare(avoid)
                        .map_err(|e| RestoreError::new(Step::PrepareStub, e))?;
                    return Ok(stub);
                }
                Err(e) if matches!(e.cause, RestoreCause::PidInUse { .. }) => return Err(e),
                Err(e) => tracing::warn!(
                    holder = holder.as_raw(),
                    error = %e,
                    "the warm memory could not be used; forking a fresh stub"
                ),
            }
        }
        let pid = match clone3::spawn_stub(want) {
            Err(Errno::EEXIST) if require => {
                return Err(RestoreError::new(
                    Step::CreateStub,
                    RestoreCause::PidInUse {
                        pid: want.unwrap_or(0),
                    },
                ));
            }
            Err(Errno::EEXIST) => clone3::spawn_stub(None),
            other => other,
        }
        .map_err(sys(Step::CreateStub, "clone3"))?;
        let mut stub = PtraceStub {
            pid,
            threads: vec![pid],
            insn: 0,
            scratch: 0,
            helper: (0, 0),
            warm: None,
            holder: None,
            done: false,
        };
        ptrace::seize(pid, abi::PTRACE_O_EXITKILL | abi::PTRACE_O_TRACECLONE)
            .map_err(sys(Step::CreateStub, "PTRACE_SEIZE"))?;
        ptrace::interrupt(pid).map_err(sys(Step::CreateStub, "PTRACE_INTERRUPT"))?;
        wait_event(pid, "the stub")?;
        stub.prepare(avoid)
            .map_err(|e| RestoreError::new(Step::PrepareStub, e))?;
        Ok(stub)
    }

    /// The stub made from a warm-memory holder: seize the holder, have it
    /// clone a process sharing its address space (with PID `want` when
    /// free), end the holder. The new process is seized (it was traced
    /// from its first instruction) but not yet emptied.
    fn from_warm(
        w: super::warm::Warm,
        want: Option<i32>,
        require: bool,
        keep_holder: bool,
    ) -> Result<PtraceStub, RestoreError> {
        let holder = w.pid();
        let (scratch, len) = w.region();
        fn err(what: &str) -> impl FnOnce(Errno) -> RestoreError + '_ {
            sys(Step::CreateStub, what)
        }
        ptrace::seize(holder, abi::PTRACE_O_EXITKILL | abi::PTRACE_O_TRACECLONE)
            .map_err(err("PTRACE_SEIZE the warm-memory holder"))?;
        // From here the holder is traced by this thread: `w`'s drop (on
        // any error) kills it and collects it.
        ptrace::interrupt(holder).map_err(err("PTRACE_INTERRUPT the holder"))?;
        wait_event(holder, "the warm-memory holder")?;
        let maps = procfs::maps(holder).map_err(|source| {
            RestoreError::new(
                Step::CreateStub,
                RestoreCause::Io {
                    what: "the holder's maps".into(),
                    source,
                },
            )
        })?;
        let insn = inject::vdso_syscall_insn(holder, &maps)
            .map_err(|e| RestoreError::new(Step::CreateStub, insn_cause("the holder", e)))?;
        // clone_args (and the wanted PID) go at the start of the warm
        // region, zeroed again afterwards.
        let clone = |with_pid: bool| -> Result<inject::Outcome, RestoreError> {
            let (ptr, n) = if with_pid { (scratch + 128, 1) } else { (0, 0) };
            let flags = (libc::CLONE_VM | libc::CLONE_PARENT) as u64;
            let mut args = abi::clone_args_bytes(flags, 0, ptr, n);
            args.resize(128, 0);
            args.extend_from_slice(&want.unwrap_or(0).to_ne_bytes());
            mem::write_vm(holder, scratch, &args).map_err(err("write clone_args"))?;
            inject::syscall(holder, insn, libc::SYS_clone3, [scratch, 88, 0, 0, 0, 0]).map_err(
                |source| {
                    RestoreError::new(
                        Step::CreateStub,
                        RestoreCause::Inject {
                            what: "clone3 in the holder".into(),
                            source,
                        },
                    )
                },
            )
        };
        let mut out = clone(want.is_some())?;
        if out.result() == Err(Errno::EEXIST) {
            if require {
                return Err(RestoreError::new(
                    Step::CreateStub,
                    RestoreCause::PidInUse {
                        pid: want.unwrap_or(0),
                    },
                ));
            }
            out = clone(false)?;
        }
        out.result().map_err(err("clone3 in the holder"))?;
        let pid = *out.clones.first().ok_or_else(|| {
            RestoreError::new(
                Step::CreateStub,
                RestoreCause::Refused("clone3 in the holder reported no new process".into()),
            )
        })?;
        // Killed on drop from here, with the holder.
        let mut stub = PtraceStub {
            pid,
            threads: vec![pid],
            insn: 0,
            scratch: 0,
            helper: (0, 0),
            warm: Some((scratch, scratch + len)),
            holder: None,
            done: false,
        };
        wait_event(pid, "the stub")?;
        mem::write_vm(holder, scratch, &[0u8; 136]).map_err(err("zero clone_args"))?;
        if keep_holder {
            // It will run calls again once the stub has emptied the
            // address space of its code and rseq area: unregister rseq
            // now, and let it wait in pause() (signals blocked) until
            // the staging seizes it again (crate::pages::staged).
            if let Some(r) = ptrace::get_rseq(holder).map_err(err("the holder's rseq"))? {
                let out = inject::syscall(
                    holder,
                    insn,
                    libc::SYS_rseq,
                    [r.addr, u64::from(r.len), 1, u64::from(r.signature), 0, 0],
                )
                .map_err(|source| {
                    RestoreError::new(
                        Step::CreateStub,
                        RestoreCause::Inject {
                            what: "unregister the holder's rseq".into(),
                            source,
                        },
                    )
                })?;
                out.result().map_err(err("unregister the holder's rseq"))?;
            }
            ptrace::detach(holder).map_err(err("PTRACE_DETACH the holder"))?;
            stub.holder = Some(w);
        } else {
            // The holder goes; the stub is the address space's only user.
            let _ = crate::sys::task::kill(holder, libc::SIGKILL);
            loop {
                match ptrace::wait(holder).map_err(err("waitpid the holder"))? {
                    ptrace::Stop::Exited(_) | ptrace::Stop::Killed(_) => break,
                    _ => {
                        let _ = ptrace::cont(holder, 0);
                    }
                }
            }
            w.consume();
        }
        let adj = super::warm::own_oom_score_adj();
        std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj).map_err(|source| {
            RestoreError::new(
                Step::CreateStub,
                RestoreCause::Io {
                    what: "the stub's oom_score_adj".into(),
                    source,
                },
            )
        })?;
        Ok(stub)
    }

    fn prepare(&mut self, avoid: &[(u64, u64)]) -> Result<(), RestoreCause> {
        let ps = |what: &str| {
            let what = what.to_owned();
            move |errno| RestoreCause::Sys { what, errno }
        };
        // The stub may not have run a single instruction of its own yet:
        // block every signal and leave our session from here.
        ptrace::set_sigmask(self.pid, !0).map_err(ps("PTRACE_SETSIGMASK"))?;
        let maps = procfs::maps(self.pid).map_err(|source| RestoreCause::Io {
            what: "stub maps".into(),
            source,
        })?;
        self.insn =
            inject::vdso_syscall_insn(self.pid, &maps).map_err(|e| insn_cause("the stub", e))?;
        match self.raw(0, libc::SYS_setsid, [0; 6]) {
            Ok(_) | Err(CallError::Errno(Errno::EPERM)) => {}
            Err(e) => return Err(call_cause("setsid", e)),
        }
        if let Some(r) = ptrace::get_rseq(self.pid).map_err(ps("PTRACE_GET_RSEQ_CONFIGURATION"))? {
            self.raw(
                0,
                libc::SYS_rseq,
                [r.addr, u64::from(r.len), 1, u64::from(r.signature), 0, 0],
            )
            .map_err(|e| call_cause("unregister the stub's rseq", e))?;
        }
        let page = crate::sys::page_size();
        let len = page * (1 + SCRATCH_PAGES);
        let mut taken: Vec<(u64, u64)> = maps
            .iter()
            .map(|m| (m.start, m.end))
            .chain(avoid.iter().copied())
            .collect();
        taken.sort_unstable();
        let at = pick_free(&taken, len, 1 << 20)
            .ok_or_else(|| RestoreCause::Refused("no room for the helper mapping".into()))?;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        let got = self
            .raw(
                0,
                libc::SYS_mmap,
                [
                    at,
                    len,
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    flags,
                    u64::MAX,
                    0,
                ],
            )
            .map_err(|e| call_cause("map the helper region", e))?;
        if got != at {
            return Err(RestoreCause::Refused(format!(
                "the helper region landed at {got:#x}, not {at:#x}"
            )));
        }
        mem::write_vm(self.pid, at, &[0x0f, 0x05, 0xcc]).map_err(ps("write the helper code"))?;
        self.raw(
            0,
            libc::SYS_mprotect,
            [
                at,
                page,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                0,
                0,
                0,
            ],
        )
        .map_err(|e| call_cause("protect the helper code", e))?;
        self.insn = at;
        self.scratch = at + page;
        self.helper = (at, at + len);
        let mut keep = vec![self.helper];
        keep.extend(self.warm);
        keep.sort_unstable();
        let top = crate::image::format::TASK_SIZE;
        let mut from = 0;
        for &(s, e) in keep.iter().chain(std::iter::once(&(top, top))) {
            if s > from {
                self.raw(0, libc::SYS_munmap, [from, s - from, 0, 0, 0, 0])
                    .map_err(|e| call_cause("unmap everything but the helper", e))?;
            }
            from = e;
        }
        if let Some((ws, we)) = self.warm {
            // Out of the image's way (its mappings go where they were).
            if avoid.iter().any(|&(s, e)| s < we && ws < e) {
                let mut taken: Vec<(u64, u64)> = avoid.iter().copied().chain(keep).collect();
                taken.sort_unstable();
                let to = pick_free(&taken, we - ws, 1 << 30)
                    .ok_or_else(|| RestoreCause::Refused("no room for the warm memory".into()))?;
                let moved = Call::Mremap {
                    from: ws,
                    len: we - ws,
                    to,
                };
                self.call(0, &moved)
                    .map_err(|e| call_cause("move the warm memory aside", e))?;
                self.warm = Some((to, to + (we - ws)));
            }
        }
        Ok(())
    }

    fn raw(&mut self, thread: usize, nr: i64, args: [u64; 6]) -> Result<u64, CallError> {
        let tid = self.threads[thread];
        let out = inject::syscall(tid, self.insn, nr, args)?;
        out.result().map_err(CallError::Errno)
    }

    /// Every thread of the stub.
    pub fn tids(&self) -> Vec<i32> {
        self.threads.iter().map(|t| t.as_raw()).collect()
    }

    /// Lets the rebuilt process run (detaches every thread); returns its pid.
    pub fn release(mut self) -> Result<i32, CallError> {
        self.done = true;
        for &t in self.threads.iter().rev() {
            ptrace::detach(t).map_err(|e| CallError::Ptrace(format!("PTRACE_DETACH {t}: {e}")))?;
        }
        Ok(self.pid.as_raw())
    }

    /// Kills the stub and reaps it: nothing half-built is left.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let _ = crate::sys::task::kill(self.pid, libc::SIGKILL);
        for &t in self.threads.iter().rev() {
            while let Ok(s) = ptrace::wait(t) {
                if matches!(s, ptrace::Stop::Exited(_) | ptrace::Stop::Killed(_)) {
                    break;
                }
                let _ = ptrace::cont(t, 0);
            }
        }
    }
}

impl Drop for PtraceStub {
    fn drop(&mut self) {
        self.kill_now();
    }
}

fn call_cause(what: &str, e: CallError) -> RestoreCause {
    match e {
        CallError::Errno(errno) => RestoreCause::Sys {
            what: what.to_owned(),
            errno,
        },
        CallError::Inject(source) => RestoreCause::Inject {
            what: what.to_owned(),
            source,
        },
        CallError::Ptrace(m) => RestoreCause::Refused(format!("{what}: {m}")),
    }
}

/// The lowest page-aligned address at or above `min` where `len` bytes
/// overlap none of the sorted ranges `taken`.
pub fn pick_free(taken: &[(u64, u64)], len: u64, min: u64) -> Option<u64> {
    let mut at = min;
    for &(s, e) in taken {
        if e <= at {
            continue;
        }
        if s >= at + len {
            break;
        }
        at = at.max(e);
    }
    (at + len <= crate::image::format::TASK_SIZE).then_some(at)
}

/// A call as (number, arguments, bytes to put at the scratch address).
fn encode(call: &Call<'_>, s: u64) -> (i64, [u64; 6], Vec<u8>) {
    let cstr = |p: &str| {
        let mut v = p.as_bytes().to_vec();
        v.push(0);
        v
    };
    let words = |w: &[u64]| w.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
    match *call {
        Call::Mmap {
            addr,
            len,
            prot,
            flags,
            fd,
            offset,
        } => (
            libc::SYS_mmap,
            [addr, len, prot.into(), flags.into(), sx(fd), offset],
            vec![],
        ),
        Call::Munmap { addr, len } => (libc::SYS_munmap, [addr, len, 0, 0, 0, 0], vec![]),
        Call::Mprotect { addr, len, prot } => (
            libc::SYS_mprotect,
            [addr, len, prot.into(), 0, 0, 0],
            vec![],
        ),
        Call::Madvise { addr, len, advice } => {
            (libc::SYS_madvise, [addr, len, sx(advice), 0, 0, 0], vec![])
        }
        Call::Mremap { from, len, to } => (
            libc::SYS_mremap,
            [
                from,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                to,
                0,
            ],
            vec![],
        ),
        Call::Mlock { addr, len } => (libc::SYS_mlock, [addr, len, 0, 0, 0, 0], vec![]),
        Call::MapVdso { addr } => (
            libc::SYS_arch_prctl,
            [abi::ARCH_MAP_VDSO_64, addr, 0, 0, 0, 0],
            vec![],
        ),
        Call::SetMmMap { map, auxv } => {
            let mut m = map;
            m.auxv = s + 128;
            m.auxv_size = u32::try_from(auxv.len()).unwrap_or(u32::MAX);
            let mut input = m.to_bytes();
            input.resize(128, 0);
            input.extend_from_slice(auxv);
            (
                libc::SYS_prctl,
                [abi::PR_SET_MM, abi::PR_SET_MM_MAP, s, 104, 0, 0],
                input,
            )
        }
        Call::Open { path, flags } => (
            libc::SYS_openat,
            [sx(libc::AT_FDCWD), s, flags.into(), 0, 0, 0],
            cstr(path),
        ),
        Call::Close { fd } => (libc::SYS_close, [sx(fd), 0, 0, 0, 0, 0], vec![]),
        Call::CloseRange { first } => (
            libc::SYS_close_range,
            [first.into(), u32::MAX.into(), 0, 0, 0, 0],
            vec![],
        ),
        Call::Dup3 { old, new, cloexec } => {
            let f = if cloexec { sx(libc::O_CLOEXEC) } else { 0 };
            (libc::SYS_dup3, [sx(old), sx(new), f, 0, 0, 0], vec![])
        }
        Call::Lseek { fd, offset } => (
            libc::SYS_lseek,
            [sx(fd), offset, sx(libc::SEEK_SET), 0, 0, 0],
            vec![],
        ),
        Call::SetLock {
            fd,
            ofd,
            write,
            start,
            len,
        } => {
            let ty = sx(if write { libc::F_WRLCK } else { libc::F_RDLCK });
            let input = words(&[ty | (sx(libc::SEEK_SET) << 16), start, len, 0]);
            let cmd = sx(if ofd {
                libc::F_OFD_SETLK
            } else {
                libc::F_SETLK
            });
            (libc::SYS_fcntl, [sx(fd), cmd, s, 0, 0, 0], input)
        }
        Call::Flock { fd, write } => {
            let op = if write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
            (libc::SYS_flock, [sx(fd), sx(op), 0, 0, 0, 0], vec![])
        }
        Call::Chdir { path } => (libc::SYS_chdir, [s, 0, 0, 0, 0, 0], cstr(path)),
        Call::Umask { mask } => (libc::SYS_umask, [mask.into(), 0, 0, 0, 0, 0], vec![]),
        Call::SigAction {
            signo,
            handler,
            flags,
            restorer,
            mask,
        } => (
            libc::SYS_rt_sigaction,
            [signo.into(), s, 0, 8, 0, 0],
            words(&[handler, flags, restorer, mask]),
        ),
        Call::SetITimer {
            which,
            interval_us,
            value_us,
        } => {
            let tv = |us: i64| {
                [
                    (us / 1_000_000).cast_unsigned(),
                    (us % 1_000_000).cast_unsigned(),
                ]
            };
            let [a, b] = tv(interval_us);
            let [c, d] = tv(value_us);
            (
                libc::SYS_setitimer,
                [which.into(), s, 0, 0, 0, 0],
                words(&[a, b, c, d]),
            )
        }
        Call::SetTidAddress { addr } => (libc::SYS_set_tid_address, [addr, 0, 0, 0, 0, 0], vec![]),
        Call::SetRobustList { head, len } => {
            (libc::SYS_set_robust_list, [head, len, 0, 0, 0, 0], vec![])
        }
        Call::Rseq {
            addr,
            len,
            signature,
            flags,
        } => (
            libc::SYS_rseq,
            [addr, len.into(), flags.into(), signature.into(), 0, 0],
            vec![],
        ),
        Call::SigAltStack { sp, flags, size } => (
            libc::SYS_sigaltstack,
            [s, 0, 0, 0, 0, 0],
            words(&[sp, flags.into(), size]),
        ),
        Call::SetNice { nice } => (
            libc::SYS_setpriority,
            [libc::PRIO_PROCESS.into(), 0, sx(nice), 0, 0, 0],
            vec![],
        ),
        Call::SetScheduler { policy, priority } => (
            libc::SYS_sched_setscheduler,
            [0, sx(policy), s, 0, 0, 0],
            priority.to_ne_bytes().to_vec(),
        ),
        Call::SetAffinity { mask } => (
            libc::SYS_sched_setaffinity,
            [0, mask.len() as u64, s, 0, 0, 0],
            mask.to_vec(),
        ),
        Call::SetName { name } => (
            libc::SYS_prctl,
            [abi::PR_SET_NAME, s, 0, 0, 0, 0],
            cstr(name),
        ),
        Call::Prlimit { resource, cur, max } => (
            libc::SYS_prlimit64,
            [0, resource.into(), s, 0, 0, 0],
            words(&[cur, max]),
        ),
        Call::Personality { persona } => (
            libc::SYS_personality,
            [persona.into(), 0, 0, 0, 0, 0],
            vec![],
        ),
        Call::PidfdOpen { pid } => (libc::SYS_pidfd_open, [sx(pid), 0, 0, 0, 0, 0], vec![]),
        Call::PidfdGetfd { pidfd, fd } => (
            libc::SYS_pidfd_getfd,
            [sx(pidfd), sx(fd), 0, 0, 0, 0],
            vec![],
        ),
        Call::Recv { fd, addr, len } => (
            libc::SYS_recvfrom,
            [sx(fd), addr, len, sx(libc::MSG_WAITALL), 0, 0],
            vec![],
        ),
        Call::Userfaultfd { flags } => {
            (libc::SYS_userfaultfd, [flags.into(), 0, 0, 0, 0, 0], vec![])
        }
        Call::NoNewPrivs => (
            libc::SYS_prctl,
            [abi::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0],
            vec![],
        ),
        Call::SetGroups { groups } => {
            let input = groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
            (
                libc::SYS_setgroups,
                [groups.len() as u64, s, 0, 0, 0, 0],
                input,
            )
        }
        Call::SetResGid { ids } => (
            libc::SYS_setresgid,
            [ids[0].into(), ids[1].into(), ids[2].into(), 0, 0, 0],
            vec![],
        ),
        Call::SetResUid { ids } => (
            libc::SYS_setresuid,
            [ids[0].into(), ids[1].into(), ids[2].into(), 0, 0, 0],
            vec![],
        ),
        Call::CapBsetDrop { cap } => (
            libc::SYS_prctl,
            [abi::PR_CAPBSET_DROP, cap.into(), 0, 0, 0, 0],
            vec![],
        ),
        Call::Capset { eff, prm, inh } => {
            let lo = |v: u64| (v & 0xffff_ffff) as u32;
            let hi = |v: u64| (v >> 32) as u32;
            let vals = [
                CAP_V3,
                0,
                lo(eff),
                lo(prm),
                lo(inh),
                hi(eff),
                hi(prm),
                hi(inh),
            ];
            let input = vals.iter().flat_map(|v| v.to_ne_bytes()).collect();
            (libc::SYS_capset, [s, s + 8, 0, 0, 0, 0], input)
        }
        Call::Queue {
            tgid,
            tid: 0,
            signo,
            info,
        } => (
            libc::SYS_rt_sigqueueinfo,
            [sx(tgid), signo.into(), s, 0, 0, 0],
            info.to_vec(),
        ),
        Call::Queue {
            tgid,
            tid,
            signo,
            info,
        } => (
            libc::SYS_rt_tgsigqueueinfo,
            [sx(tgid), sx(tid), signo.into(), s, 0, 0],
            info.to_vec(),
        ),
    }
}

impl Target for PtraceStub {
    fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    fn call(&mut self, thread: usize, call: &Call<'_>) -> Result<u64, CallError> {
        let (nr, args, input) = encode(call, self.scratch);
        if input.len() as u64 > SCRATCH_PAGES * crate::sys::page_size() {
            return Err(CallError::Errno(Errno::E2BIG));
        }
        if !input.is_empty() {
            mem::write_vm(self.pid, self.scratch, &input)
                .map_err(|e| CallError::Ptrace(format!("write scratch: {e}")))?;
        }
        self.raw(thread, nr, args)
    }

    fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), CallError> {
        mem::write_vm(self.pid, addr, data)
            .map_err(|e| CallError::Ptrace(format!("process_vm_writev at {addr:#x}: {e}")))
    }

    fn new_thread(&mut self, tid: i32, require: bool) -> Result<(usize, i32), CallError> {
        let s = self.scratch;
        let create = |want: bool| -> Result<inject::Outcome, CallError> {
            let (ptr, n) = if want { (s + 128, 1) } else { (0, 0) };
            let mut input = abi::clone_args_bytes(abi::CLONE_THREAD_FLAGS, 0, ptr, n);
            input.resize(128, 0);
            input.extend_from_slice(&tid.to_ne_bytes());
            mem::write_vm(self.pid, s, &input)
                .map_err(|e| CallError::Ptrace(format!("write scratch: {e}")))?;
            Ok(inject::syscall(
                self.threads[0],
                self.insn,
                libc::SYS_clone3,
                [s, 88, 0, 0, 0, 0],
            )?)
        };
        let mut out = create(true)?;
        if out.result() == Err(Errno::EEXIST) && !require {
            out = create(false)?;
        }
        out.result().map_err(CallError::Errno)?;
        let new = *out
            .clones
            .first()
            .ok_or_else(|| CallError::Ptrace("clone3 reported no new thread".into()))?;
        match ptrace::wait(new).map_err(|e| CallError::Ptrace(format!("waitpid {new}: {e}")))? {
            ptrace::Stop::Event { .. } => {}
            other => {
                return Err(CallError::Ptrace(format!(
                    "new thread {new} stopped with {other:?}"
                )));
            }
        }
        self.threads.push(new);
        Ok((self.threads.len() - 1, new.as_raw()))
    }

    fn xsave_layout(&mut self) -> Result<(u64, usize), CallError> {
        let x = ptrace::get_xstate(self.pid)
            .map_err(|e| CallError::Ptrace(format!("PTRACE_GETREGSET: {e}")))?;
        Ok((crate::sys::xsave::xfeatures(&x).unwrap_or(0), x.len()))
    }

    fn take_warm(&mut self) -> Option<(u64, u64)> {
        self.warm.take()
    }

    fn take_holder(&mut self) -> Option<super::warm::Warm> {
        self.holder.take()
    }

    fn vdso_block(&mut self) -> Result<Option<vdso::VdsoBlock>, CallError> {
        let maps = procfs::maps(self.pid).map_err(|e| CallError::Ptrace(format!("maps: {e}")))?;
        Ok(vdso::find(&maps))
    }

    fn finish(&mut self, states: &[ThreadState<'_>]) -> Result<(), CallError> {
        let (start, end) = self.helper;
        self.raw(0, libc::SYS_munmap, [start, end - start, 0, 0, 0, 0])?;
        if let Some((s, e)) = self.warm.take() {
            self.raw(0, libc::SYS_munmap, [s, e - s, 0, 0, 0, 0])?;
        }
        for (&tid, st) in self.threads.iter().zip(states) {
            let mut regs = st.regs;
            regs[reg::ORIG_RAX] = u64::MAX;
            let pe = |what: &'static str| {
                move |e: Errno| CallError::Ptrace(format!("{what} {tid}: {e}"))
            };
            ptrace::setregs(tid, &regs).map_err(pe("PTRACE_SETREGS"))?;
            ptrace::set_xstate(tid, st.xsave).map_err(pe("PTRACE_SETREGSET"))?;
            ptrace::set_sigmask(tid, st.sigmask).map_err(pe("PTRACE_SETSIGMASK"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_gap() {
        let taken = [(0x100000, 0x200000), (0x205000, 0x300000)];
        assert_eq!(pick_free(&taken, 0x5000, 0x100000), Some(0x200000));
        assert_eq!(pick_free(&taken, 0x6000, 0x100000), Some(0x300000));
        assert_eq!(pick_free(&[], 0x5000, 0x100000), Some(0x100000));
    }

    #[test]
    fn lays_out_structs() {
        let (nr, args, input) = encode(
            &Call::SetLock {
                fd: 3,
                ofd: false,
                write: true,
                start: 10,
                len: 0,
            },
            0x9000,
        );
        assert_eq!(
            (nr, args[1], args[2]),
            (libc::SYS_fcntl, libc::F_SETLK as u64, 0x9000)
        );
        assert_eq!(input.len(), 32);
        assert_eq!(
            u16::from_ne_bytes([input[0], input[1]]),
            u16::try_from(libc::F_WRLCK).unwrap()
        );
        assert_eq!(u64::from_ne_bytes(input[8..16].try_into().unwrap()), 10);
        let (_, args, input) = encode(
            &Call::Open {
                path: "/x",
                flags: 2,
            },
            0x9000,
        );
        assert_eq!((args[1], input.as_slice()), (0x9000, &b"/x\0"[..]));
    }
}
