//! The vDSO block: `[vvar]`, `[vvar_vclock]` (6.13+) and `[vdso]`,
//! adjacent. Never hard-code names or sizes: every `[vvar*]` mapping
//! directly before `[vdso]` belongs to the block.
//!
//! A restored process needs the block at exactly its old address (glibc
//! caches the entry points) and the same vDSO text; the restore maps a
//! fresh block with `arch_prctl(ARCH_MAP_VDSO_64, start)` (3.16, needs
//! CONFIG_CHECKPOINT_RESTORE), which places the vvar pages first.

use nix::unistd::Pid;

use super::procfs::MapEntry;

/// Where the block lies and what it is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdsoBlock {
    /// First address of the block (the first `[vvar*]` mapping).
    pub start: u64,
    /// One past its end.
    pub end: u64,
    /// The `[vdso]` text.
    pub vdso_start: u64,
    /// One past the `[vdso]` text.
    pub vdso_end: u64,
    /// Each mapping's name and offset range relative to `start`.
    pub parts: Vec<(String, u64, u64)>,
}

impl VdsoBlock {
    /// Whether `other` has the same parts at the same relative offsets.
    pub fn same_shape(&self, other: &VdsoBlock) -> bool {
        self.parts == other.parts
    }
}

/// Whether a maps entry belongs to the vDSO block.
pub fn is_vdso_part(e: &MapEntry) -> bool {
    e.path == "[vdso]" || e.path.starts_with("[vvar")
}

/// Finds the block in a maps listing; `None` when there is no `[vdso]`.
pub fn find(maps: &[MapEntry]) -> Option<VdsoBlock> {
    let vi = maps.iter().position(|e| e.path == "[vdso]")?;
    let mut first = vi;
    while first > 0
        && maps[first - 1].path.starts_with("[vvar")
        && maps[first - 1].end == maps[first].start
    {
        first -= 1;
    }
    let start = maps[first].start;
    let parts = maps[first..=vi]
        .iter()
        .map(|e| (e.path.clone(), e.start - start, e.end - start))
        .collect();
    Some(VdsoBlock {
        start,
        end: maps[vi].end,
        vdso_start: maps[vi].start,
        vdso_end: maps[vi].end,
        parts,
    })
}

/// blake3 of the `[vdso]` text of `pid`.
pub fn text_hash(pid: Pid, block: &VdsoBlock) -> std::io::Result<[u8; 32]> {
    let len = usize::try_from(block.vdso_end - block.vdso_start).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; len];
    super::mem::ProcMem::open(pid, false)?.read(block.vdso_start, &mut buf)?;
    Ok(*blake3::hash(&buf).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_6_18_layout() {
        let lines = [
            "7ffc1000-7ffc2000 rw-p 00000000 00:00 0 [stack]",
            "7ffd0000-7ffd4000 r--p 00000000 00:00 0 [vvar]",
            "7ffd4000-7ffd6000 r--p 00000000 00:00 0 [vvar_vclock]",
            "7ffd6000-7ffd8000 r-xp 00000000 00:00 0 [vdso]",
        ];
        let maps: Vec<MapEntry> = lines.iter().map(|l| MapEntry::parse(l).unwrap()).collect();
        let b = find(&maps).unwrap();
        assert_eq!(
            (b.start, b.end, b.vdso_start),
            (0x7ffd0000, 0x7ffd8000, 0x7ffd6000)
        );
        assert_eq!(b.parts.len(), 3);
        assert_eq!(b.parts[2], ("[vdso]".to_string(), 0x6000, 0x8000));
    }

    #[test]
    fn this_process_has_a_block() {
        let maps = crate::sys::procfs::maps(nix::unistd::getpid()).unwrap();
        let b = find(&maps).expect("a vDSO");
        assert!(b.parts.iter().any(|(n, _, _)| n.starts_with("[vvar")));
        text_hash(nix::unistd::getpid(), &b).unwrap();
    }
}
