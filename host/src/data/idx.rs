//! The IDX format of MNIST and Fashion-MNIST (plain or gzip-compressed).
//!
//! A file is a big-endian header — two zero bytes, a type byte (0x08: unsigned bytes), the
//! number of dimensions — then one big-endian `u32` per dimension, then the data.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
    /// The data, row-major.
    pub data: Vec<u8>,
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| {
                format!(
                    "{} is a corrupt or truncated gzip file; download it again",
                    path.display()
                )
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes; `what` names the source in errors.
pub fn parse(bytes: &[u8], what: &str) -> Result<IdxArray> {
    ensure!(
        bytes.len() >= 4,
        "{what}: truncated IDX file ({} bytes, no header); download it again",
        bytes.len()
    );
    if bytes[0] != 0 || bytes[1] != 0 {
        bail!("{what}: not an IDX file (bad magic number); expected MNIST-style *-ubyte files");
    }
    ensure!(
        bytes[2] == 0x08,
        "{what}: IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
        bytes[2]
    );
    let ndim = usize::from(bytes[3]);
    ensure!(
        (1..=4).contains(&ndim),
        "{what}: IDX file with {ndim} dimensions is not supported"
    );
    let header = 4 + 4 * ndim;
    ensure!(
        bytes.len() >= header,
        "{what}: truncated IDX header; download the file again"
    );
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let expected = expected.with_context(|| format!("{what}: IDX dimensions {dims:?} overflow"))?;
    let found = bytes.len() - header;
    ensure!(
        found == expected,
        "{what}: {} IDX file: dimensions {dims:?} need {expected} data bytes, found {found}; \
         download the file again",
        if found < expected {
            "truncated"
        } else {
            "oversized"
        }
    );
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file (plain or .gz).
pub fn read(path: &Path) -> Result<IdxArray> {
    parse(&read_maybe_gz(path)?, &path.display().to_string())
}

/// Finds `stem` in `dir` under its usual spellings (`train-images-idx3-ubyte`,
/// `train-images.idx3-ubyte`, each optionally `.gz`).
pub fn find(dir: &Path, stem: &str) -> Option<PathBuf> {
    let dotted = stem.replacen("-idx", ".idx", 1);
    [stem, dotted.as_str()]
        .iter()
        .flat_map(|s| [format!("{s}.gz"), (*s).to_string()])
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Images `[n, rows, cols]` and labels `[n]` from an image file and a label file.
pub fn read_pair(images: &Path, labels: &Path) -> Result<(IdxArray, Vec<u8>)> {
    let img = read(images)?;
    ensure!(
        img.dims.len() == 3,
        "{}: expected 3 dimensions (images, rows, cols), found {:?}",
        images.display(),
        img.dims
    );
    let lab = read(labels)?;
    ensure!(
        lab.dims.len() == 1,
        "{}: expected 1 dimension (labels), found {:?}",
        labels.display(),
        lab.dims
    );
    ensure!(
        img.dims[0] == lab.dims[0],
        "{} holds {} images but {} holds {} labels; the files do not belong together",
        images.display(),
        img.dims[0],
        labels.display(),
        lab.dims[0]
    );
    Ok((img, lab.data))
}

/// Encodes an IDX file of unsigned bytes (for tests and tools).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn round_trip_plain_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let bytes = encode(&[2, 3, 4], &data);
        std::fs::write(dir.path().join("a-idx3-ubyte"), &bytes).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        std::fs::write(dir.path().join("b-idx3-ubyte.gz"), gz.finish().unwrap()).unwrap();
        for stem in ["a-idx3-ubyte", "b-idx3-ubyte"] {
            let arr = read(&find(dir.path(), stem).unwrap()).unwrap();
            assert_eq!(arr.dims, vec![2, 3, 4]);
            assert_eq!(arr.data, data);
        }
        assert!(find(dir.path(), "c-idx3-ubyte").is_none());
    }

    #[test]
    fn truncated_and_corrupt() {
        let bytes = encode(&[2, 2, 2], &[1; 8]);
        let err = parse(&bytes[..10], "f").unwrap_err().to_string();
        assert!(err.contains("truncated IDX header"), "{err}");
        let err = parse(&bytes[..bytes.len() - 1], "f")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("truncated") && err.contains("found 7"),
            "{err}"
        );
        assert!(
            parse(&[1, 2, 3, 4, 5], "f")
                .unwrap_err()
                .to_string()
                .contains("not an IDX")
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gz");
        std::fs::write(&p, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
        let err = format!("{:#}", read(&p).unwrap_err());
        assert!(
            err.contains("corrupt or truncated gzip") && err.contains("x.gz"),
            "{err}"
        );
    }

    #[test]
    fn count_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (i, l) = (dir.path().join("img"), dir.path().join("lab"));
        std::fs::write(&i, encode(&[3, 2, 2], &[0; 12])).unwrap();
        std::fs::write(&l, encode(&[2], &[0; 2])).unwrap();
        let err = read_pair(&i, &l).unwrap_err().to_string();
        assert!(
            err.contains("3 images") && err.contains("2 labels") && err.contains("lab"),
            "{err}"
        );
    }
}
