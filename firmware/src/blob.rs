//! The packed model that QEMU's `-device loader,file=F,addr=0x21000000` places in PSRAM at boot.
//!
//! The blob is exactly a packed model ([`nvcim_shared::format`]): it knows its own size (the
//! header's total length at offset 72, CRC included), so no envelope is needed. [`validate`]
//! reads that length, checks it against the memory region (too large: "does not fit", exit 4)
//! and hands the model's bytes to [`Model::parse`] (magic, version, CRC, every field and shape;
//! any failure is a typed [`nvcim_shared::Error`], exit 3).
//!
//! ```
//! use nvcim_firmware::blob::validate;
//! let mut psram = vec![0u8; 128];
//! assert!(validate(&psram).is_err()); // nothing loaded: bad magic
//! psram[..8].copy_from_slice(b"NVCIMPK\0");
//! psram[8] = 1;
//! psram[72..76].copy_from_slice(&(1u32 << 30).to_le_bytes());
//! assert!(validate(&psram).unwrap_err().is_too_large());
//! ```

use core::fmt;

use nvcim_shared::format::{HEADER_LEN, MAGIC, Model};

/// Offset of the header's `u32` total length (CRC included).
pub const TOTAL_LEN_AT: usize = 72;

/// Why a blob was rejected.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum BlobError {
    /// The header claims more bytes than the memory region holds.
    TooLarge {
        /// Bytes the model needs.
        needed: u64,
        /// Bytes available.
        available: usize,
    },
    /// The packed-model parser rejected it (magic, version, CRC, a field or a shape).
    Invalid(nvcim_shared::Error),
}

impl BlobError {
    /// Whether this is a "does not fit in memory" failure rather than a corrupt blob.
    pub fn is_too_large(&self) -> bool {
        matches!(self, BlobError::TooLarge { .. })
    }
}

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobError::TooLarge { needed, available } => {
                write!(f, "model needs {needed} bytes, PSRAM holds {available}")
            }
            BlobError::Invalid(nvcim_shared::Error::BadMagic) => write!(
                f,
                "{} (was a packed model loaded at 0x21000000?)",
                nvcim_shared::Error::BadMagic
            ),
            BlobError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for BlobError {}

/// The model's length in bytes as its header states it, if `memory` starts with a packed
/// model's magic; `None` otherwise (then [`validate`] reports the parser's error).
pub fn declared_len(memory: &[u8]) -> Option<usize> {
    let head = memory.get(..HEADER_LEN)?;
    if head[..8] != MAGIC {
        return None;
    }
    let b = &head[TOTAL_LEN_AT..TOTAL_LEN_AT + 4];
    usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok()
}

/// Validates the packed model at the start of `memory` (the whole PSRAM region).
pub fn validate(memory: &[u8]) -> Result<Model<'_>, BlobError> {
    let bytes = match declared_len(memory) {
        Some(len) => memory.get(..len).ok_or(BlobError::TooLarge {
            needed: len as u64,
            available: memory.len(),
        })?,
        // No magic (or too short for a header): let the parser name the problem.
        None => memory.get(..HEADER_LEN + 4).unwrap_or(memory),
    };
    Model::parse(bytes).map_err(BlobError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmodel;

    #[test]
    fn a_packed_model_parses_in_a_larger_region() {
        let blob = testmodel::small(16);
        let mut psram = blob.clone();
        psram.resize(blob.len() + 4096, 0xa5);
        let model = validate(&psram).unwrap();
        assert_eq!(model.bytes().len(), blob.len());
        assert_eq!(model.test_len(), 16);
        assert_eq!(declared_len(&psram), Some(blob.len()));
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let blob = testmodel::small(4);
        let mut psram = blob.clone();
        psram.resize(blob.len() + 64, 0);
        for i in 0..blob.len() {
            let mut bad = psram.clone();
            bad[i] ^= 0x10;
            assert!(validate(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let e = validate(&[0u8; 256]).unwrap_err();
        assert_eq!(e, BlobError::Invalid(nvcim_shared::Error::BadMagic));
        assert!(e.to_string().contains("0x21000000"), "{e}");
        assert!(validate(&[0u8; 3]).is_err());
        let blob = testmodel::small(4);
        assert!(
            validate(&blob[..blob.len() - 1])
                .unwrap_err()
                .is_too_large()
        );
        let mut bad = blob.clone();
        let n = bad.len();
        bad[n - 10] ^= 1;
        assert!(matches!(
            validate(&bad),
            Err(BlobError::Invalid(
                nvcim_shared::Error::ChecksumMismatch { .. }
            ))
        ));
    }
}
