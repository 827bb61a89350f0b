//! Directory delegations: which session may answer creates and removals in
//! a directory itself, and the recalls that take a delegation back.
//!
//! A delegation is granted to a session that knows every name in the
//! directory (it asks with `want_delegation`) when no other session looked
//! into the directory within [`Delegations::quiet`]: the holder is then the
//! only one whose caches say anything about the directory's names. Before
//! a request of any other session reads or changes the directory's names,
//! the server recalls the delegation and waits until the holder has sent
//! what it queued and given it back (`DirBatch` with `release`), or until
//! the holder's watch stream is gone, or [`Delegations::recall_wait`]
//! passed. State lives in memory only: a restarted server holds no
//! delegation, and grants none before `quiet` passed since its start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migfs_proto::meta::Invalidation;
use migfs_proto::meta::invalidation::Kind;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::db::{Event, MetaDb};

/// A directory's holder.
#[derive(Debug)]
struct Holder {
    session: u64,
    /// Woken when the delegation ends.
    gone: Arc<Notify>,
    recalled: bool,
}

#[derive(Debug, Default)]
struct Inner {
    held: HashMap<u64, Holder>,
    /// Per directory, when each session last had its names answered.
    readers: HashMap<u64, Vec<(u64, Instant)>>,
    /// Live watch streams per session.
    watching: HashMap<u64, usize>,
    /// When reader records were last thrown away (none is granted for the
    /// quiet time after).
    pruned: Option<Instant>,
}

/// The delegation table.
#[derive(Debug)]
pub struct Delegations {
    inner: Mutex<Inner>,
    started: Instant,
    quiet: Duration,
    recall_wait: Duration,
}

/// Above this many directories with readers, old reader records are pruned.
const READERS_MAX: usize = 1 << 16;

impl Delegations {
    /// A table granting after `quiet` without other readers, waiting at most
    /// `recall_wait` for a recalled delegation.
    pub fn new(quiet: Duration, recall_wait: Duration) -> Delegations {
        Delegations {
            inner: Mutex::new(Inner::default()),
            started: Instant::now(),
            quiet,
            recall_wait,
        }
    }

    /// Called before a request of `session` reads or changes the names in
    /// `dir`: recalls another session's delegation of it and waits for the
    /// recall to end, then (when `reads`: the answer will be cached) notes
    /// `session` as a reader.
    pub async fn enter(&self, db: &MetaDb, dir: u64, session: u64, reads: bool) {
        let deadline = Instant::now() + self.recall_wait;
        loop {
            let gone = {
                let mut g = self.inner.lock();
                let g = &mut *g;
                let Some(holder) = g.held.get(&dir).map(|h| h.session) else {
                    if reads {
                        note_reader(g, dir, session);
                    }
                    return;
                };
                if holder == session && session != 0 {
                    return;
                }
                // Noted now, not only once it is answered: while it waits,
                // the holder must not be granted the directory again.
                note_reader(g, dir, session);
                if g.watching.get(&holder).copied().unwrap_or(0) == 0 {
                    // Nobody to recall it from: the holder's node is gone.
                    tracing::warn!(
                        dir,
                        holder,
                        "delegation dropped: its holder has no watch stream"
                    );
                    end(g, dir);
                    return;
                }
                let Some(h) = g.held.get_mut(&dir) else {
                    return;
                };
                if !h.recalled {
                    h.recalled = true;
                    db.announce(Event::Recall {
                        session: holder,
                        dir,
                    });
                }
                let gone = Arc::clone(&h.gone);
                // Registered before the lock is let go: a release between
                // here and the await still wakes it.
                let mut n = Box::pin(gone.notified_owned());
                n.as_mut().enable();
                n
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, gone).await.is_err() {
                let mut g = self.inner.lock();
                if let Some(h) = g.held.get(&dir) {
                    tracing::warn!(dir, holder = h.session, wait = ?self.recall_wait, "a recalled delegation was not given back in time; taken");
                    end(&mut g, dir);
                }
            }
        }
    }

    /// Grants `session` the delegation of `dir` if nobody holds it and no
    /// other session read its names within the quiet time; tells the other
    /// sessions to forget what they cached of it.
    pub fn grant(&self, db: &MetaDb, dir: u64, session: u64) -> bool {
        // A zero quiet time turns delegations off.
        if session == 0 || self.quiet.is_zero() || self.started.elapsed() < self.quiet {
            return false;
        }
        let mut g = self.inner.lock();
        let quiet = self.quiet;
        if g.held.contains_key(&dir)
            || g.watching.get(&session).copied().unwrap_or(0) == 0
            || g.pruned.is_some_and(|t| t.elapsed() < quiet)
        {
            return false;
        }
        if g.readers
            .get(&dir)
            .is_some_and(|r| r.iter().any(|&(s, t)| s != session && t.elapsed() < quiet))
        {
            return false;
        }
        g.held.insert(
            dir,
            Holder {
                session,
                gone: Arc::new(Notify::new()),
                recalled: false,
            },
        );
        drop(g);
        db.announce(Event::Changed {
            origin: session,
            invals: Arc::from(vec![Invalidation {
                kind: Kind::ForgetDir.into(),
                ino: dir,
                ..Default::default()
            }]),
        });
        true
    }

    /// Whether `session` holds `dir`.
    pub fn holds(&self, dir: u64, session: u64) -> bool {
        self.inner
            .lock()
            .held
            .get(&dir)
            .is_some_and(|h| h.session == session)
    }

    /// `session` gives `dir` back.
    pub fn release(&self, dir: u64, session: u64) {
        let mut g = self.inner.lock();
        if g.held.get(&dir).is_some_and(|h| h.session == session) {
            end(&mut g, dir);
        }
    }

    /// A watch stream of `session` started.
    pub fn watch_started(&self, session: u64) {
        *self.inner.lock().watching.entry(session).or_default() += 1;
    }

    /// A watch stream of `session` ended: when it was the last, every
    /// delegation of the session ends (its node is gone or will start over
    /// with empty caches).
    pub fn watch_ended(&self, session: u64) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let left = g.watching.get_mut(&session).map(|n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left == Some(0) {
            g.watching.remove(&session);
            let dirs: Vec<u64> = g
                .held
                .iter()
                .filter(|(_, h)| h.session == session)
                .map(|(&d, _)| d)
                .collect();
            for d in dirs {
                end(g, d);
            }
        }
    }

    /// Number of delegations held.
    pub fn held(&self) -> usize {
        self.inner.lock().held.len()
    }
}

fn end(g: &mut Inner, dir: u64) {
    if let Some(h) = g.held.remove(&dir) {
        h.gone.notify_waiters();
    }
}

fn note_reader(g: &mut Inner, dir: u64, session: u64) {
    if session == 0 {
        return;
    }
    if g.readers.len() >= READERS_MAX {
        g.readers.clear();
        g.pruned = Some(Instant::now());
    }
    let r = g.readers.entry(dir).or_default();
    match r.iter_mut().find(|(s, _)| *s == session) {
        Some(e) => e.1 = Instant::now(),
        None => r.push((session, Instant::now())),
    }
}
