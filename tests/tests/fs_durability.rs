//! Durability, integrity, garbage collection and failure behaviour of the
//! filesystem on a real cluster: kill -9 of daemons, corrupted block
//! copies, an unreachable metadata server.
// Byte patterns are made by truncating wider integers on purpose.
#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn stat_of(c: &Cluster, node: &str, key: &str) -> u64 {
    let s = fs::read_to_string(c.path(node, ".migfs/stats")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {key} in stats:\n{s}"))
}

fn block_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in fs::read_dir(dir.join("blocks"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            out.push(f.path());
        }
    }
    out
}

#[test]
fn fsynced_data_survives_kill_9_of_node_and_metadata_server() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::create_dir(c.path("n1", "dir")).unwrap();
    let mut f = fs::File::create(c.path("n1", "dir/kept")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    for i in 0..50 {
        let mut g = fs::File::create(c.path("n1", &format!("dir/small{i}"))).unwrap();
        g.write_all(format!("{i}").as_bytes()).unwrap();
        g.sync_all().unwrap();
    }
    fs::rename(c.path("n1", "dir/small0"), c.path("n1", "dir/renamed")).unwrap();
    fs::File::open(c.path("n1", "dir"))
        .unwrap()
        .sync_all()
        .unwrap();
    c.kill("meta");
    c.kill("n1");
    std::mem::forget(f);
    c.start("meta");
    c.start("n1");
    for node in ["n1", "n2"] {
        assert_eq!(
            fs::read(c.path(node, "dir/kept")).unwrap(),
            data,
            "{node}: fsynced data lost"
        );
        assert_eq!(fs::read(c.path(node, "dir/renamed")).unwrap(), b"0");
        let names: Vec<_> = fs::read_dir(c.path(node, "dir"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(names.len(), 51, "{node}: {names:?}");
        for p in names {
            fs::metadata(&p)
                .unwrap_or_else(|e| panic!("{node}: dangling entry {}: {e}", p.display()));
        }
    }
}

#[test]
fn unreferenced_blocks_are_collected() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let data: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(c.path("n1", "garbage"), &data).unwrap();
    let before = block_files(&c.data_dir("n1")).len();
    assert!(
        before >= 30,
        "expected the file's blocks on n1, found {before}"
    );
    fs::remove_file(c.path("n1", "garbage")).unwrap();
    let t = Instant::now();
    while block_files(&c.data_dir("n1")).len() > before - 30
        || block_files(&c.data_dir("n2")).len() > before - 30
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "blocks not collected after 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(stat_of(&c, "n1", "blocks_collected") >= 30);
}

#[test]
fn corrupt_copy_is_skipped_reported_and_never_returned() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(c.path("n1", "precious"), &data).unwrap();
    // n2 holds replicas it never read: corrupt them all there.
    let copies = block_files(&c.data_dir("n2"));
    assert!(!copies.is_empty(), "no replicas on n2");
    for p in &copies {
        let mut b = fs::read(p).unwrap();
        b[0] ^= 0xff;
        fs::write(p, b).unwrap();
    }
    assert_eq!(
        fs::read(c.path("n2", "precious")).unwrap(),
        data,
        "n2 did not fall back to n1's copies"
    );
    assert!(
        stat_of(&c, "n2", "corrupt_blocks") >= 1,
        "corruption not counted"
    );
    // With every copy corrupt the read fails instead of returning bad bytes.
    // (Other bytes than above, so no block is shared with "precious".)
    let other: Vec<u8> = (0..500_000u32).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    fs::write(c.path("n1", "doomed"), &other).unwrap();
    let before: std::collections::HashSet<_> = copies.into_iter().collect();
    for node in ["n1", "n2"] {
        for p in block_files(&c.data_dir(node))
            .into_iter()
            .filter(|p| !before.contains(p))
        {
            let mut b = fs::read(&p).unwrap();
            b[1] ^= 0x55;
            fs::write(&p, b).unwrap();
        }
    }
    // n2 never read "doomed" (no pages in its kernel); restarting both
    // nodes empties their memory caches of verified blocks.
    for node in ["n1", "n2"] {
        c.kill(node);
        c.start(node);
    }
    match fs::read(c.path("n2", "doomed")) {
        Ok(d) => panic!("{} bytes of corrupt data were returned", d.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc_eio()), "{e}"),
    }
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn unreachable_metadata_server_gives_eio_in_bounded_time_then_recovers() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up_with_env(2, &[("MIGFS_META_TIMEOUT", "3")]);
    fs::write(c.path("n1", "before"), b"1").unwrap();
    c.kill("meta");
    let t = Instant::now();
    let err = fs::write(c.path("n1", "during"), b"2")
        .expect_err("write succeeded without a metadata server");
    let took = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}: the mount must not hang"
    );
    c.start("meta");
    assert!(
        within(15_000, || fs::write(c.path("n1", "after"), b"3").is_ok()),
        "mount did not recover"
    );
    assert_eq!(fs::read(c.path("n2", "before")).unwrap(), b"1");
}

/// `len` pseudo-random bytes (xorshift from `x`, which moves on).
fn noise(len: usize, x: &mut u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            (*x >> 56) as u8
        })
        .collect()
}

#[test]
fn full_data_disk_gives_enospc_and_corrupts_nothing() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    // Give n1 an 8 MiB data disk (inside its own mount namespace).
    let data = c.data_dir("n1");
    c.kill("n1");
    let o = c.exec(
        "n1",
        &[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=8m",
            "migfs-test-full",
            data.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "mount tmpfs: {}", text(&o));
    c.start("n1");
    let keep: Vec<u8> = (0..200_000u32).map(|i| (i % 239) as u8).collect();
    fs::write(c.path("n1", "keep"), &keep).unwrap();
    // Pseudo-random bytes: no two blocks alike, so nothing deduplicates.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let big = noise(32_000_000, &mut x);
    let mut f = fs::File::create(c.path("n1", "big")).unwrap();
    let err = f
        .write_all(&big)
        .and_then(|()| f.sync_all())
        .expect_err("32 MB fitted on an 8 MiB data disk");
    assert_eq!(err.raw_os_error(), Some(28), "expected ENOSPC, got {err}");
    drop(f);
    fs::remove_file(c.path("n1", "big")).unwrap();
    assert_eq!(
        fs::read(c.path("n1", "keep")).unwrap(),
        keep,
        "existing data damaged"
    );
    assert_eq!(
        fs::read(c.path("n2", "keep")).unwrap(),
        keep,
        "existing data damaged"
    );
    // Rewrites of one file while the disk is full of garbage not yet
    // collected: some fail with ENOSPC, and every one that reports success
    // reads back whole, on both nodes. Every fourth round, before fsync,
    // a child is started (its exec closes a copy of the descriptor, which
    // flushes) and the node's periodic publisher is given time to run: an
    // upload error either of them meets must still reach this fsync.
    let mut ok = 0;
    for round in 0..40u32 {
        let data = noise(2_000_000, &mut x);
        let res = fs::File::create(c.path("n1", "again")).and_then(|mut f| {
            f.write_all(&data)?;
            if round % 4 == 3 {
                std::process::Command::new("true").status()?;
                std::thread::sleep(Duration::from_millis(1700));
            }
            f.sync_all()
        });
        match res {
            Ok(()) => {
                ok += 1;
                for node in ["n1", "n2"] {
                    let got = fs::read(c.path(node, "again")).unwrap();
                    assert!(
                        got == data,
                        "round {round}: {node} read {} bytes, not the {} just written and fsynced",
                        got.len(),
                        data.len()
                    );
                }
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(28), "round {round}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok > 0, "no rewrite ever fitted");
}
