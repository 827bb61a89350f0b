//! A consistency check of a whole database: every rule the operations keep
//! (links, counts, cookies, refcounts, indexes). Reads everything into
//! memory; meant for tests, crash recovery checks and offline use.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::Result;
use crate::ops::format::ROOT;
use crate::ops::inode::inode_count;
use crate::ops::{Read, rename::is_below};
use crate::schema::{BlockEntry, BlockRef, Dec, Dentry, Inode, Tree, k1, k2, key_pair, key_u64};

/// Every problem found, one sentence each (empty: consistent).
pub fn check<R: Read + ?Sized>(r: &R) -> Result<Vec<String>> {
    let mut p = Vec::new();
    let inodes = load_inodes(r)?;
    let links = check_dentries(r, &inodes, &mut p)?;
    check_inodes(r, &inodes, &links, &mut p)?;
    check_blocks(r, &inodes, &mut p)?;
    check_opens(r, &mut p)?;
    let counted = inode_count(r)?;
    if counted != inodes.len() as u64 {
        p.push(format!(
            "inode counter says {counted}, there are {}",
            inodes.len()
        ));
    }
    Ok(p)
}

fn all<R: Read + ?Sized>(r: &R, t: Tree) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    r.scan(t, &[], None, usize::MAX)
}

fn load_inodes<R: Read + ?Sized>(r: &R) -> Result<BTreeMap<u64, Inode>> {
    let mut m = BTreeMap::new();
    for (k, v) in all(r, Tree::Inodes)? {
        let ino = key_u64(&k, Tree::Inodes)?;
        m.insert(ino, Inode::decode(ino, &v)?);
    }
    Ok(m)
}

/// Per inode: (names, subdirectories, entries, parents naming it).
#[derive(Default)]
struct Links {
    names: u32,
    subdirs: u32,
    entries: u64,
    parents: Vec<u64>,
}

fn check_dentries<R: Read + ?Sized>(
    r: &R,
    inodes: &BTreeMap<u64, Inode>,
    p: &mut Vec<String>,
) -> Result<HashMap<u64, Links>> {
    let mut links: HashMap<u64, Links> = HashMap::new();
    let mut cookies = BTreeSet::new();
    for (k, v) in all(r, Tree::Dentries)? {
        let parent = key_u64(&k, Tree::Dentries)?;
        let name = k.get(8..).unwrap_or_default();
        let d = Dentry::decode(&v)?;
        let shown = String::from_utf8_lossy(name);
        match inodes.get(&parent) {
            Some(i) if i.is_dir() => {}
            _ => p.push(format!(
                "entry {shown:?} is in {parent}, which is not a directory"
            )),
        }
        let Some(child) = inodes.get(&d.ino) else {
            p.push(format!(
                "entry {shown:?} in {parent} names missing inode {}",
                d.ino
            ));
            continue;
        };
        match r.get(Tree::DirOrder, &k2(parent, d.cookie))? {
            Some(o) if Dec::new(&o, Tree::DirOrder)?.rest() == name => {}
            _ => p.push(format!(
                "entry {shown:?} in {parent} has no dirorder record {}",
                d.cookie
            )),
        }
        cookies.insert((parent, d.cookie));
        let c = links.entry(d.ino).or_default();
        c.names += 1;
        c.parents.push(parent);
        let pl = links.entry(parent).or_default();
        pl.entries += 1;
        if child.is_dir() {
            pl.subdirs += 1;
        }
    }
    for (k, _) in all(r, Tree::DirOrder)? {
        let pair = key_pair(&k, Tree::DirOrder)?;
        if !cookies.contains(&pair) {
            p.push(format!("dirorder record {pair:?} has no entry"));
        }
        if pair.1 <= 2 {
            p.push(format!(
                "cookie {} in {} collides with . or ..",
                pair.1, pair.0
            ));
        }
    }
    Ok(links)
}

fn check_inodes<R: Read + ?Sized>(
    r: &R,
    inodes: &BTreeMap<u64, Inode>,
    links: &HashMap<u64, Links>,
    p: &mut Vec<String>,
) -> Result<()> {
    if !inodes.get(&ROOT).is_some_and(Inode::is_dir) {
        p.push("the root directory is missing".into());
    }
    let none = Links::default();
    for (ino, i) in inodes {
        let l = links.get(ino).unwrap_or(&none);
        let orphan = r.get(Tree::Orphans, &k1(*ino))?.is_some();
        if i.is_dir() {
            if i.nlink != 2 + l.subdirs {
                p.push(format!(
                    "directory {ino} has nlink {}, expected {}",
                    i.nlink,
                    2 + l.subdirs
                ));
            }
            if i.children != l.entries {
                p.push(format!(
                    "directory {ino} counts {} entries, has {}",
                    i.children, l.entries
                ));
            }
            let expect_names = u32::from(*ino != ROOT);
            if l.names != expect_names || (*ino != ROOT && l.parents != [i.parent]) {
                p.push(format!(
                    "directory {ino} (parent {}) is named from {:?}",
                    i.parent, l.parents
                ));
            }
            if !is_below(r, *ino, ROOT).unwrap_or(false) {
                p.push(format!("directory {ino} is not reachable from the root"));
            }
        } else if i.nlink != l.names {
            p.push(format!(
                "inode {ino} has nlink {}, but {} names",
                i.nlink, l.names
            ));
        }
        if l.names == 0 && *ino != ROOT && !orphan {
            p.push(format!("inode {ino} has no name and is not an orphan"));
        }
        if orphan && (i.nlink != 0 || !crate::ops::inode::is_open(r, *ino)?) {
            p.push(format!("orphan {ino} has nlink {} or is not open", i.nlink));
        }
    }
    for (k, _) in all(r, Tree::Orphans)? {
        let ino = key_u64(&k, Tree::Orphans)?;
        if !inodes.contains_key(&ino) {
            p.push(format!("orphan {ino} does not exist"));
        }
    }
    Ok(())
}

fn check_blocks<R: Read + ?Sized>(
    r: &R,
    inodes: &BTreeMap<u64, Inode>,
    p: &mut Vec<String>,
) -> Result<()> {
    let mut refs: BTreeMap<[u8; 32], u64> = BTreeMap::new();
    for (k, v) in all(r, Tree::Blocks)? {
        let (ino, index) = key_pair(&k, Tree::Blocks)?;
        if !inodes.get(&ino).is_some_and(Inode::is_reg) {
            p.push(format!(
                "block {index} belongs to {ino}, not a regular file"
            ));
        }
        *refs.entry(BlockEntry::decode(&v)?.hash).or_default() += 1;
    }
    for (k, v) in all(r, Tree::BlockRefs)? {
        let counted = <[u8; 32]>::try_from(k.as_slice())
            .ok()
            .and_then(|h| refs.remove(&h));
        let stored = BlockRef::decode(&v)?.refs;
        if counted != Some(stored) {
            p.push(format!("block ref count {stored} but {counted:?} entries"));
        }
        if r.get(Tree::Gc, &k)?.is_some() {
            p.push("a referenced block is also in gc".into());
        }
    }
    if !refs.is_empty() {
        p.push(format!(
            "{} hashes are used without a ref count",
            refs.len()
        ));
    }
    for (k, _) in all(r, Tree::Xattrs)? {
        let ino = key_u64(&k, Tree::Xattrs)?;
        if !inodes.contains_key(&ino) {
            p.push(format!("xattr of missing inode {ino}"));
        }
    }
    Ok(())
}

fn check_opens<R: Read + ?Sized>(r: &R, p: &mut Vec<String>) -> Result<()> {
    let opens: BTreeSet<(u64, u64)> = all(r, Tree::Opens)?
        .iter()
        .map(|(k, _)| key_pair(k, Tree::Opens))
        .collect::<Result<_>>()?;
    let openers: BTreeSet<(u64, u64)> = all(r, Tree::Openers)?
        .iter()
        .map(|(k, _)| key_pair(k, Tree::Openers).map(|(i, s)| (s, i)))
        .collect::<Result<_>>()?;
    if opens != openers {
        p.push(format!(
            "opens {opens:?} and their index {openers:?} differ"
        ));
    }
    for (s, ino) in &opens {
        if r.get(Tree::Sessions, &k1(*s))?.is_none() {
            p.push(format!("inode {ino} is open in ended session {s}"));
        }
    }
    Ok(())
}
