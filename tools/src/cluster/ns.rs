//! A node's namespaces: created around a small init process, entered to
//! run commands and daemons, and the init itself (`migfs cluster init-ns`).
//!
//! The init is PID 1 of the node's PID namespace and the first process of
//! its mount and UTS namespaces. It makes mount propagation private, mounts
//! a fresh /proc, sets the hostname, creates the mountpoint, then only reaps
//! orphans; it runs and restarts nothing. Its namespaces therefore outlive
//! the node daemon, and killing it (SIGKILL to PID 1) ends everything in
//! the node, after which the kernel drops the mount namespace and its mounts.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail, ensure};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::procs::{self, ProcRef};
use super::sys;

/// What the init writes on its stdout once the namespaces are set up.
const READY: &str = "ok";
/// What `cluster up` answers once it has recorded the init.
const COMMIT: &str = "go";

/// An init just created by [`create`]: set up, but it exits unless
/// [`PendingInit::commit`] is called (so a crash of `cluster up` before it
/// recorded the init leaves nothing behind).
pub struct PendingInit {
    /// The init, as the host sees it.
    pub proc: ProcRef,
    commit: File,
}

impl PendingInit {
    /// Tells the init it is recorded and may stay.
    pub fn commit(mut self) -> anyhow::Result<()> {
        writeln!(self.commit, "{COMMIT}").context("tell the node's init to stay")
    }
}

/// Starts `bin cluster --dir DIR init-ns` as PID 1 of new PID, mount and
/// UTS namespaces, with stderr to `log`, and waits until it has set them
/// up. (`--dir` is unused by the init; it shows in `ps` whose node it is.)
pub fn create(
    bin: &Path,
    dir: &Path,
    name: &str,
    mount: &Path,
    log: File,
) -> anyhow::Result<PendingInit> {
    let (to_init_r, to_init_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let (from_init_r, from_init_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let mut cmd = Command::new(bin);
    cmd.args(["cluster", "--dir"])
        .arg(dir)
        .args(["init-ns", "--name", name, "--mount"])
        .arg(mount)
        .current_dir("/")
        .stdin(Stdio::from(to_init_r))
        .stdout(Stdio::from(from_init_w))
        .stderr(Stdio::from(log));
    let flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS;
    let pid = sys::clone_with(flags, move || {
        let _ = nix::unistd::setsid();
        let err = cmd.exec();
        eprintln!("migfs cluster: cannot run {}: {err}", bin_display(&cmd));
        127
    })?;
    // The child's ends were dropped with `cmd` in this process already.
    let proc = ProcRef::of(pid.as_raw());
    let mut reply = String::new();
    let mut from_init = BufReader::new(File::from(from_init_r));
    from_init
        .read_line(&mut reply)
        .context("read from the node's init")?;
    if reply.trim() != READY {
        let mut rest = String::new();
        let _ = from_init.read_to_string(&mut rest);
        let _ = waitpid(pid, None);
        let why = format!("{}{}", reply.trim(), rest.trim_end());
        let why = if why.is_empty() {
            "it exited without a word (see its log)".to_string()
        } else {
            why
        };
        bail!("cannot set up the namespaces of node {name}: {why}");
    }
    let proc = proc.context("the node's init vanished right after it started")?;
    Ok(PendingInit {
        proc,
        commit: File::from(to_init_w),
    })
}

fn bin_display(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

/// Handles on a running node's namespaces, opened through its init.
pub struct NodeNs {
    init: ProcRef,
    pid_ns: File,
    pid_ns_id: String,
    mnt: File,
    uts: File,
}

/// A process started in the background by [`NodeNs::spawn`].
#[derive(Clone, Copy, Debug)]
pub struct Spawned {
    /// Its PID as the node sees it.
    pub ns_pid: i32,
    /// The process as the host sees it; `None` if it already exited.
    pub host: Option<ProcRef>,
}

impl NodeNs {
    /// Opens the namespaces of the node whose init is `init`.
    pub fn open(init: ProcRef) -> anyhow::Result<NodeNs> {
        let open = |kind: &str| {
            File::open(format!("/proc/{}/ns/{kind}", init.pid))
                .with_context(|| format!("open /proc/{}/ns/{kind}", init.pid))
        };
        let (pid_ns, mnt, uts) = (open("pid")?, open("mnt")?, open("uts")?);
        let pid_ns_id = procs::ns_id(init.pid, "pid").context("read the node's PID namespace")?;
        // Checked after opening: the handles belong to the recorded init.
        ensure!(
            init.is_alive(),
            "the node's init (pid {}) is not running",
            init.pid
        );
        Ok(NodeNs {
            init,
            pid_ns,
            pid_ns_id,
            mnt,
            uts,
        })
    }

    /// The host's path to `path` inside the node (through its init's root).
    pub fn host_path(&self, path: &Path) -> PathBuf {
        host_path(self.init, path)
    }

    /// Forks a child inside the node: this process's PID namespace for
    /// children is switched to the node's for the fork (setns on the PID
    /// namespace only affects children), and the child joins the mount and
    /// UTS namespaces, then changes to `cwd` if it exists there, else `/`.
    fn fork_in(&self, cwd: &Path, child: impl FnOnce() -> i32) -> anyhow::Result<Pid> {
        let own = File::open("/proc/self/ns/pid").context("open /proc/self/ns/pid")?;
        nix::sched::setns(&self.pid_ns, CloneFlags::CLONE_NEWPID)
            .context("enter the node's PID namespace")?;
        let (mnt, uts) = (&self.mnt, &self.uts);
        let res = sys::fork_with(|| {
            if let Err(e) = nix::sched::setns(mnt, CloneFlags::CLONE_NEWNS)
                .and_then(|()| nix::sched::setns(uts, CloneFlags::CLONE_NEWUTS))
            {
                eprintln!("migfs cluster: cannot enter the node's namespaces: {e}");
                return 125;
            }
            if std::env::set_current_dir(cwd).is_err() {
                let _ = std::env::set_current_dir("/");
            }
            child()
        });
        nix::sched::setns(&own, CloneFlags::CLONE_NEWPID)
            .context("return to the host's PID namespace")?;
        res.with_context(|| format!("start a process in the node (init pid {})", self.init.pid))
    }

    /// Runs `argv` in the node with this process's stdio and environment,
    /// waits, and returns its exit code (128 + signal if it was killed).
    pub fn exec(&self, argv: &[OsString], cwd: &Path) -> anyhow::Result<i32> {
        let (prog, args) = argv.split_first().context("no command given")?;
        let pid = self.fork_in(cwd, || {
            let err = Command::new(prog).args(args).exec();
            eprintln!("migfs cluster exec: {}: {err}", prog.to_string_lossy());
            if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        })?;
        wait_code(pid)
    }

    /// Starts `cmd` in the node in a new session, detached: it is orphaned
    /// at once, so the node's init becomes its parent and reaps it.
    pub fn spawn(&self, cmd: Command, cwd: &Path) -> anyhow::Result<Spawned> {
        let spawned = spawn_detached(cmd, |f| self.fork_in(cwd, f))?;
        let host = procs::host_pid_of(&self.pid_ns_id, spawned).and_then(ProcRef::of);
        Ok(Spawned {
            ns_pid: spawned,
            host,
        })
    }

    /// Lazily detaches every FUSE mount stacked at `mount` in the node (a
    /// dead one left by a killed daemon); open files keep working until
    /// closed.
    pub fn detach_fuse(&self, mount: &Path) -> anyhow::Result<()> {
        let pid = self.fork_in(Path::new("/"), || {
            for _ in 0..16 {
                let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
                    return 1;
                };
                if !fuse_mounted(&info, mount) {
                    return 0;
                }
                if let Err(e) = nix::mount::umount2(mount, MntFlags::MNT_DETACH) {
                    eprintln!("migfs cluster: umount -l {}: {e}", mount.display());
                    return 1;
                }
            }
            1
        })?;
        ensure!(
            wait_code(pid)? == 0,
            "cannot detach the old mount at {} in the node",
            mount.display()
        );
        Ok(())
    }
}

/// Starts `cmd` on the host in a new session, detached (reparented to the
/// host's reaper); returns its PID.
pub fn spawn_on_host(cmd: Command) -> anyhow::Result<Option<ProcRef>> {
    let pid = spawn_detached(cmd, |f| sys::fork_with(f))?;
    Ok(ProcRef::of(pid))
}

/// Forks (with `fork`) a short-lived child that starts a new session,
/// spawns `cmd`, reports its PID (as the child's PID namespace sees it) on
/// a pipe and exits.
fn spawn_detached(
    mut cmd: Command,
    fork: impl FnOnce(Box<dyn FnOnce() -> i32 + '_>) -> anyhow::Result<Pid>,
) -> anyhow::Result<i32> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let mut w = Some(File::from(w));
    let pid = fork(Box::new(move || {
        let Some(mut w) = w.take() else { return 1 };
        let _ = nix::unistd::setsid();
        // Only stdio reaches the command (a stray inherited descriptor
        // would also make the process unmovable).
        let _ = sys::cloexec_from_3();
        let msg = match cmd.spawn() {
            Ok(child) => child.id().to_string(),
            Err(e) => format!(
                "error: cannot run {}: {e}",
                cmd.get_program().to_string_lossy()
            ),
        };
        i32::from(w.write_all(msg.as_bytes()).is_err())
    }))?;
    let mut msg = String::new();
    File::from(r)
        .read_to_string(&mut msg)
        .context("read the pid of the started process")?;
    let _ = wait_code(pid);
    if let Some(err) = msg.strip_prefix("error: ") {
        bail!("{err}");
    }
    msg.trim()
        .parse()
        .with_context(|| format!("could not start the process ({msg:?})"))
}

/// Waits for a child and maps its end to a shell-style exit code.
fn wait_code(pid: Pid) -> anyhow::Result<i32> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("wait for the process"),
        }
    }
}

/// The host's path to `path` inside the mount namespace of `init`.
pub fn host_path(init: ProcRef, path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap_or(path);
    PathBuf::from(format!("/proc/{}/root", init.pid)).join(rel)
}

/// Whether a FUSE filesystem is mounted at `mount` according to the
/// `mountinfo` text (mount point: field 5; fstype: first field after `-`).
pub fn fuse_mounted(mountinfo: &str, mount: &Path) -> bool {
    mountinfo.lines().any(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            return false;
        };
        let fstype = f.get(sep + 1).copied().unwrap_or("");
        f.get(4).map(|p| unescape(p)).as_deref() == Some(&*mount.to_string_lossy())
            && (fstype == "fuse" || fstype.starts_with("fuse."))
    })
}

/// Whether the node whose init is `init` has a FUSE mount at `mount`.
pub fn node_mounted(init: ProcRef, mount: &Path) -> bool {
    std::fs::read_to_string(format!("/proc/{}/mountinfo", init.pid))
        .map(|info| init.is_alive() && fuse_mounted(&info, mount))
        .unwrap_or(false)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `migfs cluster init-ns`: the body of a node's init (see the module doc).
pub fn init_main(name: &str, mount: &Path) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout();
    if let Err(e) = set_up(name, mount) {
        let _ = writeln!(out, "{e:#}");
        return Ok(ExitCode::FAILURE);
    }
    writeln!(out, "{READY}")
        .and_then(|()| out.flush())
        .context("report to `cluster up`")?;
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("wait for `cluster up`")?;
    if line.trim() != COMMIT {
        eprintln!("init-ns {name}: `cluster up` went away before recording this node; exiting");
        return Ok(ExitCode::FAILURE);
    }
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    nix::unistd::dup2_stdin(&null).context("stdin to /dev/null")?;
    nix::unistd::dup2_stdout(&null).context("stdout to /dev/null")?;
    eprintln!(
        "init-ns {name}: namespaces ready (hostname {name}, mountpoint {})",
        mount.display()
    );
    reap_forever(name)
}

fn set_up(name: &str, mount: &Path) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::getpid().as_raw() == 1,
        "init-ns must be PID 1 of a new PID namespace; `migfs cluster up` starts it"
    );
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make mount propagation private")?;
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        proc_flags,
        None::<&str>,
    )
    .context("mount a fresh /proc")?;
    nix::unistd::sethostname(name).with_context(|| format!("set the hostname to {name}"))?;
    std::fs::create_dir_all(mount)
        .with_context(|| format!("create the mountpoint {}", mount.display()))?;
    std::env::set_current_dir("/").context("chdir /")?;
    Ok(())
}

/// Reaps every child (orphans of the node are reparented here) and logs
/// how each ended. SIGCHLD stays blocked so none is missed between a wait
/// that found no child and the sleep for the next one.
fn reap_forever(name: &str) -> anyhow::Result<ExitCode> {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block().context("block SIGCHLD")?;
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) => {
                eprintln!("init-ns {name}: pid {pid} exited with status {code}")
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                eprintln!("init-ns {name}: pid {pid} killed by {sig}")
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                chld.wait().context("wait for SIGCHLD")?;
            }
            Err(e) => return Err(e).context("waitpid"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
98 27 0:55 / /migfs rw,nosuid,nodev,relatime - fuse.migfs migfs rw,user_id=0
99 27 0:56 / /with\\040space rw - fuse.other x rw
100 27 0:57 / /notfuse rw - tmpfs tmpfs rw
";

    #[test]
    fn fuse_mounts_are_found_by_mount_point() {
        assert!(fuse_mounted(INFO, Path::new("/migfs")));
        assert!(fuse_mounted(INFO, Path::new("/with space")));
        assert!(!fuse_mounted(INFO, Path::new("/notfuse")));
        assert!(!fuse_mounted(INFO, Path::new("/proc")));
        assert!(!fuse_mounted(INFO, Path::new("/mig")));
    }

    #[test]
    fn host_path_goes_through_the_init_root() {
        let init = ProcRef { pid: 42, start: 1 };
        assert_eq!(
            host_path(init, Path::new("/migfs/a")),
            PathBuf::from("/proc/42/root/migfs/a")
        );
    }
}
