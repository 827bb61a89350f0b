//! Choosing a cluster's port: one port, free on every address the cluster
//! uses (127.0.0.10 for the metadata server, 127.0.0.11.. for the nodes),
//! and reserved against other clusters started at the same time.
//!
//! A reservation is a file `<registry>/<port>` naming the cluster dir; it
//! is taken under a lock on the registry and is stale once that dir no
//! longer records a cluster on that port.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};

use super::state::State;

/// Ports are drawn from here: below the usual ephemeral range (32768..),
/// so a client connection does not take a cluster's port by chance.
const RANGE: std::ops::Range<u16> = 20000..32000;
const ATTEMPTS: usize = 500;

/// Where reservations live: /run/migfs/ports, or the temp dir if /run is
/// not writable.
fn registry() -> anyhow::Result<PathBuf> {
    let run = PathBuf::from("/run/migfs/ports");
    if std::fs::create_dir_all(&run).is_ok() {
        return Ok(run);
    }
    let tmp = std::env::temp_dir().join("migfs-ports");
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    Ok(tmp)
}

/// Picks and reserves a port for the cluster in `dir`, free on every one
/// of `addrs`.
pub fn reserve(dir: &Path, addrs: &[Ipv4Addr]) -> anyhow::Result<u16> {
    let reg = registry()?;
    let lock = File::create(reg.join("lock")).context("open the port registry lock")?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("lock the port registry")?;
    let mut seed = random_u64()?;
    for _ in 0..ATTEMPTS {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let span = u64::from(RANGE.end - RANGE.start);
        let port = RANGE.start + u16::try_from((seed >> 33) % span).unwrap_or(0);
        if reserved_by_other(&reg, port, dir) || !free_on_all(port, addrs) {
            continue;
        }
        std::fs::write(
            reg.join(port.to_string()),
            dir.as_os_str().as_encoded_bytes(),
        )
        .context("write the port reservation")?;
        return Ok(port);
    }
    bail!("no port in {RANGE:?} is free on all of {addrs:?}");
}

/// Drops the reservation of `port` if it is held by `dir`.
pub fn release(dir: &Path, port: u16) {
    let Ok(reg) = registry() else { return };
    let path = reg.join(port.to_string());
    if owner(&path).as_deref() == Some(dir) {
        let _ = std::fs::remove_file(path);
    }
}

/// Drops every reservation held by `dir` (when its port is not known).
pub fn release_all(dir: &Path) {
    let Ok(reg) = registry() else { return };
    let Ok(entries) = std::fs::read_dir(&reg) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u16>().is_ok())
            && owner(&e.path()).as_deref() == Some(dir)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn owner(path: &Path) -> Option<PathBuf> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    Some(PathBuf::from(s))
}

/// Whether another cluster dir that still records this port holds it.
fn reserved_by_other(reg: &Path, port: u16, dir: &Path) -> bool {
    let Some(other) = owner(&reg.join(port.to_string())) else {
        return false;
    };
    other != dir
        && State::load(&other)
            .ok()
            .flatten()
            .is_some_and(|s| s.port == port)
}

fn free_on_all(port: u16, addrs: &[Ipv4Addr]) -> bool {
    let held: Result<Vec<TcpListener>, _> = addrs
        .iter()
        .map(|a| TcpListener::bind(SocketAddrV4::new(*a, port)))
        .collect();
    held.is_ok()
}

fn random_u64() -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("read /dev/urandom")?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_holds_while_its_cluster_records_the_port() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let addrs = [Ipv4Addr::new(127, 0, 0, 10), Ipv4Addr::new(127, 0, 0, 11)];
        let pa = reserve(a.path(), &addrs).unwrap();
        assert!(RANGE.contains(&pa));
        assert!(
            free_on_all(pa, &addrs),
            "the port is free until a daemon binds it"
        );
        let reg = registry().unwrap();
        assert!(
            !reserved_by_other(&reg, pa, b.path()),
            "stale: `a` records no cluster yet"
        );
        State::for_test(a.path(), pa).save().unwrap();
        assert!(
            reserved_by_other(&reg, pa, b.path()),
            "live: `a` records port {pa}"
        );
        assert!(
            !reserved_by_other(&reg, pa, a.path()),
            "a cluster does not block itself"
        );
        let _held = TcpListener::bind(SocketAddrV4::new(addrs[1], pa)).unwrap();
        assert!(!free_on_all(pa, &addrs), "bound on one address is not free");
        release(a.path(), pa);
        assert!(!reg.join(pa.to_string()).exists());
    }
}
