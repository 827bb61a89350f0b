//! Writing and reading image directories. `pages.img` is written first,
//! `image.pb` last through a temporary name and a rename: a directory
//! holding an `image.pb` holds a complete image.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use migfs_proto::image::{Image, MemSegment};

use super::format::{self, IMAGE_FILE, MAX_MESSAGE, PAGES_FILE};
use crate::error::ImageError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Appends memory segments to `pages.img`.
#[derive(Debug)]
pub struct PagesWriter {
    file: File,
    path: PathBuf,
    offset: u64,
}

impl PagesWriter {
    /// Starts an image in `dir` (created if missing); an older image
    /// there stops being valid at once.
    pub fn create(dir: &Path) -> Result<PagesWriter, ImageError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let old = dir.join(IMAGE_FILE);
        match std::fs::remove_file(&old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&old)(e)),
            _ => {}
        }
        let path = dir.join(PAGES_FILE);
        let file = File::create(&path).map_err(io(&path))?;
        Ok(PagesWriter {
            file,
            path,
            offset: 0,
        })
    }

    /// Writes the pages of `[vaddr, vaddr + data.len())` and returns the
    /// segment describing them (with their blake3).
    pub fn segment(
        &mut self,
        vaddr: u64,
        data: &[u8],
        hash: [u8; 32],
    ) -> Result<MemSegment, ImageError> {
        self.file.write_all(data).map_err(io(&self.path))?;
        let seg = MemSegment {
            vaddr,
            len: data.len() as u64,
            offset: self.offset,
            blake3: hash.to_vec(),
        };
        self.offset += data.len() as u64;
        Ok(seg)
    }

    /// Writes the pages of `[vaddr, vaddr + data.len())` over the bytes at
    /// `offset`, an extent no segment names any more (pre-copy: a segment
    /// copied again); returns the segment describing them.
    pub fn segment_at(
        &mut self,
        offset: u64,
        vaddr: u64,
        data: &[u8],
        hash: [u8; 32],
    ) -> Result<MemSegment, ImageError> {
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.offset) {
            return Err(ImageError::Invalid {
                path: self.path.clone(),
                what: format!("rewrite at {offset:#x} (+{len:#x}) beyond the end"),
            });
        }
        self.file
            .write_all_at(data, offset)
            .map_err(io(&self.path))?;
        Ok(MemSegment {
            vaddr,
            len,
            offset,
            blake3: hash.to_vec(),
        })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.offset
    }
}

/// Writes `image.pb` into `dir` (after its pages); returns its size.
pub fn write_image(dir: &Path, img: &Image) -> Result<u64, ImageError> {
    let bytes = format::encode(img);
    let tmp = dir.join(format!("{IMAGE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    drop(f);
    let path = dir.join(IMAGE_FILE);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(bytes.len() as u64)
}

/// An image read and checked from a directory.
pub struct ImageDir {
    /// The message.
    pub image: Image,
    /// The page file.
    pub pages: PagesReader,
}

/// Reads `dir/image.pb`, checks framing, limits and checksum, and
/// validates it against `dir/pages.img`.
pub fn read_image(dir: &Path) -> Result<ImageDir, ImageError> {
    let path = dir.join(IMAGE_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let len = f.metadata().map_err(io(&path))?.len();
    let cap = MAX_MESSAGE + (format::HEADER_LEN + format::TRAILER_LEN) as u64;
    if len > cap {
        return Err(ImageError::TooLarge {
            path,
            what: "the file".into(),
            size: len,
            limit: cap,
        });
    }
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    f.read_exact_at(&mut bytes, 0).map_err(io(&path))?;
    let image = format::decode(&bytes, &path)?;
    let ppath = dir.join(PAGES_FILE);
    let pf = File::open(&ppath).map_err(io(&ppath))?;
    let psize = pf.metadata().map_err(io(&ppath))?.len();
    format::validate(&image, psize, &path)?;
    Ok(ImageDir {
        image,
        pages: PagesReader {
            file: pf,
            path: ppath,
        },
    })
}

/// Reads segments from `pages.img`, checking each against its blake3.
pub struct PagesReader {
    file: File,
    path: PathBuf,
}

impl PagesReader {
    /// A reader of the page file at `path` (no size check: see
    /// [`read_image`]).
    pub fn open(path: &Path) -> Result<PagesReader, ImageError> {
        Ok(PagesReader {
            file: File::open(path).map_err(io(path))?,
            path: path.to_path_buf(),
        })
    }

    /// A second reader of the same file (a lazy restore's page source).
    pub fn try_clone(&self) -> Result<PagesReader, ImageError> {
        Ok(PagesReader {
            file: self.file.try_clone().map_err(io(&self.path))?,
            path: self.path.clone(),
        })
    }

    /// The page file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` with segment `seg` and checks its hash.
    pub fn read(&self, seg: &MemSegment, buf: &mut Vec<u8>) -> Result<(), ImageError> {
        let len = usize::try_from(seg.len).map_err(|_| ImageError::Invalid {
            path: self.path.clone(),
            what: "segment length".into(),
        })?;
        buf.resize(len, 0);
        self.file
            .read_exact_at(buf, seg.offset)
            .map_err(io(&self.path))?;
        if blake3::hash(buf).as_bytes()[..] != seg.blake3[..] {
            return Err(ImageError::Checksum {
                path: self.path.clone(),
                what: format!("the segment at {:#x} (+{:#x})", seg.vaddr, seg.len),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::format::FORMAT_VERSION;
    use migfs_proto::image::{MemoryMap, Process, Thread, Vma};

    fn sample(pages: &mut PagesWriter) -> Image {
        let data = vec![7u8; 8192];
        let seg = pages
            .segment(0x10000, &data, *blake3::hash(&data).as_bytes())
            .unwrap();
        Image {
            format_version: FORMAT_VERSION,
            arch: std::env::consts::ARCH.into(),
            process: Some(Process {
                pid: 42,
                ..Default::default()
            }),
            threads: vec![Thread {
                tid: 42,
                regs: vec![0; 27],
                xsave: vec![0; 1024],
                ..Default::default()
            }],
            mm: Some(MemoryMap {
                page_size: 4096,
                vmas: vec![Vma {
                    start: 0x10000,
                    end: 0x14000,
                    prot: 3,
                    ..Default::default()
                }],
                segments: vec![seg],
                ..Default::default()
            }),
            pages_size: pages.size(),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PagesWriter::create(dir.path()).unwrap();
        let img = sample(&mut w);
        drop(w);
        write_image(dir.path(), &img).unwrap();
        let back = read_image(dir.path()).unwrap();
        assert_eq!(back.image, img);
        let mut buf = Vec::new();
        back.pages
            .read(&img.mm.as_ref().unwrap().segments[0], &mut buf)
            .unwrap();
        assert_eq!(buf, vec![7u8; 8192]);

        let ipath = dir.path().join(IMAGE_FILE);
        let good = std::fs::read(&ipath).unwrap();
        let expect = |bytes: &[u8], want: &str| {
            std::fs::write(&ipath, bytes).unwrap();
            let e = read_image(dir.path()).err().unwrap().to_string();
            assert!(e.contains(want), "{e} should say {want}");
        };
        expect(&good[..good.len() - 5], "truncated");
        expect(&good[..10], "truncated");
        let mut flip = good.clone();
        flip[30] ^= 1;
        expect(&flip, "checksum mismatch in the message");
        let mut v = good.clone();
        v[8] = 9;
        expect(&v, "format version 9 is not supported");
        expect(b"hello world, not an image at all", "bad magic");
        std::fs::write(&ipath, &good).unwrap();

        let ppath = dir.path().join(PAGES_FILE);
        let pages = std::fs::read(&ppath).unwrap();
        std::fs::write(&ppath, &pages[..4096]).unwrap();
        let e = read_image(dir.path()).err().unwrap().to_string();
        assert!(e.contains("pages.img: truncated"), "{e}");
        let mut p = pages.clone();
        p[100] ^= 0xff;
        std::fs::write(&ppath, &p).unwrap();
        let back = read_image(dir.path()).unwrap();
        let e = back
            .pages
            .read(&img.mm.as_ref().unwrap().segments[0], &mut buf)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checksum mismatch in the segment at 0x10000"),
            "{e}"
        );
    }
}
