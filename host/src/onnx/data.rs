//! Images for an imported model: a data set of `--data-dir` brought to the model's declared
//! input, and the normalization it expects.
//!
//! - **Size.** The model's `[C, H, W]` decides. [`Fit::Auto`] zero-pads (centered) images that
//!   fit, as nvcim's own networks pad 28x28 to 32x32, and resizes (bilinear, as PIL's) the
//!   others, or every image when the file says it was trained so (`nvcim.preprocess =
//!   resize`); [`Fit::Pad`] and [`Fit::Resize`] force one way.
//! - **Channels.** A count that differs from the model's is an error naming both, except
//!   grayscale into a 3-channel model with `gray_to_rgb` (the plane copied three times).
//! - **Normalization.** The file's `nvcim.normalization.*` metadata when it has it, else the
//!   caller's (`--mean` / `--std`), which are then required: a file exported by PyTorch records
//!   no preprocessing, and a guess (`[0, 1]` pixels) gives chance accuracy without an error.
//!
//! The packed format stores raw pixels and a per-channel lookup table from the same mean and
//! std, so the integer engine and the firmware see the same preprocessing.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;

use crate::data::{self, Batch, Dataset, DatasetKind, cifar, idx};
use crate::ir::Normalization;

/// How images reach the model's height and width.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Zero-pad (centered) when the images fit, else resize.
    #[default]
    Auto,
    /// Zero-pad, centered; an error when the images are larger than the input.
    Pad,
    /// Bilinear resize (PIL's, half-pixel centres) to the input's height and width.
    Resize,
}

/// Where the normalization comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum NormalizationSource {
    /// The file's `nvcim.normalization.*` metadata.
    File,
    /// The user's `--mean` / `--std`.
    Flags,
}

/// How a model's images are prepared: what [`load_for`] did, for the result files.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The data set, its original image size and channel count.
    pub source: String,
    /// What was done to the size (`zero-padded 28x28 -> 32x32`, ...).
    pub size: String,
    /// Whether gray planes were replicated to three channels.
    pub gray_to_rgb: bool,
    /// The normalization and where it came from.
    pub normalization: (Normalization, NormalizationSource),
}

impl std::fmt::Display for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, from) = &self.normalization;
        write!(f, "{}, {}", self.source, self.size)?;
        if self.gray_to_rgb {
            write!(f, ", gray replicated to 3 channels")?;
        }
        write!(
            f,
            ", (pixel/255 - mean {:?}) / std {:?} ({})",
            n.mean,
            n.std,
            match from {
                NormalizationSource::File => "the file's nvcim metadata",
                NormalizationSource::Flags => "--mean/--std",
            }
        )
    }
}

/// The normalization to feed a model with: the file's (`file`) or the flags', never both,
/// never neither.
pub fn resolve_normalization(
    file: Option<&Normalization>,
    mean: &[f32],
    std: &[f32],
    channels: usize,
    what: &str,
) -> Result<(Normalization, NormalizationSource)> {
    match (file, mean.is_empty() && std.is_empty()) {
        (Some(n), true) => Ok((n.clone(), NormalizationSource::File)),
        (Some(_), false) => bail!(
            "{what} records its normalization (nvcim.normalization.* metadata); leave out \
             --mean/--std"
        ),
        (None, true) => bail!(
            "{what} does not record its input normalization (a file exported by PyTorch has \
             none): give --mean and --std as the model was trained with, e.g. `--mean 0.2860 \
             --std 0.3530` for Fashion-MNIST, or `--mean 0 --std 1` for [0, 1] pixels"
        ),
        (None, false) => {
            let expand = |v: &[f32], flag: &str| -> Result<Vec<f32>> {
                match v.len() {
                    1 => Ok(vec![v[0]; channels]),
                    n if n == channels => Ok(v.to_vec()),
                    n => bail!(
                        "{flag} has {n} values; the model has {channels} input channels (give \
                         one value or {channels})"
                    ),
                }
            };
            ensure!(
                !mean.is_empty() && !std.is_empty(),
                "give both --mean and --std"
            );
            let n = Normalization {
                mean: expand(mean, "--mean")?,
                std: expand(std, "--std")?,
            };
            ensure!(
                n.mean.iter().all(|m| m.is_finite())
                    && n.std.iter().all(|s| s.is_finite() && *s > 0.0),
                "--mean must be finite and --std finite and positive"
            );
            Ok((n, NormalizationSource::Flags))
        }
    }
}

/// The training and test sets of `dir` (MNIST-style IDX files, or CIFAR-10/100 binaries),
/// brought to `input` (`[C, H, W]`).
pub fn load_for(
    dir: &Path,
    input: [usize; 3],
    fit: Fit,
    gray_to_rgb: bool,
    normalization: (Normalization, NormalizationSource),
) -> Result<(Dataset, Dataset, Prepared)> {
    let kind = if idx::find(dir, "t10k-images-idx3-ubyte").is_some() {
        DatasetKind::FashionMnist
    } else if cifar::Variant::Cifar10.locate(dir).is_some() {
        DatasetKind::Cifar10
    } else if cifar::Variant::Cifar100.locate(dir).is_some() {
        DatasetKind::Cifar100
    } else {
        bail!(
            "no data set in {}: expected MNIST-style IDX files (t10k-images-idx3-ubyte[.gz], \
             ...) or CIFAR-10/100 binaries; pass --data-dir",
            dir.display()
        );
    };
    let (train, test) = data::load(kind, dir)?;
    let (train, test, source, size, replicate) =
        fit_images(train, test, dir, input, fit, gray_to_rgb)?;
    Ok((
        train,
        test,
        Prepared {
            source,
            size,
            gray_to_rgb: replicate,
            normalization,
        },
    ))
}

/// Brings `train` and `test` (read from `dir`) to `input` (`[C, H, W]`): zero-padded or resized
/// per `fit`, gray planes replicated when the model takes three channels and `gray_to_rgb`.
/// Returns the sets, a description of the source and of what was done to the size, and whether
/// gray was replicated.
pub fn fit_images(
    train: Dataset,
    test: Dataset,
    dir: &Path,
    input: [usize; 3],
    fit: Fit,
    gray_to_rgb: bool,
) -> Result<(Dataset, Dataset, String, String, bool)> {
    let kind = test.kind;
    let source = format!(
        "{} in {} ({}x{}x{})",
        if kind == DatasetKind::FashionMnist {
            "IDX images"
        } else {
            kind.display_name()
        },
        dir.display(),
        test.channels,
        test.height,
        test.width
    );
    let [c, h, w] = input;
    ensure!(
        test.channels == c || (test.channels == 1 && c == 3 && gray_to_rgb),
        "the model takes {c} input channel(s); the images in {} have {}{}",
        dir.display(),
        test.channels,
        if test.channels == 1 && c == 3 {
            " (pass --gray-to-rgb to copy the gray plane into three channels)"
        } else {
            ""
        }
    );
    let replicate = test.channels == 1 && c == 3;
    let (ih, iw) = (test.height, test.width);
    let pad = match fit {
        Fit::Pad => {
            ensure!(
                ih <= h && iw <= w,
                "--fit pad: {ih}x{iw} images do not fit the model's {h}x{w} input (use --fit \
                 resize)"
            );
            true
        }
        Fit::Resize => false,
        Fit::Auto => ih <= h && iw <= w,
    };
    let size = if (ih, iw) == (h, w) {
        format!("{h}x{w} as they are")
    } else if pad {
        format!("zero-padded {ih}x{iw} -> {h}x{w} (centered)")
    } else {
        format!("resized {ih}x{iw} -> {h}x{w} (bilinear)")
    };
    let bring = |d: Dataset| -> Dataset {
        let images = if (ih, iw) == (h, w) {
            d.images
        } else if pad {
            data::pad_centered(&d.images, ih, iw, h, w)
        } else {
            data::resize_bilinear_hw(&d.images, ih, iw, h, w)
        };
        let images = if replicate {
            images
                .chunks_exact(h * w)
                .flat_map(|p| p.iter().chain(p).chain(p).copied())
                .collect()
        } else {
            images
        };
        Dataset {
            channels: c,
            height: h,
            width: w,
            images,
            ..d
        }
    };
    Ok((bring(train), bring(test), source, size, replicate))
}

/// An imported ONNX model with its images: what `eval --onnx` and `pack --onnx` work on.
pub struct ForeignModel {
    /// The file as read.
    pub proto: tract_onnx::pb::ModelProto,
    /// The file's path.
    pub path: std::path::PathBuf,
    /// The import into the IR (its normalization the resolved one), or why it failed: only
    /// `--engine tract` can run a file the importer refuses.
    pub imported: Result<crate::onnx::import::Imported>,
    /// Training images in the model's input shape (calibration, recalibration).
    pub train: Dataset,
    /// Test images in the model's input shape.
    pub test: Dataset,
    /// How the images were prepared.
    pub prepared: Prepared,
}

/// Reads, imports and prepares the data for the ONNX model at `path` (see the module docs).
/// With `require_import`, a file the importer refuses is an error before any data is read.
#[allow(clippy::too_many_arguments)]
pub fn open(
    path: &Path,
    dir: &Path,
    mean: &[f32],
    std: &[f32],
    fit: Fit,
    gray_to_rgb: bool,
    require_import: bool,
) -> Result<ForeignModel> {
    let what = path.display().to_string();
    let proto = crate::onnx::read_model(path)?;
    let imported = crate::onnx::import::import(&proto, &what);
    let imported = if require_import {
        Ok(imported?)
    } else {
        imported
    };
    let info = crate::onnx::ModelInfo::of(&proto, &what)?;
    let channels = info.image[0];
    let file = crate::onnx::import::file_normalization(&proto, channels)
        .with_context(|| format!("{what}: its nvcim.normalization metadata"))?;
    let norm = resolve_normalization(file.as_ref(), mean, std, channels, &what)?;
    let imported = imported.map(|mut m| {
        m.network.normalization = norm.0.clone();
        m
    });
    // A model trained with the authors' preprocessing (`nvcim.preprocess = resize`) sees its
    // images resized, not padded.
    let fit = match fit {
        Fit::Auto
            if proto
                .metadata_props
                .iter()
                .any(|p| p.key == "nvcim.preprocess" && p.value == "resize") =>
        {
            Fit::Resize
        }
        f => f,
    };
    let (train, test, prepared) = load_for(dir, info.image, fit, gray_to_rgb, norm)?;
    Ok(ForeignModel {
        proto,
        path: path.to_path_buf(),
        imported,
        train,
        test,
        prepared,
    })
}

/// The images of `d` normalized with `n`, flat NCHW.
pub fn normalized(d: &Dataset, n: &Normalization) -> Vec<f32> {
    let plane = d.height * d.width;
    let c = d.channels;
    d.images
        .chunks(plane)
        .enumerate()
        .flat_map(|(k, p)| {
            let (m, s) = (n.mean[k % c], n.std[k % c]);
            p.iter().map(move |&v| (f32::from(v) / 255.0 - m) / s)
        })
        .collect()
}

/// `d` as normalized batches of at most `size` images.
pub fn batches(d: &Dataset, n: &Normalization, size: usize) -> Vec<Batch> {
    let mut out = Vec::new();
    for start in (0..d.len()).step_by(size.max(1)) {
        let idx: Vec<usize> = (start..(start + size).min(d.len())).collect();
        let part = d.subset(&idx);
        out.push(Batch {
            images: normalized(&part, n),
            labels: part.labels.iter().map(|&l| i64::from(l)).collect(),
            shape: [idx.len(), d.channels, d.height, d.width],
        });
    }
    out
}

/// Checks that every label of `d` is a class of a `classes`-way model.
pub fn check_labels(d: &Dataset, classes: usize, what: &str) -> Result<()> {
    if let Some(&bad) = d.labels.iter().find(|&&l| usize::from(l) >= classes) {
        bail!(
            "{what} has {classes} outputs, but the data has label {bad}; evaluate it on data \
             whose labels are its classes"
        );
    }
    Ok(())
}

/// The `n` images of `train` that `--bn-recalibrate n` uses under `seed`, normalized.
pub fn recalibration_batch(
    train: &Dataset,
    n: usize,
    seed: u64,
    norm: &Normalization,
    where_: &str,
) -> Result<Vec<f32>> {
    let idx = crate::engine::recalibration_images(train.len(), n, seed, where_)
        .context("choosing the recalibration images")?;
    Ok(normalized(&train.subset(&idx), norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_centers_the_plane() {
        let out = data::pad_centered(&[1, 2, 3, 4], 2, 2, 3, 4);
        assert_eq!(out, vec![0, 1, 2, 0, 0, 3, 4, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn normalization_is_never_guessed() {
        let err = resolve_normalization(None, &[], &[], 1, "m.onnx").unwrap_err();
        assert!(format!("{err}").contains("--mean"), "{err}");
        let (n, src) = resolve_normalization(None, &[0.5], &[0.25], 3, "m").unwrap();
        assert_eq!(n.mean, vec![0.5; 3]);
        assert_eq!(src, NormalizationSource::Flags);
        assert!(resolve_normalization(None, &[0.5, 0.5], &[1.0], 3, "m").is_err());
        assert!(resolve_normalization(None, &[0.5], &[0.0], 1, "m").is_err());
        let file = Normalization::identity(1);
        assert!(resolve_normalization(Some(&file), &[0.5], &[1.0], 1, "m").is_err());
        let (n, src) = resolve_normalization(Some(&file), &[], &[], 1, "m").unwrap();
        assert_eq!((n, src), (file, NormalizationSource::File));
    }
}
