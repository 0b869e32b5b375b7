//! Command-line options shared by several verbs, and their conversion into `nvcim-shared` types.

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use nvcim_shared::{
    quant::QuantConfig,
    variation::{Faults, Profile, SigmaUnit, VariationConfig},
};
use serde::Serialize;

/// The sigma convention, as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// A fraction of one device's full range, 2^N - 1 levels (the authors' code; the paper's tables).
    #[default]
    Range,
    /// One conductance level (eq. 4 as printed).
    Level,
}

impl From<Unit> for SigmaUnit {
    fn from(u: Unit) -> Self {
        match u {
            Unit::Range => SigmaUnit::Range,
            Unit::Level => SigmaUnit::Level,
        }
    }
}

/// A state-dependent variation profile, as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceProfile {
    /// The same noise for every weight (the paper).
    #[default]
    Uniform,
    /// Mid-range weights get 1x the noise.
    Rram1,
    /// Mid-range weights get 2x the noise.
    Fefet2,
    /// Mid-range weights get 4x the noise.
    Rram4,
    /// Mid-range weights get 6x the noise.
    Fefet6,
}

impl From<DeviceProfile> for Profile {
    fn from(p: DeviceProfile) -> Self {
        match p {
            DeviceProfile::Uniform => Profile::Uniform,
            DeviceProfile::Rram1 => Profile::Rram1,
            DeviceProfile::Fefet2 => Profile::Fefet2,
            DeviceProfile::Rram4 => Profile::Rram4,
            DeviceProfile::Fefet6 => Profile::Fefet6,
        }
    }
}

/// The device model: bit widths, sigma convention, profile and stuck-at faults.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DeviceArgs {
    /// Weight magnitude bits M (2, 4, 6 or 8).
    #[arg(long = "m", value_name = "BITS", default_value_t = 8)]
    pub m_bits: u8,
    /// Bits per device N (1, 2 or 4; M must be a multiple of N).
    #[arg(long = "n", value_name = "BITS", default_value_t = 2)]
    pub n_bits: u8,
    /// What sigma is measured in: `range` (the authors' code, default) or `level` (eq. 4).
    #[arg(long = "sigma-unit", visible_alias = "unit", value_enum, default_value_t = Unit::Range)]
    pub unit: Unit,
    /// State-dependent variation profile.
    #[arg(long = "device-profile", visible_alias = "profile", value_enum, default_value_t = DeviceProfile::Uniform)]
    pub profile: DeviceProfile,
    /// Fraction of devices stuck at level 0, in [0, 1].
    #[arg(long, default_value_t = 0.0, value_name = "RATE")]
    pub stuck_low: f32,
    /// Fraction of devices stuck at the top level, in [0, 1].
    #[arg(long, default_value_t = 0.0, value_name = "RATE")]
    pub stuck_high: f32,
}

impl DeviceArgs {
    /// The quantization these flags describe.
    pub fn quant(&self) -> Result<QuantConfig> {
        QuantConfig::new(self.m_bits, self.n_bits)
            .with_context(|| format!("invalid --m {} / --n {}", self.m_bits, self.n_bits))
    }

    /// The variation model at `sigma`.
    pub fn variation(&self, sigma: f32) -> Result<VariationConfig> {
        let faults = Faults::new(self.stuck_low, self.stuck_high).with_context(|| {
            format!(
                "invalid --stuck-low {} / --stuck-high {}",
                self.stuck_low, self.stuck_high
            )
        })?;
        VariationConfig::new(
            self.quant()?,
            sigma,
            self.unit.into(),
            self.profile.into(),
            faults,
        )
        .with_context(|| format!("invalid --sigma {sigma}"))
    }
}

/// Parses a comma-separated list of sigma values, each finite and >= 0.
pub fn parse_sigmas(list: &str) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let v: f32 = part
            .parse()
            .with_context(|| format!("--sigma: `{part}` is not a number"))?;
        if !v.is_finite() || v < 0.0 {
            bail!("--sigma: {part} is invalid; sigma must be finite and >= 0");
        }
        out.push(v);
    }
    ensure!(
        !out.is_empty(),
        "--sigma needs at least one value, e.g. --sigma 0.2,0.4"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_lists() {
        assert_eq!(parse_sigmas("0.2, 0.4,0.6").unwrap(), vec![0.2, 0.4, 0.6]);
        assert!(parse_sigmas("").is_err());
        assert!(parse_sigmas("0.1,-1").is_err());
        assert!(parse_sigmas("nan").is_err());
        assert!(parse_sigmas("abc").unwrap_err().to_string().contains("abc"));
    }
}

/// How an imported model's images are prepared (`eval --onnx`, `pack --onnx`): its input size
/// and channels come from the file; the normalization from the file's nvcim metadata or from
/// these flags (required when the file has none).
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct InputArgs {
    /// Per-channel mean of the [0, 1] pixels the model was trained with (one value or one per
    /// channel, comma-separated). Required, with --std, for a file without nvcim metadata (a
    /// PyTorch export records no preprocessing).
    #[arg(
        long,
        value_name = "M[,M..]",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation that goes with --mean.
    #[arg(long, value_name = "S[,S..]", value_delimiter = ',')]
    pub std: Vec<f32>,
    /// How images reach the model's height and width: zero-pad when they fit (`auto`), always
    /// `pad`, or bilinear `resize`.
    #[arg(long, value_enum, default_value_t = crate::onnx::data::Fit::Auto)]
    #[serde(skip)]
    pub fit: crate::onnx::data::Fit,
    /// Copy gray images into the three channels of an RGB model.
    #[arg(long)]
    pub gray_to_rgb: bool,
}
