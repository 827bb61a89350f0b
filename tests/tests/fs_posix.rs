//! POSIX behaviour of a migfs mount, checked by a C probe built with gcc
//! and run inside node n1 of a real 2-node cluster.

mod common;
use common::*;

fn probe(checks: &[&str]) {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let bin = c_prog("fsprobe");
    let mut args = vec![bin.to_str().unwrap(), "/migfs"];
    args.extend_from_slice(checks);
    let o = c.exec("n1", &args);
    assert!(o.status.success(), "fsprobe failed:\n{}", text(&o));
    for ch in checks {
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(&format!("ok {ch}\n")),
            "check {ch} did not report ok:\n{}",
            text(&o)
        );
    }
}

#[test]
fn data_create_write_append_truncate_fallocate_fsync() {
    probe(&["rw", "mmap"]);
}

#[test]
fn namespace_rename_mkdir_rmdir_links_readdir() {
    probe(&["rename", "dirs", "links", "readdir"]);
}

#[test]
fn attributes_permissions_xattrs_and_errors() {
    probe(&["attrs", "perms", "xattr", "errors"]);
}
