//! `migfs bench move`: live migration between the two nodes of a local
//! cluster it starts, per memory size and mode: downtime (from the report
//! and as the program sees it, the largest gap in its 10 ms heartbeat),
//! total time, bytes and when the residual dependency on the source ended,
//! beside the floor of sending as many bytes over loopback TCP in one
//! stream, measured in the same run. Also: after a lazy move, how long
//! the program takes to read all of its memory against the same read
//! before the move (docs/benchmarks.md).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::bench::wait_for;
use clap::Parser;

#[derive(Debug, Parser)]
pub struct MoveArgs {
    /// Touched memory sizes in MiB (the migration goals name 64 MiB,
    /// 1 GiB, 2 GiB and 4 GiB).
    #[arg(long, value_delimiter = ',', default_value = "64,512,1024,2048,4096")]
    sizes: Vec<u64>,
    /// Modes: lazy, eager, precopy (complete), precopy-lazy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lazy,eager,precopy,precopy-lazy"
    )]
    modes: Vec<String>,
    /// How fast the program rewrites its memory in the pre-copy rows (MB/s).
    #[arg(long, default_value_t = 10)]
    dirty_mbs: u64,
    /// Size (MiB) of the read-all-after-lazy-move row (0: none).
    #[arg(long, default_value_t = 1024)]
    readall: u64,
    /// Warm memory of each node, in MiB (`migfs node --warm-memory`; 0:
    /// none; its largest holder is half of it). Eager moves land in it;
    /// each row waits until n2 has replaced what the row before used.
    #[arg(long, default_value_t = 0)]
    warm_memory: u64,
    /// Cluster directory (default: a new one under /tmp, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A cluster this benchmark started; taken down on drop.
struct Testbed {
    exe: PathBuf,
    dir: PathBuf,
}

impl Testbed {
    fn up(dir: PathBuf, warm_mib: u64) -> anyhow::Result<Testbed> {
        let exe = std::env::current_exe()?;
        let t = Testbed { exe, dir };
        let o = t
            .command(&["up", "--nodes", "2"])
            .env("MIGFS_WARM_MEMORY", warm_mib.to_string())
            .output()
            .context("run migfs cluster")?;
        ok(&o, "migfs cluster up")?;
        Ok(t)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("cluster").arg("--dir").arg(&self.dir).args(args);
        c
    }

    /// Whether all of `node`'s warm memory is ready (from its log: it was
    /// complete more often than moves have used some).
    fn warm_ready(&self, node: &str) -> bool {
        let log = crate::cluster::state::logs_dir(&self.dir).join(format!("{node}.log"));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.matches("all warm memory ready").count()
            > text.matches("placed in warm memory").count()
    }

    fn cluster(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = self.command(args).output().context("run migfs cluster")?;
        ok(&o, &format!("migfs cluster {}", args.join(" ")))
    }

    fn exec(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["exec", node, "--"];
        all.extend_from_slice(args);
        self.cluster(&all)
    }

    fn path(&self, node: &str, rel: &str) -> anyhow::Result<PathBuf> {
        Ok(PathBuf::from(self.cluster(&["path", node, rel])?.trim()))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = self.command(&["down"]).output();
    }
}

fn ok(o: &Output, what: &str) -> anyhow::Result<String> {
    if !o.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// One measured move.
struct Row {
    mib: u64,
    mode: String,
    report_ms: f64,
    gap_ms: f64,
    total_ms: f64,
    bytes: u64,
    residual_ms: f64,
    rounds: u64,
    floor_ms: f64,
    /// The report's phases, "name ms" each.
    phases: String,
}

pub fn run(a: MoveArgs) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    for m in &a.modes {
        if flags(m).is_none() {
            bail!("unknown mode {m} (lazy, eager, precopy, precopy-lazy)");
        }
    }
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("migfs-bench-move-{}", std::process::id()))
    });
    eprintln!("starting a 2-node cluster in {}", dir.display());
    let bed = Testbed::up(dir.clone(), a.warm_memory)?;
    let mut rows = Vec::new();
    for &mib in &a.sizes {
        if a.warm_memory > 0 {
            // Not while a node allocates it: both CPUs are busy then.
            wait_for("warm memory on the nodes", 600, || {
                bed.warm_ready("n1") && bed.warm_ready("n2")
            })?;
        }
        // The median of three: one send is at the mercy of the host.
        let mut floors = [0.0f64; 3];
        for f in &mut floors {
            *f = tcp_floor(mib << 20)?.as_secs_f64() * 1e3;
        }
        floors.sort_by(f64::total_cmp);
        let floor_ms = floors[1];
        for mode in &a.modes {
            eprintln!("{mib} MiB, {mode}: moving n1 -> n2");
            if a.warm_memory > 0 {
                // The holder the move before used is being replaced.
                wait_for("warm memory on n2", 600, || bed.warm_ready("n2"))?;
            }
            let dirty = if mode.starts_with("precopy") {
                a.dirty_mbs
            } else {
                0
            };
            let mut r = one(&bed, mib, mode, dirty, false)
                .with_context(|| format!("{mib} MiB {mode}"))?
                .0;
            r.floor_ms = floor_ms;
            rows.push(r);
        }
    }
    let readall = if a.readall > 0 {
        eprintln!("{} MiB: read all after a lazy move", a.readall);
        // The moves above are measured: print them even if this fails.
        let ready = if a.warm_memory > 0 {
            // Lazy moves stage their pages in it too.
            wait_for("warm memory on the nodes", 600, || {
                bed.warm_ready("n1") && bed.warm_ready("n2")
            })
        } else {
            Ok(())
        };
        match ready.and_then(|()| one(&bed, a.readall, "lazy", 0, true)) {
            Ok(r) => r.1,
            Err(e) => {
                eprintln!("the read-all row failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    drop(bed);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    print(&rows, readall, &a);
    Ok(ExitCode::SUCCESS)
}

fn flags(mode: &str) -> Option<&'static [&'static str]> {
    Some(match mode {
        "lazy" => &["--lazy"],
        "eager" => &["--eager"],
        "precopy" => &["--precopy"],
        "precopy-lazy" => &["--precopy", "--lazy"],
        _ => return None,
    })
}

fn lines_with(path: &Path, prefix: &str) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .collect()
}

/// Starts the workload on n1, moves it to n2, measures, kills it. With
/// `readall`, also returns (before, after) read-all times in ms.
fn one(
    bed: &Testbed,
    mib: u64,
    mode: &str,
    dirty_mbs: u64,
    readall: bool,
) -> anyhow::Result<(Row, Option<(f64, f64)>)> {
    // Own names for the read-all row: a file removed and made again
    // under the same name on another node was seen with the old size.
    let name = if readall {
        format!("bench-{mib}-{mode}-readall.txt")
    } else {
        format!("bench-{mib}-{mode}.txt")
    };
    let go = format!("/migfs/{name}.go");
    let exe = bed.exe.to_string_lossy().into_owned();
    let (mib_s, dirty_s, out_s) = (
        mib.to_string(),
        dirty_mbs.to_string(),
        format!("/migfs/{name}"),
    );
    let mut argv = vec![
        "exec",
        "--detach",
        "n1",
        "--",
        &exe,
        "bench",
        "workload",
        "--mib",
        &mib_s,
        "--out",
        &out_s,
        "--dirty-mbs",
        &dirty_s,
        "--readall",
        &go,
    ];
    if readall {
        argv.push("--readall-on-resume");
    }
    let pid = bed.cluster(&argv)?.trim().to_owned();
    let out = bed.path("n2", &name)?;
    let res = (|| {
        wait_for("the workload", 300, || {
            lines_with(&out, "beat ").len() >= 30
        })?;
        let before = if readall {
            Some(read_all(bed, &out, "n1", &go)?)
        } else {
            None
        };
        let mut argv = vec![exe.as_str(), "move", pid.as_str(), "n2", "--json"];
        argv.extend_from_slice(flags(mode).unwrap_or(&[]));
        let report: serde_json::Value =
            serde_json::from_str(&bed.exec("n1", &argv)?).context("the move report is not JSON")?;
        // The program read all of its memory the moment it resumed.
        let after = if readall {
            wait_for("the read-all after the move", 300, || {
                !lines_with(&out, "readall-resumed ").is_empty()
            })?;
            lines_with(&out, "readall-resumed ").first().copied()
        } else {
            None
        };
        let n = lines_with(&out, "beat ").len();
        wait_for("heartbeats after the move", 60, || {
            lines_with(&out, "beat ").len() >= n + 20
        })?;
        let beats = lines_with(&out, "beat ");
        let gap = beats.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max) / 1e6;
        let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
        let u = |k: &str| report[k].as_u64().unwrap_or(0);
        let new_pid = u("pid").to_string();
        let _ = bed.exec("n2", &["kill", "-9", &new_pid]);
        Ok::<_, anyhow::Error>((
            Row {
                mib,
                mode: mode.to_owned(),
                report_ms: f("downtime_ms"),
                gap_ms: gap,
                total_ms: f("total_ms"),
                bytes: u("bytes"),
                residual_ms: f("residual_ms"),
                rounds: u("precopy_rounds"),
                floor_ms: 0.0,
                phases: report["phases_ms"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k} {:.1}", v.as_f64().unwrap_or(0.0)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default(),
            },
            before.zip(after),
        ))
    })();
    if res.is_err() {
        let _ = bed.exec("n1", &["kill", "-9", &pid]);
    }
    let _ = std::fs::remove_file(&out);
    res
}

/// Asks the workload to read all of its memory; returns how long it took.
fn read_all(bed: &Testbed, out: &Path, node: &str, go: &str) -> anyhow::Result<f64> {
    let n = lines_with(out, "readall ").len();
    bed.exec(node, &["touch", go])?;
    wait_for("the read-all", 300, || {
        lines_with(out, "readall ").len() > n
    })?;
    Ok(lines_with(out, "readall ")[n])
}

/// Time to send `bytes` over one loopback TCP connection, until the
/// receiver has read them all (the floor is the median of three).
fn tcp_floor(bytes: u64) -> anyhow::Result<Duration> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Ok(got);
            }
            got += k as u64;
        }
    });
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut left = bytes;
    while left > 0 {
        let k = usize::try_from(left.min(buf.len() as u64))?;
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    drop(s);
    let got = rx
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP receiver panicked"))??;
    let took = t.elapsed();
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok(took)
}

fn print(rows: &[Row], readall: Option<(f64, f64)>, a: &MoveArgs) {
    println!("live migration n1 -> n2 of a process with touched anonymous memory (local cluster)");
    println!(
        "{:>9} {:>13} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7} {:>10} {:>7}",
        "memory",
        "mode",
        "downtime",
        "heartbeat",
        "total",
        "MiB sent",
        "residual",
        "rounds",
        "TCP floor",
        "total/floor"
    );
    for r in rows {
        println!(
            "{:>5} MiB {:>13} {:>7.1} ms {:>7.1} ms {:>7.0} ms {:>10} {:>7.0} ms {:>7} {:>7.0} ms {:>7.2}x",
            r.mib,
            r.mode,
            r.report_ms,
            r.gap_ms,
            r.total_ms,
            r.bytes >> 20,
            r.residual_ms,
            r.rounds,
            r.floor_ms,
            r.total_ms / r.floor_ms.max(1e-9)
        );
    }
    println!("phases (ms):");
    for r in rows {
        println!("  {:>5} MiB {:>13}: {}", r.mib, r.mode, r.phases);
    }
    if let Some((before, after)) = readall {
        println!(
            "read all {} MiB: {before:.1} ms with local memory, {after:.1} ms when it starts the moment it resumes after a lazy move ({:.2}x)",
            a.readall,
            after / before.max(1e-9)
        );
    }
    if a.warm_memory > 0 {
        println!(
            "warm memory: each node keeps {} MiB allocated for incoming moves (migfs node --warm-memory): eager ones land in it, lazy ones stage their pages there",
            a.warm_memory
        );
    }
    println!("downtime: from the report (frozen on n1 until running on n2)");
    println!(
        "TCP floor: sending as many bytes over one loopback TCP stream, 1 MiB writes and reads (median of three)"
    );
    println!("heartbeat: largest gap in the program's own 10 ms heartbeat (CLOCK_MONOTONIC)");
    println!("residual: from the resume on n2 until n1 held nothing more of the process");
    println!(
        "pre-copy rows: the program rewrites {} MB/s of its memory at random pages",
        a.dirty_mbs
    );
    let sizes: Vec<String> = a.sizes.iter().map(u64::to_string).collect();
    println!(
        "reproduce: migfs bench move --sizes {} --modes {} --dirty-mbs {} --readall {} --warm-memory {}  (release build, as root)",
        sizes.join(","),
        a.modes.join(","),
        a.dirty_mbs,
        a.readall,
        a.warm_memory
    );
}
