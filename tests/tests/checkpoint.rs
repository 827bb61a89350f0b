//! `migfs checkpoint` / `migfs restore` of unmodified processes: small C
//! programs built with gcc here (dynamic and static) and python3, frozen,
//! written to an image, ended, rebuilt, and checked to continue exactly
//! where they stopped. Also `--check` refusals and failing restores.
//!
//! Needs root with CAP_SYS_PTRACE and CAP_CHECKPOINT_RESTORE (or
//! CAP_SYS_ADMIN) and gcc: otherwise SKIP, or fail when
//! MIGFS_REQUIRE_PRIV=1. Every process a test starts is owned by a guard
//! that kills it, also when the test panics.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use migfs_e2e::harness::{migfs_bin, output_text};
use migfs_e2e::progs::{assert_sequence, assert_shared_counter, numbers, prog, wait_lines, within};

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
    if caps & (1 << 19) == 0 {
        return Err("needs CAP_SYS_PTRACE".into());
    }
    if caps & (1 << 40) == 0 && caps & (1 << 21) == 0 {
        return Err(
            "needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN (clone3 set_tid, PR_SET_MM_MAP)".into(),
        );
    }
    if fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").is_ok_and(|s| s.trim() == "3") {
        return Err("ptrace is disabled (yama ptrace_scope 3)".into());
    }
    match Command::new("gcc").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("needs gcc to build the test programs".into()),
    }
}

/// Whether checkpoint tests can run; see the module doc.
fn require_ptrace() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    match PROBE.get_or_init(probe) {
        Ok(()) => true,
        Err(why) if std::env::var("MIGFS_REQUIRE_PRIV").as_deref() == Ok("1") => {
            panic!("MIGFS_REQUIRE_PRIV=1 but checkpoint tests cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIP: {why}");
            false
        }
    }
}

// ------------------------------------------------------------- programs

fn spawner() -> PathBuf {
    prog("ckpt_spawn", false)
}

// --------------------------------------------------------------- guards

/// A process under test: killed (and reaped) on drop.
struct Proc {
    pid: i32,
    /// Our child, when we started it directly.
    child: Option<Child>,
    /// The `ckpt_spawn reap` that adopted it, when `migfs restore` started it.
    reaper: Option<Child>,
}

impl Proc {
    /// Starts `argv` with stdio on /dev/null and no other descriptors.
    fn start(argv: &[&str]) -> Proc {
        let child = Command::new(spawner())
            .arg("exec")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start test program");
        Proc {
            pid: i32::try_from(child.id()).unwrap(),
            child: Some(child),
            reaper: None,
        }
    }

    fn alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next())
            })
            .is_some_and(|c| c != 'Z' && c != 'X')
    }

    /// Reaps our child after a checkpoint ended it; returns how it ended.
    fn reap_child(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("a child to reap");
        c.wait().expect("wait for the checkpointed child")
    }

    fn fdinfo(&self, fd: i32) -> String {
        fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", self.pid)).unwrap_or_default()
    }

    fn status_field(&self, key: &str) -> String {
        let st = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        st.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .unwrap_or("")
            .trim()
            .to_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
        for c in [self.child.as_mut(), self.reaper.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// -------------------------------------------------------------- helpers

fn migfs(args: &[&str]) -> Output {
    Command::new(spawner())
        .arg("exec")
        .arg(migfs_bin())
        .args(args)
        .output()
        .expect("run migfs")
}

/// `migfs checkpoint PID --to DIR` (+ extra args); panics unless it works.
fn checkpoint(p: &Proc, dir: &Path, extra: &[&str]) -> String {
    let pid = p.pid.to_string();
    let mut args = vec!["checkpoint", pid.as_str(), "--to", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = migfs(&args);
    assert!(
        o.status.success(),
        "migfs checkpoint {pid}\n{}",
        output_text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `migfs restore --from DIR` (+ extra args) under a reaper (a child
/// subreaper that adopts what `migfs restore` leaves running); the output,
/// and the restored process when it worked. When it failed, the reaper
/// must end within 10 s: it only ends once no process `migfs restore`
/// started is left, so a half-built process fails the test.
fn try_restore(dir: &Path, extra: &[&str]) -> (Output, Option<Proc>) {
    let mut reaper = Command::new(spawner())
        .arg("reap")
        .arg(migfs_bin())
        .args(["restore", "--from", dir.to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run migfs restore");
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    reaper
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    reaper
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let out = |status| Output {
        status,
        stdout: stdout.clone().into_bytes(),
        stderr: stderr.clone().into_bytes(),
    };
    if let Ok(pid) = stdout.trim().parse::<i32>() {
        let ok = Command::new("true").status().unwrap();
        return (
            out(ok),
            Some(Proc {
                pid,
                child: None,
                reaper: Some(reaper),
            }),
        );
    }
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = reaper.try_wait().unwrap() {
            return (out(st), None);
        }
        if Instant::now() > end {
            let _ = reaper.kill();
            panic!("a failed restore left a process behind\n{stdout}{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A restore that must fail at `step` saying `says`; nothing may be left.
fn restore_fails(dir: &Path, extra: &[&str], step: &str, says: &str) {
    let (o, p) = try_restore(dir, extra);
    assert!(
        p.is_none(),
        "restore should have failed\n{}",
        output_text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}", output_text(&o));
    assert!(
        err.contains(&format!("restore failed at step \"{step}\"")),
        "wrong step, wanted {step}:\n{err}"
    );
    assert!(
        err.contains(says),
        "the message should say {says:?}:\n{err}"
    );
}

fn restore(dir: &Path, extra: &[&str]) -> Proc {
    let (o, p) = try_restore(dir, extra);
    p.unwrap_or_else(|| {
        panic!(
            "migfs restore --from {}\n{}",
            dir.display(),
            output_text(&o)
        )
    })
}

fn fdinfo_field(info: &str, key: &str) -> String {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or("")
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------- tests

/// The counter continues with no gap and no duplicate, same PID, same fd
/// number, flags and offset.
fn counter_round_trip(static_: bool) {
    counter_round_trip_with(static_, &[], &[]);
}

/// [`counter_round_trip`] with extra checkpoint and restore arguments.
fn counter_round_trip_with(static_: bool, ckpt_args: &[&str], restore_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("count.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_counter", static_);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap(), "ckpt-counter"]);
    wait_lines(&out, 20, 5000);
    let flags_before = fdinfo_field(&p.fdinfo(7), "flags");
    let cpus_before = p.status_field("Cpus_allowed_list");
    checkpoint(&p, &img, ckpt_args);
    let st = p.reap_child();
    assert_eq!(
        st.code(),
        None,
        "the original should have been killed: {st:?}"
    );
    let n = numbers(&out).len();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        numbers(&out).len(),
        n,
        "the original still writes after the checkpoint"
    );
    let r = restore(&img, restore_args);
    assert_eq!(r.pid, p.pid, "the PID should be kept when free");
    wait_lines(&out, n + 20, 5000);
    let info = r.fdinfo(7);
    assert_eq!(
        fdinfo_field(&info, "flags"),
        flags_before,
        "fd 7 flags differ: {info}"
    );
    assert_eq!(
        fdinfo_field(&info, "flags"),
        "02102001",
        "O_WRONLY|O_APPEND|O_CLOEXEC|O_LARGEFILE expected"
    );
    assert_eq!(r.status_field("Name"), "ckpt-counter");
    // The restorer pins itself and the stub to one CPU while rebuilding.
    assert_eq!(
        r.status_field("Cpus_allowed_list"),
        cpus_before,
        "the restored process kept the restorer's pinned CPU mask"
    );
    drop(r);
    assert_sequence(&out);
    let pos: u64 = fdinfo_field(&info, "pos").parse().unwrap();
    assert!(pos > 0 && pos <= fs::metadata(&out).unwrap().len());
}

#[test]
fn dynamic_counter_continues_with_same_pid_fd_and_offset() {
    if !require_ptrace() {
        return;
    }
    counter_round_trip(false);
}

#[test]
fn static_counter_continues_with_same_pid_fd_and_offset() {
    if !require_ptrace() {
        return;
    }
    counter_round_trip(true);
}

#[test]
fn check_names_sockets_and_pipes_and_checkpoint_refuses() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("beat.txt");
    let bin = prog("ckpt_sockets", false);
    let p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    wait_lines(&out, 5, 5000);
    let pid = p.pid.to_string();
    let o = migfs(&["checkpoint", "--check", &pid]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    assert!(
        text.contains(&format!("pid {pid} cannot be moved")),
        "{text}"
    );
    assert!(text.contains(": pipe pipe:["), "{text}");
    assert!(text.contains(": TCP listening socket 127.0.0.1:"), "{text}");
    let connected = text
        .lines()
        .filter(|l| l.contains(": TCP socket 127.0.0.1:") && l.contains(" -> 127.0.0.1:"))
        .count();
    assert_eq!(
        connected, 2,
        "both ends of the connection should be named: {text}"
    );
    assert!(text.contains(": io_uring instance"), "{text}");
    assert!(text.contains(": device /dev/ptmx (char 5:2)"), "{text}");
    assert!(
        text.contains(": eventfd descriptor (anon inode) is not supported"),
        "{text}"
    );
    let img = dir.path().join("img");
    let o = migfs(&["checkpoint", &pid, "--to", img.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("cannot be moved")
            && err.contains("TCP listening socket"),
        "{}",
        output_text(&o)
    );
    assert!(!img.join("image.pb").exists(), "no image may be written");
    let n = numbers(&out).len();
    wait_lines(&out, n + 10, 5000);
    assert!(p.alive());
}

#[test]
fn check_names_a_ptraced_thread() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("count.txt");
    let bin = prog("ckpt_counter", false);
    let p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    wait_lines(&out, 3, 5000);
    let mut tracer = Command::new(spawner())
        .args([
            "exec",
            prog("ckpt_tracer", false).to_str().unwrap(),
            &p.pid.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let tracer_pid = tracer.id();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(tracer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let o = migfs(&["checkpoint", "--check", &p.pid.to_string()]);
    let _ = tracer.kill();
    let _ = tracer.wait();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("thread {} is ptraced by {tracer_pid}", p.pid)),
        "{}",
        output_text(&o)
    );
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn signal_handler_counts_and_blocked_signal_stays_blocked_and_pending() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sig.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_signals", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    let last = |path: &Path| {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("")
            .to_owned()
    };
    let kill = |sig: &str, pid: i32| {
        assert!(
            Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap()
                .success()
        )
    };
    wait_lines_text(&out, 2);
    // One at a time: a second SIGUSR1 sent before the first is handled
    // would merge with it.
    for c in 1..=3 {
        kill("-USR1", p.pid);
        assert!(
            within(3000, || last(&out).starts_with(&format!("c={c} "))),
            "{}",
            last(&out)
        );
    }
    kill("-USR2", p.pid);
    assert!(
        within(3000, || last(&out) == "c=3 blocked=1 pending=1"),
        "{}",
        last(&out)
    );
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let r = restore(&img, &[]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        last(&out),
        "c=3 blocked=1 pending=1",
        "mask or pending signal lost"
    );
    for c in 4..=5 {
        kill("-USR1", r.pid);
        assert!(
            within(3000, || last(&out) == format!("c={c} blocked=1 pending=1")),
            "the handler does not count: {}",
            last(&out)
        );
    }
    assert_eq!(r.status_field("SigBlk"), "0000000000000800");
    assert_eq!(r.status_field("SigCgt"), "0000000000000200");
}

/// Freezes `ckpt_blocking MODE ARG` inside its call, restores it, runs
/// `after` (e.g. to release a lock) and returns its report line.
fn blocked_call(mode: &str, arg: &str, after: impl FnOnce()) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("call.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_blocking", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap(), mode, arg]);
    assert!(within(5000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .starts_with("start")));
    std::thread::sleep(Duration::from_millis(300));
    checkpoint(&p, &img, &[]);
    p.reap_child();
    std::thread::sleep(Duration::from_millis(300));
    let _r = restore(&img, &[]);
    after();
    assert!(
        within(10_000, || fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("rc=")),
        "{mode}: the call did not return"
    );
    fs::read_to_string(&out)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("rc="))
        .unwrap()
        .to_owned()
}

fn report(line: &str) -> (i64, i64, i64) {
    let v: Vec<i64> = line
        .split_whitespace()
        .map(|f| f.split_once('=').unwrap().1.parse().unwrap())
        .collect();
    (v[0], v[1], v[2])
}

#[test]
fn nanosleep_frozen_inside_the_call_resumes_for_the_remaining_time() {
    if !require_ptrace() {
        return;
    }
    let (rc, errno, ms) = report(&blocked_call("nanosleep", "2000", || {}));
    assert_eq!((rc, errno), (0, 0), "nanosleep must not fail with EINTR");
    assert!(ms >= 2000, "slept only {ms} ms");
    assert!(
        ms < 3500,
        "slept {ms} ms: it should go on with the remaining time, not start again"
    );
}

#[test]
fn poll_with_a_timeout_frozen_inside_the_call_is_restarted() {
    if !require_ptrace() {
        return;
    }
    let (rc, errno, ms) = report(&blocked_call("poll", "1500", || {}));
    assert_eq!(
        (rc, errno),
        (0, 0),
        "poll must time out normally, not fail with EINTR"
    );
    assert!(ms >= 1500, "polled only {ms} ms");
}

#[test]
fn lock_wait_frozen_inside_fcntl_setlkw_is_restarted() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    fs::write(&lock, b"x").unwrap();
    let bin = prog("ckpt_blocking", false);
    let hout = dir.path().join("holder.txt");
    let holder = Proc::start(&[
        bin.to_str().unwrap(),
        hout.to_str().unwrap(),
        "hold",
        lock.to_str().unwrap(),
    ]);
    assert!(within(5000, || fs::read_to_string(&hout)
        .unwrap_or_default()
        .contains("rc=0")));
    let line = blocked_call("setlkw", lock.to_str().unwrap(), || {
        std::thread::sleep(Duration::from_millis(200));
        drop(holder);
    });
    let (rc, errno, _) = report(&line);
    assert_eq!(
        (rc, errno),
        (0, 0),
        "F_SETLKW must get the lock, not fail with EINTR"
    );
}

#[test]
fn reads_of_a_file_around_the_checkpoint_are_never_short_or_interrupted() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.bin");
    fs::write(
        &data,
        (0..32u32 << 20)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let (rc, errno, _) = report(&blocked_call("read", data.to_str().unwrap(), || {}));
    assert!(
        rc > 0 && errno == 0,
        "a read failed or came back short: rc={rc} errno={errno}"
    );
}

#[test]
fn vdso_clocks_keep_working_at_the_same_address() {
    if !require_ptrace() {
        return;
    }
    vdso_clocks_keep_working_at_the_same_address_(false);
}

#[test]
fn static_binary_vdso_clocks_keep_working() {
    if !require_ptrace() {
        return;
    }
    vdso_clocks_keep_working_at_the_same_address_(true);
}

/// The vDSO test, for a dynamic or a static binary.
fn vdso_clocks_keep_working_at_the_same_address_(static_: bool) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clock.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_clock", static_);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    wait_lines_text(&out, 10);
    let vdso = |pid: i32| {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        maps.lines()
            .filter(|l| l.contains("[vdso]") || l.contains("[vvar"))
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let before = vdso(p.pid);
    assert!(before.len() >= 2, "{before:?}");
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let n = fs::read_to_string(&out).unwrap().lines().count();
    let r = restore(&img, &[]);
    wait_lines_text(&out, n + 20);
    assert_eq!(vdso(r.pid), before, "the vDSO block moved");
    let text = fs::read_to_string(&out).unwrap();
    assert!(
        !text.contains("BAD"),
        "{}",
        text.lines()
            .filter(|l| l.contains("BAD"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The counters of the last complete line `ckpt_itimer` wrote:
/// (alrm, prof, real interval µs, prof interval µs).
fn itimer_state(path: &Path) -> (i64, i64, i64, i64) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("prof_us="))
        .unwrap_or("");
    let field = |k: &str| -> i64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    (
        field("alrm="),
        field("prof="),
        field("real_us="),
        field("prof_us="),
    )
}

#[test]
fn interval_timers_keep_firing_with_their_intervals_after_restore() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("timers.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_itimer", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(
        within(5000, || {
            let (a, f, _, _) = itimer_state(&out);
            a >= 3 && f >= 3
        }),
        "the timers do not fire before the checkpoint: {:?}",
        itimer_state(&out)
    );
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let (a0, f0, _, _) = itimer_state(&out);
    let r = restore(&img, &[]);
    // SIGALRM every 2 ms and SIGPROF every 10 ms of CPU keep coming: the
    // timers were armed again, with their intervals.
    assert!(
        within(5000, || {
            let (a, f, _, _) = itimer_state(&out);
            a >= a0 + 10 && f >= f0 + 10
        }),
        "timers stopped at the restore: before {:?}, now {:?}",
        (a0, f0),
        itimer_state(&out)
    );
    let (_, _, real_us, prof_us) = itimer_state(&out);
    assert_eq!((real_us, prof_us), (2_000, 10_000));
    drop(r);
}

fn wait_lines_text(path: &Path, n: usize) {
    assert!(
        within(5000, || fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count()
            >= n),
        "{} has too few lines",
        path.display()
    );
}

#[test]
fn threads_keep_their_tls_counters_rseq_robust_lists_and_can_be_joined_and_created() {
    if !require_ptrace() {
        return;
    }
    threads_keep_their_tls_counters_rseq_robust_lists_and_can_be_joined_and_created_(false);
}

#[test]
fn static_binary_threads_keep_tls_rseq_robust_lists_and_can_be_created() {
    if !require_ptrace() {
        return;
    }
    threads_keep_their_tls_counters_rseq_robust_lists_and_can_be_joined_and_created_(true);
}

/// The threads test, for a dynamic or a static binary.
fn threads_keep_their_tls_counters_rseq_robust_lists_and_can_be_joined_and_created_(static_: bool) {
    threads_round_trip(static_, &[], &[]);
}

/// The threads program through `migfs checkpoint` (+ `ckpt_args`) and
/// `migfs restore` (+ `restore_args`).
fn threads_round_trip(static_: bool, ckpt_args: &[&str], restore_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("threads.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_threads", static_);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    wait_lines_text(&out, 60);
    let tids = |pid: i32| crate_tids(pid);
    // main and the 4 workers: the 5 lowest ids (short-lived threads come
    // and go).
    let mut before = tids(p.pid);
    assert!(before.len() >= 5, "{before:?}");
    before.truncate(5);
    checkpoint(&p, &img, ckpt_args);
    p.reap_child();
    let text = fs::read_to_string(&out).unwrap();
    let last_count = |text: &str, k: u32| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("t{k} ")))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    let counts: Vec<u64> = (0..4).map(|k| last_count(&text, k)).collect();
    let r = restore(&img, restore_args);
    let after = tids(r.pid);
    assert!(
        before.iter().all(|t| after.contains(t)),
        "thread ids differ: {before:?} then {after:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    fs::write(dir.path().join("threads.txt.stop"), b"").unwrap();
    assert!(
        within(5000, || fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("joined t0")),
        "t0 could not be joined"
    );
    std::thread::sleep(Duration::from_millis(200));
    let after = fs::read_to_string(&out).unwrap();
    let new_part = &after[text.len()..];
    for k in 0..4u32 {
        let first = new_part
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("t{k} ")))
            .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
            .next();
        assert_eq!(
            first,
            Some(counts[k as usize] + 1),
            "thread {k}'s TLS counter did not continue"
        );
    }
    for bad in ["rseq=0", "robust=0", "FAILED", "alt=0"] {
        assert!(
            !after.contains(bad),
            "{bad} after restore:\n{}",
            after
                .lines()
                .filter(|l| l.contains(bad))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(
        new_part
            .lines()
            .filter(|l| l.starts_with("spawn ") && l.contains(" ok"))
            .count()
            >= 3,
        "no new threads were created"
    );
}

/// Runs a util-linux tool; its stdout.
fn tool(argv: &[&str]) -> String {
    let o = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", argv[0]));
    assert!(o.status.success(), "{argv:?}: {}", output_text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A thread's nice, policy (with reset-on-fork), priority and CPU mask.
fn sched_of(pid: i32, tid: i32) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // Fields after the ")" of comm: state is 3, nice is 19.
    let nice = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(16)
        .unwrap()
        .to_owned();
    let t = tid.to_string();
    format!(
        "nice {nice}; {}; {}",
        tool(&["chrt", "-p", &t]).replace('\n', "; "),
        tool(&["taskset", "-p", &t]).trim_end()
    )
}

/// Every thread keeps its own nice, scheduling policy (with
/// SCHED_RESET_ON_FORK) and CPU mask.
#[test]
fn threads_keep_their_nice_policy_and_cpu_mask() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("threads.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_threads", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    wait_lines_text(&out, 20);
    let mut tids = crate_tids(p.pid);
    assert!(tids.len() >= 5, "{tids:?}");
    tids.truncate(5);
    let last_cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    for (i, tid) in tids.iter().enumerate() {
        let t = tid.to_string();
        tool(&["renice", "-n", &(3 + i).to_string(), "-p", &t]);
        match i {
            1 => drop(tool(&["chrt", "-b", "-p", "0", &t])),
            2 => drop(tool(&["chrt", "-R", "-i", "-p", "0", &t])),
            _ => {}
        }
        if i % 2 == 1 {
            tool(&["taskset", "-p", "-c", &last_cpu.to_string(), &t]);
        }
    }
    let before: Vec<String> = tids.iter().map(|&t| sched_of(p.pid, t)).collect();
    assert!(
        before[2].contains("SCHED_IDLE|SCHED_RESET_ON_FORK"),
        "{}",
        before[2]
    );
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let r = restore(&img, &[]);
    assert_eq!(r.pid, p.pid, "the PID is free again: it is kept");
    let after: Vec<String> = tids.iter().map(|&t| sched_of(r.pid, t)).collect();
    assert_eq!(before, after);
    // A deadline thread's parameters are not captured: refused up front.
    let t = tids[0].to_string();
    tool(&[
        "chrt",
        "-d",
        "--sched-runtime",
        "1000000",
        "--sched-deadline",
        "50000000",
        "--sched-period",
        "50000000",
        "-p",
        "0",
        &t,
    ]);
    let o = migfs(&["checkpoint", "--check", &r.pid.to_string()]);
    assert!(
        !o.status.success()
            && output_text(&o).contains(&format!("thread {t} runs under SCHED_DEADLINE")),
        "{}",
        output_text(&o)
    );
}

fn crate_tids(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

#[test]
fn shared_writable_mapping_of_a_file_stays_shared() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("shared.bin");
    let log = dir.path().join("log.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_shmap", false);
    let mut p = Proc::start(&[
        bin.to_str().unwrap(),
        map.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    wait_lines(&log, 20, 5000);
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let n = numbers(&log).len();
    let r = restore(&img, &[]);
    wait_lines(&log, n + 20, 5000);
    let maps = fs::read_to_string(format!("/proc/{}/maps", r.pid)).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.contains(" rw-s ") && l.ends_with(map.to_str().unwrap())),
        "{maps}"
    );
    drop(r);
    assert_shared_counter(&log, &map);
}

#[test]
fn one_gib_of_patterned_memory_is_intact_after_restore() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_bigmem", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap(), "1024"]);
    assert!(within(60_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let r = restore(&img, &[]);
    assert!(
        Command::new("kill")
            .args(["-USR1", &r.pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        within(60_000, || fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("verified")),
        "no verification"
    );
    let text = fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("verified ok"),
        "{}",
        text.lines()
            .filter(|l| l.starts_with("verified"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn python3_with_a_million_entry_dict_finishes_with_the_right_result() {
    if !require_ptrace() {
        return;
    }
    let Ok(o) = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
    else {
        panic!("python3 is needed for this test");
    };
    let python = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("work.py");
    fs::write(
        &script,
        "import sys, time\nout = open(sys.argv[1], 'a', buffering=1)\nd = {i: i * i for i in range(1_000_000)}\nout.write('built\\n')\n\
         for step in range(100):\n    time.sleep(0.01)\n    out.write(f'step {step}\\n')\nout.write(f'result {sum(d.values()) % 1000003}\\n')\n",
    )
    .unwrap();
    let out = dir.path().join("py.txt");
    let img = dir.path().join("img");
    let mut p = Proc::start(&[&python, script.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(
        within(60_000, || fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("step 20")),
        "python did not start"
    );
    checkpoint(&p, &img, &[]);
    p.reap_child();
    assert!(
        !fs::read_to_string(&out).unwrap().contains("result"),
        "finished before the checkpoint"
    );
    let _r = restore(&img, &[]);
    assert!(
        within(30_000, || fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("result")),
        "python did not finish"
    );
    let want = (0..1_000_000u64).map(|i| i * i).sum::<u64>() % 1_000_003;
    let text = fs::read_to_string(&out).unwrap();
    assert!(text.contains(&format!("result {want}\n")), "{text}");
    let steps: Vec<&str> = text.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 100, "steps lost or repeated");
}

/// A shared writable mapping of a file on /migfs, checkpointed on n1 and
/// restored on n2: the counter it keeps in the file's first page goes on
/// from where it was, the mapping is shared again, and the file sees it.
#[test]
fn shared_writable_mapping_of_a_migfs_file_moves_to_another_node() {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    let bin = prog("ckpt_shmap", false);
    let pid = start_on(
        &c,
        "n1",
        &[
            bin.to_str().unwrap(),
            "/migfs/shared.bin",
            "/migfs/shlog.txt",
        ],
    );
    let log = c.path("n1", "shlog.txt");
    let count = || numbers(&c.path("n2", "shlog.txt")).len();
    wait_lines(&log, 20, 10_000);
    c.exec_ok(
        "n1",
        &[&m, "checkpoint", &pid.to_string(), "--to", "/migfs/img-sh"],
    );
    let n = count();
    let restored = c
        .exec_ok("n2", &[&m, "restore", "--from", "/migfs/img-sh"])
        .trim()
        .to_owned();
    assert!(
        within(10_000, || count() >= n + 20),
        "the restored copy does not count"
    );
    let maps = c.exec_ok("n2", &["cat", &format!("/proc/{restored}/maps")]);
    assert!(
        maps.lines()
            .any(|l| l.contains(" rw-s ") && l.ends_with("/migfs/shared.bin")),
        "{maps}"
    );
    c.exec_ok("n2", &["kill", "-STOP", &restored]);
    assert_shared_counter(&c.path("n2", "shlog.txt"), &c.path("n2", "shared.bin"));
    c.exec_ok("n2", &["kill", "-9", &restored]);
}

/// python3 holding a million-entry dict, writing its progress to a file on
/// /migfs, checkpointed on n1 and restored on n2, finishes there with the
/// right result and every step once.
#[test]
fn python3_writing_to_migfs_finishes_on_another_node() {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    fs::write(
        c.path("n1", "work.py"),
        "import sys, time\nout = open(sys.argv[1], 'a', buffering=1)\nd = {i: i * i for i in range(1_000_000)}\nout.write('built\\n')\n\
         for step in range(300):\n    time.sleep(0.01)\n    out.write(f'step {step}\\n')\nout.write(f'result {sum(d.values()) % 1000003}\\n')\n",
    )
    .unwrap();
    let pid = start_on(&c, "n1", &["python3", "/migfs/work.py", "/migfs/py.txt"]);
    // Each node reads its own writes at once, the other's once published.
    let on = |node: &str| fs::read_to_string(c.path(node, "py.txt")).unwrap_or_default();
    let text = || on("n2");
    assert!(
        within(60_000, || on("n1").contains("step 20")),
        "python did not start"
    );
    c.exec_ok(
        "n1",
        &[&m, "checkpoint", &pid.to_string(), "--to", "/migfs/img-py"],
    );
    assert!(
        !on("n1").contains("result"),
        "finished before the checkpoint"
    );
    c.exec_ok("n2", &[&m, "restore", "--from", "/migfs/img-py"]);
    assert!(
        within(30_000, || text().contains("result")),
        "python did not finish on n2"
    );
    let want = (0..1_000_000u64).map(|i| i * i).sum::<u64>() % 1_000_003;
    let t = text();
    assert!(t.contains(&format!("result {want}\n")), "{t}");
    let steps: Vec<&str> = t.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 300, "steps lost or repeated");
}

#[test]
fn cwd_umask_rlimits_name_descriptors_and_locks_come_back() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wd = d.join("wd");
    fs::create_dir(&wd).unwrap();
    fs::write(d.join("data"), b"0123456789abcdef").unwrap();
    fs::write(d.join("lk"), b"").unwrap();
    fs::write(d.join("fl"), b"").unwrap();
    let out = d.join("out.txt");
    let img = d.join("img");
    let bin = prog("ckpt_state", false);
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let mut p = Proc::start(&[
        &s(&bin),
        &s(&out),
        &s(&wd),
        &s(&d.join("data")),
        &s(&d.join("lk")),
        &s(&d.join("fl")),
    ]);
    wait_lines_text(&out, 3);
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let r = restore(&img, &[]);
    let link = |what: &str| {
        fs::read_link(format!("/proc/{}/{what}", r.pid))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    assert_eq!(link("cwd"), s(&wd));
    for (fd, want) in [
        (9, "/dev/null".to_owned()),
        (10, s(&wd)),
        (11, s(&d.join("data"))),
        (12, s(&d.join("data"))),
        (13, s(&d.join("lk"))),
        (14, s(&d.join("fl"))),
    ] {
        assert_eq!(link(&format!("fd/{fd}")), want, "fd {fd}");
    }
    assert_eq!(r.status_field("Umask"), "0027");
    assert_eq!(r.status_field("Name"), "ckpt-state");
    let limits = fs::read_to_string(format!("/proc/{}/limits", r.pid)).unwrap();
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&nofile[3..5], ["777", "4096"]);
    assert_eq!(fdinfo_field(&r.fdinfo(11), "pos"), "5");
    assert_eq!(fdinfo_field(&r.fdinfo(13), "flags"), "0100002", "O_RDWR");
    let locks = fs::read_to_string("/proc/locks").unwrap();
    let mine: Vec<&str> = locks
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(&r.pid.to_string()))
        .collect();
    assert!(
        mine.iter()
            .any(|l| l.contains("POSIX") && l.contains("WRITE") && l.ends_with(" 0 9")),
        "{mine:?}"
    );
    assert!(
        mine.iter()
            .any(|l| l.contains("FLOCK") && l.contains("READ")),
        "{mine:?}"
    );
    assert!(
        Command::new("kill")
            .args(["-USR1", &r.pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        within(3000, || fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("shared offset 6")),
        "fds 11 and 12 no longer share their offset"
    );
}

// ------------------------------------------------------------- failures

/// A counter checkpointed (and ended) into `dir/img`; returns its output file.
fn counter_image(dir: &Path) -> (PathBuf, PathBuf, i32) {
    let out = dir.join("count.txt");
    let img = dir.join("img");
    let bin = prog("ckpt_counter", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    wait_lines(&out, 5, 5000);
    checkpoint(&p, &img, &[]);
    p.reap_child();
    (out, img, p.pid)
}

#[test]
fn corrupt_or_truncated_images_fail_at_read_image_and_leave_nothing() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, img, pid) = counter_image(dir.path());
    let meta = img.join("image.pb");
    let pages = img.join("pages.img");
    let good_meta = fs::read(&meta).unwrap();
    let good_pages = fs::read(&pages).unwrap();

    fs::write(&meta, &good_meta[..good_meta.len() / 2]).unwrap();
    restore_fails(&img, &[], "read image", "truncated");
    let mut flipped = good_meta.clone();
    flipped[100] ^= 0x40;
    fs::write(&meta, &flipped).unwrap();
    restore_fails(&img, &[], "read image", "checksum mismatch in the message");
    fs::write(&meta, b"not an image").unwrap();
    restore_fails(&img, &[], "read image", "not a migfs image");
    fs::write(&meta, &good_meta).unwrap();

    fs::write(&pages, &good_pages[..good_pages.len() - 4096]).unwrap();
    restore_fails(&img, &[], "read image", "pages.img: truncated");
    let mut bad = good_pages.clone();
    let at = bad.len() - 100;
    bad[at] ^= 1;
    fs::write(&pages, &bad).unwrap();
    restore_fails(
        &img,
        &[],
        "write memory",
        "checksum mismatch in the segment",
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the half-built process {pid} is still there"
    );

    fs::write(&pages, &good_pages).unwrap();
    let _r = restore(&img, &[]);
}

#[test]
fn missing_or_changed_files_fail_at_check_files() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, img, _) = counter_image(dir.path());
    let good = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    restore_fails(
        &img,
        &[],
        "check files",
        &format!("fd 7: {}: No such file or directory", out.display()),
    );
    let mut changed = good.clone();
    changed[0] = b'9';
    fs::write(&out, &changed).unwrap();
    restore_fails(
        &img,
        &[],
        "check files",
        "changed since the checkpoint (content differs)",
    );
    fs::write(&out, &good[..good.len() - 2]).unwrap();
    restore_fails(
        &img,
        &[],
        "check files",
        "changed since the checkpoint (size",
    );
    fs::write(&out, &good).unwrap();
    let r = restore(&img, &[]);
    wait_lines(&out, numbers(&out).len() + 5, 5000);
    drop(r);
    assert_sequence(&out);
}

#[test]
fn leave_running_keeps_the_original_and_a_taken_pid_is_refused_when_required() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("call.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_blocking", false);
    let p = Proc::start(&[
        bin.to_str().unwrap(),
        out.to_str().unwrap(),
        "poll",
        "600000",
    ]);
    assert!(within(5000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .starts_with("start")));
    let text = checkpoint(&p, &img, &["--leave-running"]);
    assert!(text.contains("left running"), "{text}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(p.alive(), "--leave-running ended the process");
    assert_eq!(fs::read_link(format!("/proc/{}/exe", p.pid)).unwrap(), bin);
    restore_fails(
        &img,
        &["--pid-required"],
        "create stub",
        &format!("pid {} is in use", p.pid),
    );
    let copy = restore(&img, &[]);
    assert_ne!(copy.pid, p.pid);
    assert!(p.alive() && copy.alive());
}

// ------------------------------------- pre-copy and lazy restore

/// `migfs restore --from DIR --lazy` under a reaper, from the moment it
/// printed the PID (the process runs, its memory still coming in).
struct LazyRun {
    /// The restored process (its guard gets the reaper at `finish`).
    proc_: Proc,
    reaper: Child,
    /// The rest of stdout, read until `migfs restore` ends.
    rest: std::thread::JoinHandle<String>,
}

impl LazyRun {
    fn start(dir: &Path) -> LazyRun {
        use std::io::BufRead;
        let mut reaper = Command::new(spawner())
            .arg("reap")
            .arg(migfs_bin())
            .args(["restore", "--lazy", "--from", dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run migfs restore --lazy");
        let mut stdout = std::io::BufReader::new(reaper.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Ok(pid) = line.trim().parse::<i32>() else {
            let _ = reaper.kill();
            let o = reaper.wait_with_output().unwrap();
            panic!(
                "no PID from migfs restore --lazy: {line:?}\n{}",
                output_text(&o)
            )
        };
        let rest = std::thread::spawn(move || {
            use std::io::Read;
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        LazyRun {
            proc_: Proc {
                pid,
                child: None,
                reaper: None,
            },
            reaper,
            rest,
        }
    }

    /// Waits until `migfs restore --lazy` ends (every page in, or an
    /// error); returns the process, the rest of stdout and stderr.
    fn finish(mut self) -> (Proc, String, String) {
        use std::io::Read;
        let mut err = String::new();
        if let Some(mut e) = self.reaper.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        let out = self.rest.join().unwrap();
        self.proc_.reaper = Some(self.reaper);
        (self.proc_, out, err)
    }
}

/// Sends SIGUSR1 to `pid` and waits for a line starting with "verified"
/// in `out`; returns those lines.
fn verify(pid: i32, out: &Path, ms: u64) -> String {
    let before = verified_lines(out).len();
    assert!(
        Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        within(ms, || verified_lines(out).len() > before),
        "no verification from {pid}"
    );
    verified_lines(out).join("\n")
}

fn verified_lines(out: &Path) -> Vec<String> {
    fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("verified"))
        .map(str::to_owned)
        .collect()
}

/// The rounds a `migfs checkpoint --precopy` reported.
fn precopy_rounds(text: &str) -> u32 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("pre-copy: ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no pre-copy line in {text:?}"))
}

#[test]
fn one_gib_of_patterned_memory_is_intact_after_precopy_and_lazy_restore() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_bigmem", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap(), "1024"]);
    assert!(within(60_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    let text = checkpoint(&p, &img, &["--precopy"]);
    assert!(precopy_rounds(&text) >= 1, "{text}");
    p.reap_child();
    let run = LazyRun::start(&img);
    // Checked while the fill still runs: faults and fill race.
    let v = verify(run.proc_.pid, &out, 60_000);
    let (r, rest, err) = run.finish();
    assert!(err.is_empty() && rest.is_empty(), "{rest}{err}");
    assert!(v.ends_with("verified ok"), "{v}");
    assert!(r.alive());
    let v = verify(r.pid, &out, 60_000);
    assert!(v.ends_with("verified ok"), "after the fill: {v}");
}

#[test]
fn a_process_writing_its_memory_during_precopy_comes_back_exactly() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("writer.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_writer", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap(), "256"]);
    assert!(within(30_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    std::thread::sleep(Duration::from_millis(200));
    let text = checkpoint(&p, &img, &["--precopy"]);
    // It writes ~250 MB/s: the first round cannot leave it clean.
    assert!(precopy_rounds(&text) >= 2, "{text}");
    p.reap_child();
    let at_checkpoint = fs::read(&out).unwrap();
    // The image restores exactly, eagerly ...
    let r = restore(&img, &[]);
    let v = verify(r.pid, &out, 30_000);
    assert!(v.starts_with("verified ok"), "eager restore: {v}");
    drop(r);
    // ... and lazily, checked while the fill runs (its output file as it
    // was at the checkpoint, or the restore refuses the changed file).
    fs::write(&out, &at_checkpoint).unwrap();
    let run = LazyRun::start(&img);
    let v = verify(run.proc_.pid, &out, 30_000);
    let (_r, rest, err) = run.finish();
    assert!(err.is_empty() && rest.is_empty(), "{rest}{err}");
    let last = v.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("verified ok"), "lazy restore: {v}");
    assert!(!v.contains("BAD"), "{v}");
}

#[test]
fn threads_keep_their_state_through_precopy_and_lazy_restore() {
    if !require_ptrace() {
        return;
    }
    threads_round_trip(false, &["--precopy"], &["--lazy"]);
}

#[test]
fn precopy_with_leave_running_leaves_the_original_correct_and_untracked() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("writer.txt");
    let img = dir.path().join("img");
    let bin = prog("ckpt_writer", false);
    let p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap(), "64"]);
    assert!(within(30_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    let text = checkpoint(&p, &img, &["--precopy", "--leave-running"]);
    assert!(text.contains("left running"), "{text}");
    assert!(p.alive());
    // No mapping is registered with a userfaultfd any more ("uw": wp).
    let smaps = fs::read_to_string(format!("/proc/{}/smaps", p.pid)).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "still write-protected after the checkpoint"
    );
    assert_eq!(p.status_field("TracerPid"), "0");
    // The image is complete and restores as a copy beside it (before
    // the original writes to its file again).
    let copy = restore(&img, &[]);
    assert_ne!(copy.pid, p.pid);
    let v = verify(p.pid, &out, 30_000);
    assert!(v.starts_with("verified ok"), "the original: {v}");
    let v = verify(copy.pid, &out, 30_000);
    assert!(!v.contains("BAD"), "the copy: {v}");
    assert!(copy.alive() && p.alive());
}

#[test]
fn counter_continues_through_precopy_and_lazy_restore() {
    if !require_ptrace() {
        return;
    }
    counter_round_trip_with(false, &["--precopy"], &["--lazy"]);
}

#[test]
fn corrupt_pages_under_lazy_restore_fail_before_resume_or_kill_the_process() {
    if !require_ptrace() {
        return;
    }
    // Eager memory (the program's own data) is checked before it runs:
    // nothing is left.
    let dir = tempfile::tempdir().unwrap();
    let (_, img, pid) = counter_image(dir.path());
    let pages = img.join("pages.img");
    let good = fs::read(&pages).unwrap();
    let mut bad = good.clone();
    bad[10] ^= 1;
    fs::write(&pages, &bad).unwrap();
    restore_fails(
        &img,
        &["--lazy"],
        "write memory",
        "checksum mismatch in the segment at 0x",
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the half-built process {pid} is still there"
    );
    fs::write(&pages, &good).unwrap();

    // Anonymous memory found bad after the process resumed: it is killed
    // and the error names the segment.
    let out = dir.path().join("big.txt");
    let img = dir.path().join("img-big");
    let bin = prog("ckpt_bigmem", false);
    let mut p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap(), "64"]);
    assert!(within(30_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let pages = img.join("pages.img");
    let mut bad = fs::read(&pages).unwrap();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    fs::write(&pages, &bad).unwrap();
    let run = LazyRun::start(&img);
    let pid = run.proc_.pid;
    let (mut r, _, err) = run.finish();
    assert!(
        err.contains(&format!("lazy restore of pid {pid}"))
            && err.contains("checksum mismatch in the segment at 0x")
            && err.contains("the process was killed"),
        "{err}"
    );
    let reaper = r.reaper.as_mut().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = reaper.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "the killed process is still there");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!r.alive(), "pid {pid} still runs");
}

/// A program built with `-nostdlib -static -no-pie` (see ckpt_noanon.c).
fn prog_nostdlib(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| migfs_e2e::progs::progs_dir("migfs-test-nostdlib"));
    let out = dir.join(name);
    if !out.exists() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("progs")
            .join(format!("{name}.c"));
        let o = Command::new("gcc")
            .args([
                "-O2",
                "-static",
                "-nostdlib",
                "-fno-pie",
                "-no-pie",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-o",
            ])
            .arg(&out)
            .arg(&src)
            .output()
            .expect("run gcc");
        assert!(o.status.success(), "gcc {name}: {}", output_text(&o));
    }
    out
}

#[test]
fn lazy_restore_of_an_image_with_nothing_lazy_and_precopy_of_a_refused_process_fail_clearly() {
    if !require_ptrace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No heap, no stack, no anonymous mapping: nothing to be lazy about.
    let bin = prog_nostdlib("ckpt_noanon");
    let mut p = Proc::start(&[bin.to_str().unwrap()]);
    assert!(within(5000, || fs::read_to_string(format!(
        "/proc/{}/maps",
        p.pid
    ))
    .is_ok_and(|m| !m.contains("[stack]"))));
    let img = dir.path().join("img");
    checkpoint(&p, &img, &[]);
    p.reap_child();
    restore_fails(
        &img,
        &["--lazy"],
        "read image",
        "--lazy: the image has no private anonymous memory",
    );
    let r = restore(&img, &[]);
    assert!(r.alive(), "a plain restore of the same image works");
    drop(r);

    // --precopy of a process --check refuses: nothing starts, it runs on.
    let out = dir.path().join("beat.txt");
    let bin = prog("ckpt_sockets", false);
    let p = Proc::start(&[bin.to_str().unwrap(), out.to_str().unwrap()]);
    wait_lines(&out, 5, 5000);
    let pid = p.pid.to_string();
    let img = dir.path().join("img-sockets");
    let o = migfs(&[
        "checkpoint",
        &pid,
        "--to",
        img.to_str().unwrap(),
        "--precopy",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(&format!("pid {pid} cannot be moved"))
            && err.contains("TCP listening socket"),
        "{}",
        output_text(&o)
    );
    assert!(!img.exists(), "nothing may be written");
    assert_eq!(p.status_field("TracerPid"), "0", "left traced");
    let n = numbers(&out).len();
    wait_lines(&out, n + 10, 5000);
    assert!(p.alive());
}

// ------------------------------------------------- across cluster nodes

use migfs_e2e::harness::{Cluster, require_priv};

fn cluster() -> Option<Cluster> {
    (require_ptrace() && require_priv()).then(|| Cluster::up(2))
}

/// Starts `argv` on `node` through `ckpt_spawn exec` (no stray
/// descriptors); returns its PID there.
fn start_on(c: &Cluster, node: &str, argv: &[&str]) -> i32 {
    let sp = spawner();
    let mut full = vec![sp.to_str().unwrap(), "exec"];
    full.extend_from_slice(argv);
    c.spawn_detached(node, &full)
}

fn bin_str() -> String {
    migfs_bin().to_str().unwrap().to_owned()
}

#[test]
fn counter_on_migfs_moves_from_n1_to_n2_and_keeps_its_pid() {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    let counter = prog("ckpt_counter", false);
    let pid = start_on(&c, "n1", &[counter.to_str().unwrap(), "/migfs/count.txt"]);
    let host_out = c.path("n2", "count.txt");
    wait_lines(&host_out, 20, 10_000);
    c.exec_ok(
        "n1",
        &[&m, "checkpoint", &pid.to_string(), "--to", "/migfs/img"],
    );
    assert!(within(5000, || !c
        .exec_ok(
            "n1",
            &[
                "sh",
                "-c",
                &format!("test -e /proc/{pid} && echo alive || true")
            ]
        )
        .contains("alive")));
    let n = numbers(&host_out).len();
    // PIDs in n2's namespace are handed out in increasing order; the
    // restore command and its threads take the next few. Move n2's counter
    // past `pid` first, so that "free" means free of the restorer too.
    assert!(within(10_000, || c
        .exec_ok("n2", &["sh", "-c", "echo $$"])
        .trim()
        .parse::<i32>()
        .is_ok_and(|p| p > pid)));
    let free = !c
        .exec_ok(
            "n2",
            &[
                "sh",
                "-c",
                &format!("test -e /proc/{pid} && echo taken || true"),
            ],
        )
        .contains("taken");
    let restored: i32 = c
        .exec_ok("n2", &[&m, "restore", "--from", "/migfs/img"])
        .trim()
        .parse()
        .unwrap();
    if free {
        assert_eq!(
            restored, pid,
            "the PID was free on n2 and should have been kept"
        );
    }
    assert_eq!(
        c.exec_ok("n2", &["cat", &format!("/proc/{restored}/comm")])
            .trim(),
        "ckpt_counter"
    );
    wait_lines(&host_out, n + 30, 10_000);
    c.exec_ok("n2", &["kill", "-9", &restored.to_string()]);
    std::thread::sleep(Duration::from_millis(100));
    assert_sequence(&c.path("n1", "count.txt"));
}

#[test]
fn migfs_file_renamed_away_and_replaced_is_reopened_by_inode() {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    let counter = prog("ckpt_counter", false);
    let pid = start_on(&c, "n1", &[counter.to_str().unwrap(), "/migfs/a.txt"]);
    wait_lines(&c.path("n1", "a.txt"), 10, 10_000);
    fs::rename(c.path("n2", "a.txt"), c.path("n2", "b.txt")).unwrap();
    fs::write(c.path("n2", "a.txt"), b"another file\n").unwrap();
    wait_lines(
        &c.path("n2", "b.txt"),
        numbers(&c.path("n2", "b.txt")).len() + 5,
        10_000,
    );
    c.exec_ok(
        "n1",
        &[&m, "checkpoint", &pid.to_string(), "--to", "/migfs/img"],
    );
    let n = numbers(&c.path("n2", "b.txt")).len();
    let restored = c
        .exec_ok("n2", &[&m, "restore", "--from", "/migfs/img"])
        .trim()
        .to_owned();
    wait_lines(&c.path("n2", "b.txt"), n + 20, 10_000);
    c.exec_ok("n2", &["kill", "-9", &restored]);
    std::thread::sleep(Duration::from_millis(100));
    assert_sequence(&c.path("n2", "b.txt"));
    assert_eq!(
        fs::read(c.path("n2", "a.txt")).unwrap(),
        b"another file\n",
        "wrote to the new a.txt"
    );
}

#[test]
fn unlinked_migfs_file_is_reopened_by_inode_on_another_node() {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    let pid = start_unlinking_writer(&c);
    // Empty until the program has set up fd 7 (polled below).
    let lines = |node: &str, pid: &str| fd7_numbers(&c, node, pid);
    assert!(within(10_000, || lines("n1", &pid).len() >= 10));
    assert!(!c.path("n1", "gone.txt").exists());
    c.exec_ok("n1", &["kill", "-USR2", &pid]);
    std::thread::sleep(Duration::from_millis(100));
    // The original keeps the file alive until the copy holds it too.
    c.exec_ok(
        "n1",
        &[
            &m,
            "checkpoint",
            &pid,
            "--to",
            "/migfs/img",
            "--leave-running",
        ],
    );
    let restored = c
        .exec_ok("n2", &[&m, "restore", "--from", "/migfs/img"])
        .trim()
        .to_owned();
    let link = c.exec_ok("n2", &["readlink", &format!("/proc/{restored}/fd/7")]);
    c.exec_ok("n1", &["kill", "-9", &pid]);
    c.exec_ok("n2", &["kill", "-USR1", &restored]);
    let n = lines("n2", &restored).len();
    assert!(
        within(10_000, || lines("n2", &restored).len() >= n + 20),
        "the copy on n2 does not write ({link})"
    );
    let v = lines("n2", &restored);
    c.exec_ok("n2", &["kill", "-9", &restored]);
    assert_counts_up(&v);
}

#[test]
fn fcntl_lock_on_migfs_stays_held_by_the_process_across_nodes() {
    lock_on_migfs_stays_held_by_the_process_across_nodes("hold");
}

/// flock(2) locks live in the metadata server like fcntl ones, but belong
/// to the open file and never conflict with fcntl locks: the restored
/// process holds a flock again (not an fcntl lock in its place).
#[test]
fn flock_lock_on_migfs_stays_held_by_the_process_across_nodes() {
    lock_on_migfs_stays_held_by_the_process_across_nodes("flock");
}

/// `ckpt_blocking MODE /migfs/lk` takes a lock on n1 (`hold`: an fcntl
/// write lock, `flock`: flock LOCK_EX); it is checkpointed there, restored
/// on n2, and the lock is held throughout, by the process only.
fn lock_on_migfs_stays_held_by_the_process_across_nodes(mode: &str) {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    let b = prog("ckpt_blocking", false);
    let b = b.to_str().unwrap();
    fs::write(c.path("n1", "lk"), b"lock me").unwrap();
    let report = |file: &str| fs::read_to_string(c.path("n1", file)).unwrap_or_default();
    // Tries a lock of kind `how` from `node`; returns its report and stops
    // the prober.
    let probe = |node: &str, how: &str, name: &str| -> String {
        let file = format!("/migfs/{name}");
        let pid = start_on(&c, node, &[b, &file, how, "/migfs/lk"]);
        assert!(
            within(10_000, || report(name).contains("rc=")),
            "{name}: no report"
        );
        c.exec_ok(node, &["kill", "-9", &pid.to_string()]);
        report(name)
    };
    let other = if mode == "flock" { "hold" } else { "flock" };
    let holder = start_on(&c, "n1", &[b, "/migfs/holder.txt", mode, "/migfs/lk"]).to_string();
    assert!(
        within(10_000, || report("holder.txt").contains("rc=0 ")),
        "{}",
        report("holder.txt")
    );
    assert!(
        probe("n2", mode, "p1.txt").contains("rc=-1 errno=11 "),
        "the {mode} lock is not held at first"
    );
    c.exec_ok("n1", &[&m, "checkpoint", &holder, "--to", "/migfs/img"]);
    let gap = probe("n2", mode, "p-gap.txt");
    assert!(
        gap.contains("rc=-1 errno=11 "),
        "the {mode} lock was free between the checkpoint and the restore: {gap}"
    );
    let restored = c
        .exec_ok("n2", &[&m, "restore", "--from", "/migfs/img"])
        .trim()
        .to_owned();
    let p2 = probe("n1", mode, "p2.txt");
    assert!(
        p2.contains("rc=-1 errno=11 "),
        "the restored process does not hold the {mode} lock: {p2}"
    );
    let p2other = probe("n1", other, "p2-other.txt");
    assert!(
        p2other.contains("rc=0 "),
        "a {other} lock must not conflict with the restored {mode} lock: {p2other}"
    );
    c.exec_ok("n2", &["kill", "-9", &restored]);
    let p3 = probe("n1", mode, "p3.txt");
    assert!(
        p3.contains("rc=0 "),
        "the lock should be free once the restored process is gone: {p3}"
    );
}

/// Locks a checkpoint parked and no restore claimed go after
/// `--hold-locks`; a later restore takes them again afresh.
#[test]
fn parked_locks_are_dropped_after_the_hold_time() {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    let b = prog("ckpt_blocking", false);
    let b = b.to_str().unwrap();
    fs::write(c.path("n1", "lk"), b"lock me").unwrap();
    let report = |file: &str| fs::read_to_string(c.path("n1", file)).unwrap_or_default();
    let tries = std::cell::Cell::new(0);
    let probe = || -> String {
        tries.set(tries.get() + 1);
        let name = format!("p{}.txt", tries.get());
        let file = format!("/migfs/{name}");
        let pid = start_on(&c, "n2", &[b, &file, "hold", "/migfs/lk"]);
        assert!(
            within(10_000, || report(&name).contains("rc=")),
            "{name}: no report"
        );
        c.exec_ok("n2", &["kill", "-9", &pid.to_string()]);
        report(&name)
    };
    let holder = start_on(&c, "n1", &[b, "/migfs/holder.txt", "hold", "/migfs/lk"]).to_string();
    assert!(within(10_000, || report("holder.txt").contains("rc=0 ")));
    c.exec_ok(
        "n1",
        &[
            &m,
            "checkpoint",
            &holder,
            "--to",
            "/migfs/img",
            "--hold-locks",
            "3",
        ],
    );
    let img = c.path("n1", "img/locks.park");
    assert!(img.exists(), "the image names no parked locks");
    assert!(probe().contains("rc=-1 errno=11 "), "not parked");
    assert!(
        within(15_000, || probe().contains("rc=0 ")),
        "parked locks were never dropped"
    );
    let restored = c
        .exec_ok("n2", &[&m, "restore", "--from", "/migfs/img"])
        .trim()
        .to_owned();
    assert!(
        probe().contains("rc=-1 errno=11 "),
        "the restore did not take the lock again"
    );
    c.exec_ok("n2", &["kill", "-9", &restored]);
}

#[test]
fn a_non_root_process_gets_exactly_its_credentials_back() {
    if !require_ptrace() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let bin = dir.path().join("counter");
    fs::copy(prog("ckpt_counter", false), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.path().join("count.txt");
    let img = dir.path().join("img");
    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let mut argv: Vec<&str> = setpriv.to_vec();
    argv.extend([bin.to_str().unwrap(), out.to_str().unwrap()]);
    let mut p = Proc::start(&argv);
    wait_lines(&out, 5, 5000);
    let creds = |p: &Proc| {
        [
            "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
        ]
        .map(|k| p.status_field(k))
    };
    let before = creds(&p);
    assert!(before[0].starts_with("65534"), "{before:?}");
    checkpoint(&p, &img, &[]);
    p.reap_child();
    let n = numbers(&out).len();
    let r = restore(&img, &[]);
    wait_lines(&out, n + 5, 5000);
    assert_eq!(creds(&r), before, "credentials differ after restore");
    drop(r);
    assert_sequence(&out);
}

/// The numbers a `ckpt_quiet` process has written to its fd 7, read
/// through /proc on `node`.
fn fd7_numbers(c: &Cluster, node: &str, pid: &str) -> Vec<u64> {
    let o = c.exec(node, &["cat", &format!("/proc/{pid}/fd/7")]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// `ckpt_quiet` on n1 writing numbers to /migfs/gone.txt through fd 7
/// after unlinking it; its PID there.
fn start_unlinking_writer(c: &Cluster) -> String {
    let quiet = prog("ckpt_quiet", false);
    start_on(
        c,
        "n1",
        &[quiet.to_str().unwrap(), "/migfs/gone.txt", "unlink"],
    )
    .to_string()
}

fn assert_counts_up(v: &[u64]) {
    for (i, &x) in v.iter().enumerate() {
        assert_eq!(x, i as u64, "gap or duplicate at line {i}");
    }
}

#[test]
fn unlinked_migfs_file_comes_back_from_its_ghost_after_a_plain_checkpoint() {
    let Some(c) = cluster() else { return };
    let m = bin_str();
    let pid = start_unlinking_writer(&c);
    assert!(within(10_000, || fd7_numbers(&c, "n1", &pid).len() >= 10));
    // A plain checkpoint ends the original, the last holder of the
    // unlinked file: only the copy in the image keeps its content.
    c.exec_ok("n1", &[&m, "checkpoint", &pid, "--to", "/migfs/img"]);
    let ghosts: Vec<_> = fs::read_dir(c.path("n1", "img"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ghost-"))
        .collect();
    assert_eq!(ghosts.len(), 1, "one ghost in the image");
    let restored = c
        .exec_ok("n2", &[&m, "restore", "--from", "/migfs/img"])
        .trim()
        .to_owned();
    let link = c.exec_ok("n2", &["readlink", &format!("/proc/{restored}/fd/7")]);
    assert!(link.trim().ends_with("(deleted)"), "fd 7 is {link}");
    let n = fd7_numbers(&c, "n2", &restored).len();
    assert!(
        within(10_000, || fd7_numbers(&c, "n2", &restored).len() >= n + 20),
        "the copy on n2 does not write"
    );
    let v = fd7_numbers(&c, "n2", &restored);
    c.exec_ok("n2", &["kill", "-9", &restored]);
    assert_counts_up(&v);
    // The file made again from the ghost is not left in the namespace.
    let names: Vec<String> = fs::read_dir(c.path("n2", ""))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".migfs-restored-")),
        "{names:?}"
    );
}
