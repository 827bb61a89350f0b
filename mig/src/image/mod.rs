//! The checkpoint image: a directory with `image.pb` (one prost
//! [`Image`](migfs_proto::image::Image) message, framed and checksummed)
//! and `pages.img` (page contents, a blake3 per segment).
//!
//! - [`format`]: framing, format version, limits, validation.
//! - [`persist`]: writing and reading image directories.
//! - [`park`]: `locks.park`, where a checkpoint parked the process's locks.

pub mod format;
pub mod park;
pub mod persist;
