//! Delegated directories across nodes: what a node answers itself must be
//! exactly what every other node sees, at once, and must survive what the
//! synchronous path survives (docs/filesystem.md "Delegated directories").

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use migfs_e2e::{Cluster, require_priv};

// errno values (Linux).
const EEXIST: i32 = 17;
const ENOTEMPTY: i32 = 39;

fn stat_of(c: &Cluster, node: &str, key: &str) -> u64 {
    let s = fs::read_to_string(c.path(node, ".migfs/stats")).unwrap();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {key} in stats:\n{s}"))
}

/// Makes `dir` on `node` and creates files in it until the node holds its
/// delegation (the server grants none in its first seconds).
fn delegated_dir(c: &Cluster, node: &str, dir: &str) {
    fs::create_dir(c.path(node, dir)).unwrap();
    let before = stat_of(c, node, "delegations_granted");
    let t = Instant::now();
    for i in 0.. {
        fs::write(c.path(node, &format!("{dir}/probe{i}")), b"p").unwrap();
        if stat_of(c, node, "delegations_granted") > before {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{node} was never granted {dir}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names(c: &Cluster, node: &str, dir: &str) -> HashSet<String> {
    fs::read_dir(c.path(node, dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn create_excl(c: &Cluster, node: &str, rel: &str) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(c.path(node, rel))
}

#[test]
fn creates_and_removals_answered_by_n1_are_what_n2_sees() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    delegated_dir(&c, "n1", "d");
    let answered = stat_of(&c, "n1", "dirops_answered");
    let mut want: HashSet<String> = names(&c, "n1", "d");
    for i in 0..300 {
        let name = format!("f{i:03}");
        let mut f = create_excl(&c, "n1", &format!("d/{name}")).unwrap();
        if i % 3 == 0 {
            std::io::Write::write_all(&mut f, name.as_bytes()).unwrap();
        }
        want.insert(name);
    }
    for i in (0..300).step_by(7) {
        let name = format!("f{i:03}");
        fs::remove_file(c.path("n1", &format!("d/{name}"))).unwrap();
        want.remove(&name);
    }
    // A name removed and made again in the same batch.
    fs::write(c.path("n1", "d/f007"), b"again").unwrap();
    want.insert("f007".into());
    assert!(
        stat_of(&c, "n1", "dirops_answered") >= answered + 300,
        "n1 did not answer the creates itself"
    );
    assert_eq!(stat_of(&c, "n1", "delegations_held"), 1);
    // n2 looks: the delegation is recalled first, so it sees everything.
    assert_eq!(names(&c, "n2", "d"), want, "n2's listing");
    assert_eq!(fs::read(c.path("n2", "d/f003")).unwrap(), b"f003");
    assert_eq!(fs::read(c.path("n2", "d/f007")).unwrap(), b"again");
    assert!(
        fs::metadata(c.path("n2", "d/f014")).is_err(),
        "f014 was removed"
    );
    let m = fs::metadata(c.path("n2", "d/f001")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
        0o640
    );
    assert_eq!(stat_of(&c, "n1", "delegations_held"), 0, "not given back");
    assert_eq!(stat_of(&c, "n1", "dirops_refused"), 0);
    // The same inode numbers on both nodes.
    for n in ["f001", "f002", "f299"] {
        let p = |node| fs::metadata(c.path(node, &format!("d/{n}"))).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&p("n1")),
            std::os::unix::fs::MetadataExt::ino(&p("n2"))
        );
    }
    // n2 cannot remove the directory while it has names, even ones n1
    // had only queued.
    delegated_dir(&c, "n1", "e");
    create_excl(&c, "n1", "e/late").unwrap();
    let err = fs::remove_dir(c.path("n2", "e")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(ENOTEMPTY), "{err}");
    assert!(c.path("n2", "e/late").exists());
}

#[test]
fn o_excl_in_a_delegated_dir_lets_exactly_one_node_win_each_name() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    delegated_dir(&c, "n1", "x");
    let won: Vec<Vec<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = ["n1", "n2"]
            .into_iter()
            .map(|node| {
                let c = &c;
                s.spawn(move || {
                    let mut won = Vec::new();
                    for i in 0..300 {
                        let name = format!("n{i:03}");
                        match create_excl(c, node, &format!("x/{name}")) {
                            Ok(mut f) => {
                                std::io::Write::write_all(&mut f, node.as_bytes()).unwrap();
                                won.push(name);
                            }
                            Err(e) if e.raw_os_error() == Some(EEXIST) => {}
                            Err(e) => panic!("{node}: create {name}: {e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (a, b): (HashSet<_>, HashSet<_>) = (
        won[0].iter().cloned().collect(),
        won[1].iter().cloned().collect(),
    );
    assert!(
        a.is_disjoint(&b),
        "both nodes created {:?}",
        a.intersection(&b)
    );
    assert_eq!(a.len() + b.len(), 300, "names nobody created");
    for (node, mine) in [("n1", &a), ("n2", &b)] {
        for n in mine.iter().take(20) {
            for reader in ["n1", "n2"] {
                assert_eq!(
                    fs::read(c.path(reader, &format!("x/{n}"))).unwrap(),
                    node.as_bytes(),
                    "{reader} reads x/{n}"
                );
            }
        }
    }
    let listed = names(&c, "n2", "x");
    assert_eq!(listed.iter().filter(|n| n.starts_with('n')).count(), 300);
    assert_eq!(stat_of(&c, "n1", "dirops_refused"), 0);
}

#[test]
fn fsync_makes_delegated_creates_survive_kill_9_of_the_metadata_server() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    delegated_dir(&c, "n1", "k");
    for i in 0..100 {
        fs::write(c.path("n1", &format!("k/f{i}")), format!("{i}")).unwrap();
    }
    let f = fs::File::create(c.path("n1", "k/last")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    c.kill("meta");
    c.start("meta");
    let got = names(&c, "n2", "k");
    for i in 0..100 {
        assert!(got.contains(&format!("f{i}")), "f{i} lost: {got:?}");
    }
    assert!(got.contains("last"));
    assert_eq!(fs::read(c.path("n2", "k/f42")).unwrap(), b"42");
}

#[test]
fn a_holder_killed_with_kill_9_does_not_hold_up_the_other_node() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    delegated_dir(&c, "n1", "h");
    let f = fs::File::create(c.path("n1", "h/kept")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    c.kill("n1");
    // The holder's watch stream is gone with it: n2 is answered without
    // waiting out the recall.
    let t = Instant::now();
    assert!(names(&c, "n2", "h").contains("kept"));
    create_excl(&c, "n2", "h/after").unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "n2 waited {:?} for a dead holder",
        t.elapsed()
    );
    c.start("n1");
    assert!(c.path("n1", "h/after").exists());
}
