//! Nodes, sessions and open files.
//!
//! A node registers under a stable name and gets a new session each time;
//! the node's previous session ends at once (that daemon is gone). A
//! session holds inodes open (`opens`, indexed by inode in `openers`) and
//! locks; when it ends, by takeover or lease expiry, its opens are released
//! (orphans reclaimed) and its locks dropped, all in one batch.

use migfs_proto::meta::{NodeInfo, StatFsReply};

use super::inode::{delete, inode_count, is_open};
use super::{NAME_MAX, Read, Txn, get_inode, inode, locks};
use crate::error::{Result, e};
use crate::schema::{self, Node, Session, Tree, k1, k2, key_pair, prefix_range};

/// Files the server claims it can still create (there is no real limit).
pub const FILES_FREE: u64 = 1 << 40;

/// The live session `id`, or ESTALE.
pub fn session<R: Read + ?Sized>(r: &R, id: u64) -> Result<Session> {
    match r.get(Tree::Sessions, &k1(id))? {
        Some(v) => Session::decode(&v),
        None => Err(e::estale(format!("session {id} is unknown or has ended"))),
    }
}

/// A node registering: returns (node id, new session id).
pub fn register(
    t: &mut Txn<'_>,
    name: &str,
    addr: &str,
    capacity: u64,
    free: u64,
    lease_ms: i64,
) -> Result<(u64, u64)> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(e::einval(format!(
            "node name of {} bytes (1..={NAME_MAX})",
            name.len()
        )));
    }
    if addr.len() > 1024 {
        return Err(e::einval("node address is longer than 1024 bytes"));
    }
    let node_id = match t.get(Tree::NodeNames, name.as_bytes())? {
        Some(v) => schema::decode_u64(&v, Tree::NodeNames)?,
        None => {
            let id = t.fresh_id()?;
            t.put(Tree::NodeNames, name.as_bytes(), schema::encode_u64(id));
            id
        }
    };
    if let Some(old) = get_node(t, node_id)?
        && old.session != 0
    {
        end(t, old.session)?;
    }
    let sid = t.fresh_id()?;
    let expires_ms = t.now_ms().saturating_add(lease_ms);
    t.put(
        Tree::Sessions,
        &k1(sid),
        Session {
            node: node_id,
            expires_ms,
        }
        .encode(),
    );
    let node = Node {
        name: name.to_string(),
        addr: addr.to_string(),
        capacity,
        free,
        last_heartbeat_ms: t.now_ms(),
        session: sid,
    };
    t.put(Tree::Nodes, &k1(node_id), node.encode());
    Ok((node_id, sid))
}

/// The node record `id`, if known.
pub fn get_node<R: Read + ?Sized>(r: &R, id: u64) -> Result<Option<Node>> {
    r.get(Tree::Nodes, &k1(id))?
        .map(|v| Node::decode(&v))
        .transpose()
}

/// Extends the lease of session `sid` and records the node's space.
pub fn heartbeat(t: &mut Txn<'_>, sid: u64, capacity: u64, free: u64, lease_ms: i64) -> Result<()> {
    let mut s = session(t, sid)?;
    s.expires_ms = t.now_ms().saturating_add(lease_ms);
    t.put(Tree::Sessions, &k1(sid), s.encode());
    if let Some(mut n) = get_node(t, s.node)? {
        n.capacity = capacity;
        n.free = free;
        n.last_heartbeat_ms = t.now_ms();
        t.put(Tree::Nodes, &k1(s.node), n.encode());
    }
    Ok(())
}

/// Ends session `sid`: releases its opens (deleting orphans nobody holds
/// open any more), drops its locks, marks its node down.
pub fn end(t: &mut Txn<'_>, sid: u64) -> Result<()> {
    let Some(v) = t.get(Tree::Sessions, &k1(sid))? else {
        return Ok(());
    };
    let s = Session::decode(&v)?;
    t.remove(Tree::Sessions, &k1(sid));
    let (start, stop) = prefix_range(sid);
    let mut inos = Vec::new();
    for (k, _) in t.scan(Tree::Opens, &start, stop.as_deref(), usize::MAX)? {
        let (_, ino) = key_pair(&k, Tree::Opens)?;
        t.remove(Tree::Opens, &k);
        t.remove(Tree::Openers, &k2(ino, sid));
        inos.push(ino);
    }
    for ino in inos {
        reclaim_if_orphan(t, ino)?;
    }
    for (k, _) in t.scan(Tree::SessLocks, &start, stop.as_deref(), usize::MAX)? {
        let (_, ino) = key_pair(&k, Tree::SessLocks)?;
        locks::drop_session(t, ino, sid)?;
    }
    if let Some(mut n) = get_node(t, s.node)?
        && n.session == sid
    {
        n.session = 0;
        t.put(Tree::Nodes, &k1(s.node), n.encode());
    }
    t.session_ended(sid);
    tracing::info!(session = sid, node = s.node, "session ended");
    Ok(())
}

/// Deletes `ino` if it is an orphan that no session holds open.
fn reclaim_if_orphan(t: &mut Txn<'_>, ino: u64) -> Result<()> {
    if t.get(Tree::Orphans, &k1(ino))?.is_some() && !is_open(t, ino)? {
        delete(t, ino)?;
    }
    Ok(())
}

/// Gives every stored session a full lease from now: after a server
/// restart, live nodes get the time to heartbeat before being reaped.
pub fn renew_all(t: &mut Txn<'_>, lease_ms: i64) -> Result<()> {
    let until = t.now_ms().saturating_add(lease_ms);
    for (k, v) in t.scan(Tree::Sessions, &[], None, usize::MAX)? {
        let mut s = Session::decode(&v)?;
        if s.expires_ms < until {
            s.expires_ms = until;
            t.put(Tree::Sessions, &k, s.encode());
        }
    }
    Ok(())
}

/// Sessions whose lease ran out before `now_ms`.
pub fn expired<R: Read + ?Sized>(r: &R, now_ms: i64) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for (k, v) in r.scan(Tree::Sessions, &[], None, usize::MAX)? {
        if Session::decode(&v)?.expires_ms < now_ms {
            out.push(schema::key_u64(&k, Tree::Sessions)?);
        }
    }
    Ok(out)
}

/// Registers one more open of `ino` by session `sid`.
pub fn add_open(t: &mut Txn<'_>, sid: u64, ino: u64) -> Result<()> {
    session(t, sid)?;
    let key = k2(sid, ino);
    let n = match t.get(Tree::Opens, &key)? {
        Some(v) => schema::decode_u64(&v, Tree::Opens)?,
        None => 0,
    };
    t.put(Tree::Opens, &key, schema::encode_u64(n + 1));
    t.put(Tree::Openers, &k2(ino, sid), schema::marker());
    Ok(())
}

/// open(2) of `ino` in session `sid`.
pub fn open(t: &mut Txn<'_>, sid: u64, ino: u64) -> Result<schema::Inode> {
    let i = inode(t, ino)?;
    add_open(t, sid, ino)?;
    Ok(i)
}

/// The last close of one open of `ino` in session `sid`; the last release
/// of an orphan deletes it.
pub fn release(t: &mut Txn<'_>, sid: u64, ino: u64) -> Result<()> {
    session(t, sid)?;
    let key = k2(sid, ino);
    let Some(v) = t.get(Tree::Opens, &key)? else {
        return Ok(());
    };
    let n = schema::decode_u64(&v, Tree::Opens)?;
    if n > 1 {
        t.put(Tree::Opens, &key, schema::encode_u64(n - 1));
        return Ok(());
    }
    t.remove(Tree::Opens, &key);
    t.remove(Tree::Openers, &k2(ino, sid));
    if get_inode(t, ino)?.is_some() {
        reclaim_if_orphan(t, ino)?;
    }
    Ok(())
}

/// Every known node; `up` when it has a live session.
pub fn list_nodes<R: Read + ?Sized>(r: &R) -> Result<Vec<NodeInfo>> {
    let mut out = Vec::new();
    for (k, v) in r.scan(Tree::Nodes, &[], None, usize::MAX)? {
        let id = schema::key_u64(&k, Tree::Nodes)?;
        let n = Node::decode(&v)?;
        let up = n.session != 0 && r.get(Tree::Sessions, &k1(n.session))?.is_some();
        out.push(NodeInfo {
            node_id: id,
            name: n.name,
            addr: n.addr,
            up,
            capacity_bytes: n.capacity,
            free_bytes: n.free,
            last_heartbeat_ms: n.last_heartbeat_ms,
            // The server's in-memory load reports fill it in.
            load: None,
        });
    }
    Ok(out)
}

/// statfs(2): space over the nodes that are up, inode count.
pub fn statfs<R: Read + ?Sized>(r: &R, block_size: u32) -> Result<StatFsReply> {
    let (mut total, mut free) = (0u64, 0u64);
    for n in list_nodes(r)?.into_iter().filter(|n| n.up) {
        total = total.saturating_add(n.capacity_bytes);
        free = free.saturating_add(n.free_bytes);
    }
    Ok(StatFsReply {
        block_size: u64::from(block_size),
        total_bytes: total,
        free_bytes: free,
        files: inode_count(r)?,
        files_free: FILES_FREE,
        name_max: 255,
    })
}
