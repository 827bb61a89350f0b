//! Lazy memory and dirty tracking with real processes (C programs in
//! `tests/progs`, built with gcc here): capture without anonymous memory,
//! restore with userfaultfd on this machine while the original stays
//! frozen and serves its pages (so the copy gets a new PID), pushes,
//! discards, failing fetches; stop-and-copy with the original sending its
//! own pages and the stub receiving them into place; and dirty tracking
//! of a running process for pre-copy.
//!
//! Needs root (ptrace, pidfd_getfd, clone3, PR_SET_MM_MAP), a kernel with
//! userfaultfd write-protect (WP_ASYNC, WP_UNPOPULATED) and PAGEMAP_SCAN
//! (6.7+), and gcc: otherwise SKIP, or fail when MIGFS_REQUIRE_PRIV=1.
//! Every process a test starts is owned by a guard that kills and reaps
//! it, also when the test panics.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use migfs_mig::capture::{self, CaptureOptions};
use migfs_mig::freeze::{self, Frozen};
use migfs_mig::pages::wire::{Incoming, Link, Origin, PageServer};
use migfs_mig::pages::{self, LazyConfig, LazyPages, PageFetch, PageSource, Tracker};
use migfs_mig::restore::stream::StreamFill;
use migfs_mig::restore::warm::{self, Warm, WarmPool, WarmTake};
use migfs_mig::restore::{self, Extras, RestoreOptions};
use migfs_mig::sys::uffd;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const PAGE: u64 = 4096;
const WAIT_MS: u64 = 60_000;

// ---------------------------------------------------------------- probe

fn probe() -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    if field("Uid").split_whitespace().nth(1) != Some("0") {
        return Err("needs root".into());
    }
    let caps = u64::from_str_radix(&field("CapEff"), 16).unwrap_or(0);
    if caps & (1 << 19) == 0 || caps & (1 << 21) == 0 {
        return Err("needs CAP_SYS_PTRACE and CAP_SYS_ADMIN".into());
    }
    let want = uffd::FEATURE_EVENT_REMOVE
        | uffd::FEATURE_EVENT_UNMAP
        | uffd::FEATURE_EVENT_REMAP
        | uffd::FEATURE_WP_ASYNC
        | uffd::FEATURE_WP_UNPOPULATED;
    let have = uffd::available_features().map_err(|e| format!("no userfaultfd: {e}"))?;
    if have & want != want {
        return Err(format!(
            "userfaultfd lacks features {:#x} (kernel too old)",
            want & !have
        ));
    }
    if !migfs_mig::sys::pagemap::supported() {
        return Err("no PAGEMAP_SCAN (kernel older than 6.7)".into());
    }
    match Command::new("gcc").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("needs gcc to build the test programs".into()),
    }
}

/// Whether these tests can run; see the module doc.
fn require() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    match PROBE.get_or_init(probe) {
        Ok(()) => true,
        Err(why) if std::env::var("MIGFS_REQUIRE_PRIV").as_deref() == Ok("1") => {
            panic!("MIGFS_REQUIRE_PRIV=1 but the pages tests cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIP: {why}");
            false
        }
    }
}

// ------------------------------------------------------------- programs

/// Builds `tests/progs/<name>.c` once per test binary, into
/// `/tmp/migfs-pages-progs-<pid>` (world-readable: one test runs a
/// program as another user). A static is never dropped, so the first call
/// removes the directories of test processes that are gone instead.
fn prog(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir = DIR.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        const PREFIX: &str = "migfs-pages-progs-";
        let tmp = std::env::temp_dir();
        for e in fs::read_dir(&tmp).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let gone = name
                .strip_prefix(PREFIX)
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if gone {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let d = tmp.join(format!("{PREFIX}{}", std::process::id()));
        // One left by an earlier process that had our PID holds old builds.
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        d
    });
    let out = dir.join(name);
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !out.exists() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/progs")
            .join(format!("{name}.c"));
        let o = Command::new("gcc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .output()
            .expect("run gcc");
        assert!(
            o.status.success(),
            "gcc {}: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    out
}

// --------------------------------------------------------------- guards

/// A process under test, killed and reaped on drop.
struct Proc {
    pid: i32,
    child: Option<Child>,
}

impl Proc {
    fn start(bin: &Path, args: &[&str]) -> Proc {
        Proc::start_as(bin, args, None)
    }

    /// [`Proc::start`] as user `uid` (and group `uid`) when given.
    fn start_as(bin: &Path, args: &[&str], uid: Option<u32>) -> Proc {
        let mut cmd = Command::new(bin);
        if let Some(id) = uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, id);
            std::os::unix::process::CommandExt::gid(&mut cmd, id);
        }
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start test program");
        Proc {
            pid: i32::try_from(child.id()).unwrap(),
            child: Some(child),
        }
    }

    /// A process restored by this test process (its child, no `Child`).
    fn adopt(pid: i32) -> Proc {
        Proc { pid, child: None }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.pid)
    }

    fn signal(&self, s: Signal) {
        kill(self.pid(), s).expect("signal the test program");
    }

    /// Waits up to `ms` for it to end; its wait status.
    fn wait_gone(&mut self, ms: u64) -> Option<nix::sys::wait::WaitStatus> {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            match waitpid(self.pid(), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => thread::sleep(Duration::from_millis(10)),
                Ok(s) => {
                    self.pid = 0;
                    return Some(s);
                }
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.pid <= 0 {
            return;
        }
        let _ = kill(self.pid(), Signal::SIGKILL);
        match &mut self.child {
            Some(c) => drop(c.wait()),
            None => drop(nix::sys::wait::waitpid(self.pid(), None)),
        }
    }
}

// -------------------------------------------------------------- helpers

/// Waits up to `ms` for a line of `path` starting with `prefix`.
fn wait_line(path: &Path, prefix: &str, ms: u64) -> String {
    let end = Instant::now() + Duration::from_millis(ms);
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
            return l.to_owned();
        }
        assert!(
            Instant::now() < end,
            "no line starting with {prefix:?} in {} after {ms} ms:\n{text}",
            path.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// The number of lines of `path` starting with `prefix`.
fn count_lines(path: &Path, prefix: &str) -> usize {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

/// Waits for the `n`-th line starting with `prefix`; returns it.
fn wait_nth(path: &Path, prefix: &str, n: usize, ms: u64) -> String {
    let end = Instant::now() + Duration::from_millis(ms);
    while count_lines(path, prefix) < n {
        assert!(
            Instant::now() < end,
            "fewer than {n} lines {prefix:?} in {}:\n{}",
            path.display(),
            fs::read_to_string(path).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(5));
    }
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .nth(n - 1)
        .unwrap()
        .to_owned()
}

fn parse_addr(line: &str) -> u64 {
    let hex = line
        .split_whitespace()
        .last()
        .unwrap()
        .trim_start_matches("0x");
    u64::from_str_radix(hex, 16).unwrap()
}

/// Whether `pid` holds a userfaultfd descriptor.
fn has_uffd(pid: i32) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy().contains("userfaultfd"))
}

/// Whether a mapping of `pid` is still registered with a userfaultfd
/// (VmFlags "um" missing, "uw" write-protect) after a short wait: a
/// process this test binary forks for another test (gcc, a restore stub)
/// holds copies of our descriptors for a moment, and the ranges are
/// unregistered only when the last copy of the userfaultfd is closed.
fn has_uffd_ranges(pid: i32) -> bool {
    let registered = || {
        fs::read_to_string(format!("/proc/{pid}/smaps"))
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("VmFlags:"))
            .any(|f| f.split_whitespace().any(|x| x == "um" || x == "uw"))
    };
    let end = Instant::now() + Duration::from_secs(2);
    while registered() {
        if Instant::now() > end {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

// ---------------------------------------------------------- lazy setup

/// A `lazy_mem` process holding `mib` MiB, frozen and captured with its
/// anonymous memory left out; its pages served by a [`PageSource`].
struct Lazy {
    // Drop order: the frozen original is killed by `orig`'s guard after
    // `frozen` lets go of it.
    frozen: Option<Frozen>,
    orig: Proc,
    dir: tempfile::TempDir,
    out: PathBuf,
    region: (u64, u64),
    source: Arc<PageSource>,
}

impl Lazy {
    fn new(mib: u64) -> Lazy {
        Lazy::with_threads(mib, 0)
    }

    /// [`Lazy::new`] with `threads` checking threads in the program.
    fn with_threads(mib: u64, threads: usize) -> Lazy {
        Lazy::build(mib, threads, false)
    }

    /// [`Lazy::new`] with the second quarter of the region discarded
    /// (SIGUSR2) before the freeze: a hole in a mapping.
    fn sparse(mib: u64) -> Lazy {
        Lazy::build(mib, 0, true)
    }

    /// [`Lazy::new`] of a process of user `uid`.
    fn as_user(mib: u64, uid: u32) -> Lazy {
        Lazy::build_as(mib, 0, false, Some(uid))
    }

    fn build(mib: u64, threads: usize, hole: bool) -> Lazy {
        Lazy::build_as(mib, threads, hole, None)
    }

    fn build_as(mib: u64, threads: usize, hole: bool, uid: Option<u32>) -> Lazy {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        if uid.is_some() {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        }
        let out = dir.path().join("out.txt");
        let orig = Proc::start_as(
            &prog("lazy_mem"),
            &[
                out.to_str().unwrap(),
                &mib.to_string(),
                &threads.to_string(),
            ],
            uid,
        );
        let start = parse_addr(&wait_line(&out, "filled", WAIT_MS));
        if hole {
            orig.signal(Signal::SIGUSR2);
            wait_line(&out, "dontneed done", WAIT_MS);
        }
        let frozen = freeze::freeze(orig.pid(), Duration::from_secs(10)).expect("freeze");
        let img_dir = dir.path().join("img");
        fs::create_dir(&img_dir).unwrap();
        let opts = CaptureOptions {
            lazy_anon: true,
            ..CaptureOptions::default()
        };
        let stats = capture::capture(&frozen, &img_dir, &opts, None).expect("capture");
        let img = migfs_mig::image::persist::read_image(&img_dir)
            .unwrap()
            .image;
        let ranges = pages::lazy_ranges(&img);
        let region = (start, start + (mib << 20));
        assert!(
            pages::ranges::normalize(ranges.clone())
                .iter()
                .any(|&(s, e)| s <= region.0 && region.1 <= e),
            "the region {region:x?} is not lazy: {ranges:x?}"
        );
        // The image holds no anonymous data: only file pages' private
        // copies (relocations, .data, .bss) and such.
        assert!(
            stats.pages_bytes < 2 << 20,
            "pages.img has {} bytes for a {mib} MiB process",
            stats.pages_bytes
        );
        let source = Arc::new(PageSource::new(orig.pid(), ranges).expect("page source"));
        Lazy {
            frozen: Some(frozen),
            orig,
            dir,
            out,
            region,
            source,
        }
    }

    /// Restores the copy with `fetch`; the copy's guard, its lazy pages,
    /// and how long the restore took.
    fn restore(&self, fetch: Arc<dyn PageFetch>) -> Result<(Proc, LazyPages, Duration), String> {
        self.restore_staged(fetch, None, None)
    }

    /// [`Lazy::restore`] staging its pages in `warm`, the holder taking
    /// `pull_socket` for [`LazyPages::receive`].
    fn restore_staged(
        &self,
        fetch: Arc<dyn PageFetch>,
        warm: Option<WarmTake>,
        pull_socket: Option<std::net::TcpStream>,
    ) -> Result<(Proc, LazyPages, Duration), String> {
        let t = Instant::now();
        let extras = Extras {
            lazy: Some(LazyConfig {
                fetch,
                warm,
                pull_socket,
            }),
            ..Extras::default()
        };
        let mut r = restore::restore_with(
            &self.dir.path().join("img"),
            &RestoreOptions::default(),
            extras,
        )
        .map_err(|e| e.to_string())?;
        let took = t.elapsed();
        assert!(!r.same_pid, "the original still holds its PID");
        let lazy = r.lazy.take().expect("lazy pages");
        Ok((Proc::adopt(r.pid), lazy, took))
    }

    /// Pushes every present run of the original in 4 MiB pieces; pages
    /// newly installed and bytes sent.
    fn push_all(&self, lazy: &LazyPages) -> (u64, u64) {
        let (mut pages, mut bytes) = (0, 0);
        for (s, e) in pages::chunks(&self.source.present().unwrap(), 4 << 20) {
            let mut buf = vec![0u8; usize::try_from(e - s).unwrap()];
            self.source.read(s, &mut buf).unwrap();
            pages += lazy.install(s, &buf).unwrap();
            bytes += e - s;
        }
        (pages, bytes)
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        if let Some(f) = self.frozen.take() {
            let _ = f.kill();
            self.orig.pid = 0;
        }
    }
}

/// Pages served from the frozen original, counting fetches.
struct SourceFetch {
    source: Arc<PageSource>,
    calls: AtomicU64,
}

impl SourceFetch {
    fn new(source: &Arc<PageSource>) -> Arc<SourceFetch> {
        Arc::new(SourceFetch {
            source: Arc::clone(source),
            calls: AtomicU64::new(0),
        })
    }
}

impl PageFetch for SourceFetch {
    fn fetch(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; len];
        self.source
            .read(addr, &mut buf)
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------- tests

#[test]
fn lazy_restore_faults_everything_in_on_demand() {
    if !require() {
        return;
    }
    let l = Lazy::new(256);
    let fetch = SourceFetch::new(&l.source);
    let (copy, lazy, took) = l.restore(fetch.clone()).expect("restore");
    assert!(
        !has_uffd(copy.pid),
        "the userfaultfd is still in the process"
    );
    let t = Instant::now();
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    let verify = t.elapsed();
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.stats();
    assert!(st.error.is_none(), "{st:?}");
    assert!(st.demand_faults > 0 && st.demand_pages >= 65536, "{st:?}");
    assert_eq!(st.installed_pages, 0);
    eprintln!(
        "lazy 256 MiB: restore {took:?}; verify by demand faults {verify:?} = {:.0} MB/s; \
         {} faults, {} pages, fetch {:?} ({} calls)",
        mbps(256 << 20, verify),
        st.demand_faults,
        st.demand_pages,
        st.fetch_time,
        fetch.calls.load(Ordering::Relaxed)
    );
    let fin = lazy.finish();
    assert!(fin.error.is_none());
    assert!(
        !has_uffd_ranges(copy.pid),
        "ranges still registered after finish"
    );
    copy.signal(Signal::SIGUSR1);
    let again = wait_nth(&l.out, "verified", 2, WAIT_MS);
    eprintln!("the program's own check: {line} (faulting), {again} (all there)");
    assert!(again.starts_with("verified ok"));
    copy.signal(Signal::SIGHUP);
    assert_eq!(wait_line(&l.out, "alloc", WAIT_MS), "alloc ok");
}

#[test]
fn four_threads_fault_at_once() {
    if !require() {
        return;
    }
    let l = Lazy::with_threads(128, 4);
    let (copy, lazy, _) = l.restore(SourceFetch::new(&l.source)).expect("restore");
    let t = Instant::now();
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none() && st.demand_faults > 4, "{st:?}");
    eprintln!(
        "4 threads, 128 MiB by demand faults: {:?} ({} faults, {} pages)",
        t.elapsed(),
        st.demand_faults,
        st.demand_pages
    );
    copy.signal(Signal::SIGUSR1);
    assert!(wait_nth(&l.out, "verified", 2, WAIT_MS).starts_with("verified ok"));
}

/// A pushed run that spans two mappings (one copy cannot) lands whole:
/// the pages before the boundary were skipped once, and read as zeros
/// after the finish (a threads program crashed on its stack cache).
#[test]
fn a_push_across_two_mappings_installs_every_page() {
    if !require() {
        return;
    }
    let l = Lazy::new(8);
    let size = l.region.1 - l.region.0;
    // Where lazy_mem's second mapping starts.
    let boundary = l.region.0 + size / 8 + 3 * PAGE;
    let (copy, lazy, _) = l.restore(SourceFetch::new(&l.source)).expect("restore");
    let (s, e) = (boundary - 8 * PAGE, boundary + 8 * PAGE);
    let mut buf = vec![0u8; usize::try_from(e - s).unwrap()];
    l.source.read(s, &mut buf).unwrap();
    assert_eq!(lazy.install(s, &buf).unwrap(), 16, "pages installed of 16");
    let (pushed, _) = l.push_all(&lazy);
    assert!(pushed >= size / PAGE - 16, "pushed {pushed} pages");
    // Nothing is fetched once it is finished: every page must be there.
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
}

#[test]
fn background_push_then_finish_leaves_a_process_without_userfaultfd() {
    if !require() {
        return;
    }
    let l = Lazy::new(256);
    let (copy, lazy, _) = l.restore(SourceFetch::new(&l.source)).expect("restore");
    let lazy = Arc::new(lazy);
    let t = Instant::now();
    let pusher = {
        let lazy = Arc::clone(&lazy);
        let source = Arc::clone(&l.source);
        thread::spawn(move || {
            let mut n = 0;
            for (s, e) in pages::chunks(&source.present().unwrap(), 4 << 20) {
                let mut buf = vec![0u8; usize::try_from(e - s).unwrap()];
                source.read(s, &mut buf).unwrap();
                n += lazy.install(s, &buf).unwrap();
            }
            n
        })
    };
    // The process runs (and faults) while the push goes on.
    copy.signal(Signal::SIGUSR1);
    let pushed = pusher.join().unwrap();
    let push = t.elapsed();
    // Everything is there now: a second push installs nothing.
    let t2 = Instant::now();
    let (again, bytes) = l.push_all(&lazy);
    assert_eq!(again, 0);
    eprintln!(
        "push of 256 MiB already there: {:?} = {:.0} MB/s",
        t2.elapsed(),
        mbps(bytes, t2.elapsed())
    );
    assert_eq!(
        wait_line(&l.out, "verified", WAIT_MS).split(' ').nth(1),
        Some("ok")
    );
    let lazy = Arc::into_inner(lazy).expect("one owner");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
    assert_eq!(st.installed_pages, pushed);
    assert!(pushed > 0, "{st:?}");
    eprintln!(
        "push 256 MiB while running: {push:?} = {:.0} MB/s ({} pushed, {} by faults in {} faults)",
        mbps(256 << 20, push),
        st.installed_pages,
        st.demand_pages,
        st.demand_faults
    );
    assert!(!has_uffd(copy.pid) && !has_uffd_ranges(copy.pid));
    // Without a userfaultfd: new memory, and the old one checked again.
    copy.signal(Signal::SIGHUP);
    assert_eq!(wait_line(&l.out, "alloc", WAIT_MS), "alloc ok");
    copy.signal(Signal::SIGUSR1);
    assert!(wait_nth(&l.out, "verified", 2, WAIT_MS).starts_with("verified ok"));
}

/// The original as a page server sees it in a move: reads from outside,
/// pulls sent from inside it by the thread that froze it (the test's).
struct Handing {
    source: Arc<PageSource>,
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Handed>>,
}

type Handed = (
    std::net::TcpStream,
    Vec<(u64, u64)>,
    std::sync::mpsc::SyncSender<Option<std::io::Result<u64>>>,
);

impl Origin for Handing {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        Origin::read(self.source.as_ref(), addr, buf)
    }

    fn present(&self) -> Result<Vec<(u64, u64)>, String> {
        Origin::present(self.source.as_ref())
    }

    fn send_runs(
        &self,
        s: &mut std::net::TcpStream,
        chunks: &[(u64, u64)],
    ) -> Option<std::io::Result<u64>> {
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        let job = (s.try_clone().ok()?, chunks.to_vec(), done);
        self.tx.lock().unwrap().send(job).ok()?;
        answer.recv().ok().flatten()
    }
}

fn fds(pid: Pid) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let to = fs::read_link(e.path()).unwrap_or_default();
            format!("{} -> {}", e.file_name().to_string_lossy(), to.display())
        })
        .collect();
    v.sort();
    v
}

/// A stop-and-copy of `l` over a real page channel: the stub receives
/// every page itself, sent by `serve` (on this thread, which froze the
/// original), into `warm` memory if given. Returns the copy, the pages
/// the stub counted and the bytes placed from warm memory.
fn stream_copy(
    l: &Lazy,
    warm: Option<WarmTake>,
    origin: impl FnOnce(std::sync::mpsc::Sender<Handed>) -> Arc<dyn Origin>,
    serve: impl Fn(Handed),
) -> Result<(Proc, u64, u64), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = PageServer::start("127.0.0.1".parse().unwrap(), 7, origin(tx)).unwrap();
    let link = Link {
        addr: server.addr(),
        move_id: 7,
        token: server.token(),
    };
    let dir = l.dir.path().join("img");
    let counted = Arc::new(AtomicU64::new(0));
    let pages = Arc::clone(&counted);
    let restorer = thread::spawn(move || {
        let pull = Incoming::pull(&link, &[])?;
        let extras = Extras {
            stream: Some(StreamFill { pull, pages, warm }),
            ..Extras::default()
        };
        let res = restore::restore_with(&dir, &RestoreOptions::default(), extras);
        // A stub is a child of the thread that made it: none may be left
        // by a restore that failed.
        let left = fs::read_to_string("/proc/thread-self/children").unwrap_or_default();
        res.map(|r| (r.pid, r.warm)).map_err(|e| {
            assert!(
                left.trim().is_empty(),
                "a failed restore left {left:?}: {e}"
            );
            e.to_string()
        })
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(job) => serve(job),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !restorer.is_finished() => {}
            Err(_) => break,
        }
    }
    let (pid, warm) = restorer.join().unwrap()?;
    server.close();
    Ok((Proc::adopt(pid), counted.load(Ordering::Relaxed), warm))
}

#[test]
fn the_original_sends_its_pages_from_inside_and_the_stub_receives_them_in_place() {
    if !require() {
        return;
    }
    let mut l = Lazy::new(64);
    let source = Arc::clone(&l.source);
    let orig = l.orig.pid();
    let before = fds(orig);
    let sent = Arc::new(AtomicU64::new(0));
    let (copy, counted, _) = stream_copy(
        &l,
        None,
        |tx| {
            Arc::new(Handing {
                source,
                tx: std::sync::Mutex::new(tx),
            })
        },
        |(mut sock, chunks, done)| {
            let r = match pages::inside::send_runs(orig, &mut sock, &chunks) {
                pages::inside::Sent::Done(r) => r,
                pages::inside::Sent::NotHere(why) => panic!("could not send from inside: {why}"),
            };
            let bytes = r.as_ref().map_or(0, |b| *b);
            sent.store(bytes, Ordering::Relaxed);
            let _ = done.send(Some(r));
        },
    )
    .expect("restore with the stub receiving its pages");
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent >= 64 << 20, "only {sent} bytes were sent");
    assert_eq!(
        counted * PAGE,
        sent,
        "the stub counted other pages than were sent"
    );
    // The copy has every page and no userfaultfd: nothing is left to fetch.
    assert!(!has_uffd(copy.pid().as_raw()), "the copy has a userfaultfd");
    copy.signal(Signal::SIGUSR1);
    assert!(wait_line(&l.out, "verified", WAIT_MS).starts_with("verified ok"));
    // The original lost no descriptor, gained none, and runs on intact.
    assert_eq!(fds(orig), before, "the original's descriptors changed");
    drop(copy);
    l.frozen.take().unwrap().thaw();
    l.orig.signal(Signal::SIGUSR1);
    assert!(wait_nth(&l.out, "verified", 2, WAIT_MS).starts_with("verified ok"));
}

/// Serves a frozen process's pages but announces some at an address of
/// its own choosing.
struct Lying {
    source: Arc<PageSource>,
    at: u64,
}

impl Origin for Lying {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        if addr >= self.at {
            buf.fill(0xee);
            return Ok(());
        }
        self.source.read(addr, buf).map_err(|e| e.to_string())
    }

    fn present(&self) -> Result<Vec<(u64, u64)>, String> {
        let mut runs = self.source.present().map_err(|e| e.to_string())?;
        runs.push((self.at, self.at + 4 * PAGE));
        Ok(runs)
    }
}

#[test]
fn a_stream_with_a_page_outside_the_anonymous_memory_fails_the_restore() {
    if !require() {
        return;
    }
    let l = Lazy::new(8);
    // An address in no lazy range of the image: 64 GiB is above a
    // non-PIE binary's heap and below every PIE load, mmap and stack
    // address (ASLR puts the stack anywhere up to 0x7fff_ffff_f000).
    let ranges = l.source.ranges();
    let at = 0x10_0000_0000u64;
    assert!(
        ranges.iter().all(|&(s, e)| e <= at || s >= at + 4 * PAGE),
        "{at:#x} is inside the image's memory: {ranges:x?}"
    );
    let source = Arc::clone(&l.source);
    let err = stream_copy(
        &l,
        None,
        |_| Arc::new(Lying { source, at }),
        |_| panic!("this origin sends from outside"),
    )
    .map(|(p, ..)| p.pid())
    .expect_err("a run outside the process's memory was accepted");
    assert!(
        err.contains("not whole pages of the process's anonymous memory"),
        "{err}"
    );
}

/// Anonymous memory resident in `pid`, in bytes.
fn rss_anon(pid: Pid) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssAnon in /proc/PID/status");
    kb << 10
}

/// [`stream_copy`] of `l` with its pages read from outside it.
fn outside_copy(l: &Lazy, warm: Option<WarmTake>) -> Result<(Proc, u64, u64), String> {
    let source = Arc::clone(&l.source);
    stream_copy(
        l,
        warm,
        |_| source,
        |_| panic!("this origin sends from outside"),
    )
}

/// The pool once every holder has its memory.
fn ready(pool: WarmPool) -> Arc<WarmPool> {
    assert!(
        pool.wait_ready(Duration::from_secs(60)),
        "no warm memory after 60 s"
    );
    Arc::new(pool)
}

/// Warm memory from `pool`, as the agent asks for it.
fn from_pool(pool: &Arc<WarmPool>) -> Option<WarmTake> {
    Some(warm::taker(pool))
}

/// A copy of `l` that was verified once (and had forked `children`
/// checking children before) allocates more memory, forks a child that
/// checks every page, mremaps a quarter, and verifies again.
fn runs_on(copy: &Proc, l: &Lazy, children: usize) {
    copy.signal(Signal::SIGHUP);
    assert_eq!(wait_line(&l.out, "alloc", WAIT_MS), "alloc ok");
    copy.signal(Signal::SIGWINCH);
    assert_eq!(wait_nth(&l.out, "child", children + 1, WAIT_MS), "child ok");
    copy.signal(Signal::SIGALRM);
    assert_eq!(wait_line(&l.out, "moved", WAIT_MS), "moved ok");
    copy.signal(Signal::SIGUSR1);
    assert!(wait_nth(&l.out, "verified", 2, WAIT_MS).starts_with("verified ok"));
}

/// The 64 MiB holder of a 128 MiB pool (keep the pool: its holders end
/// with it).
fn a_64_mib_holder() -> (Arc<WarmPool>, Warm) {
    let pool = ready(WarmPool::start(128 << 20).expect("start the pool"));
    let holder = pool.take_for(64 << 20).expect("the 64 MiB holder");
    (pool, holder)
}

/// Exactly `w`, whatever the need.
fn this(w: Warm) -> Option<WarmTake> {
    Some(Box::new(move |_| Some(w)))
}

#[test]
fn a_stream_copy_lands_in_warm_memory_and_keeps_its_holes() {
    if !require() {
        return;
    }
    // Holders of 128, 64, 32, 16 and 16 MiB: the process (a 64 MiB
    // region and a little more) takes the 128 MiB one.
    let pool = ready(WarmPool::start(256 << 20).expect("start the pool"));
    assert_eq!(
        pool.sizes(),
        [128, 64, 32, 16, 16].map(|m: u64| m << 20).to_vec()
    );
    let l = Lazy::sparse(64);
    let before = rss_anon(l.orig.pid());
    let (copy, counted, warm) =
        outside_copy(&l, from_pool(&pool)).expect("restore into warm memory");
    // Both mappings of the region came from the holder, the 128 MiB one
    // (no other holds 64 MiB).
    assert!(
        (64 << 20..=128 << 20).contains(&warm),
        "{warm} bytes were placed warm"
    );
    let quarter = (64 << 20) / PAGE / 4;
    assert!(
        counted <= (64 << 20) / PAGE - quarter + 512,
        "{counted} pages were sent for a region with a hole"
    );
    // The hole was given back: the copy holds what the original held,
    // not the warm memory under it.
    let after = rss_anon(copy.pid());
    assert!(
        after <= before + (2 << 20),
        "the copy holds {} KiB of anonymous memory, the original {} KiB",
        after >> 10,
        before >> 10
    );
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    // It runs on in that memory: more memory, a fork, a mremap.
    runs_on(&copy, &l, 0);
    // The pool made a new 128 MiB holder, and only that one.
    assert!(pool.wait_ready(Duration::from_secs(60)));
    assert_eq!(pool.made(), 6);
}

#[test]
fn a_small_process_takes_the_smallest_holder_that_fits() {
    if !require() {
        return;
    }
    let pool = ready(WarmPool::start(256 << 20).expect("start the pool"));
    let l = Lazy::new(8);
    let (copy, _, warm) = outside_copy(&l, from_pool(&pool)).expect("restore into warm memory");
    // A 16 MiB holder: no more was placed.
    assert!(
        (8 << 20..=16 << 20).contains(&warm),
        "{warm} bytes were placed warm"
    );
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
}

#[test]
fn a_holder_keeps_none_of_its_parents_memory() {
    if !require() {
        return;
    }
    // 64 MiB of this process's own, touched before the fork.
    let mine = vec![7u8; 64 << 20];
    let pool = ready(WarmPool::start(16 << 20).expect("start the pool"));
    let holder = pool.take_for(16 << 20).expect("the holder");
    let rss = rss_anon(holder.pid());
    assert!(
        (16 << 20..20 << 20).contains(&rss),
        "the holder has {} KiB of anonymous memory for 16 MiB",
        rss >> 10
    );
    let at = mine.as_ptr() as u64;
    let maps = fs::read_to_string(format!("/proc/{}/maps", holder.pid())).unwrap();
    assert!(
        !maps.lines().any(|l| {
            let (s, e) = l.split_once(' ').unwrap().0.split_once('-').unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            (s..e).contains(&at)
        }),
        "the holder still maps the parent's heap:\n{maps}"
    );
    drop(mine);
}

#[test]
fn a_dead_warm_holder_gives_way_to_a_fresh_stub() {
    if !require() {
        return;
    }
    let pool = ready(WarmPool::start(16 << 20).expect("start the pool"));
    let holder = pool.take_for(16 << 20).expect("the holder");
    kill(holder.pid(), Signal::SIGKILL).unwrap();
    let l = Lazy::new(8);
    let (copy, _, warm) = outside_copy(&l, this(holder)).expect("restore without the dead holder");
    assert_eq!(warm, 0);
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    // The pool replaces it.
    assert!(pool.wait_ready(Duration::from_secs(60)));
    assert_eq!(pool.made(), 2);
}

/// The mappings of `pid` as (start, end).
fn mappings(pid: Pid) -> Vec<(u64, u64)> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .map(|l| {
            let (s, e) = l.split_once(' ').unwrap().0.split_once('-').unwrap();
            (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_lazy_copy_stages_its_pages_in_warm_memory_and_keeps_no_trace_of_it() {
    if !require() {
        return;
    }
    // Holders of 128, 64, 32, 16 and 16 MiB: the lazy memory (the 64 MiB
    // region and a little more) is staged in the 128 MiB one.
    let pool = ready(WarmPool::start(256 << 20).expect("start the pool"));
    let l = Lazy::new(64);
    let before = rss_anon(l.orig.pid());
    let (copy, lazy, _) = l
        .restore_staged(SourceFetch::new(&l.source), from_pool(&pool), None)
        .expect("restore");
    let staged = lazy.staging_bytes();
    assert_eq!(staged, 128 << 20, "staging area of {staged} bytes");
    // The area is mapped in the copy while memory is lazy: a page of the
    // holder's code, then the rest.
    let maps = mappings(copy.pid());
    let rest: Vec<&(u64, u64)> = maps
        .iter()
        .filter(|(s, e)| e - s == staged - PAGE)
        .collect();
    assert_eq!(rest.len(), 1, "{maps:x?}");
    let area = (rest[0].0 - PAGE, rest[0].1);
    assert!(maps.contains(&(area.0, rest[0].0)), "{maps:x?}");
    // A child forked now does not get it (and gets its pages).
    copy.signal(Signal::SIGWINCH);
    assert_eq!(wait_line(&l.out, "child", WAIT_MS), "child ok");
    let (pushed, _) = l.push_all(&lazy);
    assert!(pushed > 0);
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
    // Nearly every page came by a move, not a copy.
    let want = (64 << 20) / PAGE;
    assert!(
        st.staged_pages >= want && st.staged_pages <= st.installed_pages + st.demand_pages,
        "{st:?}"
    );
    // Gone: the area, its pages, the holder, the userfaultfd.
    assert!(
        !mappings(copy.pid())
            .iter()
            .any(|&(s, e)| s < area.1 && e > area.0),
        "the staging area is still mapped"
    );
    let after = rss_anon(copy.pid());
    assert!(
        after <= before + (2 << 20),
        "the copy holds {} KiB of anonymous memory, the original {} KiB",
        after >> 10,
        before >> 10
    );
    assert!(!has_uffd(copy.pid) && !has_uffd_ranges(copy.pid));
    // It runs on: more memory, a fork, a mremap, all checked.
    runs_on(&copy, &l, 1);
    // The holder was replaced, and only that one.
    assert!(pool.wait_ready(Duration::from_secs(60)));
    assert_eq!(pool.made(), 6);
}

#[test]
fn a_staging_holder_killed_midway_leaves_the_pages_to_be_copied() {
    if !require() {
        return;
    }
    let (_pool, holder) = a_64_mib_holder();
    let hpid = holder.pid();
    let l = Lazy::new(32);
    let (copy, lazy, _) = l
        .restore_staged(SourceFetch::new(&l.source), this(holder), None)
        .expect("restore");
    assert_eq!(lazy.staging_bytes(), 64 << 20);
    // Half of it is pushed through staging, then its holder dies.
    let runs = pages::chunks(&l.source.present().unwrap(), 4 << 20);
    let half = runs.len() / 2;
    for &(s, e) in &runs[..half] {
        let mut buf = vec![0u8; usize::try_from(e - s).unwrap()];
        l.source.read(s, &mut buf).unwrap();
        lazy.install(s, &buf).unwrap();
    }
    let staged = lazy.stats().staged_pages;
    assert!(staged > 0, "{:?}", lazy.stats());
    kill(hpid, Signal::SIGKILL).unwrap();
    let (rest, _) = l.push_all(&lazy);
    assert!(rest > 0);
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
    assert_eq!(
        st.staged_pages, staged,
        "nothing is staged after the holder died"
    );
    assert!(!has_uffd(copy.pid));
}

/// A page server for `l`'s frozen original (it reads it itself).
fn serve(l: &Lazy) -> (PageServer, Link) {
    let origin: Arc<dyn Origin> = Arc::clone(&l.source) as Arc<dyn Origin>;
    let server = PageServer::start("127.0.0.1".parse().unwrap(), 9, origin).unwrap();
    let link = Link {
        addr: server.addr(),
        move_id: 9,
        token: server.token(),
    };
    (server, link)
}

/// A pull of every page of `l`'s original on `link`, received into the
/// lazy copy by [`LazyPages::receive`]; the pages it installed.
fn receive_all(lazy: &LazyPages, link: &Link) -> u64 {
    let (installed, bytes, _) = lazy.receive(link, &[]).expect("receive");
    assert!(bytes >= 32 << 20, "{bytes} bytes received");
    installed
}

/// The effective uid of `pid`.
fn euid(pid: Pid) -> u32 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        .expect("Uid in /proc/PID/status")
}

#[test]
fn a_pull_is_received_straight_into_the_staging_area() {
    if !require() {
        return;
    }
    let (_pool, holder) = a_64_mib_holder();
    let hpid = holder.pid();
    // A process of another user: the holder must not run as root.
    let l = Lazy::as_user(32, 65534);
    let (server, link) = serve(&l);
    let socket = Incoming::connect(&link).expect("connect");
    let (copy, lazy, _) = l
        .restore_staged(SourceFetch::new(&l.source), this(holder), Some(socket))
        .expect("restore");
    assert_eq!(lazy.staging_bytes(), 64 << 20);
    // The holder took on the process's ids before the process ran.
    assert_eq!(euid(copy.pid()), 65534);
    assert_eq!(euid(hpid), 65534);
    let installed = receive_all(&lazy, &link);
    server.close();
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
    assert!(
        installed >= (32 << 20) / PAGE,
        "{installed} pages installed"
    );
    assert!(st.staged_pages >= (32 << 20) / PAGE, "{st:?}");
    assert!(!has_uffd(copy.pid));
}

#[test]
fn a_pull_is_received_here_when_the_staging_holder_is_gone() {
    if !require() {
        return;
    }
    let (_pool, holder) = a_64_mib_holder();
    let hpid = holder.pid();
    let l = Lazy::new(32);
    let (server, link) = serve(&l);
    let socket = Incoming::connect(&link).expect("connect");
    let (copy, lazy, _) = l
        .restore_staged(SourceFetch::new(&l.source), this(holder), Some(socket))
        .expect("restore");
    assert_eq!(lazy.staging_bytes(), 64 << 20);
    kill(hpid, Signal::SIGKILL).unwrap();
    // (The copy runs: a fault may have been staged before the kill.)
    thread::sleep(Duration::from_millis(50));
    let before = lazy.stats().staged_pages;
    let installed = receive_all(&lazy, &link);
    server.close();
    assert!(
        installed >= (32 << 20) / PAGE,
        "{installed} pages installed"
    );
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
    assert_eq!(st.staged_pages, before, "{st:?}");
}

#[test]
fn discarded_memory_stays_zero_when_a_push_comes_later() {
    if !require() {
        return;
    }
    let l = Lazy::new(64);
    let (copy, lazy, _) = l.restore(SourceFetch::new(&l.source)).expect("restore");
    copy.signal(Signal::SIGUSR2);
    wait_line(&l.out, "dontneed done", WAIT_MS);
    let st = lazy.stats();
    assert!(st.discards >= 1, "{st:?}");
    // The original still has the quarter the copy discarded: a push must
    // skip it.
    let (pushed, _) = l.push_all(&lazy);
    let quarter = (64 << 20) / PAGE / 4;
    let total = (64 << 20) / PAGE;
    assert!(
        pushed >= total - quarter && pushed < total,
        "pushed {pushed} pages"
    );
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
    assert!(st.zero_pages > 0, "{st:?}");
    drop(copy);
    let _ = l.region;
}

#[test]
fn moved_memory_is_fetched_from_its_old_address() {
    if !require() {
        return;
    }
    let l = Lazy::new(64);
    let (copy, lazy, _) = l.restore(SourceFetch::new(&l.source)).expect("restore");
    // mremap of the last quarter (not touched yet) to a new place, 1 MiB
    // longer; half of it checked there at once (faults at the new place).
    copy.signal(Signal::SIGALRM);
    assert_eq!(wait_line(&l.out, "moved", WAIT_MS), "moved ok");
    assert!(lazy.stats().moves >= 1, "{:?}", lazy.stats());
    // The push sends the original addresses; the rest of the quarter
    // must land at its new place.
    let (pushed, _) = l.push_all(&lazy);
    assert!(pushed > 0);
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
}

#[test]
fn a_child_forked_while_memory_is_lazy_gets_its_pages() {
    if !require() {
        return;
    }
    let l = Lazy::new(64);
    let (copy, lazy, _) = l.restore(SourceFetch::new(&l.source)).expect("restore");
    // Discard a quarter, then fork a child that checks everything at
    // once: nothing has arrived yet, so its faults come on the child's
    // own userfaultfd.
    copy.signal(Signal::SIGUSR2);
    wait_line(&l.out, "dontneed done", WAIT_MS);
    copy.signal(Signal::SIGWINCH);
    let line = wait_line(&l.out, "child", WAIT_MS);
    assert_eq!(line, "child ok");
    let st = lazy.stats();
    assert!(st.forks == 1 && st.error.is_none(), "{st:?}");
    // The parent still has nothing of it: a push fills the parent (the
    // child is gone by now and is dropped).
    let (pushed, _) = l.push_all(&lazy);
    assert!(pushed > 0);
    copy.signal(Signal::SIGUSR1);
    let line = wait_line(&l.out, "verified", WAIT_MS);
    assert!(line.starts_with("verified ok"), "{line}");
    let st = lazy.finish();
    assert!(st.error.is_none(), "{st:?}");
}

/// Fails every fetch inside `bad`.
struct FailingFetch {
    inner: Arc<SourceFetch>,
    bad: (u64, u64),
}

impl PageFetch for FailingFetch {
    fn fetch(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        if addr < self.bad.1 && self.bad.0 < addr + len as u64 {
            return Err(format!("injected failure at {addr:#x}"));
        }
        self.inner.fetch(addr, len)
    }
}

#[test]
fn a_failing_fetch_kills_the_process_and_is_reported() {
    if !require() {
        return;
    }
    let l = Lazy::new(16);
    let fetch = Arc::new(FailingFetch {
        inner: SourceFetch::new(&l.source),
        bad: l.region,
    });
    let (mut copy, lazy, _) = l.restore(fetch).expect("restore");
    copy.signal(Signal::SIGUSR1);
    let status = copy.wait_gone(20_000);
    assert!(
        matches!(
            status,
            Some(nix::sys::wait::WaitStatus::Signaled(_, Signal::SIGKILL, _))
        ),
        "{status:?}"
    );
    let why = lazy.failed().expect("the error is kept");
    assert!(why.contains("injected failure"), "{why}");
    let e = lazy
        .install(l.region.0, &vec![0u8; 4096])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lazy memory of pid") && e.contains("injected failure"),
        "{e}"
    );
    assert!(lazy.finish().error.is_some());

    // Every fetch failing: the restore itself fails (the kernel touches
    // lazy memory while rebuilding) or the process dies at once.
    let fetch = Arc::new(FailingFetch {
        inner: SourceFetch::new(&l.source),
        bad: (0, u64::MAX),
    });
    match l.restore(fetch) {
        Err(e) => assert!(
            e.contains("lazy memory failed") && e.contains("injected"),
            "{e}"
        ),
        Ok((mut copy, lazy, _)) => {
            copy.signal(Signal::SIGUSR1);
            assert!(copy.wait_gone(20_000).is_some(), "the process hangs");
            assert!(lazy.failed().is_some());
        }
    }
}

#[test]
fn a_lazy_image_is_refused_without_a_page_source() {
    if !require() {
        return;
    }
    let l = Lazy::new(4);
    let e = restore::restore(&l.dir.path().join("img"), &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("read image") && e.contains("lazy"), "{e}");
}

// --------------------------------------------------------- dirty pages

struct Dirty {
    proc_: Proc,
    out: PathBuf,
    cmd: PathBuf,
    base: u64,
    rounds: usize,
    _dir: tempfile::TempDir,
}

impl Dirty {
    /// A `dirty_pages` process, run as `uid` when given.
    fn new(uid: Option<u32>) -> Dirty {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let (out, cmd) = (dir.path().join("out"), dir.path().join("cmd"));
        let proc_ = Proc::start_as(
            &prog("dirty_pages"),
            &[out.to_str().unwrap(), cmd.to_str().unwrap()],
            uid,
        );
        let base = parse_addr(&wait_line(&out, "region", WAIT_MS));
        Dirty {
            proc_,
            out,
            cmd,
            base,
            rounds: 0,
            _dir: dir,
        }
    }

    /// Runs `cmds` ("w 3", "d 5") in the process; waits until done.
    fn run(&mut self, cmds: &[&str]) {
        fs::write(&self.cmd, cmds.join("\n") + "\n").unwrap();
        self.rounds += 1;
        self.proc_.signal(Signal::SIGUSR1);
        wait_line(&self.out, &format!("done {}", self.rounds), WAIT_MS);
    }

    /// Page runs by index.
    fn pages(&self, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        runs.iter()
            .map(|&(s, e)| ((s - self.base) / PAGE, (e - self.base) / PAGE))
            .collect()
    }
}

/// Writes, discards and checks in a `dirty_pages` process run as `uid`.
fn exact_dirty_pages(uid: Option<u32>) {
    let mut d = Dirty::new(uid);
    if let Some(u) = uid {
        let status = fs::read_to_string(format!("/proc/{}/status", d.proc_.pid)).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            line.split_whitespace().nth(2) == Some(&u.to_string()[..]),
            "{line}"
        );
    }
    let range = (d.base, d.base + 64 * PAGE);
    let t = Instant::now();
    let mut tr = Tracker::start(d.proc_.pid(), [range]).expect("start tracking");
    eprintln!(
        "tracker start (freeze, inject, register, protect): {:?}",
        t.elapsed()
    );
    assert!(
        !has_uffd(d.proc_.pid),
        "the userfaultfd is still in the process"
    );
    assert_eq!(tr.collect().unwrap(), vec![], "nothing written yet");
    // Populated pages (3, 7) and never-touched ones (40, 41).
    d.run(&["w 3", "w 7", "w 40", "w 41"]);
    assert_eq!(
        d.pages(&tr.collect().unwrap()),
        vec![(3, 4), (7, 8), (40, 42)]
    );
    assert_eq!(tr.collect().unwrap(), vec![], "protected again");
    // A discarded page changed too (it reads as zeros now).
    d.run(&["d 5", "w 6"]);
    assert_eq!(d.pages(&tr.collect().unwrap()), vec![(5, 7)]);
    assert_eq!(tr.collect().unwrap(), vec![]);
    d.run(&["w 3", "w 3", "w 63"]);
    assert_eq!(d.pages(&tr.collect().unwrap()), vec![(3, 4), (63, 64)]);
    let t = Instant::now();
    assert_eq!(tr.collect().unwrap(), vec![]);
    eprintln!("collect of 64 pages: {:?}", t.elapsed());
    tr.stop();
    assert!(
        !has_uffd_ranges(d.proc_.pid),
        "ranges still registered after stop"
    );
    // The process is unaffected.
    d.run(&["w 10", "d 11", "w 50"]);
    assert!(d.proc_.wait_gone(50).is_none());
}

#[test]
fn dirty_tracking_reports_exactly_the_written_pages() {
    if require() {
        exact_dirty_pages(None);
    }
}

/// The process may not make a userfaultfd that sees kernel faults
/// (vm.unprivileged_userfaultfd=0): the tracker falls back to a
/// user-mode-only one, which is enough for write tracking.
#[test]
fn dirty_tracking_of_an_unprivileged_process() {
    if require() {
        exact_dirty_pages(Some(65534));
    }
}

#[test]
fn dirty_tracking_of_a_large_region_and_a_new_mapping() {
    if !require() {
        return;
    }
    // The lazy_mem program: 64 MiB, all written once, then idle.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let p = Proc::start(&prog("lazy_mem"), &[out.to_str().unwrap(), "64"]);
    let base = parse_addr(&wait_line(&out, "filled", WAIT_MS));
    let region = (base, base + (64 << 20));
    let mut tr = Tracker::start(p.pid(), [region]).expect("start tracking");
    let t = Instant::now();
    assert_eq!(tr.collect().unwrap(), vec![]);
    eprintln!("collect of 64 MiB, nothing written: {:?}", t.elapsed());
    // SIGUSR2 discards the second quarter: reported, as it changed.
    p.signal(Signal::SIGUSR2);
    wait_line(&out, "dontneed done", WAIT_MS);
    let q = (64 << 20) / 4;
    assert_eq!(tr.collect().unwrap(), vec![(base + q, base + 2 * q)]);
    // SIGHUP maps, writes and unmaps 64 MiB elsewhere: not in the range.
    p.signal(Signal::SIGHUP);
    assert_eq!(wait_line(&out, "alloc", WAIT_MS), "alloc ok");
    assert_eq!(tr.collect().unwrap(), vec![]);
    // Reading the discarded quarter maps the zero page: nothing changed.
    p.signal(Signal::SIGUSR1);
    assert!(wait_line(&out, "verified", WAIT_MS).starts_with("verified ok"));
    assert_eq!(tr.collect().unwrap(), vec![]);
    tr.stop();
}
