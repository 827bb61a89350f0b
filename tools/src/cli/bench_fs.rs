//! `migfs bench fs`: migfs (a 2-node cluster, measured on n1) beside a
//! local directory, bindfs (the FUSE floor) and MooseFS (the peer), in one
//! table. I/O by fio (sequential write with end_fsync, sequential read and
//! 4 KiB random reads, caches dropped before each read), metadata by the
//! metabench workload (create / stat warm / stat cold after dropping the
//! kernel caches / unlink of N files in one directory).
//!
//! Peers are brought up by the scripts in `--peers` (`../shared/peers` by
//! default: `moosefs-up.sh`, `bindfs-up.sh`); a peer that cannot be brought
//! up is reported and left out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// `bench fs` options.
#[derive(Debug, clap::Parser)]
pub struct FsArgs {
    /// Directory with the peers' up/down scripts.
    #[arg(long, default_value = "../shared/peers")]
    peers: PathBuf,
    /// fio file size.
    #[arg(long, default_value = "1g")]
    size: String,
    /// Files for the metadata phases.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Seconds of random reads at most.
    #[arg(long, default_value_t = 30)]
    rand_secs: u32,
    /// Targets to measure, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "local,bindfs,moosefs,migfs"
    )]
    targets: Vec<String>,
}

/// `bench fs-run` (internal): measure one directory, print one JSON row.
#[derive(Debug, clap::Parser)]
pub struct RunArgs {
    /// Directory to measure in (created).
    #[arg(long)]
    path: PathBuf,
    #[arg(long)]
    size: String,
    #[arg(long)]
    files: usize,
    #[arg(long)]
    rand_secs: u32,
}

/// One target's figures.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    write_mib_s: f64,
    read_mib_s: f64,
    rand_iops: f64,
    create_s: f64,
    stat_warm_s: f64,
    stat_cold_s: f64,
    unlink_s: f64,
}

fn drop_caches() {
    nix::unistd::sync();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3\n") {
        eprintln!("warn: cannot drop caches ({e}); cold figures are warm");
    }
}

fn fio(name: &str, file: &Path, extra: &[&str], size: &str) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("fio")
        .arg(format!("--name={name}"))
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .args([
            "--bs=1M",
            "--numjobs=1",
            "--ioengine=psync",
            "--output-format=json",
        ])
        .args(extra)
        .output()
        .context("run fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!(
            "fio {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse fio output")?;
    Ok(v["jobs"][0].clone())
}

fn mib_s(job: &serde_json::Value, rw: &str) -> f64 {
    job[rw]["bw_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0
}

fn rate(n: usize, t: Instant) -> f64 {
    n as f64 / t.elapsed().as_secs_f64()
}

/// Measures `a.path` and prints the row as JSON.
pub fn run_one(a: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = &a.path;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let f = dir.join("fio.dat");
    let w = fio(
        "seqw",
        &f,
        &["--rw=write", "--end_fsync=1", "--runtime=120"],
        &a.size,
    )?;
    drop_caches();
    let r = fio("seqr", &f, &["--rw=read", "--runtime=60"], &a.size)?;
    drop_caches();
    let rr = fio(
        "randr",
        &f,
        &[
            "--rw=randread",
            "--bs=4k",
            "--randrepeat=0",
            "--norandommap",
            &format!("--runtime={}", a.rand_secs),
        ],
        &a.size,
    )?;
    std::fs::remove_file(&f).ok();
    let m = dir.join("meta");
    std::fs::create_dir_all(&m)?;
    let names: Vec<PathBuf> = (0..a.files).map(|i| m.join(format!("f{i:07}"))).collect();
    let t = Instant::now();
    for n in &names {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(n)?;
    }
    let create_s = rate(names.len(), t);
    let t = Instant::now();
    for n in &names {
        std::fs::metadata(n)?;
    }
    let stat_warm_s = rate(names.len(), t);
    drop_caches();
    let t = Instant::now();
    for n in &names {
        std::fs::metadata(n)?;
    }
    let stat_cold_s = rate(names.len(), t);
    let t = Instant::now();
    for n in &names {
        std::fs::remove_file(n)?;
    }
    let unlink_s = rate(names.len(), t);
    std::fs::remove_dir_all(dir).ok();
    let row = Row {
        write_mib_s: mib_s(&w, "write"),
        read_mib_s: mib_s(&r, "read"),
        rand_iops: rr["read"]["iops"].as_f64().unwrap_or(0.0),
        create_s,
        stat_warm_s,
        stat_cold_s,
        unlink_s,
    };
    println!("{}", serde_json::to_string(&row)?);
    Ok(std::process::ExitCode::SUCCESS)
}

/// A peer brought up by its script; taken down on drop.
struct Peer {
    down: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.down)
            .arg("--purge")
            .stdout(Stdio::null())
            .status();
    }
}

fn peer_up(peers: &Path, name: &str) -> anyhow::Result<Peer> {
    let up = peers.join(format!("{name}-up.sh"));
    let down = peers.join(format!("{name}-down.sh"));
    if !up.exists() {
        bail!("{} not found (use --peers DIR)", up.display());
    }
    let st = Command::new("bash")
        .arg(&up)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        let _ = Command::new("bash")
            .arg(&down)
            .arg("--purge")
            .stdout(Stdio::null())
            .status();
        bail!(
            "{} failed (are its Debian packages installed? see its README)",
            up.display()
        );
    }
    Ok(Peer { down })
}

/// A migfs test cluster; torn down on drop.
struct Testbed {
    exe: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(&self.exe)
            .arg("cluster")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("down")
            .stdout(Stdio::null())
            .status();
    }
}

fn measure(cmd: &mut Command) -> anyhow::Result<Row> {
    let out = cmd.output().context("run the measurement")?;
    if !out.status.success() {
        bail!(
            "measurement failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("bad measurement output {line:?}"))
}

fn run_args(exe: &Path, a: &FsArgs, path: &Path) -> Vec<String> {
    vec![
        exe.display().to_string(),
        "bench".into(),
        "fs-run".into(),
        "--path".into(),
        path.display().to_string(),
        "--size".into(),
        a.size.clone(),
        "--files".into(),
        a.files.to_string(),
        "--rand-secs".into(),
        a.rand_secs.to_string(),
    ]
}

fn target(exe: &Path, a: &FsArgs, name: &str) -> anyhow::Result<Row> {
    let local =
        |p: &Path| measure(Command::new(&run_args(exe, a, p)[0]).args(&run_args(exe, a, p)[1..]));
    match name {
        "local" => {
            let d = tempfile::tempdir_in("/var/tmp")?;
            local(&d.path().join("bench"))
        }
        "bindfs" => {
            let _p = peer_up(&a.peers, "bindfs")?;
            local(Path::new("/mnt/peer-bindfs/.migfs-bench"))
        }
        "moosefs" => {
            let _p = peer_up(&a.peers, "moosefs")?;
            local(Path::new("/mnt/peer-mfs/.migfs-bench"))
        }
        "migfs" => {
            let tb = Testbed {
                exe: exe.to_path_buf(),
                dir: tempfile::tempdir()?,
            };
            let st = Command::new(exe)
                .arg("cluster")
                .arg("--dir")
                .arg(tb.dir.path())
                .args(["up", "--nodes", "2"])
                .stdout(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("migfs cluster up failed");
            }
            let mut cmd = Command::new(exe);
            cmd.arg("cluster")
                .arg("--dir")
                .arg(tb.dir.path())
                .args(["exec", "n1", "--"]);
            cmd.args(run_args(exe, a, Path::new("/migfs/bench")));
            measure(&mut cmd)
        }
        other => bail!("unknown target {other:?} (local, bindfs, moosefs, migfs)"),
    }
}

/// Runs every target and prints the table.
pub fn run(a: FsArgs) -> anyhow::Result<std::process::ExitCode> {
    let exe = std::env::current_exe().context("find the migfs binary")?;
    let mut rows: Vec<(String, Row)> = Vec::new();
    for t in &a.targets {
        eprintln!("bench fs: measuring {t} ...");
        match target(&exe, &a, t) {
            Ok(r) => rows.push((t.clone(), r)),
            Err(e) => eprintln!("bench fs: {t} left out: {e:#}"),
        }
    }
    let base = rows.iter().find(|(n, _)| n == "moosefs").map(|(_, r)| r);
    println!(
        "| target | seq write MiB/s | seq read MiB/s | rand 4k read IOPS | create/s | stat warm/s | stat cold/s | unlink/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (n, r) in &rows {
        let cell = |v: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{v:.0} ({:.2}x)", v / b),
            _ => format!("{v:.0}"),
        };
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} |",
            cell(r.write_mib_s, base.map(|b| b.write_mib_s)),
            cell(r.read_mib_s, base.map(|b| b.read_mib_s)),
            cell(r.rand_iops, base.map(|b| b.rand_iops)),
            cell(r.create_s, base.map(|b| b.create_s)),
            cell(r.stat_warm_s, base.map(|b| b.stat_warm_s)),
            cell(r.stat_cold_s, base.map(|b| b.stat_cold_s)),
            cell(r.unlink_s, base.map(|b| b.unlink_s)),
        );
    }
    println!(
        "\nRatios are to MooseFS. Reproduce: migfs bench fs --size {} --files {} --rand-secs {} --targets {}",
        a.size,
        a.files,
        a.rand_secs,
        a.targets.join(",")
    );
    Ok(std::process::ExitCode::SUCCESS)
}
