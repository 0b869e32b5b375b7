//! The CIFAR-10 and CIFAR-100 binary formats.
//!
//! CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` and
//! `test_batch.bin`, records of 1 label byte + 3072 image bytes (3 x 32 x 32, channel-major).
//! CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`, records of a coarse and a fine
//! label byte + 3072 image bytes; nvcim uses the fine (100-class) label.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// Bytes of one CIFAR image.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which CIFAR variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// 10 classes, one label byte.
    Cifar10,
    /// 100 classes, coarse and fine label bytes.
    Cifar100,
}

impl Variant {
    /// Label bytes per record.
    pub const fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }

    /// Number of classes.
    pub const fn classes(self) -> usize {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100 => 100,
        }
    }

    /// The subdirectory the official archive unpacks to.
    pub const fn subdir(self) -> &'static str {
        match self {
            Variant::Cifar10 => "cifar-10-batches-bin",
            Variant::Cifar100 => "cifar-100-binary",
        }
    }

    /// The training and test file names.
    pub fn files(self) -> (Vec<&'static str>, &'static str) {
        match self {
            Variant::Cifar10 => (
                vec![
                    "data_batch_1.bin",
                    "data_batch_2.bin",
                    "data_batch_3.bin",
                    "data_batch_4.bin",
                    "data_batch_5.bin",
                ],
                "test_batch.bin",
            ),
            Variant::Cifar100 => (vec!["train.bin"], "test.bin"),
        }
    }

    /// The directory holding the files: `dir` itself or its official subdirectory.
    pub fn locate(self, dir: &Path) -> Option<PathBuf> {
        let (train, _) = self.files();
        [dir.to_path_buf(), dir.join(self.subdir())]
            .into_iter()
            .find(|d| d.join(train[0]).is_file())
    }
}

/// Parses the records of one file into `images` and `labels`; `what` names it in errors.
pub fn parse_into(
    bytes: &[u8],
    variant: Variant,
    what: &str,
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<()> {
    let record = variant.label_bytes() + IMAGE_BYTES;
    ensure!(
        !bytes.is_empty() && bytes.len().is_multiple_of(record),
        "{what}: {} bytes is not a whole number of {record}-byte CIFAR records (truncated or \
         corrupt); download the dataset again",
        bytes.len()
    );
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[variant.label_bytes() - 1];
        ensure!(
            usize::from(label) < variant.classes(),
            "{what}: record {i} has label {label}, outside 0..{}; the file is corrupt or is not {}",
            variant.classes(),
            variant.subdir()
        );
        labels.push(label);
        images.extend_from_slice(&rec[variant.label_bytes()..]);
    }
    Ok(())
}

/// Reads the named files of `dir` (images `[n, 3, 32, 32]`, labels `[n]`).
pub fn read_files(dir: &Path, names: &[&str], variant: Variant) -> Result<(Vec<u8>, Vec<u8>)> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for name in names {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).with_context(|| {
            format!(
                "reading {}; is the {} archive fully unpacked?",
                p.display(),
                variant.subdir()
            )
        })?;
        parse_into(
            &bytes,
            variant,
            &p.display().to_string(),
            &mut images,
            &mut labels,
        )?;
    }
    Ok((images, labels))
}

/// Encodes records (for tests and tools): `labels[i]` is the fine label.
pub fn encode(variant: Variant, images: &[u8], labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (img, &l) in images.chunks_exact(IMAGE_BYTES).zip(labels) {
        if variant == Variant::Cifar100 {
            out.push(l / 5);
        }
        out.push(l);
        out.extend_from_slice(img);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_variants() {
        let images: Vec<u8> = (0..2 * IMAGE_BYTES).map(|i| (i % 251) as u8).collect();
        for (variant, labels) in [(Variant::Cifar10, [3u8, 9]), (Variant::Cifar100, [42, 99])] {
            let bytes = encode(variant, &images, &labels);
            let (mut im, mut la) = (Vec::new(), Vec::new());
            parse_into(&bytes, variant, "f", &mut im, &mut la).unwrap();
            assert_eq!(
                (im.as_slice(), la.as_slice()),
                (images.as_slice(), &labels[..])
            );
        }
    }

    #[test]
    fn truncated_and_bad_labels() {
        let images = vec![0u8; IMAGE_BYTES];
        let bytes = encode(Variant::Cifar10, &images, &[1]);
        let (mut im, mut la) = (Vec::new(), Vec::new());
        let err = parse_into(&bytes[..100], Variant::Cifar10, "batch", &mut im, &mut la);
        assert!(err.unwrap_err().to_string().contains("not a whole number"));
        let bad = encode(Variant::Cifar10, &images, &[10]);
        let err = parse_into(&bad, Variant::Cifar10, "batch", &mut im, &mut la);
        assert!(err.unwrap_err().to_string().contains("label 10"));
    }
}
