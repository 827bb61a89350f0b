//! fcntl byte-range locks and flock(2) locks, Linux semantics.
//!
//! A lock is held by (session, owner). All locks of one inode are one
//! record in `locks`; `sesslocks` indexes them by session so a session's
//! locks go when it ends. fcntl and flock locks never conflict with each
//! other. SetLock never waits: a blocking request is the client retrying.

use super::{Read, Txn, inode, sessions};
use crate::error::{Result, e};
use crate::schema::{self, LockRec, Tree, decode_locks, encode_locks, k1, k2};

/// Shared lock.
pub const F_RDLCK: i32 = 0;
/// Exclusive lock.
pub const F_WRLCK: i32 = 1;
/// Unlock.
pub const F_UNLCK: i32 = 2;

/// A lock request (GetLock or SetLock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockReq {
    /// The file.
    pub ino: u64,
    /// Holder session.
    pub session: u64,
    /// Holder owner within the session.
    pub owner: u64,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// F_RDLCK, F_WRLCK or F_UNLCK.
    pub typ: i32,
    /// Process id reported to F_GETLK callers.
    pub pid: u32,
    /// flock(2) instead of fcntl.
    pub flock: bool,
}

impl LockReq {
    fn holder_of(&self, l: &LockRec) -> bool {
        !l.pending && l.session == self.session && l.owner == self.owner && l.flock == self.flock
    }

    /// Whether the granted lock `l` of another holder conflicts with this
    /// request.
    fn conflicts_with(&self, l: &LockRec) -> bool {
        let (start, end) = if self.flock {
            (0, u64::MAX)
        } else {
            (self.start, self.end)
        };
        l.flock == self.flock
            && (l.pending || !(l.session == self.session && l.owner == self.owner))
            && l.start <= end
            && start <= l.end
            && (i32::from(l.typ) == F_WRLCK || self.typ == F_WRLCK)
    }

    fn check(&self, allow_unlock: bool) -> Result<()> {
        let ok =
            self.typ == F_RDLCK || self.typ == F_WRLCK || (allow_unlock && self.typ == F_UNLCK);
        if !ok {
            return Err(e::einval(format!("invalid lock type {}", self.typ)));
        }
        if self.start > self.end {
            return Err(e::einval(format!(
                "lock range {}..={} is empty",
                self.start, self.end
            )));
        }
        Ok(())
    }
}

fn load<R: Read + ?Sized>(r: &R, ino: u64) -> Result<Vec<LockRec>> {
    r.get(Tree::Locks, &k1(ino))?
        .map(|v| decode_locks(&v))
        .transpose()
        .map(Option::unwrap_or_default)
}

fn store(t: &mut Txn<'_>, ino: u64, session: u64, mut locks: Vec<LockRec>) {
    locks.sort_by_key(|l| (l.session, l.owner, l.flock, l.start));
    if locks.iter().any(|l| l.session == session) {
        t.put(Tree::SessLocks, &k2(session, ino), schema::marker());
    } else {
        t.remove(Tree::SessLocks, &k2(session, ino));
    }
    if locks.is_empty() {
        t.remove(Tree::Locks, &k1(ino));
    } else {
        t.put(Tree::Locks, &k1(ino), encode_locks(&locks));
    }
}

/// F_GETLK: the first lock of another holder that conflicts with `req`.
pub fn get<R: Read + ?Sized>(r: &R, req: &LockReq) -> Result<Option<LockRec>> {
    req.check(false)?;
    inode(r, req.ino)?;
    Ok(load(r, req.ino)?
        .into_iter()
        .find(|l| req.conflicts_with(l)))
}

/// F_SETLK / flock: grants (true) or refuses (false, nothing changed).
pub fn set(t: &mut Txn<'_>, req: &LockReq) -> Result<bool> {
    req.check(true)?;
    inode(t, req.ino)?;
    sessions::session(t, req.session)?;
    let mut all = load(t, req.ino)?;
    claim(&mut all, req);
    if req.typ != F_UNLCK && all.iter().any(|l| req.conflicts_with(l)) {
        return Ok(false);
    }
    let (mine, mut rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|l| req.holder_of(l));
    rest.extend(if req.flock {
        set_flock(req)
    } else {
        set_posix(mine, req)
    });
    store(t, req.ino, req.session, rest);
    Ok(true)
}

fn set_flock(req: &LockReq) -> Vec<LockRec> {
    if req.typ == F_UNLCK {
        return Vec::new();
    }
    vec![record(req, 0, u64::MAX)]
}

fn record(req: &LockReq, start: u64, end: u64) -> LockRec {
    LockRec {
        session: req.session,
        owner: req.owner,
        flock: req.flock,
        typ: u8::try_from(req.typ).unwrap_or(1),
        start,
        end,
        pid: req.pid,
        pending: false,
    }
}

/// The holder's fcntl locks after applying `req`: the range is cut out of
/// every existing lock (splitting where needed), the new lock added, and
/// touching locks of the same type merged.
fn set_posix(mine: Vec<LockRec>, req: &LockReq) -> Vec<LockRec> {
    let mut out = Vec::with_capacity(mine.len() + 2);
    for l in mine {
        if l.end < req.start || l.start > req.end {
            out.push(l);
            continue;
        }
        if l.start < req.start {
            out.push(LockRec {
                end: req.start - 1,
                ..l
            });
        }
        if l.end > req.end {
            out.push(LockRec {
                start: req.end + 1,
                ..l
            });
        }
    }
    if req.typ != F_UNLCK {
        out.push(record(req, req.start, req.end));
    }
    out.sort_by_key(|l| l.start);
    let mut merged: Vec<LockRec> = Vec::with_capacity(out.len());
    for l in out {
        match merged.last_mut() {
            Some(m) if m.typ == l.typ && l.start <= m.end.saturating_add(1) => {
                m.end = m.end.max(l.end);
                if l.pid == req.pid {
                    m.pid = l.pid;
                }
            }
            _ => merged.push(l),
        }
    }
    merged
}

/// A migrated process's first lock request takes the locks handed over
/// to it: they become the request owner's. fcntl locks have one owner per
/// process, so the first fcntl request takes them all; a flock lock belongs
/// to one open file, so a flock request takes one (the process may have
/// held flock locks through several open files of the inode), one of its
/// own type if there is such.
fn claim(all: &mut [LockRec], req: &LockReq) {
    let mine = |l: &LockRec| {
        l.pending
            && l.owner == PENDING_OWNER
            && l.session == req.session
            && l.pid == req.pid
            && l.flock == req.flock
    };
    if req.flock {
        let same_type = all
            .iter()
            .position(|l| mine(l) && i32::from(l.typ) == req.typ);
        if let Some(i) = same_type.or_else(|| all.iter().position(&mine)) {
            all[i].pending = false;
            all[i].owner = req.owner;
        }
        return;
    }
    for l in all.iter_mut().filter(|l| mine(l)) {
        l.pending = false;
        l.owner = req.owner;
    }
}

/// Owner of a handed-over lock until it is claimed (no kernel lock owner
/// is 0).
const PENDING_OWNER: u64 = 0;

/// A lock as [`move_locks`] returns it and [`return_locks`] takes it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The file.
    pub ino: u64,
    /// The lock as it was in the source session.
    pub rec: LockRec,
}

/// Hands every fcntl and flock lock process `from_pid` holds in `from` to
/// session `to`, pending until process `to_pid` there claims it (its first
/// lock request on the inode, normally the restore taking it again).
/// Returns the locks as they were, for [`return_locks`].
pub fn move_locks(
    t: &mut Txn<'_>,
    from: u64,
    from_pid: u32,
    to: u64,
    to_pid: u32,
) -> Result<Vec<Held>> {
    sessions::session(t, to)?;
    rehome(
        t,
        from,
        |l| l.pid == from_pid && !l.pending,
        |l| hand_to(l, to, to_pid),
    )
}

/// Parks every lock process `pid` holds in `session` under `token` (a
/// checkpoint, before the process ends): they stay held, by nobody, until
/// [`claim_parked`] hands them to a restored process or [`drop_parked`]
/// drops them. Returns them as they were.
pub fn park_locks(t: &mut Txn<'_>, session: u64, pid: u32, token: u64) -> Result<Vec<Held>> {
    if token == PENDING_OWNER {
        return Err(e::einval("a park token is not 0"));
    }
    rehome(
        t,
        session,
        |l| l.pid == pid && !l.pending,
        |l| {
            l.owner = token;
            l.pid = 0;
            l.pending = true;
        },
    )
}

/// Hands the locks parked in `from` under `token` to session `to`, pending
/// until process `to_pid` claims them (as [`move_locks`]). Returns them as
/// they were (parked), for [`return_locks`].
pub fn claim_parked(
    t: &mut Txn<'_>,
    from: u64,
    token: u64,
    to: u64,
    to_pid: u32,
) -> Result<Vec<Held>> {
    sessions::session(t, to)?;
    rehome(t, from, parked_under(token), |l| hand_to(l, to, to_pid))
}

/// Drops the locks parked in `session` under `token` (none once claimed).
/// Returns how many.
pub fn drop_parked(t: &mut Txn<'_>, session: u64, token: u64) -> Result<usize> {
    let picked = parked_under(token);
    let mut dropped = 0;
    for ino in inos_of(t, session)? {
        let all = load(t, ino)?;
        let n = all.len();
        let rest: Vec<LockRec> = all
            .into_iter()
            .filter(|l| !(l.session == session && picked(l)))
            .collect();
        if rest.len() != n {
            dropped += n - rest.len();
            store(t, ino, session, rest);
        }
    }
    Ok(dropped)
}

fn parked_under(token: u64) -> impl Fn(&LockRec) -> bool {
    move |l| l.pending && l.owner == token && token != PENDING_OWNER
}

fn hand_to(l: &mut LockRec, to: u64, to_pid: u32) {
    l.session = to;
    l.owner = PENDING_OWNER;
    l.pid = to_pid;
    l.pending = true;
}

/// The inodes `session` holds locks on.
fn inos_of(t: &mut Txn<'_>, session: u64) -> Result<Vec<u64>> {
    sessions::session(t, session)?;
    let (start, end) = schema::prefix_range(session);
    t.scan(Tree::SessLocks, &start, end.as_deref(), usize::MAX)?
        .iter()
        .map(|(k, _)| schema::key_pair(k, Tree::SessLocks).map(|(_, ino)| ino))
        .collect()
}

/// Changes, with `change`, every lock of session `from` that `pick`
/// selects; returns them as they were.
fn rehome(
    t: &mut Txn<'_>,
    from: u64,
    pick: impl Fn(&LockRec) -> bool,
    change: impl Fn(&mut LockRec),
) -> Result<Vec<Held>> {
    let mut moved = Vec::new();
    for ino in inos_of(t, from)? {
        let mut all = load(t, ino)?;
        let before = moved.len();
        for l in all.iter_mut().filter(|l| l.session == from && pick(l)) {
            moved.push(Held { ino, rec: *l });
            change(l);
        }
        if moved.len() != before {
            let mut sessions: Vec<u64> = all.iter().map(|l| l.session).collect();
            sessions.push(from);
            sessions.sort_unstable();
            sessions.dedup();
            for s in sessions {
                store(t, ino, s, all.clone());
            }
        }
    }
    Ok(moved)
}

/// Undoes [`move_locks`]: whatever session `to` holds for `to_pid` on the
/// inodes of `held` (pending or already claimed) is dropped and `held`
/// comes back as it was.
pub fn return_locks(t: &mut Txn<'_>, to: u64, to_pid: u32, held: &[Held]) -> Result<()> {
    let mut inos: Vec<u64> = held.iter().map(|h| h.ino).collect();
    inos.sort_unstable();
    inos.dedup();
    for ino in inos {
        let mut all: Vec<LockRec> = load(t, ino)?
            .into_iter()
            .filter(|l| !(l.session == to && l.pid == to_pid))
            .collect();
        let back: Vec<LockRec> = held
            .iter()
            .filter(|h| h.ino == ino)
            .map(|h| h.rec)
            .collect();
        let from: Vec<u64> = back.iter().map(|l| l.session).collect();
        all.extend(back);
        for s in from {
            store(t, ino, s, all.clone());
        }
        store(t, ino, to, all);
    }
    Ok(())
}

/// Drops every lock session `sid` holds on `ino`.
pub fn drop_session(t: &mut Txn<'_>, ino: u64, sid: u64) -> Result<()> {
    let all = load(t, ino)?;
    let rest = all.into_iter().filter(|l| l.session != sid).collect();
    store(t, ino, sid, rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(start: u64, end: u64, typ: i32) -> LockReq {
        LockReq {
            ino: 5,
            session: 1,
            owner: 1,
            start,
            end,
            typ,
            pid: 7,
            flock: false,
        }
    }

    #[test]
    fn a_pending_lock_is_claimed_by_its_pid_only() {
        let mut all = vec![LockRec {
            session: 1,
            owner: PENDING_OWNER,
            flock: false,
            typ: 1,
            start: 0,
            end: 9,
            pid: 7,
            pending: true,
        }];
        let other_pid = LockReq {
            pid: 8,
            owner: 3,
            ..req(0, 9, F_WRLCK)
        };
        claim(&mut all, &other_pid);
        assert!(all[0].pending && other_pid.conflicts_with(&all[0]));
        let me = LockReq {
            owner: 3,
            ..req(0, 9, F_WRLCK)
        };
        claim(&mut all, &me);
        assert!(!all[0].pending && all[0].owner == 3 && !me.conflicts_with(&all[0]));
    }

    #[test]
    fn each_flock_request_claims_one_pending_flock_of_its_type_first() {
        let pending = |typ| LockRec {
            session: 1,
            owner: PENDING_OWNER,
            flock: true,
            typ,
            start: 0,
            end: u64::MAX,
            pid: 7,
            pending: true,
        };
        let mut all = vec![pending(1), pending(0)];
        let flock = |owner, typ| LockReq {
            owner,
            flock: true,
            ..req(0, u64::MAX, typ)
        };
        let fcntl = LockReq {
            owner: 9,
            ..req(0, 9, F_WRLCK)
        };
        claim(&mut all, &fcntl);
        assert!(
            all.iter().all(|l| l.pending),
            "an fcntl request takes no flock"
        );
        claim(&mut all, &flock(3, F_RDLCK));
        assert!(all[0].pending && !all[1].pending && all[1].owner == 3);
        claim(&mut all, &flock(4, F_WRLCK));
        assert!(!all[0].pending && all[0].owner == 4 && all[1].owner == 3);
    }

    fn ranges(v: &[LockRec]) -> Vec<(u64, u64, u8)> {
        v.iter().map(|l| (l.start, l.end, l.typ)).collect()
    }

    #[test]
    fn posix_split_and_merge() {
        let v = set_posix(Vec::new(), &req(0, 99, F_WRLCK));
        let v = set_posix(v, &req(40, 49, F_RDLCK));
        assert_eq!(ranges(&v), [(0, 39, 1), (40, 49, 0), (50, 99, 1)]);
        let v = set_posix(v, &req(40, 49, F_WRLCK));
        assert_eq!(ranges(&v), [(0, 99, 1)]);
        let v = set_posix(v, &req(10, 19, F_UNLCK));
        assert_eq!(ranges(&v), [(0, 9, 1), (20, 99, 1)]);
        let v = set_posix(v, &req(100, u64::MAX, F_WRLCK));
        assert_eq!(ranges(&v), [(0, 9, 1), (20, u64::MAX, 1)]);
        let v = set_posix(v, &req(0, u64::MAX, F_UNLCK));
        assert!(v.is_empty());
    }

    #[test]
    fn conflicts_need_overlap_a_writer_and_another_holder() {
        let mine = record(&req(0, 9, F_RDLCK), 0, 9);
        let other = |start, end, typ| LockReq {
            owner: 2,
            ..req(start, end, typ)
        };
        assert!(!other(0, 9, F_RDLCK).conflicts_with(&mine));
        assert!(other(9, 20, F_WRLCK).conflicts_with(&mine));
        assert!(!other(10, 20, F_WRLCK).conflicts_with(&mine));
        assert!(!req(0, 9, F_WRLCK).conflicts_with(&mine));
        let flock = LockReq {
            flock: true,
            ..other(0, 0, F_WRLCK)
        };
        assert!(!flock.conflicts_with(&mine));
    }
}
