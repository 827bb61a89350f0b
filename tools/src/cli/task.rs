//! The task commands, run on a node and answered by its agent:
//! `migfs move` (also `migfs-move`), `migfs ps`, `migfs run`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use migfs_mig::agent::client::{connect, local_node};
use migfs_proto::agent::{self as pb, Mode, move_event};
use tokio_stream::StreamExt;

/// Where this node's filesystem is mounted (the agent is found there).
#[derive(Debug, clap::Args)]
pub struct Local {
    /// Mount point of migfs on this node.
    #[arg(long, env = "MIGFS_MOUNT", default_value = "/migfs")]
    pub(crate) mount: PathBuf,
}

#[derive(Debug, Parser)]
pub struct MoveArgs {
    /// The process: a PID on this node, or a task id (`t42`, or a number
    /// that is no PID here).
    what: String,
    /// The node to move it to.
    node: String,
    /// Copy-on-reference (the default): resume first, memory on first touch
    /// and by a background push.
    #[arg(long, conflicts_with = "eager")]
    lazy: bool,
    /// Stop-and-copy: every page before the process resumes.
    #[arg(long)]
    eager: bool,
    /// Copy memory in rounds while the process runs (dirty pages tracked
    /// with userfaultfd write-protect), then stop briefly. Alone, what is
    /// left is sent during the stop and nothing is fetched from the source
    /// after the resume; with --lazy, what is left follows on demand.
    #[arg(long, conflicts_with = "eager")]
    precopy: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    local: Local,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// `t42` / `task:42` is a task; a number is a local PID if one exists,
/// else a task id.
pub(crate) fn parse_target(what: &str) -> anyhow::Result<(u64, u32)> {
    let task = what
        .strip_prefix("task:")
        .or_else(|| what.strip_prefix('t'));
    if let Some(id) = task {
        let id: u64 = id
            .parse()
            .with_context(|| format!("bad task id {what:?}"))?;
        return Ok((id, 0));
    }
    let n: u64 = what
        .parse()
        .with_context(|| format!("{what:?} is neither a PID nor a task id"))?;
    match u32::try_from(n) {
        Ok(pid) if Path::new(&format!("/proc/{pid}")).exists() => Ok((0, pid)),
        _ => Ok((n, 0)),
    }
}

/// `migfs move`: moves a process or task and prints the report.
pub fn run_move(a: MoveArgs) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let (task_id, pid) = parse_target(&a.what)?;
    let node = local_node(&a.local.mount)?;
    let req = pb::MoveRequest {
        task_id,
        pid,
        target: a.node.clone(),
        // --precopy alone completes the copy before the resume.
        mode: if a.eager || (a.precopy && !a.lazy) {
            Mode::Eager
        } else {
            Mode::Lazy
        } as i32,
        precopy: a.precopy,
        caller_uid: 0,
    };
    let report = runtime()?.block_on(async {
        let mut c = connect(&node.socket).await?;
        let mut s = c
            .r#move(req)
            .await
            .map_err(|s| {
                let guessed = task_id != 0 && !a.what.starts_with('t');
                if guessed {
                    anyhow::anyhow!(
                        "{} is no process on {} and no task either: {}",
                        a.what,
                        node.name,
                        s.message()
                    )
                } else {
                    anyhow::anyhow!("{}", s.message())
                }
            })?
            .into_inner();
        let mut report = None;
        while let Some(ev) = s.next().await {
            match ev.map_err(|s| anyhow::anyhow!("{}", s.message()))?.event {
                Some(move_event::Event::Progress(p)) if !a.json => eprintln!("migfs-move: {p}"),
                Some(move_event::Event::Report(r)) => report = Some(r),
                _ => {}
            }
        }
        report.ok_or_else(|| anyhow::anyhow!("the agent ended the move without a report"))
    })?;
    if a.json {
        println!("{}", report_json(&report));
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn mode_name(m: i32) -> &'static str {
    match Mode::try_from(m) {
        Ok(Mode::Eager) => "eager",
        _ => "lazy",
    }
}

fn report_json(r: &pb::MoveReport) -> serde_json::Value {
    let phases: serde_json::Map<String, serde_json::Value> = r
        .phases
        .iter()
        .map(|p| (p.name.clone(), serde_json::json!(round(p.ms))))
        .collect();
    serde_json::json!({
        "task": r.task,
        "pid": r.pid,
        "source_pid": r.source_pid,
        "from": r.from,
        "to": r.to,
        "mode": mode_name(r.mode),
        "precopy": r.precopy,
        "precopy_rounds": r.precopy_rounds,
        "pages_precopy": r.pages_precopy,
        "downtime_ms": round(r.downtime_ms),
        "total_ms": round(r.total_ms),
        "bytes": r.bytes,
        "pages_eager": r.pages_eager,
        "pages_demand": r.pages_demand,
        "pages_push": r.pages_push,
        "residual_ms": round(r.residual_ms),
        "phases_ms": phases,
    })
}

fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn print_report(r: &pb::MoveReport) {
    println!(
        "moved task {} (pid {} on {}) to {} as pid {} ({}{})",
        r.task,
        r.source_pid,
        r.from,
        r.to,
        r.pid,
        mode_name(r.mode),
        if r.precopy { ", pre-copied" } else { "" }
    );
    for p in &r.phases {
        println!("  {:<16} {:>10.1} ms", p.name, p.ms);
    }
    println!("  {:<16} {:>10.1} ms", "downtime", r.downtime_ms);
    println!("  {:<16} {:>10.1} ms", "total", r.total_ms);
    println!(
        "  {:<16} {:>10.1} ms after resume",
        "residual ended", r.residual_ms
    );
    if r.precopy {
        println!(
            "  pre-copy: {} rounds, {} pages",
            r.precopy_rounds, r.pages_precopy
        );
    }
    println!(
        "  pages: {} eager, {} on demand, {} pushed; {} bytes sent",
        r.pages_eager, r.pages_demand, r.pages_push, r.bytes
    );
}

#[derive(Debug, Parser)]
pub struct PsArgs {
    /// Also list tasks that have exited.
    #[arg(long, short)]
    all: bool,
    /// One JSON object per task, in an array.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    local: Local,
}

/// `migfs ps`: every task of the cluster.
pub fn run_ps(a: PsArgs) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let node = local_node(&a.local.mount)?;
    let rows = runtime()?.block_on(async {
        let mut c = connect(&node.socket).await?;
        let r = c
            .tasks(pb::TasksRequest {
                include_exited: a.all,
                task_id: 0,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        anyhow::Ok(r.into_inner().tasks)
    })?;
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|t| {
                serde_json::json!({
                    "task": t.task_id, "node": t.node, "pid": t.pid, "state": t.state,
                    "cmd": t.cmd, "pinned": t.pinned, "moves": t.moves,
                    "exit_code": t.exit_code, "moving_to": t.moving_to,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<8} {:<8} {:>8} {:<8} {:>5}  CMD",
        "TASK", "NODE", "PID", "STATE", "MOVES"
    );
    for t in rows {
        let state = match t.state.as_str() {
            "moving" => format!("->{}", t.moving_to),
            "exited" => format!("exit {}", t.exit_code),
            s => s.to_owned(),
        };
        println!(
            "{:<8} {:<8} {:>8} {:<8} {:>5}  {}",
            format!("t{}", t.task_id),
            t.node,
            t.pid,
            state,
            t.moves,
            one_line(&t.cmd)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Parser)]
pub struct RunArgs {
    /// Start it on this node (default: here).
    #[arg(long)]
    node: Option<String>,
    /// Never move it automatically (the balancer leaves it alone).
    #[arg(long)]
    pin: bool,
    /// Print the task id and return at once instead of relaying its output
    /// and waiting for its exit status.
    #[arg(long, short)]
    detach: bool,
    #[command(flatten)]
    local: Local,
    /// The command.
    #[arg(last = true, required = true)]
    cmd: Vec<std::ffi::OsString>,
}

/// `migfs run -- CMD`: starts CMD as a task; relays its output here wherever
/// it runs and exits with its status.
pub fn run_run(a: RunArgs) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let node = local_node(&a.local.mount)?;
    let dir = a.local.mount.join(".tasks").join(format!(
        "{}-{}-{}",
        node.name,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    for f in [&out, &err] {
        std::fs::File::create(f).with_context(|| format!("create {}", f.display()))?;
    }
    let bytes = |p: &Path| p.as_os_str().as_bytes().to_vec();
    let req = pb::RunRequest {
        argv: a.cmd.iter().map(|s| s.as_bytes().to_vec()).collect(),
        env: std::env::vars_os()
            .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
            .collect(),
        cwd: std::env::current_dir()
            .map(|d| d.as_os_str().as_bytes().to_vec())
            .unwrap_or_default(),
        stdout: bytes(&out),
        stderr: bytes(&err),
        pinned: a.pin,
        // The agent compares them with the socket's peer credentials.
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        home_node: 0,
        node: a.node.clone().unwrap_or_default(),
        stdin: !a.detach,
    };
    let rt = runtime()?;
    let mut c = rt.block_on(connect(&node.socket))?;
    let started = rt
        .block_on(c.run(req))
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if a.detach {
        println!("t{} {}", started.task_id, started.pid);
        return Ok(ExitCode::SUCCESS);
    }
    let (socket, task) = (node.socket.clone(), started.task_id);
    std::thread::spawn(move || {
        if let Err(e) = feed_stdin(&socket, task) {
            tracing::warn!(error = %e, "stdin relay ended");
        }
    });
    let mut relay = [Relay::new(&out, false), Relay::new(&err, true)];
    let code = loop {
        for r in &mut relay {
            r.pump()?;
        }
        let t = rt
            .block_on(c.tasks(pb::TasksRequest {
                include_exited: true,
                task_id: started.task_id,
            }))
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner()
            .tasks;
        if let Some(t) = t.first().filter(|t| t.state == "exited") {
            break t.exit_code;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in &mut relay {
        r.pump()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(1),
    ))
}

/// Sends our stdin to task `task`, wherever it runs, until end-of-file
/// (which the task then reads) or until the task is gone. Input waits
/// while the task moves or its pipe is full.
fn feed_stdin(socket: &Path, task: u64) -> anyhow::Result<()> {
    let rt = runtime()?;
    let mut c = rt.block_on(connect(socket))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut input = std::io::stdin().lock();
    loop {
        let n = input.read(&mut buf)?;
        let mut data = &buf[..n];
        loop {
            let req = pb::StdinRequest {
                task_id: task,
                data: data.to_vec(),
                eof: n == 0,
                caller_uid: 0,
            };
            match rt.block_on(c.stdin(req)) {
                Ok(r) => {
                    let taken = usize::try_from(r.into_inner().taken)?.min(data.len());
                    data = &data[taken..];
                    if data.is_empty() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(s) => anyhow::bail!("{}", s.message()),
            }
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Copies what a task appended to one of its output files to ours. The
/// file is opened anew each time: an open is when this node learns that
/// another node (where the task runs now) changed it.
struct Relay {
    path: PathBuf,
    at: u64,
    stderr: bool,
}

impl Relay {
    fn new(path: &Path, stderr: bool) -> Relay {
        Relay {
            path: path.to_owned(),
            at: 0,
            stderr,
        }
    }

    fn pump(&mut self) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("open {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.at))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.at += buf.len() as u64;
        if self.stderr {
            std::io::stderr().write_all(&buf)?;
        } else {
            let mut o = std::io::stdout();
            o.write_all(&buf)?;
            o.flush()?;
        }
        Ok(())
    }
}

/// A command line on one line of at most 80 characters.
pub(crate) fn one_line(cmd: &str) -> String {
    let flat: String = cmd
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out: String = flat.chars().take(80).collect();
    if flat.chars().count() > 80 {
        out.push('…');
    }
    out
}
