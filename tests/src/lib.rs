//! End-to-end tests of migfs. They run the real thing: the `migfs` binary
//! starts a real local cluster (`migfs cluster up`, see docs/testbed.md)
//! and tests act on its nodes through [`harness::Cluster`].
//!
//! Build the binaries first: `cargo build --workspace --bins`.

#![warn(missing_docs)]

pub mod harness;
pub mod progs;

pub use harness::{Cluster, require_priv};
