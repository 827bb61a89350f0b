//! Creating a new database (root directory, cluster constants, format
//! version) and checking an existing one.

use crate::error::{MetaError, Result};
use crate::schema::{
    self, Cluster, FORMAT_VERSION, Inode, META_CLUSTER, META_FORMAT, META_INODES, Tree, mode,
};
use crate::store::{Batch, MetaStore};

/// The root directory's inode number.
pub const ROOT: u64 = 1;

/// Returns the cluster constants of the database in `store`, formatting it
/// with `wanted` first if it is new.
pub fn open_or_format(store: &dyn MetaStore, wanted: Cluster, now: i64) -> Result<Cluster> {
    let cluster = read_or_format(store, wanted, now)?;
    if !cluster.block_size.is_power_of_two() || cluster.block_size < 512 || cluster.replicas == 0 {
        return Err(MetaError::Config(format!(
            "block size {} (a power of two, at least 512) and replicas {} (at least 1)",
            cluster.block_size, cluster.replicas
        )));
    }
    Ok(cluster)
}

fn read_or_format(store: &dyn MetaStore, wanted: Cluster, now: i64) -> Result<Cluster> {
    if let Some(v) = store.get(Tree::Meta, META_FORMAT)? {
        let found = <[u8; 4]>::try_from(v.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| MetaError::Corrupt {
                tree: "meta",
                what: "format version is not 4 bytes".into(),
            })?;
        if found != FORMAT_VERSION {
            return Err(MetaError::Format {
                found,
                supported: FORMAT_VERSION,
            });
        }
        let c = store
            .get(Tree::Meta, META_CLUSTER)?
            .ok_or(MetaError::Corrupt {
                tree: "meta",
                what: "no cluster record".into(),
            })?;
        return Cluster::decode(&c);
    }
    let root = Inode {
        ino: ROOT,
        mode: mode::S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        rdev: 0,
        nlink: 2,
        size: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        data_version: 0,
        parent: ROOT,
        children: 0,
        target: Vec::new(),
    };
    if !wanted.block_size.is_power_of_two() || wanted.block_size < 512 || wanted.replicas == 0 {
        return Err(MetaError::Config(format!(
            "cannot create a database with block size {} and {} replicas",
            wanted.block_size, wanted.replicas
        )));
    }
    let mut b = Batch::new();
    b.put(Tree::Inodes, schema::k1(ROOT), root.encode());
    b.put(Tree::Meta, META_CLUSTER, wanted.encode());
    b.put(Tree::Meta, META_INODES, schema::encode_u64(1));
    // Written last in the same batch: a database with a format key is complete.
    b.put(
        Tree::Meta,
        META_FORMAT,
        FORMAT_VERSION.to_be_bytes().to_vec(),
    );
    store.apply(&b)?;
    store.flush()?;
    tracing::info!(
        block_size = wanted.block_size,
        replicas = wanted.replicas,
        "created a new metadata database"
    );
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn formats_once_and_refuses_bad_settings_and_versions() {
        let s = MemStore::new();
        let bad = Cluster {
            block_size: 1000,
            replicas: 2,
        };
        assert!(matches!(
            open_or_format(&s, bad, 0),
            Err(MetaError::Config(_))
        ));
        assert!(
            s.get(Tree::Meta, META_FORMAT).unwrap().is_none(),
            "nothing written"
        );
        let c = Cluster {
            block_size: 4096,
            replicas: 1,
        };
        assert_eq!(open_or_format(&s, c, 5).unwrap(), c);
        let other = Cluster {
            block_size: 65536,
            replicas: 3,
        };
        assert_eq!(
            open_or_format(&s, other, 6).unwrap(),
            c,
            "the stored constants win"
        );
        let root = crate::ops::inode(&s, ROOT).unwrap();
        assert_eq!(
            (root.mode, root.nlink, root.uid, root.gid, root.ctime),
            (0o40755, 2, 0, 0, 5)
        );
        let mut b = Batch::new();
        b.put(Tree::Meta, META_FORMAT, 99u32.to_be_bytes().to_vec());
        s.apply(&b).unwrap();
        assert!(matches!(
            open_or_format(&s, c, 0),
            Err(MetaError::Format {
                found: 99,
                supported: 1
            })
        ));
    }
}
