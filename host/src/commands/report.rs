//! `nvcim report RUNS...`: the paper's Tables II-V from evaluation results (see
//! [`crate::report`] for what each table shows and how runs are matched).

use anyhow::Result;

pub use crate::report::ReportArgs;

/// Runs `nvcim report`.
pub fn run(args: &ReportArgs) -> Result<()> {
    crate::report::write(args)
}
