//! `migfs bench checkpoint`: how long a process does not run when it is
//! checkpointed and restored, against the floor of copying its memory
//! through the page cache (docs/checkpoint-restore.md, "Speed").
//!
//! The process is this binary in a hidden role (`migfs bench workload`):
//! it touches N MiB of memory and appends a CLOCK_MONOTONIC heartbeat to
//! a file every 10 ms. The not-running time is the largest gap between
//! two heartbeats, as the program itself sees it. Each size runs four
//! ways: plain, `checkpoint --precopy`, `restore --lazy`, and both, with
//! CRIU 4.2's figures for scale.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use migfs_mig::checkpoint::{CheckpointOptions, checkpoint};
use migfs_mig::predump::PrecopyOptions;
use migfs_mig::restore::lazy::restore_lazy;
use migfs_mig::restore::{RestoreOptions, restore};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

#[derive(Debug, Parser)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Checkpoint + restore downtime for several memory sizes.
    Checkpoint(CheckpointArgs),
    /// Filesystem throughput and metadata rates beside local disk, bindfs, MooseFS.
    Fs(super::bench_fs::FsArgs),
    /// (internal) Measures one directory for `bench fs`.
    #[command(hide = true)]
    FsRun(super::bench_fs::RunArgs),
    /// Live migration between two nodes of a local cluster: downtime, total
    /// time, bytes and residual dependency per mode, beside loopback TCP.
    Move(super::bench_move::MoveArgs),
    /// (internal) The process `bench checkpoint` and `bench move` move.
    #[command(hide = true)]
    Workload(WorkloadArgs),
}

#[derive(Debug, Parser)]
struct CheckpointArgs {
    /// Touched memory sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    sizes: Vec<u64>,
    /// Where images are written (default: a new directory in /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, Parser)]
pub struct WorkloadArgs {
    #[arg(long)]
    mib: u64,
    #[arg(long)]
    out: PathBuf,
    /// Rewrite this many MB of its memory per second (pages at random).
    #[arg(long, default_value_t = 0)]
    dirty_mbs: u64,
    /// When this file exists: read all of the memory once, append
    /// "readall <ms>", remove the file.
    #[arg(long)]
    readall: Option<PathBuf>,
    /// Also read all of it once right after it finds itself on another
    /// node (its host name changed: a move), appending "readall-resumed
    /// <ms>".
    #[arg(long)]
    readall_on_resume: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    match a.cmd {
        Cmd::Checkpoint(c) => bench(c),
        Cmd::Move(m) => super::bench_move::run(m),
        Cmd::Fs(a) => super::bench_fs::run(a),
        Cmd::FsRun(a) => super::bench_fs::run_one(a),
        Cmd::Workload(w) => workload(w),
    }
}

/// The moved process: no descriptor but stdio and its output file.
fn workload(w: WorkloadArgs) -> anyhow::Result<ExitCode> {
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        let _ = nix::unistd::close(fd);
    }
    let n = usize::try_from(w.mib << 20)?;
    let mut mem = vec![0u8; n];
    for (i, chunk) in mem.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(
            &(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_ne_bytes()[..chunk.len()],
        );
    }
    let mut out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&w.out)?;
    writeln!(out, "ready")?;
    // Instant is CLOCK_MONOTONIC: it goes on across the checkpoint.
    let base = Instant::now();
    let pages = (n / 4096).max(1);
    let dirty_per_tick = w.dirty_mbs * 1_000_000 / 100 / 4096;
    let mut seed = u64::from(std::process::id()) | 1;
    let mut resumed_once = !w.readall_on_resume;
    // Each node of the testbed has its own UTS namespace, as machines have
    // their own names. (A gap between two beats is no signal: a lazy move
    // stops it for about as long as a busy machine may.)
    let home = nix::unistd::gethostname()?;
    let read_all = |mem: &[u8]| {
        let t = Instant::now();
        let sum = mem
            .iter()
            .fold(0u64, |acc, &b| acc.wrapping_add(u64::from(b)));
        std::hint::black_box(sum);
        t.elapsed().as_secs_f64() * 1e3
    };
    loop {
        writeln!(out, "beat {}", base.elapsed().as_nanos())?;
        std::thread::sleep(Duration::from_millis(10));
        if !resumed_once && nix::unistd::gethostname()? != home {
            resumed_once = true;
            writeln!(out, "readall-resumed {:.3}", read_all(&mem))?;
        }
        std::hint::black_box(&mem);
        mem[0] = mem[0].wrapping_add(1);
        for _ in 0..dirty_per_tick {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = usize::try_from(seed % pages as u64)? * 4096;
            let end = (at + 4096).min(n);
            for b in &mut mem[at..end] {
                *b = b.wrapping_add(1);
            }
        }
        if let Some(go) = &w.readall
            && go.exists()
        {
            writeln!(out, "readall {:.3}", read_all(&mem))?;
            let _ = fs::remove_file(go);
        }
    }
}

/// How a row checkpoints and restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Precopy,
    Lazy,
    PrecopyLazy,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Plain, Mode::Precopy, Mode::Lazy, Mode::PrecopyLazy];

    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Precopy => "precopy",
            Mode::Lazy => "lazy",
            Mode::PrecopyLazy => "precopy+lazy",
        }
    }

    fn precopy(self) -> bool {
        matches!(self, Mode::Precopy | Mode::PrecopyLazy)
    }

    fn lazy(self) -> bool {
        matches!(self, Mode::Lazy | Mode::PrecopyLazy)
    }
}

/// CRIU 4.2's dump + restore through tmpfs, for scale (issue 3), in ms.
fn criu_ms(mib: u64) -> Option<f64> {
    match mib {
        64 => Some(130.0),
        256 => Some(320.0),
        1024 => Some(1700.0),
        _ => None,
    }
}

/// One measured size and mode.
struct Row {
    mib: u64,
    mode: Mode,
    freeze: Duration,
    /// Pre-copy rounds while it ran.
    precopy: Option<Duration>,
    /// From the freeze until the image was complete.
    frozen: Duration,
    image: u64,
    /// Until the restored process ran.
    restore: Duration,
    /// Until every page was in (lazy).
    fill: Option<Duration>,
    down: Duration,
    floor: Duration,
}

fn bench(c: CheckpointArgs) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let tmp;
    let dir = match &c.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("migfs-bench-{}", std::process::id()));
            tmp.clone()
        }
    };
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut rows = Vec::new();
    for &mib in &c.sizes {
        let floor = floor(&dir, mib)?;
        for mode in Mode::ALL {
            let r =
                one(&dir, mib, mode, floor).with_context(|| format!("{mib} MiB {}", mode.name()));
            let _ = fs::remove_dir_all(dir.join("img"));
            rows.push(r?);
        }
    }
    if c.dir.is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
    print_table(&rows, &c);
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[Row], c: &CheckpointArgs) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let opt =
        |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), |d| format!("{:.1} ms", ms(d)));
    println!("checkpoint + restore of a process with touched anonymous memory (same node)");
    println!(
        "{:>8} {:>12} {:>8} {:>10} {:>11} {:>8} {:>10} {:>10} {:>11} {:>10} {:>7} {:>9} {:>7}",
        "memory",
        "mode",
        "freeze",
        "pre-copy",
        "frozen",
        "image",
        "restore",
        "fill",
        "not running",
        "floor",
        "/floor",
        "CRIU",
        "vs CRIU"
    );
    for r in rows {
        let criu = criu_ms(r.mib);
        println!(
            "{:>4} MiB {:>12} {:>5.1} ms {:>10} {:>8.1} ms {:>4} MiB {:>7.1} ms {:>10} {:>8.1} ms {:>7.1} ms {:>6.2}x {:>9} {:>7}",
            r.mib,
            r.mode.name(),
            ms(r.freeze),
            opt(r.precopy),
            ms(r.frozen),
            r.image >> 20,
            ms(r.restore),
            opt(r.fill),
            ms(r.down),
            ms(r.floor),
            r.down.as_secs_f64() / r.floor.as_secs_f64().max(1e-9),
            criu.map_or_else(|| "-".to_owned(), |c| format!("{c:.0} ms")),
            criu.map_or_else(
                || "-".to_owned(),
                |c| format!("{:.1}x", c / ms(r.down).max(1e-9))
            ),
        );
    }
    println!(
        "modes: plain; precopy = checkpoint --precopy; lazy = restore --lazy; precopy+lazy = both"
    );
    println!(
        "pre-copy: rounds while the process ran; frozen: from the freeze until the image was written"
    );
    println!("restore: until the process ran again; fill: until every page was in (lazy)");
    println!("not running: largest gap in the program's own 10 ms heartbeat (CLOCK_MONOTONIC)");
    println!(
        "floor: writing that many bytes to a file in the image directory and reading them back"
    );
    println!("CRIU: CRIU 4.2 dump + restore through tmpfs (issue 3); vs CRIU: CRIU / not running");
    let sizes: Vec<String> = c.sizes.iter().map(u64::to_string).collect();
    let dir = c
        .dir
        .as_ref()
        .map(|d| format!(" --dir {}", d.display()))
        .unwrap_or_default();
    println!(
        "reproduce: migfs bench checkpoint --sizes {}{dir}  (release build, as root)",
        sizes.join(",")
    );
}

fn beats(path: &Path) -> Vec<i64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("beat ")?.parse().ok())
        .collect()
}

/// Polls `cond` every 5 ms for up to `secs` seconds.
pub(crate) fn wait_for(
    what: &str,
    secs: u64,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn one(dir: &Path, mib: u64, mode: Mode, floor: Duration) -> anyhow::Result<Row> {
    let out = dir.join(format!("beat-{mib}.txt"));
    let img = dir.join("img");
    let _ = fs::remove_file(&out);
    let mut child = Command::new(std::env::current_exe()?)
        .args(["bench", "workload", "--mib", &mib.to_string(), "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the workload")?;
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    let res = (|| {
        wait_for("the workload", 120, || beats(&out).len() >= 20)?;
        let opts = CheckpointOptions {
            precopy: mode.precopy().then(PrecopyOptions::default),
            ..CheckpointOptions::default()
        };
        let report = checkpoint(pid, &img, &opts)?;
        // The checkpoint, as tracer and parent, may have reaped it already.
        let _ = child.wait();
        let (rpid, restore_time, fill) = if mode.lazy() {
            let r = restore_lazy(&img, &RestoreOptions::default(), Default::default())?;
            let (rpid, t) = (r.pid(), r.restored.total);
            let filler = std::thread::spawn(move || r.fill(2));
            (rpid, t, Some(filler))
        } else {
            let r = restore(&img, &RestoreOptions::default())?;
            (r.pid, r.total, None)
        };
        let rpid = Pid::from_raw(rpid);
        let fill = fill
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("the fill thread panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .transpose();
        let n = beats(&out).len();
        let ok = fill.and_then(|f| {
            wait_for("heartbeats after restore", 30, || {
                beats(&out).len() >= n + 10
            })?;
            Ok(f)
        });
        let _ = kill(rpid, Signal::SIGKILL);
        let _ = waitpid(rpid, None);
        let fill = ok?;
        let b = beats(&out);
        let gap = b.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Ok::<Row, anyhow::Error>(Row {
            mib,
            mode,
            freeze: report.freeze,
            precopy: report.precopy.map(|p| p.elapsed),
            frozen: report.frozen_to_image,
            image: report.capture.pages_bytes + report.capture.image_bytes,
            restore: restore_time,
            fill: fill.map(|f| f.fill.elapsed),
            down: Duration::from_nanos(u64::try_from(gap).unwrap_or(0)),
            floor,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = fs::remove_file(&out);
    res
}

/// Time to write `mib` MiB to a new file in `dir` and read it back.
fn floor(dir: &Path, mib: u64) -> anyhow::Result<Duration> {
    let path = dir.join("floor.bin");
    let n = usize::try_from(mib << 20)?;
    let data: Vec<u8> = (0..n).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
    let mut back = vec![0u8; 16 << 20];
    let t = Instant::now();
    fs::File::create(&path)?.write_all(&data)?;
    let mut f = fs::File::open(&path)?;
    let mut sink = Vec::with_capacity(n);
    loop {
        let k = f.read(&mut back)?;
        if k == 0 {
            break;
        }
        sink.extend_from_slice(&back[..k]);
    }
    let took = t.elapsed();
    fs::remove_file(&path)?;
    anyhow::ensure!(sink.len() == n, "read back {} of {n} bytes", sink.len());
    Ok(took)
}
