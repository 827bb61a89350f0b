//! The xsave area as `PTRACE_GETREGSET NT_X86_XSTATE` returns it. Bytes
//! 464..512 of the legacy area are the kernel's software-reserved bytes
//! (`struct _fpx_sw_bytes`); they carry the xfeatures mask (XCR0) the
//! layout was made for. A state taken on one CPU can be loaded on another
//! only when both masks and sizes are equal.

/// `FP_XSTATE_MAGIC1`.
const MAGIC1: u32 = 0x4650_5853;

/// The xfeatures mask of an xsave buffer, if the software bytes are there.
pub fn xfeatures(xsave: &[u8]) -> Option<u64> {
    let sw = xsave.get(464..512)?;
    let magic = u32::from_ne_bytes(sw[0..4].try_into().ok()?);
    (magic == MAGIC1).then(|| u64::from_ne_bytes(sw[8..16].try_into().unwrap_or([0; 8])))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_mask() {
        let mut b = vec![0u8; 1024];
        b[464..468].copy_from_slice(&super::MAGIC1.to_ne_bytes());
        b[472..480].copy_from_slice(&0x2e7u64.to_ne_bytes());
        assert_eq!(super::xfeatures(&b), Some(0x2e7));
        assert_eq!(super::xfeatures(&b[..100]), None);
    }
}
