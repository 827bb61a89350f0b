//! Memory that moves apart from the image (DESIGN "Migration", steps 2
//! and 7; docs/checkpoint-restore.md "Lazy memory and dirty tracking").
//!
//! - which ranges an image leaves out ("lazy": [`lazy_ranges`]);
//! - [`source`]: the source's reader of a frozen process's memory;
//! - [`lazy`]: the target's userfaultfd handler that fills the lazy ranges
//!   on first touch or by a push; `staged`: its warm staging area, moved
//!   in with `UFFDIO_MOVE`;
//! - [`inside`]: the source's sends from inside the frozen process (one
//!   copy per byte);
//! - [`dirty`]: dirty-page tracking of a running process for pre-copy;
//! - [`ranges`]: the address-range arithmetic they share;
//! - [`rounds`]: when pre-copy rounds stop;
//! - [`image`]: a lazy restore's pages served from an image directory;
//! - [`store`]: pre-copied pages kept on the target until installed;
//! - [`wire`]: the page channel (raw TCP, [`frame`]s) between the
//!   source's page server and the target.

pub mod dirty;
mod fill;
pub mod frame;
pub mod image;
pub mod inside;
pub mod lazy;
pub mod ranges;
pub mod rounds;
pub mod source;
mod staged;
pub mod store;
pub mod wire;

use migfs_proto::image::{Image, VmaKind};

pub use dirty::Tracker;
pub use lazy::{LazyConfig, LazyPages, LazyStats, PageFetch};
pub use source::PageSource;
pub use store::Store;

/// Whether a mapping's pages may be left out of the image and fetched
/// later: private anonymous memory (heap, stack, anonymous mappings) that
/// is accessible. userfaultfd's missing mode covers exactly those.
pub fn is_lazy_kind(kind: i32, shared: bool, prot: u32) -> bool {
    let anon = matches!(
        VmaKind::try_from(kind),
        Ok(VmaKind::VmaAnon | VmaKind::VmaHeap | VmaKind::VmaStack)
    );
    anon && !shared && prot != 0
}

/// The ranges `[start, end)` of an image whose pages are not in it.
pub fn lazy_ranges(img: &Image) -> Vec<(u64, u64)> {
    img.mm
        .iter()
        .flat_map(|m| &m.vmas)
        .filter(|v| v.lazy)
        .map(|v| (v.start, v.end))
        .collect()
}

/// The ranges of a running process's maps that a capture with lazy
/// anonymous memory would leave out of the image: the same
/// classification ([`crate::capture::mm::vma_kind`], [`is_lazy_kind`]).
pub fn lazy_ranges_of_maps(maps: &[crate::sys::procfs::MapEntry]) -> Vec<(u64, u64)> {
    maps.iter()
        .filter(|m| m.path != "[vsyscall]")
        .filter(|m| {
            let kind = crate::capture::mm::vma_kind(m);
            is_lazy_kind(kind as i32, m.shared, m.prot)
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// Splits `(start, end)` runs into runs of at most `max` bytes.
pub fn chunks(runs: &[(u64, u64)], max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in runs {
        let mut at = s;
        while at < e {
            let end = e.min(at + max);
            out.push((at, end));
            at = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_accessible_anonymous_memory_is_lazy() {
        let anon = VmaKind::VmaAnon as i32;
        assert!(is_lazy_kind(anon, false, 3));
        assert!(is_lazy_kind(VmaKind::VmaStack as i32, false, 3));
        assert!(!is_lazy_kind(anon, true, 3));
        assert!(!is_lazy_kind(anon, false, 0));
        assert!(!is_lazy_kind(VmaKind::VmaFile as i32, false, 3));
        assert!(!is_lazy_kind(VmaKind::VmaVdsoBlock as i32, false, 5));
    }

    #[test]
    fn shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<LazyPages>();
        send_sync::<PageSource>();
        send_sync::<Tracker>();
    }

    #[test]
    fn chunks_split_long_runs() {
        assert_eq!(
            chunks(&[(0, 10), (20, 22)], 4),
            vec![(0, 4), (4, 8), (8, 10), (20, 22)]
        );
    }
}
