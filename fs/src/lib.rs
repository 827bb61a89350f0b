//! A migfs node: the FUSE client that every node mounts at the same path,
//! the node's block store and block service, and the daemon that ties them
//! to the metadata server (registration, heartbeats, pushed invalidations,
//! garbage collection).
//!
//! # Layout
//! - [`node`]: the daemon (`migfs node`).
//! - [`fuse`]: the FUSE filesystem (namespace ops, data path, control dir).
//! - [`blocks`]: blake3-named blocks: local store, cache, replication, service.
//! - [`cache`]: the user-space name and attribute cache.
//! - [`dirops`]: delegated directories: creates and removals answered here.
//! - [`meta_client`]: the retrying metadata client.
//! - [`mount`]: mounting `fuse.migfs`.
//! - [`error`]: the crate error, `FsError`.
#![warn(missing_docs)]

pub mod blocks;
pub mod cache;
pub mod dirops;
pub mod error;
pub mod fuse;
pub mod meta_client;
pub mod mount;
pub mod node;

pub use error::FsError;
