//! The change log of a [`super::WriteBehind`] store: every batch is
//! appended here, in one `write(2)`, before its caller is answered, so an
//! answered change survives a crash of the server process even while the
//! durable store is written behind in large groups; `fdatasync` of the log
//! makes it survive a crash of the machine. On start, the records the
//! store does not hold yet are applied again.
//!
//! Files `changes.<generation>.log` in the database directory; a record is
//! `len:u32 seq:u64 writes check:[u8; 8]` (little-endian; `check` is the
//! start of the blake3 hash of `seq` and the writes). Reading stops at the
//! first record that is torn or does not check: it was never answered.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Batch;
use crate::error::{MetaError, Result};
use crate::schema::Tree;

/// Largest record accepted when reading (a batch is far smaller).
const MAX_RECORD: usize = 1 << 30;

fn io(what: String) -> impl FnOnce(std::io::Error) -> MetaError {
    move |e| MetaError::store("change log", format!("{what}: {e}"))
}

fn file_name(generation: u64) -> String {
    format!("changes.{generation:016}.log")
}

/// The generations of the logs in `dir`, in order.
fn generations(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(io(format!("list {}", dir.display())))?;
    for e in rd {
        let e = e.map_err(io(format!("list {}", dir.display())))?;
        let name = e.file_name();
        let Some(g) = name
            .to_str()
            .and_then(|n| n.strip_prefix("changes."))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.push(g);
    }
    out.sort_unstable();
    Ok(out)
}

fn encode(seq: u64, b: &Batch) -> Result<Vec<u8>> {
    let len32 = |n: usize| {
        u32::try_from(n)
            .map(u32::to_le_bytes)
            .map_err(|_| MetaError::store("change log", format!("a record of {n} bytes")))
    };
    let size: usize = b
        .ops()
        .iter()
        .map(|(_, k, v)| 10 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(20 + size);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    for (tree, key, value) in b.ops() {
        out.push(u8::try_from(tree.index()).unwrap_or(u8::MAX));
        out.extend_from_slice(&len32(key.len())?);
        out.extend_from_slice(key);
        match value {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&len32(v.len())?);
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    let check = blake3::hash(&out[4..]);
    out.extend_from_slice(&check.as_bytes()[..8]);
    let len = len32(out.len() - 4)?;
    out[..4].copy_from_slice(&len);
    Ok(out)
}

/// Splits `n` bytes off the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn u32_of(b: &mut &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize)
}

/// One record's body (after its length); `None` if it does not check.
fn decode(body: &[u8]) -> Option<(u64, Batch)> {
    let (data, check) = body.split_at(body.len().checked_sub(8)?);
    if &blake3::hash(data).as_bytes()[..8] != check {
        return None;
    }
    let mut b = data;
    let seq = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
    let mut batch = Batch::new();
    while !b.is_empty() {
        let tree = *Tree::ALL.get(usize::from(take(&mut b, 1)?[0]))?;
        let klen = u32_of(&mut b)?;
        let key = take(&mut b, klen)?.to_vec();
        match take(&mut b, 1)?[0] {
            1 => {
                let vlen = u32_of(&mut b)?;
                batch.put(tree, key, take(&mut b, vlen)?.to_vec());
            }
            _ => batch.remove(tree, key),
        }
    }
    Some((seq, batch))
}

/// Every intact record of `bytes`, in order.
fn records(mut bytes: &[u8]) -> Vec<(u64, Batch)> {
    let mut out = Vec::new();
    while let Some(len) = u32_of(&mut bytes) {
        if len > MAX_RECORD {
            break;
        }
        let Some(rec) = take(&mut bytes, len).and_then(decode) else {
            break;
        };
        out.push(rec);
    }
    out
}

/// The log being appended to.
#[derive(Debug)]
pub struct ChangeLog {
    dir: PathBuf,
    generation: u64,
    file: Arc<File>,
    bytes: u64,
}

/// What a directory's logs hold when it is opened.
pub struct Recovered {
    /// The log to append to from now on (a new generation).
    pub log: ChangeLog,
    /// Every intact record of the older logs, in order.
    pub records: Vec<(u64, Batch)>,
    /// The older logs: remove them once the store holds their records.
    pub old: Vec<PathBuf>,
}

impl ChangeLog {
    /// Reads the logs of `dir` and starts a new one after them.
    pub fn open(dir: &Path) -> Result<Recovered> {
        let gens = generations(dir)?;
        let mut records = Vec::new();
        let mut old = Vec::new();
        for g in &gens {
            let p = dir.join(file_name(*g));
            let bytes = std::fs::read(&p).map_err(io(format!("read {}", p.display())))?;
            records.extend(self::records(&bytes));
            old.push(p);
        }
        let generation = gens.last().map_or(1, |g| g + 1);
        let log = ChangeLog::create(dir, generation)?;
        Ok(Recovered { log, records, old })
    }

    fn create(dir: &Path, generation: u64) -> Result<ChangeLog> {
        let p = dir.join(file_name(generation));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io(format!("create {}", p.display())))?;
        // The new file's name must survive a machine crash too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("sync {}", dir.display())))?;
        Ok(ChangeLog {
            dir: dir.to_path_buf(),
            generation,
            file: Arc::new(file),
            bytes: 0,
        })
    }

    /// Appends one batch (one `write(2)`: the kernel holds it once this
    /// returns).
    pub fn append(&mut self, seq: u64, b: &Batch) -> Result<()> {
        let rec = encode(seq, b)?;
        (&*self.file)
            .write_all(&rec)
            .map_err(io(format!("append to {}", self.path().display())))?;
        self.bytes += rec.len() as u64;
        Ok(())
    }

    /// Bytes appended to this generation.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The file being appended to, for syncing outside any lock.
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(file_name(self.generation))
    }

    /// Syncs this generation and starts the next; returns the old file's
    /// path (remove it once the store holds its records).
    pub fn rotate(&mut self) -> Result<PathBuf> {
        let old = self.path();
        self.file
            .sync_data()
            .map_err(io(format!("sync {}", old.display())))?;
        *self = ChangeLog::create(&self.dir, self.generation + 1)?;
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(i: u8) -> Batch {
        let mut b = Batch::new();
        b.put(Tree::Inodes, vec![i], vec![i; usize::from(i)]);
        b.remove(Tree::Dentries, vec![i, i]);
        b
    }

    fn same(a: &Batch, b: &Batch) -> bool {
        a.ops() == b.ops()
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(dir.path()).unwrap().log;
        for i in 1..=3 {
            log.append(u64::from(i), &batch(i)).unwrap();
        }
        let p = log.path();
        drop(log);
        let mut bytes = std::fs::read(&p).unwrap();
        let r = records(&bytes);
        assert_eq!(r.len(), 3);
        assert!(
            r.iter()
                .zip(1..)
                .all(|((s, b), i)| *s == u64::from(i) && same(b, &batch(i)))
        );
        // A torn last record, then a flipped byte in the second.
        bytes.truncate(bytes.len() - 3);
        assert_eq!(records(&bytes).len(), 2);
        let second = encode(1, &batch(1)).unwrap().len() + 10;
        bytes[second] ^= 1;
        assert_eq!(records(&bytes).len(), 1);
    }

    #[test]
    fn reopening_reads_every_generation_in_order_and_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ChangeLog::open(dir.path()).unwrap().log;
        log.append(1, &batch(1)).unwrap();
        let first = log.rotate().unwrap();
        log.append(2, &batch(2)).unwrap();
        drop(log);
        let r = ChangeLog::open(dir.path()).unwrap();
        assert_eq!(
            r.records.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(r.old.len(), 2);
        assert_eq!(r.old[0], first);
        assert_eq!(r.log.generation, 3);
    }
}
