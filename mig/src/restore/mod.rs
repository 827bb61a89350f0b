//! Restore (DESIGN "Migration" step 5): rebuild a process from an image
//! directory by driving a stub with ptrace, in the caller's namespaces.
//!
//! Order: read and verify the image; check this node can take it (vDSO,
//! CPU, files); fork the stub (old PID when free) and empty it; place the
//! vDSO; map memory and write pages; mm fields; descriptors, cwd, locks;
//! signal handlers; threads; umask/rlimits; credentials last; pending
//! signals and registers; run. Any failure kills the stub, so no
//! half-built process is left, and names its [`Step`].
//!
//! - [`inject`]: the [`Target`] trait and the calls it runs.
//! - [`stub`]: the real target, a ptraced stub process.
//! - [`mm`], [`files`], [`state`]: the steps.
//! - [`lazy`]: `migfs restore --lazy`: the process runs before its
//!   private anonymous memory is in.
//! - [`stream`]: an eager move's anonymous memory, received by the stub
//!   straight into place.

#[cfg(test)]
pub mod fake;
pub mod files;
pub mod inject;
pub mod lazy;
pub mod mm;
pub mod pin;
pub mod state;
pub mod stream;
pub mod stub;
pub mod warm;

use std::path::Path;
use std::time::{Duration, Instant};

use migfs_proto::image::{Creds, Image, VmaKind};

use crate::error::{RestoreCause, RestoreError, Step};
use crate::image::persist::{self, PagesReader};
use crate::sys::{procfs, vdso};
pub use inject::{Call, CallError, Target, ThreadState};

/// Knobs of a restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Fail when the old PID (or a thread id) is taken, instead of using
    /// another.
    pub require_pid: bool,
}

/// Called with the PID once the process is rebuilt, before it runs; an
/// error destroys it (a move's commit point).
pub type BeforeResume = Box<dyn FnOnce(i32) -> Result<(), String> + Send>;

/// What a migration adds to a restore.
#[derive(Default)]
pub struct Extras {
    /// Leave the image's lazy ranges to a userfaultfd handler.
    pub lazy: Option<crate::pages::LazyConfig>,
    /// Or have the stub receive them, before anything else runs in it
    /// (an eager move, [`stream`]).
    pub stream: Option<stream::StreamFill>,
    /// Hold the rebuilt process until this says go.
    pub before_resume: Option<BeforeResume>,
    /// A path the process opens (read-only) for its relay-pipe
    /// descriptors: the read end of a new stdin relay pipe
    /// (`/proc/<restorer>/fd/<n>`).
    pub relay_stdin: Option<String>,
    /// Called with the rebuilt process's PID just before it takes its
    /// locks again: hands it the locks its checkpoint parked.
    pub claim_locks: Option<ClaimLocks>,
}

/// See [`Extras::claim_locks`].
pub type ClaimLocks = Box<dyn FnOnce(i32) -> Result<(), String> + Send>;

/// A restored process, running.
#[derive(Debug)]
pub struct Restored {
    /// Its PID here.
    pub pid: i32,
    /// Whether that is the PID it had.
    pub same_pid: bool,
    /// Bytes of memory written.
    pub bytes: u64,
    /// Time spent reading the image and checking files.
    pub prepare: Duration,
    /// Time spent writing memory.
    pub memory: Duration,
    /// The whole restore.
    pub total: Duration,
    /// The lazy memory still being filled (with [`Extras::lazy`]).
    pub lazy: Option<crate::pages::LazyPages>,
    /// Bytes of its mappings placed from warm memory, or of the warm
    /// memory its lazy pages are staged in ([`warm`]).
    pub warm: u64,
}

/// Rebuilds the process whose image is in `dir` and lets it run.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<Restored, RestoreError> {
    restore_with(dir, opts, Extras::default())
}

/// [`restore`] with lazy memory and a hold before the process runs.
#[tracing::instrument(skip_all, fields(dir = %dir.display()))]
pub fn restore_with(
    dir: &Path,
    opts: &RestoreOptions,
    extras: Extras,
) -> Result<Restored, RestoreError> {
    let t0 = Instant::now();
    let persist::ImageDir { image, pages } = persist::read_image(dir)
        .map_err(|e| RestoreError::new(Step::ReadImage, RestoreCause::Image(e)))?;
    restore_image(dir, opts, extras, t0, &image, &pages)
}

/// [`restore_with`] once the image is read (and maybe made lazy).
fn restore_image(
    dir: &Path,
    opts: &RestoreOptions,
    extras: Extras,
    t0: Instant,
    image: &Image,
    pages: &PagesReader,
) -> Result<Restored, RestoreError> {
    check_lazy(image, &extras)?;
    check_vdso(image)?;
    let resolved = files::resolve(image, dir)?;
    let res = restore_resolved(opts, extras, t0, image, pages, &resolved);
    resolved.remove_ghosts();
    res
}

/// [`restore_with`] once the files are found.
fn restore_resolved(
    opts: &RestoreOptions,
    mut extras: Extras,
    t0: Instant,
    image: &Image,
    pages: &PagesReader,
    resolved: &files::Resolved,
) -> Result<Restored, RestoreError> {
    let ours = own_creds()?;
    let prepare = t0.elapsed();
    let avoid: Vec<(u64, u64)> = image
        .mm
        .iter()
        .flat_map(|m| &m.vmas)
        .map(|v| (v.start, v.end))
        .collect();
    let old = image.process.as_ref().map_or(0, |p| p.pid);
    let pin = pin::Pin::here();
    // Warm memory: an eager restore places the process's memory in it; a
    // lazy one stages pages there (crate::pages::staged), and keeps the
    // holder to move them.
    let (warm, staged) = match (extras.stream.as_mut(), extras.lazy.as_mut()) {
        (Some(s), _) => (
            s.warm
                .take()
                .and_then(|take| take(stream::warm_need(image))),
            false,
        ),
        (None, Some(l)) => (
            l.warm
                .take()
                .and_then(|take| take(crate::pages::lazy::staging_need(image))),
            true,
        ),
        (None, None) => (None, false),
    };
    let mut stub = stub::PtraceStub::spawn(Some(old), opts.require_pid, &avoid, warm, staged)?;
    if let Some(p) = &pin {
        p.join(stub.pid());
    }
    tracing::debug!(
        prepare_ms = prepare.as_secs_f64() * 1e3,
        stub_ms = (t0.elapsed() - prepare).as_secs_f64() * 1e3,
        "image read, files checked, stub ready"
    );
    match rebuild(&mut stub, image, resolved, pages, opts, &ours, &mut extras) {
        Ok(stats) => {
            if let Some(p) = &pin {
                // Threads with a captured CPU mask have it already.
                let handler = stats.lazy.as_ref().and_then(|l| l.handler_tid());
                let unset = stub
                    .tids()
                    .into_iter()
                    .zip(&image.threads)
                    .filter(|(_, th)| th.sched.as_ref().is_none_or(|s| s.cpus.is_empty()))
                    .map(|(tid, _)| tid);
                p.release(unset.chain(handler));
            }
            drop(pin);
            let pid = stub.release().map_err(|e| {
                RestoreError::new(Step::Resume, files::cause("let it run".into(), e))
            })?;
            let total = t0.elapsed();
            tracing::info!(pid, old, ?total, "restored");
            Ok(Restored {
                pid,
                same_pid: pid == old,
                bytes: stats.bytes,
                prepare,
                memory: stats.memory,
                total,
                lazy: stats.lazy,
                warm: stats.warm,
            })
        }
        Err(e) => {
            stub.kill();
            Err(e)
        }
    }
}

/// What [`rebuild`] did.
#[derive(Debug, Default)]
pub struct RebuildStats {
    /// Bytes of memory written.
    pub bytes: u64,
    /// Time spent mapping and writing memory.
    pub memory: Duration,
    /// The lazy memory handler, when restoring lazily.
    pub lazy: Option<crate::pages::LazyPages>,
    /// Bytes of mappings placed from warm memory.
    pub warm: u64,
}

/// Runs every restore step against `t`, in order.
pub fn rebuild<T: Target>(
    t: &mut T,
    img: &Image,
    r: &files::Resolved,
    pages: &PagesReader,
    opts: &RestoreOptions,
    ours: &Creds,
    extras: &mut Extras,
) -> Result<RebuildStats, RestoreError> {
    let mut steps = Steps::new();
    check_cpu(t, img)?;
    mm::place_vdso(t, img)?;
    steps.mark("vdso");
    mm::map_memory(t, img, r)?;
    steps.mark("map");
    let mut bytes = mm::write_memory(t, img, pages)?;
    steps.mark("write");
    let mut warm = 0;
    if let Some(s) = extras.stream.take() {
        let filled = stream::fill(t, img, s)?;
        bytes += filled.bytes;
        warm = filled.warm;
        steps.mark("stream");
    }
    // The kernel may touch lazy memory in any later step: handle faults now.
    let lazy = match extras.lazy.take() {
        Some(cfg) => Some(crate::pages::lazy::start(t, img, cfg)?),
        None => None,
    };
    steps.mark("lazy");
    let res = rest(t, img, r, opts, ours, extras, &mut steps);
    match res {
        Ok(memory) => Ok(RebuildStats {
            bytes,
            memory,
            warm: warm.max(
                lazy.as_ref()
                    .map_or(0, crate::pages::LazyPages::staging_bytes),
            ),
            lazy,
        }),
        // A step that failed because the page source did (the handler
        // killed the stub) says so.
        Err(e) => match lazy.as_ref().and_then(crate::pages::LazyPages::failed) {
            Some(why) => Err(RestoreError::new(
                e.step,
                RestoreCause::Refused(format!("lazy memory failed: {why} (then: {})", e.cause)),
            )),
            None => Err(e),
        },
    }
}

/// The steps after memory; returns the time memory took.
fn rest<T: Target>(
    t: &mut T,
    img: &Image,
    r: &files::Resolved,
    opts: &RestoreOptions,
    ours: &Creds,
    extras: &mut Extras,
    steps: &mut Steps,
) -> Result<Duration, RestoreError> {
    mm::seal_memory(t, img)?;
    let memory = steps.since("vdso");
    steps.mark("seal");
    mm::mm_fields(t, img, r)?;
    steps.mark("mm fields");
    files::open_fds(t, img, r, extras.relay_stdin.as_deref())?;
    if let Some(claim) = extras.claim_locks.take() {
        claim(t.pid()).map_err(|why| refused(Step::Locks, why))?;
    }
    files::take_locks(t, img, r)?;
    steps.mark("files");
    state::sigactions(t, img)?;
    state::itimers(t, img)?;
    let tids = state::threads(t, img, opts.require_pid)?;
    steps.mark("threads");
    state::process_state(t, img)?;
    state::credentials(t, img, ours)?;
    steps.mark("state");
    tracing::debug!(steps = %steps, "rebuilt");
    if let Some(hold) = extras.before_resume.take() {
        hold(t.pid()).map_err(|why| refused(Step::Resume, why))?;
    }
    state::resume(t, img, &tids)?;
    Ok(memory)
}

/// Durations of the rebuild steps, for the log.
struct Steps {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Time since the end of step `after`.
    fn since(&self, after: &str) -> Duration {
        let mut sum = Duration::ZERO;
        let mut counting = false;
        for (name, d) in &self.done {
            if counting {
                sum += *d;
            }
            counting |= *name == after;
        }
        sum + self.last.elapsed()
    }

    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, d) in &self.done {
            write!(f, "{name} {:.1} ms; ", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// An image whose lazy memory is not in it cannot be restored without a
/// page source.
fn check_lazy(img: &Image, extras: &Extras) -> Result<(), RestoreError> {
    let lazy = crate::pages::lazy_ranges(img);
    if extras.lazy.is_none() && extras.stream.is_none() && !lazy.is_empty() {
        let bytes = crate::pages::ranges::total(&lazy);
        return Err(refused(
            Step::ReadImage,
            format!(
                "the image leaves {} KiB of memory in {} lazy ranges to a page source; \
                 restore it with a lazy configuration",
                bytes >> 10,
                lazy.len()
            ),
        ));
    }
    Ok(())
}

fn refused(step: Step, why: String) -> RestoreError {
    RestoreError::new(step, RestoreCause::Refused(why))
}

/// This node's vDSO must be the one the process was using.
fn check_vdso(img: &Image) -> Result<(), RestoreError> {
    let Some(m) = &img.mm else { return Ok(()) };
    let parts: Vec<_> = m
        .vmas
        .iter()
        .filter(|v| v.kind == VmaKind::VmaVdsoBlock as i32)
        .collect();
    let Some(first) = parts.first() else {
        return Ok(());
    };
    let me = nix::unistd::getpid();
    let maps = procfs::maps(me).map_err(|source| {
        RestoreError::new(
            Step::CheckTarget,
            RestoreCause::Io {
                what: "own maps".into(),
                source,
            },
        )
    })?;
    let ours = vdso::find(&maps)
        .ok_or_else(|| refused(Step::CheckTarget, "this node has no vDSO".into()))?;
    let want: Vec<(String, u64, u64)> = parts
        .iter()
        .map(|v| (v.name.clone(), v.start - first.start, v.end - first.start))
        .collect();
    if ours.parts != want {
        return Err(refused(
            Step::CheckTarget,
            format!(
                "the vDSO block here is {:?}, the image's is {want:?}",
                ours.parts
            ),
        ));
    }
    let hash = vdso::text_hash(me, &ours).map_err(|source| {
        RestoreError::new(
            Step::CheckTarget,
            RestoreCause::Io {
                what: "own vDSO".into(),
                source,
            },
        )
    })?;
    if hash[..] != m.vdso_blake3[..] {
        return Err(refused(
            Step::CheckTarget,
            "the vDSO here differs from the checkpointed one (another kernel?)".into(),
        ));
    }
    Ok(())
}

/// The CPU must lay out xsave state as the image's does.
fn check_cpu<T: Target>(t: &mut T, img: &Image) -> Result<(), RestoreError> {
    let Some(cpu) = &img.cpu else { return Ok(()) };
    let (feat, size) = t.xsave_layout().map_err(|e| {
        RestoreError::new(Step::CheckTarget, files::cause("xsave layout".into(), e))
    })?;
    if feat != cpu.xfeatures || size != cpu.xsave_size as usize {
        return Err(refused(
            Step::CheckTarget,
            format!(
                "this CPU's xsave state (features {feat:#x}, {size} bytes) differs from the image's ({:#x}, {} bytes)",
                cpu.xfeatures, cpu.xsave_size
            ),
        ));
    }
    Ok(())
}

fn own_creds() -> Result<Creds, RestoreError> {
    let st = procfs::status("self").map_err(|source| {
        RestoreError::new(
            Step::CheckTarget,
            RestoreCause::Io {
                what: "own status".into(),
                source,
            },
        )
    })?;
    Ok(crate::capture::process::creds_of(&st))
}

#[cfg(test)]
mod tests {
    use migfs_proto::image::{
        Creds, Fd, FileLock, FileRef, MemoryMap, PendingSignal, Process, SigAction, Thread, Vma,
        VmaKind,
    };
    use nix::errno::Errno;

    use super::fake::Fake;
    use super::*;
    use crate::image::format::FORMAT_VERSION;
    use crate::image::persist::{PagesWriter, read_image, write_image};
    use crate::sys::vdso::VdsoBlock;

    const VVAR: u64 = 0x7fff_0000_0000;

    fn thread(tid: i32) -> Thread {
        Thread {
            tid,
            comm: "t".into(),
            regs: vec![0; 27],
            xsave: vec![0; 1024],
            robust_list_len: 24,
            ..Default::default()
        }
    }

    /// An image of a two-thread process with one anonymous mapping holding
    /// a page, a file mapping, the vDSO, two descriptors, a lock, a
    /// handler, a pending signal and other credentials; read back from disk.
    fn image(dir: &Path) -> persist::ImageDir {
        let mut w = PagesWriter::create(dir).unwrap();
        let page = vec![1u8; 4096];
        let seg = w
            .segment(0x10000, &page, *blake3::hash(&page).as_bytes())
            .unwrap();
        let file = FileRef {
            path: "/lib/x.so".into(),
            mode: libc::S_IFREG,
            ..Default::default()
        };
        let vma = |start, end, kind: VmaKind, name: &str| Vma {
            start,
            end,
            prot: 3,
            kind: kind as i32,
            name: name.into(),
            ..Default::default()
        };
        let img = Image {
            format_version: FORMAT_VERSION,
            arch: std::env::consts::ARCH.into(),
            process: Some(Process {
                pid: 4242,
                umask: 0o27,
                creds: Some(Creds {
                    uids: vec![1000; 4],
                    gids: vec![1000; 4],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            threads: vec![thread(4242), thread(4243)],
            mm: Some(MemoryMap {
                page_size: 4096,
                vmas: vec![
                    vma(0x10000, 0x12000, VmaKind::VmaAnon, ""),
                    Vma {
                        file: Some(file.clone()),
                        prot: 5,
                        ..vma(0x20000, 0x21000, VmaKind::VmaFile, "/lib/x.so")
                    },
                    vma(VVAR, VVAR + 0x4000, VmaKind::VmaVdsoBlock, "[vvar]"),
                    vma(
                        VVAR + 0x4000,
                        VVAR + 0x6000,
                        VmaKind::VmaVdsoBlock,
                        "[vdso]",
                    ),
                ],
                segments: vec![seg],
                ..Default::default()
            }),
            fds: vec![
                Fd {
                    fd: 3,
                    flags: 2,
                    file: Some(FileRef {
                        path: "/data/a".into(),
                        ..Default::default()
                    }),
                    dup_of: -1,
                    pos: 9,
                    ..Default::default()
                },
                Fd {
                    fd: 5,
                    flags: 2,
                    file: Some(FileRef {
                        path: "/data/a".into(),
                        ..Default::default()
                    }),
                    dup_of: 3,
                    ..Default::default()
                },
            ],
            locks: vec![FileLock {
                fd: 3,
                write: true,
                start: 0,
                len: 10,
                ..Default::default()
            }],
            sigactions: vec![SigAction {
                signo: 10,
                handler: 0x4000,
                ..Default::default()
            }],
            shared_pending: vec![PendingSignal {
                signo: 12,
                siginfo: vec![0; 128],
            }],
            pages_size: w.size(),
            ..Default::default()
        };
        drop(w);
        write_image(dir, &img).unwrap();
        read_image(dir).unwrap()
    }

    fn fake() -> Fake {
        let mut f = Fake::new();
        f.vdso = Some(VdsoBlock {
            start: VVAR,
            end: VVAR + 0x6000,
            vdso_start: VVAR + 0x4000,
            vdso_end: VVAR + 0x6000,
            parts: vec![
                ("[vvar]".into(), 0, 0x4000),
                ("[vdso]".into(), 0x4000, 0x6000),
            ],
        });
        f
    }

    fn run(f: &mut Fake, dir: &Path) -> Result<RebuildStats, RestoreError> {
        let d = image(dir);
        let ours = Creds {
            uids: vec![0; 4],
            gids: vec![0; 4],
            ..Default::default()
        };
        rebuild(
            f,
            &d.image,
            &files::Resolved::default(),
            &d.pages,
            &RestoreOptions::default(),
            &ours,
            &mut Extras::default(),
        )
    }

    #[test]
    fn steps_run_in_order_at_the_image_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = fake();
        let stats = run(&mut f, dir.path()).unwrap();
        assert_eq!(stats.bytes, 4096);
        let at = |needle: &str| {
            f.find(needle)
                .unwrap_or_else(|| panic!("no {needle} in {:#?}", f.log))
        };
        assert!(at("MapVdso { addr: 140733193388032 }") < at("Mmap { addr: 65536"));
        assert!(
            at("Mmap { addr: 65536, len: 8192, prot: 3")
                < at("WriteMemory { addr: 65536, len: 4096 }")
        );
        assert!(
            at("Open { path: \"/lib/x.so\"")
                < at("Mmap { addr: 131072, len: 4096, prot: 5, flags: 18")
        );
        assert!(at("WriteMemory") < at("SetMmMap"));
        assert!(at("SetMmMap") < at("CloseRange { first: 0 }"));
        assert!(at("CloseRange { first: 0 }") < at("Open { path: \"/data/a\", flags: 2 }"));
        assert!(at("Lseek { fd: 3, offset: 9 }") < at("Dup3 { old: 3, new: 5, cloexec: false }"));
        assert!(
            at("Dup3 { old: 3, new: 5")
                < at("SetLock { fd: 3, ofd: false, write: true, start: 0, len: 10 }")
        );
        assert_eq!(f.log.iter().filter(|l| l.contains("SigAction")).count(), 62);
        assert!(
            f.log
                .iter()
                .any(|l| l.contains("SigAction { signo: 10, handler: 16384"))
        );
        assert!(at("NewThread { tid: 4243") < at("1 SetTidAddress"));
        assert!(at("1 SigAltStack").max(at("1 SetName")) < at("Umask { mask: 23 }"));
        // Credentials come last, uid after gid, then only the resume.
        let uid = at("SetResUid { ids: [1000, 1000, 1000] }");
        assert!(at("SetGroups") < at("SetResGid") && at("SetResGid") < uid);
        assert!(
            f.log[uid + 1..]
                .iter()
                .all(|l| l.contains("Capset") || l.contains("Queue") || l.contains("Finish")),
            "{:#?}",
            &f.log[uid..]
        );
        assert!(at("Queue { tgid: 4242, tid: 0, signo: 12") < at("Finish { threads: 2 }"));
        assert_eq!(f.log.last().unwrap(), "0 Finish { threads: 2 }");
    }

    #[test]
    fn a_failing_call_names_its_step() {
        for (prefix, step, says) in [
            ("MapVdso", "place vdso", "arch_prctl(ARCH_MAP_VDSO_64"),
            (
                "Mmap { addr: 131072",
                "map memory",
                "map 20000-21000 /lib/x.so",
            ),
            ("WriteMemory", "write memory", "write 0x10000 (+0x1000)"),
            ("SetMmMap", "mm fields", "prctl(PR_SET_MM_MAP)"),
            (
                "Open { path: \"/data/a\"",
                "open files",
                "fd 3: open /data/a",
            ),
            (
                "SetLock",
                "take locks",
                "fd 3: LOCK_POSIX write lock on /data/a (bytes 0+10)",
            ),
            (
                "SigAction { signo: 10",
                "signal handlers",
                "rt_sigaction(10)",
            ),
            ("Rseq", "threads", "thread"),
            ("Prlimit", "process state", "rlimit"),
            ("SetResUid", "credentials", "setresuid"),
            ("Finish", "resume", "load registers"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut f = fake();
            f.log.clear();
            f.fail = Some((prefix.to_owned(), Errno::EAGAIN));
            let mut img_dir = image(dir.path());
            if prefix == "Rseq" || prefix == "Prlimit" {
                img_dir.image.threads[0].rseq = Some(Default::default());
                img_dir.image.process.as_mut().unwrap().rlimits = vec![Default::default()];
            }
            let ours = Creds::default();
            let e = rebuild(
                &mut f,
                &img_dir.image,
                &files::Resolved::default(),
                &img_dir.pages,
                &RestoreOptions::default(),
                &ours,
                &mut Extras::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with(&format!("restore failed at step \"{step}\": ")),
                "{prefix}: {e}"
            );
            assert!(e.contains(says) && e.contains("EAGAIN"), "{prefix}: {e}");
        }
    }

    /// Rebuilds `image` with thread 1 given a nice, policy and CPU mask,
    /// failing the first call starting with `fail`.
    fn rebuild_with_sched(fail: Option<(&str, Errno)>) -> (Fake, Result<RebuildStats, String>) {
        let dir = tempfile::tempdir().unwrap();
        let mut f = fake();
        f.log.clear();
        f.fail = fail.map(|(p, e)| (p.to_owned(), e));
        let mut img_dir = image(dir.path());
        img_dir.image.threads[1].sched = Some(migfs_proto::image::Sched {
            nice: 7,
            policy: libc::SCHED_BATCH,
            priority: 0,
            cpus: vec![0b10, 0],
        });
        let r = rebuild(
            &mut f,
            &img_dir.image,
            &files::Resolved::default(),
            &img_dir.pages,
            &RestoreOptions::default(),
            &Creds::default(),
            &mut Extras::default(),
        )
        .map_err(|e| e.to_string());
        (f, r)
    }

    #[test]
    fn scheduling_is_set_in_its_own_thread_before_the_credentials() {
        let (f, r) = rebuild_with_sched(None);
        r.unwrap();
        let at = |needle: &str| {
            f.find(needle)
                .unwrap_or_else(|| panic!("no {needle} in {:#?}", f.log))
        };
        assert!(at("1 SetNice { nice: 7 }") < at("1 SetScheduler { policy: 3, priority: 0 }"));
        assert!(at("1 SetAffinity { mask: [2, 0] }") < at("SetResUid"));
        assert!(
            !f.log.iter().any(|l| l.starts_with("0 SetNice")),
            "a thread with no captured scheduling is left alone"
        );
        // A mask of CPUs this machine does not have: any CPU, not a failure.
        let (f, r) = rebuild_with_sched(Some(("SetAffinity", Errno::EINVAL)));
        r.unwrap();
        assert!(
            f.find("1 SetAffinity { mask: [255, 255] }").is_some(),
            "{:#?}",
            f.log
        );
        // A policy the kernel refuses fails the restore at its step.
        let (_, r) = rebuild_with_sched(Some(("SetScheduler", Errno::EPERM)));
        let e = r.unwrap_err();
        assert!(
            e.starts_with("restore failed at step \"threads\": ")
                && e.contains("thread 4243: sched_setscheduler (policy 3, priority 0)")
                && e.contains("EPERM"),
            "{e}"
        );
    }

    #[test]
    fn a_vdso_landing_elsewhere_or_another_cpu_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = fake();
        f.vdso.as_mut().unwrap().start += 0x1000;
        let e = run(&mut f, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("\"place vdso\"") && e.contains("landed at"),
            "{e}"
        );
        let mut f = fake();
        f.xsave = (7, 4096);
        let d = image(dir.path());
        let mut img = d.image.clone();
        img.cpu = Some(migfs_proto::image::Cpu {
            xfeatures: 7,
            xsave_size: 2048,
        });
        let e = rebuild(
            &mut f,
            &img,
            &files::Resolved::default(),
            &d.pages,
            &RestoreOptions::default(),
            &Creds::default(),
            &mut Extras::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"check target\"") && e.contains("xsave"), "{e}");
    }
}
