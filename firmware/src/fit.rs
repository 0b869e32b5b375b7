//! Whether a packed model fits the board: the PSRAM that holds the blob and the programmed
//! state, and the static RAM pools of the scratch. The constants here are the board's own
//! (`board::memory` sizes its pools with them), so `nvcim pack` can check a model on the host
//! with [`memory_plan`] before it ever reaches QEMU.
//!
//! ```
//! use nvcim_firmware::fit::{memory_plan, PSRAM_CAP};
//! use nvcim_shared::{format::Model, tile::Path};
//! let blob = nvcim_firmware::testmodel::small(8);
//! let model = Model::parse(&blob)?;
//! let plan = memory_plan(&model, Path::Collapsed);
//! assert_eq!(plan.psram_cap, PSRAM_CAP);
//! plan.check()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;

use nvcim_shared::{format::Model, tile::Path};

/// Base address of the PSRAM region where QEMU's loader puts the blob (`memory.x`).
pub const PSRAM_BASE: usize = 0x2100_0000;
/// Bytes of PSRAM (`memory.x`'s `PSRAM` length): the blob, then the programmed state.
pub const PSRAM_CAP: usize = 16 << 20;
/// Capacity of the activation arena in RAM, bytes.
pub const ACT_CAP: usize = 1 << 20;
/// Capacity of the patch buffer in RAM (`i16` elements): the format's largest fan-in.
pub const PATCH_CAP: usize = nvcim_shared::tile::MAX_FAN_IN;
/// Capacity of the logits buffer in RAM (`i32` elements).
pub const LOGITS_CAP: usize = 4096;

/// Where the programmed state starts: the blob's length rounded up to a word.
pub const fn state_offset(blob_bytes: usize) -> usize {
    blob_bytes.div_ceil(4) * 4
}

/// A model's memory needs on the board next to the capacities, all in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The packed model in PSRAM.
    pub blob_bytes: usize,
    /// The programmed tile state for the path, after the blob (word-aligned).
    pub state_bytes: usize,
    /// PSRAM used: the blob, its alignment padding and the state.
    pub psram_bytes: usize,
    /// PSRAM capacity.
    pub psram_cap: usize,
    /// Activation arena.
    pub act_bytes: usize,
    /// Activation arena capacity.
    pub act_cap: usize,
    /// Patch (im2col row).
    pub patch_bytes: usize,
    /// Patch capacity.
    pub patch_cap: usize,
    /// Logits.
    pub logits_bytes: usize,
    /// Logits capacity.
    pub logits_cap: usize,
}

/// The board's memory needs of `model` run on `path` (the state size depends on it: `2` bytes
/// per weight collapsed, `2 M/N` sliced).
pub fn memory_plan(model: &Model<'_>, path: Path) -> MemoryPlan {
    let blob_bytes = model.bytes().len();
    let state_bytes = 2 * model.state_len(path);
    let s = model.scratch();
    MemoryPlan {
        blob_bytes,
        state_bytes,
        psram_bytes: state_offset(blob_bytes).saturating_add(state_bytes),
        psram_cap: PSRAM_CAP,
        act_bytes: s.act_bytes,
        act_cap: ACT_CAP,
        patch_bytes: 2 * s.patch,
        patch_cap: 2 * PATCH_CAP,
        logits_bytes: 4 * s.logits,
        logits_cap: 4 * LOGITS_CAP,
    }
}

impl MemoryPlan {
    /// The plan's regions: name, bytes needed, bytes available.
    pub fn regions(&self) -> [(&'static str, usize, usize); 4] {
        [
            (
                "PSRAM (model + programmed state)",
                self.psram_bytes,
                self.psram_cap,
            ),
            ("activation arena (RAM)", self.act_bytes, self.act_cap),
            ("patch (RAM)", self.patch_bytes, self.patch_cap),
            ("logits (RAM)", self.logits_bytes, self.logits_cap),
        ]
    }

    /// `Ok` when every region fits, else [`NoFit`] naming each one that does not.
    pub fn check(&self) -> Result<(), NoFit> {
        if self.regions().iter().all(|&(_, need, cap)| need <= cap) {
            Ok(())
        } else {
            Err(NoFit { plan: *self })
        }
    }
}

/// A model that does not fit the board; its `Display` names every region that overflows, what
/// it needs and its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFit {
    /// The plan that failed.
    pub plan: MemoryPlan,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "does not fit the board:")?;
        let mut sep = " ";
        for (name, need, cap) in self.plan.regions() {
            if need > cap {
                write!(f, "{sep}{name} needs {need} B, {cap} B available")?;
                sep = "; ";
            }
        }
        if self.plan.psram_bytes > self.plan.psram_cap {
            write!(
                f,
                " (model {} B + state {} B)",
                self.plan.blob_bytes, self.plan.state_bytes
            )?;
        }
        Ok(())
    }
}

impl core::error::Error for NoFit {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmodel;
    use alloc::string::ToString;
    use nvcim_shared::tile::Adc;

    #[test]
    fn small_model_fits_and_sizes_add_up() {
        let blob = testmodel::small(4);
        let model = Model::parse(&blob).unwrap();
        let p = memory_plan(&model, Path::Collapsed);
        assert_eq!(p.blob_bytes, blob.len());
        assert_eq!(p.state_bytes, 2 * model.weight_count());
        assert_eq!(p.psram_bytes, state_offset(blob.len()) + p.state_bytes);
        assert_eq!(p.act_bytes, model.scratch().act_bytes);
        assert!(p.check().is_ok());
        let sliced = memory_plan(&model, Path::Sliced(Adc::Ideal));
        assert_eq!(sliced.state_bytes, 4 * p.state_bytes); // M/N = 4 slices
        assert_eq!(state_offset(5), 8);
        assert_eq!(state_offset(8), 8);
    }

    #[test]
    fn every_overflowing_region_is_named_with_its_limit() {
        let blob = testmodel::small(4);
        let model = Model::parse(&blob).unwrap();
        let mut p = memory_plan(&model, Path::Collapsed);
        p.act_bytes = ACT_CAP + 1;
        p.logits_bytes = 4 * LOGITS_CAP + 4;
        let e = p.check().unwrap_err().to_string();
        assert!(
            e.contains(&alloc::format!(
                "activation arena (RAM) needs {} B, {} B available",
                ACT_CAP + 1,
                ACT_CAP
            )),
            "{e}"
        );
        assert!(
            e.contains("logits (RAM) needs 16388 B, 16384 B available"),
            "{e}"
        );
        assert!(!e.contains("patch") && !e.contains("PSRAM"), "{e}");
        p.psram_bytes = PSRAM_CAP + 2;
        let e = p.check().unwrap_err().to_string();
        assert!(
            e.contains("PSRAM (model + programmed state) needs 16777218 B"),
            "{e}"
        );
        // At the limit exactly: fits.
        let mut q = memory_plan(&model, Path::Collapsed);
        q.act_bytes = ACT_CAP;
        assert!(q.check().is_ok());
    }

    #[test]
    fn a_large_model_overflows_psram() {
        // VGG-8 at width 0.25 fits; its 8-bit sliced state (4 slices) still fits 16 MiB.
        let blob = testmodel::vgg8_w025(1, 0.1).unwrap();
        let model = Model::parse(&blob).unwrap();
        let p = memory_plan(&model, Path::Sliced(Adc::Ideal));
        assert!(p.check().is_ok(), "{p:?}");
        let mut big = p;
        big.state_bytes = PSRAM_CAP;
        big.psram_bytes = state_offset(big.blob_bytes) + big.state_bytes;
        assert!(big.check().unwrap_err().to_string().contains("(model "));
    }
}
