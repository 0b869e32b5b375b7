//! The blob that QEMU's `-device loader,file=F,addr=0x21000000` places in PSRAM at boot.
//!
//! Until the packed model format of issue 3 lands, the blob is a generic self-describing
//! envelope (all integers little-endian):
//!
//! ```text
//! offset 0  magic    b"NVCB"
//! offset 4  version  u32 (1)
//! offset 8  length   u32, payload bytes
//! offset 12 crc32    u32, CRC-32 (IEEE 802.3, as zlib) of the payload
//! offset 16 payload  `length` bytes
//! ```
//!
//! [`validate`] is the single place where the model parser plugs in: today it checks the
//! envelope and hands back the payload; the packed-model parser will take the payload (or
//! replace the envelope with its own header) and return the parsed model instead.
//!
//! ```
//! use nvcim_firmware::blob::{Header, validate};
//! let payload = b"tiny model";
//! let mut image = Header::for_payload(payload).to_bytes().to_vec();
//! image.extend_from_slice(payload);
//! image.resize(64, 0); // the rest of PSRAM
//! let blob = validate(&image).unwrap();
//! assert_eq!(blob.payload, payload);
//! assert_eq!(blob.bytes_used(), 16 + payload.len());
//! ```

use core::fmt;

/// The envelope's magic bytes.
pub const MAGIC: [u8; 4] = *b"NVCB";
/// The envelope version this firmware reads.
pub const VERSION: u32 = 1;
/// Bytes of the envelope header.
pub const HEADER_LEN: usize = 16;

/// The envelope header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Envelope version.
    pub version: u32,
    /// Payload bytes.
    pub length: u32,
    /// CRC-32 of the payload.
    pub crc32: u32,
}

impl Header {
    /// The header for `payload` (panics only if the payload exceeds 4 GiB, which no model does).
    pub fn for_payload(payload: &[u8]) -> Header {
        let length = u32::try_from(payload.len()).expect("blob payloads are below 4 GiB");
        Header {
            version: VERSION,
            length,
            crc32: crc32(payload),
        }
    }

    /// The 16 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.length.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc32.to_le_bytes());
        b
    }
}

/// A blob that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob<'a> {
    /// Its header.
    pub header: Header,
    /// The payload (the packed model, once issue 3 defines it).
    pub payload: &'a [u8],
}

impl Blob<'_> {
    /// PSRAM bytes the blob occupies, header included.
    pub fn bytes_used(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// Why a blob was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlobError {
    /// The memory does not start with [`MAGIC`] (no blob was loaded, or another format).
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// An envelope version this firmware does not read.
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The header claims more bytes than the memory region holds.
    TooLarge {
        /// Bytes the blob needs, header included.
        needed: u64,
        /// Bytes available.
        available: usize,
    },
    /// The payload's CRC-32 differs from the header's.
    CrcMismatch {
        /// CRC-32 in the header.
        expected: u32,
        /// CRC-32 of the payload as found.
        found: u32,
    },
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
            BlobError::BadMagic { found } => write!(
                f,
                "bad magic {:02x}{:02x}{:02x}{:02x} (expected \"NVCB\"; was a blob loaded at 0x21000000?)",
                found[0], found[1], found[2], found[3]
            ),
            BlobError::UnsupportedVersion { found } => {
                write!(
                    f,
                    "blob version {found}, this firmware reads version {VERSION}"
                )
            }
            BlobError::TooLarge { needed, available } => {
                write!(f, "blob needs {needed} bytes, PSRAM holds {available}")
            }
            BlobError::CrcMismatch { expected, found } => {
                write!(
                    f,
                    "payload CRC-32 {found:08x} differs from the header's {expected:08x}"
                )
            }
        }
    }
}

impl core::error::Error for BlobError {}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Validates the blob at the start of `memory` (the whole PSRAM region).
pub fn validate(memory: &[u8]) -> Result<Blob<'_>, BlobError> {
    let Some(head) = memory.get(..HEADER_LEN) else {
        return Err(BlobError::TooLarge {
            needed: HEADER_LEN as u64,
            available: memory.len(),
        });
    };
    let found = [head[0], head[1], head[2], head[3]];
    if found != MAGIC {
        return Err(BlobError::BadMagic { found });
    }
    let header = Header {
        version: le32(&head[4..]),
        length: le32(&head[8..]),
        crc32: le32(&head[12..]),
    };
    if header.version != VERSION {
        return Err(BlobError::UnsupportedVersion {
            found: header.version,
        });
    }
    let needed = HEADER_LEN as u64 + u64::from(header.length);
    let payload = usize::try_from(needed)
        .ok()
        .and_then(|end| memory.get(HEADER_LEN..end))
        .ok_or(BlobError::TooLarge {
            needed,
            available: memory.len(),
        })?;
    let crc = crc32(payload);
    if crc != header.crc32 {
        return Err(BlobError::CrcMismatch {
            expected: header.crc32,
            found: crc,
        });
    }
    Ok(Blob { header, payload })
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`).
///
/// ```
/// assert_eq!(nvcim_firmware::blob::crc32(b"123456789"), 0xcbf4_3926);
/// ```
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(payload: &[u8], region: usize) -> Vec<u8> {
        let mut v = Header::for_payload(payload).to_bytes().to_vec();
        v.extend_from_slice(payload);
        v.resize(region.max(v.len()), 0);
        v
    }

    #[test]
    fn round_trip() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let img = image(&payload, 4096);
        let blob = validate(&img).unwrap();
        assert_eq!(blob.payload, &payload[..]);
        assert_eq!(blob.bytes_used(), 1016);
        assert_eq!(validate(&image(&[], 16)).unwrap().payload, &[] as &[u8]);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let payload = b"a small payload for the flipped-byte test";
        let img = image(payload, 128);
        for i in 0..HEADER_LEN + payload.len() {
            let mut bad = img.clone();
            bad[i] ^= 0x10;
            assert!(validate(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            validate(&[0u8; 64]),
            Err(BlobError::BadMagic {
                found: [0, 0, 0, 0]
            })
        ));
        assert!(matches!(
            validate(&[0u8; 3]),
            Err(BlobError::TooLarge { .. })
        ));
        let mut v = image(b"xyz", 32);
        v[4] = 2;
        assert_eq!(
            validate(&v),
            Err(BlobError::UnsupportedVersion { found: 2 })
        );
        let mut v = image(b"xyz", 32);
        v[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = validate(&v).unwrap_err();
        assert!(e.is_too_large(), "{e}");
        let mut v = image(b"xyz", 32);
        v[16] ^= 1;
        assert!(matches!(validate(&v), Err(BlobError::CrcMismatch { .. })));
    }
}
