//! The page channel's framing ([`super::wire`]): fixed little-endian
//! headers, then raw page bytes. No protobuf for page data.
//!
//! ```text
//! target -> source  Hello    magic u32 | version u16 | kind u16 | move u64 | token [16]
//! source -> target  Welcome  magic u32 | status u32 (0: accepted)
//! fetch connection (request/reply, any number of times):
//!   target -> source  Fetch  addr u64 | len u32 | 0 u32
//!   source -> target  Frame(Run, addr, len) + len bytes, or Frame(Error) + message
//! bulk connection (once):
//!   target -> source  Pull   count u32 | 0 u32 | 0 u64, then count x (start u64 | end u64)
//!   source -> target  Frame(Run) + bytes ... then Frame(End, addr = bytes sent)
//!                     or Frame(Error) + message
//! ```
//!
//! Every length read off the wire is bounded ([`MAX_RUN`], [`MAX_RANGES`])
//! before anything is allocated for it.

/// "MGPW", little-endian.
pub const MAGIC: u32 = 0x5750_474d;
/// Version of this framing.
pub const VERSION: u16 = 1;
/// Largest run of page bytes in one frame.
pub const MAX_RUN: u32 = 16 << 20;
/// Most ranges a pull may name.
pub const MAX_RANGES: u32 = 1 << 20;
/// Bytes of a [`Hello`].
pub const HELLO_LEN: usize = 32;
/// Bytes of a welcome, a fetch request, a frame header, a pull header.
pub const HEADER_LEN: usize = 16;
/// Bytes of a welcome.
pub const WELCOME_LEN: usize = 8;
/// Bytes of the per-move secret.
pub const TOKEN_LEN: usize = 16;

/// The per-move secret a target presents (random, sent to it in the
/// authenticated Receive stream).
pub type Token = [u8; TOKEN_LEN];

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Demand fetches: request, reply, repeated.
    Fetch,
    /// One pull of every present page (the background push, eager).
    Bulk,
    /// Runs the source pushes when it wants (pre-copy rounds), to a
    /// target that connected back.
    Pushed,
}

/// The first bytes on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// What the connection is for.
    pub kind: Kind,
    /// The move whose pages are wanted.
    pub move_id: u64,
    /// Its secret.
    pub token: Token,
}

/// What a source→target frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// `len` page bytes of the original at `addr`.
    Run,
    /// The pull is complete; `addr` holds the bytes sent.
    End,
    /// A `len`-byte UTF-8 message: why the request failed.
    Error,
}

/// A source→target frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What follows.
    pub kind: FrameKind,
    /// Bytes after the header.
    pub len: u32,
    /// Address of the run (or bytes sent, for [`FrameKind::End`]).
    pub addr: u64,
}

/// Why bytes off the wire were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not the page channel, or another version of it.
    #[error("not a migfs page channel (magic {magic:#x}, version {version})")]
    Magic {
        /// The magic read.
        magic: u32,
        /// The version read.
        version: u16,
    },
    /// A field out of range.
    #[error("bad {what}: {value}")]
    Field {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

impl Hello {
    /// The wire form.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let kind: u16 = match self.kind {
            Kind::Fetch => 1,
            Kind::Bulk => 2,
            Kind::Pushed => 3,
        };
        b[6..8].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.move_id.to_le_bytes());
        b[16..32].copy_from_slice(&self.token);
        b
    }

    /// Reads the wire form.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, FrameError> {
        let (magic, version) = (u32_at(b, 0), u16_at(b, 4));
        if magic != MAGIC || version != VERSION {
            return Err(FrameError::Magic { magic, version });
        }
        let kind = match u16_at(b, 6) {
            1 => Kind::Fetch,
            2 => Kind::Bulk,
            3 => Kind::Pushed,
            k => {
                return Err(FrameError::Field {
                    what: "connection kind",
                    value: u64::from(k),
                });
            }
        };
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&b[16..32]);
        Ok(Hello {
            kind,
            move_id: u64_at(b, 8),
            token,
        })
    }
}

/// The source's answer to a hello: accepted (status 0) or not.
pub fn welcome(status: u32) -> [u8; WELCOME_LEN] {
    let mut b = [0u8; WELCOME_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&status.to_le_bytes());
    b
}

/// The status of a welcome.
pub fn decode_welcome(b: &[u8; WELCOME_LEN]) -> Result<u32, FrameError> {
    let magic = u32_at(b, 0);
    if magic != MAGIC {
        return Err(FrameError::Magic { magic, version: 0 });
    }
    Ok(u32_at(b, 4))
}

/// A fetch request: `len` bytes at `addr`.
pub fn fetch(addr: u64, len: u32) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b
}

/// Reads a fetch request; the length is at most [`MAX_RUN`], not zero.
pub fn decode_fetch(b: &[u8; HEADER_LEN]) -> Result<(u64, u32), FrameError> {
    let (addr, len) = (u64_at(b, 0), u32_at(b, 8));
    if len == 0 || len > MAX_RUN {
        return Err(FrameError::Field {
            what: "fetch length",
            value: u64::from(len),
        });
    }
    Ok((addr, len))
}

impl Frame {
    /// The wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.encode_into(&mut b);
        b
    }

    /// Writes the wire form into the first [`HEADER_LEN`] bytes of `b`.
    pub fn encode_into(&self, b: &mut [u8]) {
        let kind: u32 = match self.kind {
            FrameKind::Run => 1,
            FrameKind::End => 2,
            FrameKind::Error => 3,
        };
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
    }

    /// Reads a header; the length is at most [`MAX_RUN`] (an end frame
    /// carries none).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Frame, FrameError> {
        let kind = match u32_at(b, 0) {
            1 => FrameKind::Run,
            2 => FrameKind::End,
            3 => FrameKind::Error,
            k => {
                return Err(FrameError::Field {
                    what: "frame kind",
                    value: u64::from(k),
                });
            }
        };
        let len = u32_at(b, 4);
        if len > MAX_RUN || (kind == FrameKind::End && len != 0) {
            return Err(FrameError::Field {
                what: "frame length",
                value: u64::from(len),
            });
        }
        Ok(Frame {
            kind,
            len,
            addr: u64_at(b, 8),
        })
    }
}

/// A pull request naming `only` (empty: every present page).
pub fn pull(only: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + only.len() * 16);
    let n = u32::try_from(only.len()).unwrap_or(u32::MAX);
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    for &(s, e) in only {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&e.to_le_bytes());
    }
    b
}

/// The number of ranges a pull header announces (at most [`MAX_RANGES`]).
pub fn decode_pull(b: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let n = u32_at(b, 0);
    if n > MAX_RANGES {
        return Err(FrameError::Field {
            what: "pull ranges",
            value: u64::from(n),
        });
    }
    let n = usize::try_from(n).map_err(|_| FrameError::Field {
        what: "pull ranges",
        value: u64::from(n),
    })?;
    Ok(n)
}

/// The ranges after a pull header (`16 * count` bytes); each must be
/// non-empty.
pub fn decode_ranges(b: &[u8]) -> Result<Vec<(u64, u64)>, FrameError> {
    b.chunks_exact(16)
        .map(|c| {
            let (s, e) = (u64_at(c, 0), u64_at(c, 8));
            if s >= e {
                return Err(FrameError::Field {
                    what: "pull range start",
                    value: s,
                });
            }
            Ok((s, e))
        })
        .collect()
}

/// Whether two tokens are equal, in time independent of where they differ.
pub fn same_token(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_checks_magic_version_kind() {
        let h = Hello {
            kind: Kind::Bulk,
            move_id: 0x0102_0304_0506_0708,
            token: [7; TOKEN_LEN],
        };
        let b = h.encode();
        assert_eq!(&b[0..4], b"MGPW");
        assert_eq!(Hello::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(Hello::decode(&bad), Err(FrameError::Magic { .. })));
        let mut bad = b;
        bad[4] = 9;
        assert_eq!(
            Hello::decode(&bad),
            Err(FrameError::Magic {
                magic: MAGIC,
                version: 9
            })
        );
        let mut bad = b;
        bad[6] = 4;
        assert!(matches!(
            Hello::decode(&bad),
            Err(FrameError::Field {
                what: "connection kind",
                ..
            })
        ));
    }

    #[test]
    fn frames_round_trip_and_lengths_are_bounded() {
        for f in [
            Frame {
                kind: FrameKind::Run,
                len: 4096,
                addr: 0x7fff_0000_1000,
            },
            Frame {
                kind: FrameKind::End,
                len: 0,
                addr: 1 << 33,
            },
            Frame {
                kind: FrameKind::Error,
                len: 12,
                addr: 0,
            },
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        let big = Frame {
            kind: FrameKind::Run,
            len: MAX_RUN + 1,
            addr: 0,
        };
        assert!(Frame::decode(&big.encode()).is_err());
        let end_with_data = Frame {
            kind: FrameKind::End,
            len: 1,
            addr: 0,
        };
        assert!(Frame::decode(&end_with_data.encode()).is_err());
        let mut b = big.encode();
        b[0] = 9;
        assert!(Frame::decode(&b).is_err());
    }

    #[test]
    fn fetch_requests_round_trip_and_refuse_empty_or_huge() {
        assert_eq!(decode_fetch(&fetch(0x1000, 65536)), Ok((0x1000, 65536)));
        assert!(decode_fetch(&fetch(0x1000, 0)).is_err());
        assert!(decode_fetch(&fetch(0x1000, MAX_RUN + 1)).is_err());
    }

    #[test]
    fn pulls_round_trip_and_refuse_bad_ranges() {
        let only = [(0x1000, 0x3000), (0x9000, 0xa000)];
        let b = pull(&only);
        let head: [u8; HEADER_LEN] = b[..HEADER_LEN].try_into().unwrap();
        assert_eq!(decode_pull(&head), Ok(2));
        assert_eq!(decode_ranges(&b[HEADER_LEN..]), Ok(only.to_vec()));
        assert_eq!(decode_pull(&pull(&[])[..].try_into().unwrap()), Ok(0));
        assert!(decode_ranges(&pull(&[(5, 5)])[HEADER_LEN..]).is_err());
        let mut huge = [0u8; HEADER_LEN];
        huge[0..4].copy_from_slice(&(MAX_RANGES + 1).to_le_bytes());
        assert!(decode_pull(&huge).is_err());
    }

    #[test]
    fn welcome_and_tokens() {
        assert_eq!(decode_welcome(&welcome(0)), Ok(0));
        assert_eq!(decode_welcome(&welcome(3)), Ok(3));
        assert!(decode_welcome(&[0; WELCOME_LEN]).is_err());
        assert!(same_token(&[1; TOKEN_LEN], &[1; TOKEN_LEN]));
        let mut t = [1; TOKEN_LEN];
        t[15] = 2;
        assert!(!same_token(&[1; TOKEN_LEN], &t));
    }
}
