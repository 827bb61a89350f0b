//! Test programs (C sources in `tests/progs`, built with gcc once per test
//! binary) and the checks the checkpoint and move tests share: counter
//! files that must hold 0, 1, 2, ... with no gap and no duplicate.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::output_text;

/// A directory for the programs this test process builds,
/// `/tmp/<prefix>-<pid>` (world-readable: some tests run them as another
/// user). A static is never dropped, so it cannot remove its directory
/// when the process ends; instead the first call removes those of
/// processes that are gone.
pub fn progs_dir(prefix: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tmp = std::env::temp_dir();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}-{}", std::process::id()));
    // One left by an earlier process that had our PID holds old builds.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("programs directory");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Builds `tests/progs/<name>.c` (`-static` when `static_`) once per test
/// binary; returns the binary.
pub fn prog(name: &str, static_: bool) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir = DIR.get_or_init(|| progs_dir("migfs-test-progs"));
    let out = dir.join(if static_ {
        format!("{name}-static")
    } else {
        name.to_owned()
    });
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !out.exists() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("progs")
            .join(format!("{name}.c"));
        let mut cmd = Command::new("gcc");
        cmd.args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(&src);
        if static_ {
            cmd.arg("-static");
        }
        let o = cmd.output().expect("run gcc");
        assert!(
            o.status.success(),
            "gcc {}:\n{}",
            src.display(),
            output_text(&o)
        );
    }
    out
}

/// The numbers, one per line, in `path`.
pub fn numbers(path: &Path) -> Vec<u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// Whether gcc is here to build the test programs; without it the test
/// is skipped, or fails under `MIGFS_REQUIRE_PRIV=1`.
pub fn have_gcc() -> bool {
    if Command::new("gcc").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("MIGFS_REQUIRE_PRIV").as_deref() != Ok("1"),
        "MIGFS_REQUIRE_PRIV=1 but gcc is missing"
    );
    eprintln!("SKIP: needs gcc");
    false
}

/// Waits up to `ms` for `cond`.
pub fn within(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Waits up to `ms` until `path` holds at least `n` numbers.
pub fn wait_lines(path: &Path, n: usize, ms: u64) {
    assert!(
        within(ms, || numbers(path).len() >= n),
        "{} has {} lines, wanted {n}",
        path.display(),
        numbers(path).len()
    );
}

/// `path` holds 0, 1, 2, ... with no gap and no duplicate.
pub fn assert_sequence(path: &Path) {
    let v = numbers(path);
    for (i, &x) in v.iter().enumerate() {
        assert_eq!(
            x,
            i as u64,
            "{}: line {i} is {x} (gap or duplicate); around: {:?}",
            path.display(),
            &v[i.saturating_sub(3)..(i + 3).min(v.len())]
        );
    }
}

/// `ckpt_shmap`'s log (in `log`) counts 1, 2, 3, ... with no jump, and
/// the file it maps (`map`) holds the last value in its first word.
pub fn assert_shared_counter(log: &Path, map: &Path) {
    let v = numbers(log);
    for (i, &x) in v.iter().enumerate() {
        assert_eq!(
            x,
            i as u64 + 1,
            "the counter in the shared page jumped at line {i}"
        );
    }
    let word = fs::read(map).expect("the mapped file");
    let in_file = u64::from_ne_bytes(word[..8].try_into().expect("8 bytes"));
    // The program increments the word and then logs it, so a stop that
    // falls between the two leaves the file one ahead of the log.
    let last = v.last().copied().expect("the log has lines");
    assert!(
        in_file == last || in_file == last + 1,
        "the file does not see the writes through the mapping: it holds {in_file}, the log ends at {last}"
    );
}
