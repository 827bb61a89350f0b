//! `migfs-move PID|TASK NODE`: the same as `migfs move`.

use std::process::ExitCode;

use clap::Parser;
use migfs_tools::cli::task::{MoveArgs, run_move};

fn main() -> ExitCode {
    match run_move(MoveArgs::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("migfs-move: {e:#}");
            ExitCode::FAILURE
        }
    }
}
