//! `migfs`: the metadata server, the node daemon, the cluster testbed and
//! the user commands, as subcommands of one binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use migfs_tools::cli;

#[derive(Parser)]
#[command(
    name = "migfs",
    version,
    about = "A global filesystem that running processes can move across"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the metadata server.
    Meta(cli::meta::Args),
    /// Run a node: mount the filesystem, serve the block store, heartbeat.
    Node(cli::node::Args),
    /// The local testbed: a metadata server and nodes in namespaces.
    Cluster(cli::cluster::Args),
    /// Freeze a process and write its image (or, with --check, say whether it can move).
    Checkpoint(cli::checkpoint::Args),
    /// Rebuild a checkpointed process here and print its PID.
    Restore(cli::restore::Args),
    /// Benchmarks that print tables (`bench checkpoint`).
    Bench(cli::bench::Args),
    /// Move a running process (PID here, or task id) to another node.
    Move(cli::task::MoveArgs),
    /// List the cluster's tasks.
    Ps(cli::task::PsArgs),
    /// Start a command as a task; its output comes here wherever it runs.
    Run(cli::task::RunArgs),
    /// The cluster's nodes with their load, and its tasks.
    Status(cli::status::Args),
    /// Pin a task (the balancer never moves it), or --unpin it.
    Pin(cli::pin::Args),
    /// Move tasks automatically to spread load (--policy cpu|memory).
    Balance(cli::balance::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Meta(a) => cli::meta::run(a),
        Cmd::Node(a) => cli::node::run(a),
        Cmd::Cluster(a) => cli::cluster::run(a),
        Cmd::Checkpoint(a) => cli::checkpoint::run(a),
        Cmd::Restore(a) => cli::restore::run(a),
        Cmd::Bench(a) => cli::bench::run(a),
        Cmd::Move(a) => cli::task::run_move(a),
        Cmd::Ps(a) => cli::task::run_ps(a),
        Cmd::Run(a) => cli::task::run_run(a),
        Cmd::Status(a) => cli::status::run(a),
        Cmd::Pin(a) => cli::pin::run(a),
        Cmd::Balance(a) => cli::balance::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("migfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
