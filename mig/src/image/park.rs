//! `locks.park` in an image directory: where a plain checkpoint parked the
//! process's locks on migfs files (see `agent::parked`), so that the
//! restore claims them. Four text lines:
//!
//! ```text
//! migfs-lock-park 1
//! session 12
//! token 9876543210
//! locks 2
//! ```
//!
//! No file: nothing was parked (no locks on migfs, `--leave-running`, or
//! `--hold-locks 0`), and a restore takes the image's locks afresh.

use std::path::Path;

use crate::error::ImageError;

/// The file's name in the image directory.
pub const FILE: &str = "locks.park";

const MAGIC: &str = "migfs-lock-park";
const VERSION: u32 = 1;

/// Where the locks are parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockPark {
    /// The session they are parked in (the checkpointing node's).
    pub session: u64,
    /// The token that names them.
    pub token: u64,
    /// How many.
    pub locks: u32,
}

/// Writes `park` into `dir` (synced, as the image is).
pub fn write(dir: &Path, park: &LockPark) -> Result<(), ImageError> {
    use std::io::Write;
    let path = dir.join(FILE);
    let text = format!(
        "{MAGIC} {VERSION}\nsession {}\ntoken {}\nlocks {}\n",
        park.session, park.token, park.locks
    );
    let io = |source| ImageError::Io {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::File::create(&path).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The park of the image in `dir`, if it has one.
pub fn read(dir: &Path) -> Result<Option<LockPark>, ImageError> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ImageError::Io { path, source }),
    };
    parse(&text).map(Some).ok_or(ImageError::Magic { path })
}

fn parse(text: &str) -> Option<LockPark> {
    let mut lines = text.lines();
    let (magic, version) = lines.next()?.split_once(' ')?;
    if magic != MAGIC || version.parse::<u32>().ok()? != VERSION {
        return None;
    }
    let mut field = |name: &str| -> Option<u64> {
        let (k, v) = lines.next()?.split_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    };
    let park = LockPark {
        session: field("session")?,
        token: field("token")?,
        locks: u32::try_from(field("locks")?).ok()?,
    };
    (lines.next().is_none() && park.token != 0).then_some(park)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_park_round_trips_and_a_bad_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let p = LockPark {
            session: 12,
            token: u64::MAX,
            locks: 3,
        };
        write(dir.path(), &p).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(p));
        for bad in [
            "migfs-lock-park 2\nsession 1\ntoken 2\nlocks 1\n",
            "migfs-lock-park 1\nsession 1\ntoken 0\nlocks 1\n",
            "migfs-lock-park 1\ntoken 2\nsession 1\nlocks 1\n",
            "migfs-lock-park 1\nsession 1\ntoken 2\n",
            "migfs-lock-park 1\nsession 1\ntoken 2\nlocks 1\nmore\n",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
