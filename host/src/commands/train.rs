//! `nvcim train`: train VGG-8 or ResNet-18 with `vanilla`, `noise`, `nft` or `nft-ovf`.
//!
//! Writes under `--out`: `config.json`, `model.json`, `metrics.jsonl`, `checkpoint/` (every
//! epoch, atomically) and `best/backbone.bpk` (the best epoch under `--select`). Progress goes
//! to stderr, the summary to stdout.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;

use crate::data::{DatasetKind, Preprocess};
use crate::model::graph::GraphSpec;
use crate::model::{Arch, Init, ModelSpec};
use crate::options::DeviceArgs;
use crate::training::{
    self, Backend, BnStats, ExitProfile, LrSchedule, Method, Recipe, RunOptions, Select,
    TrainConfig, TrainSummary,
};

/// The flags that define a training run (shared with `alpha-search`).
#[derive(Debug, Clone, Args)]
pub struct TrainFlags {
    /// The dataset.
    #[arg(long, value_enum, default_value_t = DatasetKind::FashionMnist)]
    pub dataset: DatasetKind,
    /// Directory with the dataset's files (default: Debian's location for Fashion-MNIST,
    /// `/usr/share/datasets/mnist` for MNIST, `data/cifar-10` / `data/cifar-100`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep 28x28 images as they are instead of bringing them to 32x32.
    #[arg(long, conflicts_with = "preprocess")]
    pub no_pad: bool,
    /// How 28x28 images (MNIST, Fashion-MNIST) become 32x32: `pad` (nvcim's default: zero
    /// padding, every pixel kept, the dataset's own mean/std) or `resize` (the authors': bilinear
    /// 28 -> 32, mean/std 0.5). Recorded in config.json; eval, export and pack apply the same.
    /// See docs/fidelity.md. Default: the recipe's (nvcim `pad`, paper `resize`).
    #[arg(long, value_enum)]
    pub preprocess: Option<Preprocess>,
    /// The set of defaults for the flags below that say "the recipe's": `nvcim` (chosen from
    /// measurements at small budgets) or `paper` (every setting of the authors' code at once:
    /// noisy BatchNorm statistics and selection, their linear init, resize, lr 1e-3 / ResNet-18
    /// 1e-2, uniform exit noise, their alpha, 200 epochs, no clipping). A flag given explicitly
    /// wins; config.json records the recipe and every resolved value.
    #[arg(long, value_enum, default_value_t = Recipe::Nvcim)]
    pub recipe: Recipe,
    /// The network.
    #[arg(long, value_enum, default_value_t = Arch::Vgg8)]
    pub model: Arch,
    /// Width multiplier on every hidden width.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    /// The training method.
    #[arg(long, value_enum, default_value_t = Method::Nft)]
    pub method: Method,
    /// Negative-feedback weight alpha (eq. 1). Default: the recipe's (nvcim 0.1; paper the
    /// authors' IRS values VGG-8 MNIST 1e-2, CIFAR-10 1e-1, ResNet-18 MNIST 1e-1, CIFAR-10/100
    /// 1e-3, and their OVF values for nft-ovf).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Device variation sigma for training noise and noisy validation (unit: --sigma-unit).
    #[arg(long, default_value_t = 0.4)]
    pub sigma: f32,
    /// The device model.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Epochs. Default: the recipe's (nvcim 10, paper 200).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Initial learning rate of Adam (epsilon 1e-8, as PyTorch; cosine-annealed to 0 over the
    /// epochs). Default: the recipe's (nvcim 1e-3; paper VGG-8 1e-3, ResNet-18 1e-2).
    #[arg(long)]
    pub lr: Option<f64>,
    /// When the cosine annealing steps: `cosine-epoch` (once per epoch, the authors'
    /// `CosineAnnealingLR(T_max=epochs)`) or `cosine-step` (after every batch, the same curve
    /// over the run's steps, ending near 0). With few epochs the per-epoch curve never comes
    /// down (2 epochs: 1e-3, then 5e-4); `cosine-step` is what the demo uses (see the README).
    #[arg(long, value_enum, default_value_t = LrSchedule::CosineEpoch)]
    pub lr_schedule: LrSchedule,
    /// Fraction of the training set held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Seed of everything (init, split, shuffles, noise, Monte Carlo validation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train on at most this many images (a seeded subset), for quick runs.
    #[arg(long, value_name = "N")]
    pub max_train: Option<usize>,
    /// Monte Carlo runs of the noisy validation after each epoch (0: select by clean accuracy).
    #[arg(long, default_value_t = 3)]
    pub mc_val: u32,
    /// Which epoch is kept as `best/`: `clean` validation accuracy, `noisy` (mean over
    /// --mc-val runs at --sigma), or `auto` (clean for vanilla, noisy for the noise-injection
    /// methods: a vanilla model is near chance at sigma 0.4 in every epoch, so its noisy
    /// figures cannot tell its epochs apart). Default: the recipe's (nvcim `auto`, paper
    /// `noisy`).
    #[arg(long, value_enum)]
    pub select: Option<Select>,
    /// BatchNorm's running statistics under noise injection: `clean` (from a clean forward
    /// pass of the same batch, no gradient through it; the network that is evaluated is the
    /// clean one) or `noisy` (from the noisy pass that is trained on, the authors' code). The
    /// batch itself is always normalized with its own statistics. Default: the recipe's (nvcim
    /// `clean`, paper `noisy`).
    #[arg(long, value_enum)]
    pub bn_stats: Option<BnStats>,
    /// Leave exit I (1-based, shallowest first) out of eq. 1 (`nft` only; Table V's ablation).
    /// The other exits keep their coefficients 0.1^(i-1) and the divisor counts the terms that
    /// remain (backbone + 2 exits on VGG-8: 3).
    #[arg(long, value_name = "I")]
    pub drop_exit: Option<usize>,
    /// The backbone's linear-layer initialization: `pytorch` (nn.Linear's default) or
    /// `authors` (Kaiming-normal fan-out, bias 0, as their `init_weights`). Convs are
    /// Kaiming-normal fan-out either way. `pytorch` by default: with the authors' init the
    /// 10-way classifier starts with logits of std ~16, and noise-injection training at sigma
    /// 0.4 barely moved in a CPU budget (loss 81 after 20 steps, measured).
    ///
    /// With --onnx the backbone starts from the file's weights unless --init is given (`random`
    /// = `pytorch`: train the file's architecture from scratch).
    #[arg(long, value_enum, value_name = "pytorch|random|authors")]
    pub init: Option<Init>,
    /// Train the CNN of this ONNX file instead of --model: its graph (the ops `eval --onnx`
    /// imports), its weights as the starting point, its input size (images are brought to it
    /// as --fit says) and its normalization (the file's nvcim metadata, else --mean/--std).
    /// The trained backbone exports, evaluates, packs and runs on the firmware like a built-in
    /// one. See docs/guide.md, "Train your own CNN".
    #[arg(long, value_name = "FILE", conflicts_with_all = ["init_from", "no_pad", "model", "width", "preprocess"])]
    pub onnx: Option<PathBuf>,
    /// The exits of an --onnx model (nft): `auto` (the paper's rule: one at the end of every
    /// block where the resolution, the width or the kind of convolution changes, before the
    /// last block; heads pooled so that C*s*s comes nearest Table I's 2048-2304) or node names,
    /// comma-separated (an exit reads that node's output). `nvcim train --show-exits` prints
    /// them. VGG-8 and ResNet-18 keep Table I's exits.
    #[arg(
        long,
        value_name = "auto|NODE,...",
        value_delimiter = ',',
        requires = "onnx"
    )]
    pub exits: Vec<String>,
    /// Input preparation of an --onnx model (normalization, size, channels).
    #[command(flatten)]
    pub input: crate::options::InputArgs,
    /// Start the backbone from a trained checkpoint (a run directory or its `backbone.bpk`;
    /// same architecture, width and data) instead of random weights: fine-tuning, e.g. noise
    /// injection or nft on top of a vanilla model. The exits (nft) start random. The path is
    /// recorded in config.json; --init then applies to the exits only.
    #[arg(long, value_name = "RUN_DIR")]
    pub init_from: Option<PathBuf>,
    /// The device profile of the exits' training noise (`nft`): `backbone` (the backbone's
    /// --device-profile: one device model for every perturbed layer) or `uniform` (the
    /// authors' code). The exits are never deployed, so this changes only the feedback terms.
    /// Default: the recipe's (nvcim `backbone`, paper `uniform`).
    #[arg(long, value_enum)]
    pub exit_profile: Option<ExitProfile>,
    /// Clip every conv and linear weight to +-K standard deviations of its layer after each
    /// optimizer step (per-layer Gaussian clipping, aihwkit's `LAYER_GAUSSIAN`; not in the
    /// paper). Under the `range` convention the device noise scales with max|W|, so a layer's
    /// outliers set every weight's noise; clipping them lowers it. Default: the recipe's (nvcim
    /// 1.5 for the methods that inject noise at a sigma above 0, off for vanilla; paper off);
    /// `--clip-weights 0` turns it off. Recorded in config.json; docs/results.md has what it
    /// measured.
    #[arg(long, value_name = "K")]
    pub clip_weights: Option<f32>,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    pub backend: Backend,
}

impl TrainFlags {
    /// The resolved configuration.
    pub fn config(&self) -> Result<TrainConfig> {
        let d = self
            .recipe
            .defaults(self.model_arch(), self.dataset, self.method, self.sigma);
        let alpha = self.alpha.unwrap_or(d.alpha);
        let select = self.select.unwrap_or(d.select);
        let preprocess = self.preprocess.unwrap_or(d.preprocess);
        // `--clip-weights 0` turns the recipe's clipping off.
        let clip_weights = match self.clip_weights {
            Some(0.0) => None,
            Some(k) => Some(k),
            None => d.clip_weights,
        };
        ensure!(
            alpha.is_finite() && alpha >= 0.0,
            "--alpha must be >= 0, got {alpha}"
        );
        let model = self.model_spec()?;
        if let Some(i) = self.drop_exit {
            ensure!(
                self.method == Method::Nft,
                "--drop-exit needs --method nft (the only method with exits), got {:?}",
                self.method
            );
            let exits = model.exit_taps().len();
            ensure!(
                (1..=exits).contains(&i),
                "--drop-exit {i}: the model has exits 1..={exits}"
            );
        }
        if model.arch == Arch::Graph && self.method.uses_exits() {
            ensure!(
                !model.exit_taps().is_empty(),
                "--exits auto found no block boundary before the last convolution block of {}; name the exit points with --exits NODE,... (see --show-exits)",
                self.onnx
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            );
        }
        if self.onnx.is_none() {
            ensure!(
                self.input.mean.is_empty()
                    && self.input.std.is_empty()
                    && !self.input.gray_to_rgb
                    && self.input.fit == crate::onnx::data::Fit::Auto,
                "--mean, --std, --fit and --gray-to-rgb apply to --onnx models only"
            );
        }
        if let Some(k) = self.clip_weights {
            ensure!(
                k.is_finite() && k >= 0.0,
                "--clip-weights must be a positive number of standard deviations (0: off), got {k}"
            );
        }
        ensure!(
            !(select == Select::Noisy && self.mc_val == 0),
            "--select noisy needs noisy validation runs: --mc-val must be at least 1"
        );
        ensure!(
            !(self.preprocess == Some(Preprocess::Resize) && self.dataset.augments()),
            "--preprocess resize applies to the 28x28 datasets (mnist, fashion-mnist); {} images are already 32x32",
            self.dataset.display_name()
        );
        // The paper recipe's resize applies to the 28x28 data sets only (CIFAR is 32x32).
        let preprocess = if self.no_pad {
            Preprocess::Pad
        } else {
            preprocess
        };
        let pad32 = !self.no_pad && !self.dataset.augments() && self.onnx.is_none();
        let native = if self.dataset.augments() { 32 } else { 28 };
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| self.dataset.default_dir());
        Ok(TrainConfig {
            dataset: self.dataset,
            data_dir,
            pad32,
            preprocess,
            model: if self.onnx.is_some() {
                model
            } else {
                ModelSpec {
                    arch: self.model,
                    width: self.width,
                    in_channels: self.dataset.channels(),
                    image_size: if pad32 { 32 } else { native },
                    num_classes: self.dataset.classes(),
                    graph: None,
                }
            },
            method: self.method,
            alpha,
            variation: self.device.variation(self.sigma)?,
            epochs: self.epochs.unwrap_or(d.epochs),
            batch_size: self.batch_size,
            lr: self.lr.unwrap_or(d.lr),
            lr_schedule: self.lr_schedule,
            val_fraction: self.val_fraction,
            seed: self.seed,
            max_train: self.max_train,
            mc_val: self.mc_val,
            select,
            bn_stats: self.bn_stats.unwrap_or(d.bn_stats),
            init: self.init.unwrap_or(d.init),
            init_from: self.init_from.clone(),
            exit_profile: self.exit_profile.unwrap_or(d.exit_profile),
            drop_exit: self.drop_exit,
            clip_weights,
            recipe: self.recipe,
            backend: self.backend,
            onnx: self.onnx.as_ref().map(|file| training::OnnxSource {
                file: file.clone(),
                weights: self.init.is_none(),
                fit: self.input.fit,
                gray_to_rgb: self.input.gray_to_rgb,
            }),
        })
    }

    /// The architecture: --model's, or a graph with --onnx.
    fn model_arch(&self) -> Arch {
        if self.onnx.is_some() {
            Arch::Graph
        } else {
            self.model
        }
    }

    /// The model: VGG-8 / ResNet-18 of --model and --width, or the graph of --onnx with its
    /// exits and normalization.
    pub fn model_spec(&self) -> Result<ModelSpec> {
        let Some(file) = &self.onnx else {
            let native = if self.dataset.augments() { 32 } else { 28 };
            let pad32 = !self.no_pad && !self.dataset.augments();
            return Ok(ModelSpec {
                arch: self.model,
                width: self.width,
                in_channels: self.dataset.channels(),
                image_size: if pad32 { 32 } else { native },
                num_classes: self.dataset.classes(),
                graph: None,
            });
        };
        let what = file.display().to_string();
        let proto = crate::onnx::read_model(file)?;
        let imported = crate::onnx::import::import(&proto, &what)?;
        let mut graph = GraphSpec::from_network(&imported.network)
            .with_context(|| format!("{what} cannot be trained"))?;
        let channels = graph.input[0];
        let file_norm = crate::onnx::import::file_normalization(&proto, channels)
            .with_context(|| format!("{what}: its nvcim.normalization metadata"))?;
        let (norm, _) = crate::onnx::data::resolve_normalization(
            file_norm.as_ref(),
            &self.input.mean,
            &self.input.std,
            channels,
            &what,
        )?;
        graph.mean = norm.mean;
        graph.std = norm.std;
        graph.exits = match self.exits.as_slice() {
            [] => graph.auto_exits()?,
            [one] if one == "auto" => graph.auto_exits()?,
            names => graph
                .exits_at(names)
                .with_context(|| format!("--exits on {what}"))?,
        };
        graph
            .check()
            .with_context(|| format!("{what} cannot be trained"))?;
        Ok(ModelSpec::of_graph(graph))
    }
}

/// Arguments of `nvcim train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The run.
    #[command(flatten)]
    pub flags: TrainFlags,
    /// Output directory.
    #[arg(long, value_name = "DIR", default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue from `--out`'s checkpoint (same flags required).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many epochs of this invocation, as if interrupted (for testing resume).
    #[arg(long, hide = true, value_name = "N")]
    pub stop_after_epochs: Option<usize>,
    /// No progress bars or per-epoch lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print the backbone with its exit points and head sizes, and train nothing.
    #[arg(long)]
    pub show_exits: bool,
}

/// Prints a summary for people.
pub fn print_summary(cfg: &TrainConfig, s: &TrainSummary) {
    println!("recipe          {}", cfg.recipe.name());
    println!("method          {:?}", cfg.method);
    println!(
        "model           {:?} width {}",
        cfg.model.arch, cfg.model.width
    );
    println!(
        "sigma           {} ({}), profile {}",
        cfg.variation.sigma(),
        cfg.variation.unit().name(),
        cfg.variation.profile().name()
    );
    if let Some(k) = cfg.clip_weights {
        println!("weight clipping +-{k} std per layer after every step");
    }
    println!(
        "epochs done     {}{}",
        s.epochs_done,
        if s.interrupted {
            " (stopped early)"
        } else {
            ""
        }
    );
    println!(
        "best epoch      {} (selected by {} validation accuracy)",
        s.best_epoch, s.select
    );
    println!("val clean acc   {:.2}%", 100.0 * s.best_val_clean_acc);
    if cfg.mc_val == 0 {
        println!("val noisy acc   not measured (--mc-val 0)");
    } else {
        println!(
            "val noisy acc   {:.2}% ({} runs)",
            100.0 * s.best_val_noisy_acc,
            cfg.mc_val
        );
    }
    println!("test clean acc  {:.2}%", 100.0 * s.test_clean_acc);
    println!("best backbone   {}", s.best_backbone.display());
    println!("wall time       {:.1} s", s.wall_seconds);
}

/// Runs `nvcim train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    if args.show_exits {
        let spec = args.flags.model_spec()?;
        let graph = spec.graph();
        match &args.flags.onnx {
            Some(f) => println!("{} ({} nodes)", f.display(), graph.nodes.len()),
            None => println!("{:?} width {} (Table I's exits)", spec.arch, spec.width),
        }
        print!("{}", graph.describe()?);
        println!("{} exit(s)", graph.exits.len());
        return Ok(());
    }
    let cfg = args.flags.config()?;
    if let (Some(f), Some(g)) = (&cfg.onnx, &cfg.model.graph) {
        if !g.has_batchnorm() {
            eprintln!(
                "note: {} holds no BatchNorm: PyTorch's exporter folds BatchNorm into the \
                 convolutions in eval mode. nvcim trains what the file holds (convolutions with \
                 biases); to keep BatchNorm, export in training mode with \
                 `torch.onnx.export(model.eval(), ..., training=torch.onnx.TrainingMode.PRESERVE, \
                 do_constant_folding=False)`",
                f.file.display()
            );
        }
        eprintln!(
            "training {} ({} weight layers, {} exits){}",
            f.file.display(),
            g.nodes.iter().filter(|n| n.op.is_weight()).count(),
            g.exits.len(),
            if f.weights {
                ", starting from its weights"
            } else {
                ", from random weights (--init)"
            }
        );
    }
    let opts = RunOptions {
        out: args.out.clone(),
        resume: args.resume,
        stop_after: args.stop_after_epochs,
        quiet: args.quiet,
    };
    let summary = training::train(&cfg, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&cfg, &summary);
    }
    Ok(())
}
