//! The on-disk framing of `image.pb` and the checks every image passes
//! before any of it is used: magic, format version, size limits, the
//! message checksum, and the consistency of what the message says
//! (docs/image-format.md).
//!
//! ```text
//! image.pb:  "MIGFSIMG" | u32 version | u32 0 | u64 len | Image (len bytes) | blake3(Image)
//! pages.img: raw pages; each MemSegment = (vaddr, len, offset, blake3)
//! ```

use std::path::Path;

use migfs_proto::image::{Image, MemSegment};
use prost::Message;

use crate::error::ImageError;
use crate::sys::abi;

/// First bytes of `image.pb`.
pub const MAGIC: [u8; 8] = *b"MIGFSIMG";
/// The format this build writes and reads. Bump on any incompatible
/// change of the message or of the page file.
pub const FORMAT_VERSION: u32 = 1;
/// The message file in an image directory.
pub const IMAGE_FILE: &str = "image.pb";
/// The page file in an image directory.
pub const PAGES_FILE: &str = "pages.img";
/// Header: magic, version, reserved, message length.
pub const HEADER_LEN: usize = 24;
/// Trailer: blake3 of the message.
pub const TRAILER_LEN: usize = 32;

/// Largest message accepted.
pub const MAX_MESSAGE: u64 = 64 << 20;
/// Largest memory segment, the unit of checksumming: small enough to be
/// checked in a cache-resident buffer just before it is written into the
/// process.
pub const MAX_SEGMENT: u64 = 1 << 20;
/// Most threads accepted.
pub const MAX_THREADS: usize = 16 << 10;
/// Largest xsave area accepted.
pub const MAX_XSAVE: usize = 64 << 10;
/// Longest path accepted.
pub const MAX_PATH: usize = 4096;
/// Largest auxv accepted.
pub const MAX_AUXV: usize = 1024;
/// Highest user address on x86_64 (4-level paging).
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Frames `img` as the bytes of `image.pb`.
pub fn encode(img: &Image) -> Vec<u8> {
    let body = img.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out
}

/// Checks the framing of `bytes` (read from `path`) and decodes it.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Image, ImageError> {
    let p = || path.to_path_buf();
    if bytes.len() < HEADER_LEN {
        return Err(
            if bytes.starts_with(&MAGIC[..bytes.len().min(8)]) && !bytes.is_empty() {
                ImageError::Truncated {
                    path: p(),
                    what: format!("header is {} of {HEADER_LEN} bytes", bytes.len()),
                }
            } else {
                ImageError::Magic { path: p() }
            },
        );
    }
    if bytes[..8] != MAGIC {
        return Err(ImageError::Magic { path: p() });
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(ImageError::Version {
            path: p(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
    if len > MAX_MESSAGE {
        return Err(ImageError::TooLarge {
            path: p(),
            what: "the message".into(),
            size: len,
            limit: MAX_MESSAGE,
        });
    }
    let len = usize::try_from(len).map_err(|_| ImageError::Invalid {
        path: p(),
        what: "length".into(),
    })?;
    let want = HEADER_LEN + len + TRAILER_LEN;
    if bytes.len() < want {
        return Err(ImageError::Truncated {
            path: p(),
            what: format!("{} of {want} bytes", bytes.len()),
        });
    }
    if bytes.len() > want {
        return Err(ImageError::Invalid {
            path: p(),
            what: format!("{} bytes after the checksum", bytes.len() - want),
        });
    }
    let body = &bytes[HEADER_LEN..HEADER_LEN + len];
    if blake3::hash(body).as_bytes()[..] != bytes[HEADER_LEN + len..] {
        return Err(ImageError::Checksum {
            path: p(),
            what: "the message".into(),
        });
    }
    Image::decode(body).map_err(|source| ImageError::Decode { path: p(), source })
}

/// Checks that the message is consistent and within limits, and that its
/// segments lie inside `pages_size` bytes of page file.
pub fn validate(img: &Image, pages_size: u64, path: &Path) -> Result<(), ImageError> {
    let bad = |what: String| ImageError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    if img.format_version != FORMAT_VERSION {
        return Err(ImageError::Version {
            path: path.to_path_buf(),
            found: img.format_version,
            supported: FORMAT_VERSION,
        });
    }
    if img.arch != std::env::consts::ARCH {
        return Err(bad(format!(
            "architecture {} (this is {})",
            img.arch,
            std::env::consts::ARCH
        )));
    }
    if img.pages_size != pages_size {
        return Err(ImageError::Truncated {
            path: path.with_file_name(PAGES_FILE),
            what: format!("{pages_size} bytes, the image says {}", img.pages_size),
        });
    }
    let proc = img
        .process
        .as_ref()
        .ok_or_else(|| bad("no process".into()))?;
    validate_threads(img, proc.pid).map_err(bad)?;
    validate_memory(img, pages_size).map_err(bad)?;
    validate_files(img).map_err(bad)?;
    for a in &img.sigactions {
        if !(1..=64).contains(&a.signo) || a.signo == 9 || a.signo == 19 {
            return Err(bad(format!("sigaction for signal {}", a.signo)));
        }
    }
    Ok(())
}

fn validate_threads(img: &Image, pid: i32) -> Result<(), String> {
    if img.threads.is_empty() || img.threads.len() > MAX_THREADS {
        return Err(format!("{} threads", img.threads.len()));
    }
    if img.threads[0].tid != pid {
        return Err("the first thread is not the main thread".into());
    }
    for t in &img.threads {
        if t.regs.len() != abi::reg::COUNT {
            return Err(format!("thread {}: {} registers", t.tid, t.regs.len()));
        }
        if t.xsave.len() > MAX_XSAVE || t.xsave.len() < 576 {
            return Err(format!(
                "thread {}: xsave area of {} bytes",
                t.tid,
                t.xsave.len()
            ));
        }
        let pending = t.pending.iter().chain(&img.shared_pending);
        if let Some(s) = pending
            .into_iter()
            .find(|s| s.siginfo.len() != abi::SIGINFO_SIZE || !(1..=64).contains(&s.signo))
        {
            return Err(format!(
                "thread {}: pending signal {} with {} bytes of siginfo",
                t.tid,
                s.signo,
                s.siginfo.len()
            ));
        }
        if t.comm.len() > 16 {
            return Err(format!("thread {}: name of {} bytes", t.tid, t.comm.len()));
        }
    }
    Ok(())
}

fn validate_memory(img: &Image, pages_size: u64) -> Result<(), String> {
    let mm = img.mm.as_ref().ok_or("no memory map")?;
    let page = crate::sys::page_size();
    if mm.page_size != page {
        return Err(format!("page size {} (this system: {page})", mm.page_size));
    }
    if mm.auxv.len() > MAX_AUXV || mm.auxv.len() % 16 != 0 {
        return Err(format!("auxv of {} bytes", mm.auxv.len()));
    }
    let mut prev_end = 0;
    for v in &mm.vmas {
        if v.start % page != 0
            || v.end % page != 0
            || v.start >= v.end
            || v.end > TASK_SIZE
            || v.start < prev_end
        {
            return Err(format!(
                "mapping {:#x}-{:#x} is misaligned, empty, out of range or overlapping",
                v.start, v.end
            ));
        }
        prev_end = v.end;
    }
    let mut prev: Option<&MemSegment> = None;
    for s in &mm.segments {
        let aligned = s.vaddr % page == 0 && s.len % page == 0 && s.offset % page == 0;
        if !aligned || s.len == 0 || s.len > MAX_SEGMENT || s.blake3.len() != 32 {
            return Err(format!(
                "segment at {:#x} (+{:#x}) is misaligned, empty or too large",
                s.vaddr, s.len
            ));
        }
        if s.offset.checked_add(s.len).is_none_or(|e| e > pages_size) {
            return Err(format!(
                "segment at {:#x} lies beyond the end of {PAGES_FILE}",
                s.vaddr
            ));
        }
        if prev.is_some_and(|p| p.vaddr + p.len > s.vaddr) {
            return Err(format!("segment at {:#x} overlaps the one before", s.vaddr));
        }
        let inside = mm
            .vmas
            .iter()
            .any(|v| v.start <= s.vaddr && s.vaddr + s.len <= v.end);
        if !inside {
            return Err(format!(
                "segment at {:#x} (+{:#x}) is outside every mapping",
                s.vaddr, s.len
            ));
        }
        prev = Some(s);
    }
    Ok(())
}

fn validate_files(img: &Image) -> Result<(), String> {
    let mut prev = -1;
    for f in &img.fds {
        if f.fd <= prev {
            return Err(format!("fd {} is out of order", f.fd));
        }
        prev = f.fd;
        if f.dup_of >= f.fd || (f.dup_of >= 0 && !img.fds.iter().any(|o| o.fd == f.dup_of)) {
            return Err(format!(
                "fd {} shares a description with unknown fd {}",
                f.fd, f.dup_of
            ));
        }
        if f.kind == migfs_proto::image::FdKind::FdRelayPipe as i32 {
            if f.file.is_some() || f.dup_of >= 0 {
                return Err(format!("fd {}: a relay pipe names no file", f.fd));
            }
            continue;
        }
        let file = f
            .file
            .as_ref()
            .ok_or_else(|| format!("fd {}: no file", f.fd))?;
        if file.path.len() > MAX_PATH || file.path.as_bytes().contains(&0) {
            return Err(format!("fd {}: bad path", f.fd));
        }
    }
    for l in &img.locks {
        if !img.fds.iter().any(|f| f.fd == l.fd) {
            return Err(format!("lock through unknown fd {}", l.fd));
        }
    }
    Ok(())
}
