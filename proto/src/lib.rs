//! The wire protocol of migfs: generated tonic/prost code for the metadata
//! and block services, identity newtypes, errno transport and the cluster
//! secret check every inter-node call carries.
//!
//! # Layout
//! - [`meta`]: the metadata service (namespace, block maps, sessions, locks).
//! - [`block`]: the block service each node serves from its block store.
//! - [`image`]: the checkpoint image of a process (`migfs checkpoint`).
//! - [`agent`]: the migration agent and page server on every node.
//! - [`ids`]: `Ino`, `NodeId`, `SessionId`, `TaskId`, `BlockHash`.
//! - [`errno`]: carrying a POSIX errno inside a `tonic::Status`.
//! - [`auth`]: the cluster secret, presented on every call and checked.
//! - [`control`]: what a node answers about its mount's files (flock ioctl).
//! - [`frame`]: unary calls over plain framed TCP (the hot path).
#![warn(missing_docs)]

pub mod auth;
pub mod control;
pub mod errno;
pub mod frame;
pub mod ids;

/// The generated code, nested as the proto packages are, so that one
/// package can name another's messages (the agent's `Cluster` reply
/// carries `migfs.meta.v1` nodes and tasks). Use the short paths below.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod migfs {
    /// `migfs.meta.v1`.
    pub mod meta {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("migfs.meta.v1");
        }
    }
    /// `migfs.block.v1`.
    pub mod block {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("migfs.block.v1");
        }
    }
    /// `migfs.image.v1`.
    pub mod image {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("migfs.image.v1");
        }
    }
    /// `migfs.agent.v1`.
    pub mod agent {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("migfs.agent.v1");
        }
    }
}

/// The metadata service, `migfs.meta.v1`.
pub use migfs::meta::v1 as meta;

/// The block service, `migfs.block.v1`.
pub use migfs::block::v1 as block;

/// The checkpoint image format, `migfs.image.v1` (docs/image-format.md).
pub use migfs::image::v1 as image;

/// The migration agent and page server, `migfs.agent.v1`.
pub use migfs::agent::v1 as agent;

/// Largest gRPC message either side accepts (block batches, block maps).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// HTTP/2 flow-control window per stream. The 64 KiB default caps one
/// stream at a few hundred MB/s even on loopback; pages and blocks move
/// in MiB-sized messages.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 flow-control window per connection (all its streams).
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame (the 16 KiB default cuts a 4 MiB message into 256).
pub const MAX_FRAME: u32 = (1 << 24) - 1;
