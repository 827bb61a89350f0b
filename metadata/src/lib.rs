//! The migfs metadata server: the namespace, block maps, sessions, locks
//! and nodes of one cluster, kept in sled behind a store trait and served
//! over gRPC (`migfs.meta.v1.Meta`).
//!
//! Every mutating operation reads the current state, computes one batch of
//! writes and applies it atomically ([`db::MetaDb::write`]); one writer at a
//! time makes the operations serializable, and a crash leaves each batch
//! either fully applied or not at all.
//!
//! # Layout
//! - [`error`]: [`MetaError`] and its single mapping to a gRPC `Status`.
//! - [`store`]: the [`MetaStore`] trait, [`SledStore`], [`MemStore`].
//! - [`schema`]: tree names, big-endian keys, versioned records.
//! - [`db`]: [`MetaDb`], the single-writer discipline and the event channel.
//! - [`ops`]: one module per family of operations (namei, attr, rename,
//!   blocks, locks, sessions, xattr, gc), each computing one batch.
//! - [`fsck`]: a consistency check of a whole database.
//! - [`server`]: the tonic service, the watch stream, the session reaper,
//!   [`server::run`].
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use migfs_meta::{Config, MemStore, MetaDb, ops};
//!
//! let db = MetaDb::open(Arc::new(MemStore::new()), Config::default()).unwrap();
//! let root = db.read(|s| ops::inode(s, 1)).unwrap();
//! assert!(root.is_dir());
//! let f = db
//!     .write(0, |t| {
//!         ops::namei::mknod(t, ops::namei::NewNode {
//!             parent: 1, name: b"hello", mode: 0o100644, rdev: 0,
//!             uid: 0, gid: 0, target: b"", open_in: None,
//!         })
//!     })
//!     .unwrap();
//! assert_eq!(db.read(|s| ops::namei::lookup(s, 1, b"hello")).unwrap().ino, f.ino);
//! assert!(db.read(|s| migfs_meta::fsck::check(s)).unwrap().is_empty());
//! ```
#![warn(missing_docs)]

pub mod db;
pub mod error;
pub mod fsck;
pub mod ops;
pub mod schema;
pub mod server;
pub mod store;

pub use db::{Config, MetaDb};
pub use error::{MetaError, Result};
pub use store::{MemStore, MetaStore, SledStore, WriteBehind};
