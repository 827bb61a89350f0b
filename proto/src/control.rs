//! Requests a node answers about the files of its mount, outside the
//! metadata protocol: shared by the FUSE client (`migfs-fs`), which
//! answers them, and the migration code (`migfs-mig`), which asks and never
//! imports the client.
//!
//! [`IOC_FLOCK_HELD`] is an ioctl on any regular file of a migfs mount. It
//! answers which flock(2) lock the *open file* it is called through holds,
//! as a [`FlockHeld`]. migfs keeps locks in its metadata server, so neither
//! `/proc/PID/fdinfo` nor `/proc/locks` lists them; a checkpoint takes the
//! process's open file with `pidfd_getfd` and asks through it.

/// `_IOR('M', 1, [u8; 8])`: the flock(2) lock held through this open file.
pub const IOC_FLOCK_HELD: u32 = ior(b'M', 1, FlockHeld::LEN);

/// The `_IOR` request number of the Linux ioctl encoding (x86-64, arm64):
/// direction "read" (2) in bits 30-31, size in bits 16-29, type and number.
const fn ior(ty: u8, nr: u8, size: usize) -> u32 {
    // The size of an ioctl argument fits in 14 bits by definition.
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    (2 << 30) | (size << 16) | ((ty as u32) << 8) | nr as u32
}

/// Answer to [`IOC_FLOCK_HELD`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlockHeld {
    /// `F_RDLCK` (0, `LOCK_SH`), `F_WRLCK` (1, `LOCK_EX`) or `F_UNLCK` (2,
    /// none).
    pub typ: i32,
    /// The process that took it, as the node's PID namespace numbers it
    /// (0 when none is held).
    pub pid: u32,
}

impl FlockHeld {
    /// Size of the encoded answer.
    pub const LEN: usize = 8;

    /// No flock lock held.
    pub const NONE: FlockHeld = FlockHeld { typ: 2, pid: 0 };

    /// Little-endian `typ` then `pid`.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[..4].copy_from_slice(&self.typ.to_le_bytes());
        b[4..].copy_from_slice(&self.pid.to_le_bytes());
        b
    }

    /// The answer in `b`, or `None` if it is not one.
    pub fn decode(b: &[u8]) -> Option<FlockHeld> {
        let b: &[u8; Self::LEN] = b.try_into().ok()?;
        let typ = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let pid = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        (0..=2).contains(&typ).then_some(FlockHeld { typ, pid })
    }

    /// Whether a lock is held.
    pub fn held(&self) -> bool {
        self.typ != Self::NONE.typ
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_number_is_the_kernels_ior_encoding() {
        // _IOR('M', 1, 8 bytes) as the kernel's <asm-generic/ioctl.h> builds it.
        assert_eq!(IOC_FLOCK_HELD, 0x8008_4d01);
    }

    #[test]
    fn answers_round_trip_and_bad_ones_are_refused() {
        let a = FlockHeld { typ: 1, pid: 42 };
        assert_eq!(FlockHeld::decode(&a.encode()), Some(a));
        assert!(!FlockHeld::NONE.held() && a.held());
        assert_eq!(FlockHeld::decode(&[0; 7]), None);
        assert_eq!(
            FlockHeld::decode(&FlockHeld { typ: 7, pid: 1 }.encode()),
            None
        );
    }
}
