//! Datasets: MNIST and Fashion-MNIST (IDX) and CIFAR-10/100 (binary), a seeded validation
//! split, normalization, CIFAR augmentation and batching.
//!
//! Everything here is Burn-free (bytes, `f32` and labels), so evaluation and packing reuse it;
//! [`tensor`] alone turns a [`Batch`] into Burn tensors. Per-epoch randomness (shuffle,
//! augmentation) comes from `nvcim_shared::rng::stream_for(Purpose::Host, seed, epoch, tag)`, so
//! any epoch can be replayed from `(seed, epoch)` alone.

pub mod cifar;
pub mod idx;
pub mod tensor;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use nvcim_shared::rng::{Purpose, Xoshiro128PlusPlus, stream_for};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

/// Stream tags (the `layer` argument of `stream_for`) of the host's random uses.
pub mod tags {
    /// The validation split.
    pub const SPLIT: u32 = 1;
    /// The training subset of `--max-train`.
    pub const SUBSET: u32 = 2;
    /// The per-epoch shuffle.
    pub const SHUFFLE: u32 = 3;
    /// The per-epoch augmentation.
    pub const AUGMENT: u32 = 4;
    /// The images of `nvcim eval --bn-recalibrate`.
    pub const RECALIBRATE: u32 = 5;
}

/// A supported dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// MNIST digits (IDX).
    Mnist,
    /// Fashion-MNIST (IDX).
    FashionMnist,
    /// CIFAR-10 (binary version).
    Cifar10,
    /// CIFAR-100 (binary version, fine labels).
    Cifar100,
}

impl DatasetKind {
    /// The human name.
    pub const fn display_name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "MNIST",
            DatasetKind::FashionMnist => "Fashion-MNIST",
            DatasetKind::Cifar10 => "CIFAR-10",
            DatasetKind::Cifar100 => "CIFAR-100",
        }
    }

    /// Where the data is looked for without `--data-dir`.
    pub fn default_dir(self) -> PathBuf {
        match self {
            // Debian's `dataset-fashion-mnist` package.
            DatasetKind::FashionMnist => PathBuf::from("/usr/share/datasets/fashion-mnist"),
            DatasetKind::Mnist => PathBuf::from("/usr/share/datasets/mnist"),
            DatasetKind::Cifar10 => PathBuf::from("data/cifar-10"),
            DatasetKind::Cifar100 => PathBuf::from("data/cifar-100"),
        }
    }

    /// Number of classes.
    pub const fn classes(self) -> usize {
        match self {
            DatasetKind::Cifar100 => 100,
            _ => 10,
        }
    }

    /// Input channels.
    pub const fn channels(self) -> usize {
        match self {
            DatasetKind::Mnist | DatasetKind::FashionMnist => 1,
            _ => 3,
        }
    }

    /// Per-channel mean and std of the training images (in [0, 1] units).
    pub const fn normalization(self) -> (&'static [f32], &'static [f32]) {
        match self {
            DatasetKind::Mnist => (&[0.1307], &[0.3081]),
            DatasetKind::FashionMnist => (&[0.2860], &[0.3530]),
            DatasetKind::Cifar10 => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
            DatasetKind::Cifar100 => (&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762]),
        }
    }

    /// Whether training uses random crop + flip augmentation.
    pub const fn augments(self) -> bool {
        matches!(self, DatasetKind::Cifar10 | DatasetKind::Cifar100)
    }
}

/// How 28x28 images become the 32x32 inputs of the networks, and how pixels are normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preprocess {
    /// nvcim's default: zero-pad 28 -> 32 (every pixel kept as it is), normalize with the
    /// dataset's own mean and std (MNIST 0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530).
    #[default]
    Pad,
    /// The authors' (`NF_Training`): bilinear resize 28 -> 32 (PIL's `Resize(32)` on the 8-bit
    /// image: half-pixel centres, edges clamped, rounded to the nearest byte), normalize with
    /// mean 0.5 and std 0.5. Needed to evaluate an imported authors' checkpoint, whose BatchNorm
    /// statistics were measured on such inputs.
    Resize,
}

impl Preprocess {
    /// The name in `config.json`.
    pub const fn name(self) -> &'static str {
        match self {
            Preprocess::Pad => "pad",
            Preprocess::Resize => "resize",
        }
    }

    /// Per-channel mean and std (in [0, 1] units) of `kind`'s images after this preprocessing:
    /// the dataset's own, or 0.5 / 0.5 after the authors' resize.
    pub const fn normalization(self, kind: DatasetKind) -> (&'static [f32], &'static [f32]) {
        match self {
            Preprocess::Pad => kind.normalization(),
            Preprocess::Resize => (&[0.5], &[0.5]),
        }
    }

    /// Brings `d` to `size x size` (pad or resize; a dataset already that size is returned as
    /// it is, with this preprocessing's normalization).
    pub fn apply(self, d: Dataset, size: usize) -> Result<Dataset> {
        let mut out = if d.height == size && d.width == size {
            d
        } else {
            match self {
                Preprocess::Pad => d.pad_to(size)?,
                Preprocess::Resize => d.resize_to(size)?,
            }
        };
        out.preprocess = self;
        Ok(out)
    }
}

/// Images as bytes (`[n, c, h, w]`, channel-major) with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Which dataset this came from (normalization, augmentation).
    pub kind: DatasetKind,
    /// Channels per image.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Pixel bytes, `len() * channels * height * width`.
    pub images: Vec<u8>,
    /// One label per image, `< kind.classes()`.
    pub labels: Vec<u8>,
    /// How the images were brought to the network's size (and so how they are normalized).
    pub preprocess: Preprocess,
    /// A model's own normalization (per-channel mean and std), in place of the preprocessing's
    /// (a graph model trained with `--onnx`).
    pub custom_normalization: Option<std::sync::Arc<(Vec<f32>, Vec<f32>)>>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image.
    pub fn image_bytes(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let b = self.image_bytes();
        let mut images = Vec::with_capacity(indices.len() * b);
        for &i in indices {
            images.extend_from_slice(&self.images[i * b..(i + 1) * b]);
        }
        Dataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            ..self.clone_header()
        }
    }

    /// Per-channel mean and std (in [0, 1] units) the batches are normalized with.
    pub fn normalization(&self) -> (&[f32], &[f32]) {
        match &self.custom_normalization {
            Some(n) => (&n.0, &n.1),
            None => self.preprocess.normalization(self.kind),
        }
    }

    fn clone_header(&self) -> Dataset {
        Dataset {
            preprocess: self.preprocess,
            custom_normalization: self.custom_normalization.clone(),
            kind: self.kind,
            channels: self.channels,
            height: self.height,
            width: self.width,
            images: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Pads every image with zero bytes to `size x size` (centered), e.g. MNIST's 28 -> 32.
    pub fn pad_to(&self, size: usize) -> Result<Dataset> {
        ensure!(
            size >= self.height && size >= self.width,
            "cannot pad {}x{} images to {size}x{size}",
            self.height,
            self.width
        );
        let images = pad_centered(&self.images, self.height, self.width, size, size);
        Ok(self.with_square_images(images, size))
    }

    /// Resizes every image to `size x size` with [`resize_bilinear`] (the authors' resize).
    pub fn resize_to(&self, size: usize) -> Result<Dataset> {
        ensure!(
            size >= self.height && size >= self.width && self.height > 0 && self.width > 0,
            "cannot resize {}x{} images to {size}x{size} (only enlarging is supported)",
            self.height,
            self.width
        );
        let images = resize_bilinear(&self.images, self.height, self.width, size);
        Ok(self.with_square_images(images, size))
    }

    /// These labels with `size x size` images.
    fn with_square_images(&self, images: Vec<u8>, size: usize) -> Dataset {
        Dataset {
            images,
            height: size,
            width: size,
            labels: self.labels.clone(),
            ..self.clone_header()
        }
    }
}

/// Zero-pads every `h x w` byte plane of `images` to `oh x ow`, centered (an odd extra row or
/// column at the bottom or right). The caller checks `oh >= h`, `ow >= w`.
pub fn pad_centered(images: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    let (top, left) = ((oh - h) / 2, (ow - w) / 2);
    let planes = images.len() / (h * w).max(1);
    let mut out = vec![0u8; planes * oh * ow];
    for (src, dst) in images
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(oh * ow))
    {
        for y in 0..h {
            let d = (y + top) * ow + left;
            dst[d..d + w].copy_from_slice(&src[y * w..(y + 1) * w]);
        }
    }
    out
}

/// Resizes every `h x w` byte plane of `images` (images x channels of them) to `size x size`
/// as PIL's bilinear `Resize` does on 8-bit images when enlarging (what torchvision's
/// `Resize(32)` does to an MNIST image): output pixel `o` samples the source at `(o + 0.5) * n / size - 0.5`, clamped to the image,
/// interpolating its two neighbours; a horizontal pass rounded to bytes, then a vertical one.
/// The caller checks `size >= h, w > 0`.
pub fn resize_bilinear(images: &[u8], h: usize, w: usize, size: usize) -> Vec<u8> {
    resize_bilinear_hw(images, h, w, size, size)
}

/// [`resize_bilinear`] to `oh x ow` (each axis on its own; shrinking samples the same way,
/// without PIL's antialiasing filter). The caller checks `h, w, oh, ow > 0`.
pub fn resize_bilinear_hw(images: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    // Per output coordinate: the two source indices and the weight of the second.
    let taps = |n: usize, size: usize| -> Vec<(usize, usize, f64)> {
        (0..size)
            .map(|o| {
                let c =
                    ((o as f64 + 0.5) * n as f64 / size as f64 - 0.5).clamp(0.0, (n - 1) as f64);
                let i = c.floor() as usize;
                (i, (i + 1).min(n - 1), c - i as f64)
            })
            .collect()
    };
    let lerp = |a: u8, b: u8, w: f64| {
        (f64::from(a) * (1.0 - w) + f64::from(b) * w)
            .round()
            .clamp(0.0, 255.0) as u8
    };
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    let plane = oh * ow;
    let mut out = vec![0u8; images.len() / (h * w) * plane];
    let mut rows = vec![0u8; h * ow];
    for (src, dst) in images.chunks_exact(h * w).zip(out.chunks_exact_mut(plane)) {
        for y in 0..h {
            for (ox, &(x0, x1, wx)) in tx.iter().enumerate() {
                rows[y * ow + ox] = lerp(src[y * w + x0], src[y * w + x1], wx);
            }
        }
        for (oy, &(y0, y1, wy)) in ty.iter().enumerate() {
            for ox in 0..ow {
                dst[oy * ow + ox] = lerp(rows[y0 * ow + ox], rows[y1 * ow + ox], wy);
            }
        }
    }
    out
}

/// The training and test sets of `kind` from `dir`.
pub fn load(kind: DatasetKind, dir: &Path) -> Result<(Dataset, Dataset)> {
    let missing = |looked: &str| -> anyhow::Error {
        anyhow::anyhow!(
            "no {} found in {} (looked for {looked}); run `cargo xtask setup` or pass --data-dir",
            kind.display_name(),
            dir.display()
        )
    };
    match kind {
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            let stems = [
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            ];
            let mut paths = Vec::new();
            for stem in stems {
                paths.push(idx::find(dir, stem).ok_or_else(|| missing(&format!("{stem}[.gz]")))?);
            }
            let set = |i: &Path, l: &Path| -> Result<Dataset> {
                let (img, labels) = idx::read_pair(i, l)?;
                if let Some(bad) = labels
                    .iter()
                    .position(|&x| usize::from(x) >= kind.classes())
                {
                    bail!(
                        "{}: label {} at {bad} is not a class 0..10",
                        l.display(),
                        labels[bad]
                    );
                }
                Ok(Dataset {
                    kind,
                    channels: 1,
                    height: img.dims[1],
                    width: img.dims[2],
                    images: img.data,
                    labels,
                    preprocess: Preprocess::Pad,
                    custom_normalization: None,
                })
            };
            Ok((set(&paths[0], &paths[1])?, set(&paths[2], &paths[3])?))
        }
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let variant = if kind == DatasetKind::Cifar10 {
                cifar::Variant::Cifar10
            } else {
                cifar::Variant::Cifar100
            };
            let (train_files, test_file) = variant.files();
            let base = variant.locate(dir).ok_or_else(|| {
                missing(&format!(
                    "{} or {}/{}",
                    train_files[0],
                    variant.subdir(),
                    train_files[0]
                ))
            })?;
            let set = |names: &[&str]| -> Result<Dataset> {
                let (images, labels) = cifar::read_files(&base, names, variant)?;
                Ok(Dataset {
                    kind,
                    channels: 3,
                    height: 32,
                    width: 32,
                    images,
                    labels,
                    preprocess: Preprocess::Pad,
                    custom_normalization: None,
                })
            };
            Ok((set(&train_files)?, set(&[test_file])?))
        }
    }
}

/// A seeded permutation of `0..n` (Fisher-Yates on `rng`).
pub fn permutation(n: usize, rng: &mut Xoshiro128PlusPlus) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, below(rng, i + 1));
    }
    p
}

/// A uniform integer in `0..n` (n < 2^32), by 32-bit multiply-shift.
fn below(rng: &mut impl RngCore, n: usize) -> usize {
    ((u64::from(rng.next_u32()) * n as u64) >> 32) as usize
}

/// Splits `train` into (training, validation) with `fraction` of it, chosen by `seed`, held out.
pub fn split_validation(train: &Dataset, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
    ensure!(
        (0.0..1.0).contains(&fraction),
        "--val-fraction must be in [0, 1), got {fraction}"
    );
    let perm = permutation(
        train.len(),
        &mut stream_for(Purpose::Host, seed, 0, tags::SPLIT),
    );
    let n_val = (train.len() as f64 * fraction).round() as usize;
    let (val, tr) = perm.split_at(n_val);
    let (mut val, mut tr) = (val.to_vec(), tr.to_vec());
    val.sort_unstable();
    tr.sort_unstable();
    Ok((train.subset(&tr), train.subset(&val)))
}

/// A batch ready for a network: normalized `f32` images `[n, c, h, w]` and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Normalized pixels.
    pub images: Vec<f32>,
    /// Labels.
    pub labels: Vec<i64>,
    /// `[n, c, h, w]`.
    pub shape: [usize; 4],
}

/// Builds the batch of `indices`, normalized, with random crop (pad 4) and flip when `augment`
/// holds a generator.
pub fn make_batch(
    data: &Dataset,
    indices: &[usize],
    mut augment: Option<&mut Xoshiro128PlusPlus>,
) -> Batch {
    let (c, h, w) = (data.channels, data.height, data.width);
    let (mean, std) = data.normalization();
    let b = data.image_bytes();
    let mut images = Vec::with_capacity(indices.len() * b);
    for &i in indices {
        let src = &data.images[i * b..(i + 1) * b];
        // Offsets into the image padded by 4 (crop) and the flip, for this image.
        let (dy, dx, flip) = match augment.as_deref_mut() {
            Some(rng) => (
                below(rng, 9) as isize - 4,
                below(rng, 9) as isize - 4,
                rng.next_u32() & 1 == 1,
            ),
            None => (0, 0, false),
        };
        for ch in 0..c {
            let (m, s) = (mean[ch % mean.len()], std[ch % std.len()]);
            for y in 0..h {
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x } as isize + dx;
                    let sy = y as isize + dy;
                    let v = if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                        src[(ch * h + sy as usize) * w + sx as usize]
                    } else {
                        0
                    };
                    images.push((f32::from(v) / 255.0 - m) / s);
                }
            }
        }
    }
    Batch {
        images,
        labels: indices.iter().map(|&i| i64::from(data.labels[i])).collect(),
        shape: [indices.len(), c, h, w],
    }
}

/// Resolves `--data-dir` and loads, with context naming the dataset.
pub fn load_from(kind: DatasetKind, dir: Option<&Path>) -> Result<(Dataset, Dataset)> {
    let dir = dir.map_or_else(|| kind.default_dir(), Path::to_path_buf);
    load(kind, &dir).with_context(|| format!("loading {}", kind.display_name()))
}

/// The first `n` examples of `test` (all when `None` or larger).
pub fn subset(test: &Dataset, n: Option<usize>) -> Dataset {
    match n {
        Some(n) if n < test.len() => test.subset(&(0..n).collect::<Vec<_>>()),
        _ => test.clone(),
    }
}

/// The test set as normalized batches of at most `size` images.
pub fn batches(test: &Dataset, size: usize) -> Vec<Batch> {
    let idx: Vec<usize> = (0..test.len()).collect();
    idx.chunks(size.max(1))
        .map(|c| make_batch(test, c, None))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n: usize) -> Dataset {
        Dataset {
            kind: DatasetKind::Mnist,
            channels: 1,
            height: 2,
            width: 3,
            images: (0..n * 6).map(|i| i as u8).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            preprocess: Preprocess::Pad,
            custom_normalization: None,
        }
    }

    /// A model's own normalization (`train --onnx`) replaces the preprocessing's in batches.
    #[test]
    fn custom_normalization_is_used_by_batches() {
        let d = tiny(1);
        let plain = make_batch(&d, &[0], None);
        let (m, s) = d.normalization();
        assert_eq!(plain.images[1], (1.0 / 255.0 - m[0]) / s[0]);
        let custom = Dataset {
            custom_normalization: Some(std::sync::Arc::new((vec![0.5], vec![0.25]))),
            ..d
        };
        let b = make_batch(&custom, &[0], None);
        assert_eq!(b.images[1], (1.0 / 255.0 - 0.5) / 0.25);
        assert_eq!(custom.subset(&[0]).normalization().0, &[0.5]);
    }

    #[test]
    fn resize_is_bilinear_with_half_pixel_centres() {
        let d = Dataset {
            height: 2,
            width: 2,
            images: vec![0, 100, 200, 255],
            labels: vec![3],
            ..tiny(0)
        };
        let r = Preprocess::Resize.apply(d.clone(), 4).unwrap();
        assert_eq!(
            (r.height, r.width, r.preprocess),
            (4, 4, Preprocess::Resize)
        );
        // Computed by hand: source coordinates -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
        #[rustfmt::skip]
        let want = [
            0, 25, 75, 100,
            50, 72, 117, 139,
            150, 167, 200, 216,
            200, 214, 241, 255,
        ];
        assert_eq!(r.images, want);
        assert_eq!(r.normalization(), (&[0.5f32][..], &[0.5f32][..]));
        // Padding keeps every pixel and the dataset's own normalization.
        let p = Preprocess::Pad.apply(d.clone(), 4).unwrap();
        assert_eq!(p.images[5..7], [0, 100]);
        assert_eq!(p.normalization(), DatasetKind::Mnist.normalization());
        // Same size: untouched.
        assert_eq!(
            Preprocess::Resize.apply(d.clone(), 2).unwrap().images,
            d.images
        );
        assert!(d.resize_to(1).is_err());
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let d = tiny(100);
        let (tr, va) = split_validation(&d, 0.1, 7).unwrap();
        assert_eq!((tr.len(), va.len()), (90, 10));
        let (tr2, va2) = split_validation(&d, 0.1, 7).unwrap();
        assert_eq!((&tr, &va), (&tr2, &va2));
        let (_, va3) = split_validation(&d, 0.1, 8).unwrap();
        assert_ne!(va, va3);
        let mut firsts: Vec<u8> = tr
            .images
            .chunks(6)
            .chain(va.images.chunks(6))
            .map(|c| c[0])
            .collect();
        firsts.sort_unstable();
        let mut all: Vec<u8> = (0..100).map(|i| (i * 6) as u8).collect();
        all.sort_unstable();
        assert_eq!(firsts, all);
        assert!(split_validation(&d, 1.0, 7).is_err());
    }

    #[test]
    fn pad_centers_the_image() {
        let d = tiny(2).pad_to(4).unwrap();
        assert_eq!((d.height, d.width, d.images.len()), (4, 4, 32));
        // 2x3 in 4x4: top 1, left 0.
        assert_eq!(
            &d.images[..16],
            &[0, 0, 0, 0, 0, 1, 2, 0, 3, 4, 5, 0, 0, 0, 0, 0]
        );
        assert_eq!(d.labels, vec![0, 1]);
    }

    #[test]
    fn batches_normalize_and_augment() {
        let d = tiny(3);
        let b = make_batch(&d, &[2, 0], None);
        assert_eq!(b.shape, [2, 1, 2, 3]);
        assert_eq!(b.labels, vec![2, 0]);
        let expect = (12.0 / 255.0 - 0.1307) / 0.3081;
        assert!((b.images[0] - expect).abs() < 1e-6);
        // Augmentation: every output pixel is either a source pixel or the padding value.
        let mut rng = stream_for(Purpose::Host, 1, 0, tags::AUGMENT);
        let a = make_batch(&d, &[1; 20], Some(&mut rng));
        let pad = (0.0 - 0.1307) / 0.3081;
        let allowed: Vec<f32> = (6..12)
            .map(|v| (v as f32 / 255.0 - 0.1307) / 0.3081)
            .chain([pad])
            .collect();
        assert!(
            a.images
                .iter()
                .all(|v| allowed.iter().any(|x| (x - v).abs() < 1e-6))
        );
        let first = &a.images[..6];
        assert!(
            a.images.chunks(6).any(|c| c != first),
            "augmentation should vary (20 draws)"
        );
    }

    #[test]
    fn missing_dir_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(DatasetKind::FashionMnist, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no Fashion-MNIST found") && err.contains("--data-dir"),
            "{err}"
        );
        let err = load(DatasetKind::Cifar10, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CIFAR-10 found"), "{err}");
    }

    #[test]
    fn loads_idx_and_cifar_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for (stem, n) in [("train", 5usize), ("t10k", 3)] {
            let img: Vec<u8> = (0..n * 4).map(|i| i as u8).collect();
            std::fs::write(
                p.join(format!("{stem}-images-idx3-ubyte")),
                idx::encode(&[n, 2, 2], &img),
            )
            .unwrap();
            let lab: Vec<u8> = (0..n as u8).collect();
            std::fs::write(
                p.join(format!("{stem}-labels-idx1-ubyte")),
                idx::encode(&[n], &lab),
            )
            .unwrap();
        }
        let (tr, te) = load(DatasetKind::Mnist, p).unwrap();
        assert_eq!((tr.len(), te.len(), tr.height), (5, 3, 2));
        let sub = p.join(cifar::Variant::Cifar10.subdir());
        std::fs::create_dir(&sub).unwrap();
        let img = vec![7u8; cifar::IMAGE_BYTES * 2];
        for f in [
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
        ] {
            std::fs::write(
                sub.join(f),
                cifar::encode(cifar::Variant::Cifar10, &img, &[1, 2]),
            )
            .unwrap();
        }
        let err = format!("{:#}", load(DatasetKind::Cifar10, p).unwrap_err());
        assert!(err.contains("data_batch_5.bin"), "{err}");
        std::fs::write(
            sub.join("data_batch_5.bin"),
            cifar::encode(cifar::Variant::Cifar10, &img, &[1, 2]),
        )
        .unwrap();
        std::fs::write(
            sub.join("test_batch.bin"),
            &cifar::encode(cifar::Variant::Cifar10, &img, &[3, 4])[..50],
        )
        .unwrap();
        let err = format!("{:#}", load(DatasetKind::Cifar10, p).unwrap_err());
        assert!(
            err.contains("test_batch.bin") && err.contains("truncated"),
            "{err}"
        );
    }
}
