//! Behaviour across the nodes of a real 2-node cluster: close-to-open data,
//! pushed invalidations, unlinked-open files, concurrent creates, open by
//! inode, and locks held across nodes.
// Byte patterns are made by truncating wider integers on purpose.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn file_written_on_n1_reads_identical_on_n2() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let data = pattern(5 << 20 | 12345, 7);
    fs::write(c.path("n1", "data.bin"), &data).unwrap();
    assert_eq!(
        fs::read(c.path("n2", "data.bin")).unwrap(),
        data,
        "n2 sees other bytes"
    );
    // Overwrite the middle on n2, read back on n1 (close-to-open both ways).
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(c.path("n2", "data.bin"))
        .unwrap();
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(b"written on n2").unwrap();
    drop(f);
    let mut want = data.clone();
    want[3 << 20..(3 << 20) + 13].copy_from_slice(b"written on n2");
    assert_eq!(fs::read(c.path("n1", "data.bin")).unwrap(), want);
    // Truncate on n1 is seen on n2.
    fs::OpenOptions::new()
        .write(true)
        .open(c.path("n1", "data.bin"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    assert_eq!(fs::read(c.path("n2", "data.bin")).unwrap(), want[..1000]);
}

#[test]
fn rename_and_unlink_on_n1_are_seen_on_n2_before_any_ttl() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    fs::write(c.path("n1", "old"), b"x").unwrap();
    fs::write(c.path("n1", "doomed"), b"y").unwrap();
    // Warm n2's caches.
    assert!(c.path("n2", "old").exists() && c.path("n2", "doomed").exists());
    fs::rename(c.path("n1", "old"), c.path("n1", "new")).unwrap();
    fs::remove_file(c.path("n1", "doomed")).unwrap();
    // The kernel TTL is 1 s and the user-space cache 60 s: only a pushed
    // invalidation makes n2 see this within 300 ms.
    assert!(
        within(300, || !c.path("n2", "old").exists()),
        "n2 still sees the old name"
    );
    assert!(
        within(300, || c.path("n2", "new").exists()),
        "n2 does not see the new name"
    );
    assert!(
        within(300, || !c.path("n2", "doomed").exists()),
        "n2 still sees the unlinked file"
    );
}

#[test]
fn file_unlinked_on_n1_stays_readable_where_open_on_n2() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let data = pattern(300_000, 3);
    fs::write(c.path("n1", "victim"), &data).unwrap();
    let mut f = fs::File::open(c.path("n2", "victim")).unwrap();
    let ino = f.metadata().unwrap().ino();
    fs::remove_file(c.path("n1", "victim")).unwrap();
    assert!(within(300, || !c.path("n2", "victim").exists()));
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, data, "open file lost its data after unlink elsewhere");
    // While n2 holds it, the inode is reachable by number on n1.
    let by_ino = c.path("n1", &format!(".migfs/by-inode/{ino}"));
    assert_eq!(
        fs::read(&by_ino).unwrap(),
        data,
        "open by inode of an unlinked file"
    );
    drop(f);
    assert!(
        within(3000, || fs::metadata(&by_ino).is_err()),
        "inode survived its last close"
    );
}

#[test]
fn open_by_inode_follows_renames() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    fs::create_dir(c.path("n1", "a")).unwrap();
    fs::write(c.path("n1", "a/f"), b"content").unwrap();
    let ino = fs::metadata(c.path("n1", "a/f")).unwrap().ino();
    fs::rename(c.path("n1", "a/f"), c.path("n1", "g")).unwrap();
    let p = c.path("n2", &format!(".migfs/by-inode/{ino}"));
    assert_eq!(fs::read(&p).unwrap(), b"content");
    let mut w = fs::OpenOptions::new().append(true).open(&p).unwrap();
    w.write_all(b"+more").unwrap();
    drop(w);
    assert_eq!(fs::read(c.path("n1", "g")).unwrap(), b"content+more");
    assert!(fs::read(c.path("n1", ".migfs/by-inode/999999999")).is_err());
    // The control directory is not listed.
    let names: Vec<_> = fs::read_dir(c.path("n1", ""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!names.iter().any(|n| n == ".migfs"), "{names:?}");
}

#[test]
fn two_nodes_creating_1000_files_each_in_one_dir_lose_none() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    fs::create_dir(c.path("n1", "shared")).unwrap();
    std::thread::scope(|s| {
        for node in ["n1", "n2"] {
            let c = &c;
            s.spawn(move || {
                for i in 0..1000 {
                    fs::write(
                        c.path(node, &format!("shared/{node}-{i:04}")),
                        node.as_bytes(),
                    )
                    .unwrap();
                }
            });
        }
    });
    for node in ["n1", "n2"] {
        let n = fs::read_dir(c.path(node, "shared")).unwrap().count();
        assert_eq!(n, 2000, "{node} lists {n} entries");
    }
    assert_eq!(fs::read(c.path("n1", "shared/n2-0999")).unwrap(), b"n2");
}

/// A python3 lock holder on one node, a try-lock on the other.
fn lock_script(kind: &str, hold: bool) -> String {
    let take = match kind {
        "fcntl" => "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        _ => "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
    };
    if hold {
        format!(
            "import fcntl, time\nf = open('/migfs/lockfile', 'r+')\n{take}\nopen('/migfs/held-{kind}', 'w').close()\ntime.sleep(60)\n"
        )
    } else {
        format!(
            "import fcntl, sys\nf = open('/migfs/lockfile', 'r+')\ntry:\n    {take}\n    print('acquired')\nexcept OSError as e:\n    print('busy', e.errno)\n"
        )
    }
}

#[test]
fn fcntl_and_flock_locks_taken_on_n1_block_n2() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    fs::write(c.path("n1", "lockfile"), b"l").unwrap();
    for kind in ["fcntl", "flock"] {
        let holder = c.spawn_detached("n1", &["python3", "-c", &lock_script(kind, true)]);
        assert!(
            within(10_000, || c.path("n1", &format!("held-{kind}")).exists()),
            "{kind} holder on n1 never took the lock"
        );
        let try_lock = || {
            let o = c.exec("n2", &["python3", "-c", &lock_script(kind, false)]);
            assert!(o.status.success(), "{}", text(&o));
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let out = try_lock();
        assert!(
            out.starts_with("busy"),
            "{kind} lock on n1 did not block n2: {out}"
        );
        c.exec("n1", &["kill", "-9", &holder.to_string()]);
        assert!(
            within(5_000, || try_lock().starts_with("acquired")),
            "{kind} lock not released when its holder died"
        );
    }
}

/// flock(2) and fcntl locks on /migfs follow Linux's rules, across nodes:
/// the two kinds never conflict; a flock belongs to the open file (two
/// opens of one process conflict, a closed duplicate keeps it), an fcntl
/// lock to the process (its opens share it, any close drops it).
#[test]
fn flock_and_fcntl_locks_keep_their_own_rules() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    fs::write(c.path("n1", "lockfile"), b"l").unwrap();
    let holder = c.spawn_detached("n1", &["python3", "-c", &lock_script("flock", true)]);
    assert!(
        within(10_000, || c.path("n1", "held-flock").exists()),
        "flock holder on n1 never took the lock"
    );
    let o = c.exec("n2", &["python3", "-c", &lock_script("fcntl", false)]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "acquired",
        "an fcntl lock on n2 must not conflict with n1's flock: {}",
        text(&o)
    );
    c.exec("n1", &["kill", "-9", &holder.to_string()]);
    let script = r#"
import fcntl, os, subprocess
def other(kind):
    take = {"flock": "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
            "fcntl": "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"}[kind]
    code = ("import fcntl\nf = open('/migfs/rules', 'r+')\ntry:\n    " + take
            + "\n    print('acquired')\nexcept OSError:\n    print('busy')")
    return subprocess.run(["python3", "-c", code], capture_output=True, text=True).stdout.strip()
open('/migfs/rules', 'w').write('x')
a = open('/migfs/rules', 'r+'); b = open('/migfs/rules', 'r+')
fcntl.flock(a, fcntl.LOCK_EX)
try:
    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB); print('flock second open: acquired')
except OSError:
    print('flock second open: busy')
os.close(os.dup(a.fileno()))
print('flock after closing a dup:', other('flock'))
fcntl.flock(a, fcntl.LOCK_UN)
print('flock after unlock:', other('flock'))
fcntl.lockf(a, fcntl.LOCK_EX)
fcntl.lockf(b, fcntl.LOCK_EX | fcntl.LOCK_NB); print('fcntl second open: acquired')
print('fcntl held:', other('fcntl'))
os.close(os.dup(a.fileno()))
print('fcntl after closing a dup:', other('fcntl'))
"#;
    let out = c.exec_ok("n1", &["python3", "-c", script]);
    assert_eq!(
        out.trim(),
        "flock second open: busy\n\
         flock after closing a dup: busy\n\
         flock after unlock: acquired\n\
         fcntl second open: acquired\n\
         fcntl held: busy\n\
         fcntl after closing a dup: acquired",
        "{out}"
    );
}

/// A file appended on n1 without pause (never closed, so published only
/// by the periodic publish) and read on n2 meanwhile: n2 never sees a size
/// ahead of the data (no zeros), and at the end every line is there once.
#[test]
fn reader_on_n2_never_sees_zeros_while_n1_appends() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let path = c.path("n1", "log.txt");
    let mut w = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let writer = std::thread::spawn(move || {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(4);
        let mut i = 0u64;
        while std::time::Instant::now() < end {
            w.write_all(format!("{i}\n").as_bytes()).unwrap();
            i += 1;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        i
    });
    let mut at = 0u64;
    let mut reads = 0;
    while !writer.is_finished() {
        let mut f = fs::File::open(c.path("n2", "log.txt")).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        assert!(
            !buf.contains(&0),
            "n2 read zeros at {at}: {:?}",
            String::from_utf8_lossy(&buf)
        );
        at += buf.len() as u64;
        reads += usize::from(!buf.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let n = writer.join().unwrap();
    assert!(reads > 1, "n2 saw nothing while n1 wrote");
    let want: String = (0..n).map(|i| format!("{i}\n")).collect();
    assert_eq!(fs::read_to_string(c.path("n2", "log.txt")).unwrap(), want);
}

#[test]
fn names_made_on_n2_are_seen_in_a_directory_n1_made_and_knows() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    // n1 made "d", so it knows every name in it and answers misses itself;
    // n2's changes must still show on n1 at once.
    fs::create_dir(c.path("n1", "d")).unwrap();
    fs::write(c.path("n1", "d/a"), b"1").unwrap();
    assert!(!c.path("n1", "d/b").exists());
    fs::write(c.path("n2", "d/b"), b"2").unwrap();
    assert!(
        within(300, || c.path("n1", "d/b").exists()),
        "n1 does not see the name n2 made"
    );
    assert_eq!(fs::read(c.path("n1", "d/b")).unwrap(), b"2");
    fs::remove_file(c.path("n2", "d/a")).unwrap();
    assert!(
        within(300, || !c.path("n1", "d/a").exists()),
        "n1 still sees the name n2 removed"
    );
    fs::write(c.path("n1", "d/a"), b"3").unwrap();
    assert_eq!(fs::read(c.path("n2", "d/a")).unwrap(), b"3");
    // And its own changes, in a directory it made.
    fs::create_dir(c.path("n1", "d/e")).unwrap();
    fs::rename(c.path("n1", "d/b"), c.path("n1", "d/e/b")).unwrap();
    assert!(!c.path("n1", "d/b").exists() && c.path("n1", "d/e/b").exists());
    fs::remove_dir(c.path("n1", "d/e")).unwrap_err();
    let mut names: Vec<_> = fs::read_dir(c.path("n2", "d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "e"]);
}

#[test]
fn o_creat_of_the_same_names_on_both_nodes_at_once_never_fails() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    // Fresh directories made by n1 (which then answers misses in them
    // itself) and names both nodes open with O_CREAT in step: whichever
    // loses the race to create a name must open the other's file.
    for round in 0..10 {
        fs::create_dir(c.path("n1", &format!("r{round}"))).unwrap();
        std::thread::scope(|s| {
            for node in ["n1", "n2"] {
                let c = &c;
                s.spawn(move || {
                    for i in 0..50 {
                        let p = c.path(node, &format!("r{round}/f{i}"));
                        fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&p)
                            .unwrap_or_else(|e| panic!("{node}: open(O_CREAT) {p:?}: {e}"));
                    }
                });
            }
        });
        let n = fs::read_dir(c.path("n2", &format!("r{round}")))
            .unwrap()
            .count();
        assert_eq!(n, 50);
    }
}
