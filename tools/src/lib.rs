//! The migfs command-line tools: one thin module per subcommand in [`cli`],
//! the local cluster testbed, and logging set-up.
//!
//! # Layout
//! - [`cli`]: `migfs meta`, `migfs node`, ... (one file each, clap + anyhow).
//! - [`observability`]: the tracing subscriber, set up only by binaries.

pub mod cli;
pub mod cluster;
pub mod observability;
