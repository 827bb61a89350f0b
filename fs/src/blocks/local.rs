//! The node's on-disk block store: one file per block under
//! `DATA/blocks/<2 hex>/<64 hex>`, written to a temp file and renamed, so a
//! crash never leaves a partial block under a valid name.
//!
//! Blocks being written or just received are *pinned* for a while, so the
//! garbage collector cannot delete a block that a commit is about to
//! reference again.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use migfs_proto::ids::BlockHash;
use parking_lot::Mutex;

use crate::error::{FsError, Result};

/// How long a pin protects a block from collection.
pub const PIN_TTL: Duration = Duration::from_secs(10);

/// One node's block files.
#[derive(Debug)]
pub struct LocalStore {
    dir: PathBuf,
    tmp: PathBuf,
    pins: Mutex<HashMap<BlockHash, Instant>>,
    tmp_seq: AtomicU64,
}

impl LocalStore {
    /// Opens (creating) the store under `data_dir`; leftover temp files of a
    /// previous run are removed.
    pub fn open(data_dir: &Path) -> Result<LocalStore> {
        let dir = data_dir.join("blocks");
        let tmp = data_dir.join("tmp");
        for d in [&dir, &tmp] {
            fs::create_dir_all(d).map_err(|e| FsError::io(format!("create {}", d.display()), e))?;
        }
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(LocalStore {
            dir,
            tmp,
            pins: Mutex::new(HashMap::new()),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Where the block lives on disk.
    pub fn path(&self, h: &BlockHash) -> PathBuf {
        let hex = h.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Stores `data` as block `h` (the caller has checked the name) and pins it.
    pub fn put(&self, h: &BlockHash, data: &[u8]) -> Result<()> {
        self.pin(h);
        let path = self.path(h);
        if path.exists() {
            return Ok(());
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("{}.{seq}", h.to_hex()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            drop(f);
            match fs::rename(&tmp, &path) {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    fs::create_dir_all(path.parent().unwrap_or(&self.dir))?;
                    fs::rename(&tmp, &path)
                }
                r => r,
            }
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            FsError::io(format!("store block {h}"), e)
        })
    }

    /// The raw bytes stored for `h`, unverified; `None` if absent.
    pub fn get(&self, h: &BlockHash) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(h)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FsError::io(format!("read block {h}"), e)),
        }
    }

    /// Whether the block file exists.
    pub fn contains(&self, h: &BlockHash) -> bool {
        self.path(h).exists()
    }

    /// Removes a copy (e.g. one found corrupt), pinned or not.
    pub fn discard(&self, h: &BlockHash) {
        let _ = fs::remove_file(self.path(h));
    }

    /// Deletes a collected block unless it is pinned; says whether it did.
    pub fn collect(&self, h: &BlockHash) -> bool {
        let pins = self.pins.lock();
        if pins.get(h).is_some_and(|t| t.elapsed() < PIN_TTL) {
            return false;
        }
        let _ = fs::remove_file(self.path(h));
        true
    }

    /// Protects `h` from collection for [`PIN_TTL`].
    pub fn pin(&self, h: &BlockHash) {
        let mut pins = self.pins.lock();
        if pins.len() > 100_000 {
            pins.retain(|_, t| t.elapsed() < PIN_TTL);
        }
        pins.insert(*h, Instant::now());
    }

    /// Ends the protection of `h` (its commit landed).
    pub fn unpin(&self, h: &BlockHash) {
        self.pins.lock().remove(h);
    }

    /// Flushes the store's filesystem to stable storage.
    pub fn sync(&self) -> Result<()> {
        let f = fs::File::open(&self.dir).map_err(|e| FsError::io("open block dir", e))?;
        nix::unistd::syncfs(&f).map_err(|e| FsError::io("syncfs block store", e.into()))
    }

    /// (capacity, free) bytes of the filesystem holding the store.
    pub fn usage(&self) -> (u64, u64) {
        match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(s) => {
                let frag = s.fragment_size();
                (s.blocks() * frag, s.blocks_available() * frag)
            }
            Err(_) => (0, 0),
        }
    }

    /// Every block hash present (for tests and repair tools).
    pub fn list(&self) -> Vec<BlockHash> {
        let mut out = Vec::new();
        for sub in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for f in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
                let name = f.file_name();
                let Some(s) = name.to_str() else { continue };
                if let Ok(h) = blake3::Hash::from_hex(s) {
                    out.push(BlockHash(*h.as_bytes()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_collect_respects_pins() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::open(d.path()).unwrap();
        let data = b"hello block".to_vec();
        let h = BlockHash::of(&data);
        s.put(&h, &data).unwrap();
        assert_eq!(s.get(&h).unwrap().unwrap(), data);
        assert_eq!(s.list(), vec![h]);
        assert!(!s.collect(&h), "a freshly written block is pinned");
        s.pins.lock().clear();
        assert!(s.collect(&h));
        assert!(s.get(&h).unwrap().is_none());
    }
}
