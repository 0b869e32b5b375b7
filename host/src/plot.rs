//! PNG plots drawn with `plotters`' bitmap backend.
//!
//! Text is rendered by `ab_glyph` with the DejaVu Sans font shipped in `host/assets/` (its
//! licence beside it), registered as plotters' `sans-serif` family on first use. This keeps
//! the build free of system font libraries (fontconfig, freetype), which plotters' default
//! `ttf` feature would need.

use std::{path::Path, sync::Once};

use anyhow::{Result, anyhow, ensure};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| ())
            .expect("the shipped DejaVu font parses");
    });
}

/// A plotters error as an anyhow error naming the file.
fn draw_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e}", path.display())
}

/// Distinct colours for series, cycled.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One point of a series: x, y, and an optional interval `(low, high)` drawn as a band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Abscissa.
    pub x: f64,
    /// Ordinate.
    pub y: f64,
    /// The interval around `y`, if any.
    pub band: Option<(f64, f64)>,
}

/// A named line of points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points, drawn in order.
    pub points: Vec<Point>,
}

/// The range of `values`, widened by 5% (or ±0.5 when flat).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = 0.05 * (hi - lo);
    (lo - pad, hi + pad)
}

/// Draws lines with optional interval bands (accuracy vs sigma) into a PNG at `path`.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    ensure!(
        series.iter().any(|s| !s.points.is_empty()),
        "nothing to plot in {}",
        path.display()
    );
    register_font();
    let err = draw_err(path);
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = padded_range(pts().map(|p| p.x));
    let (y0, y1) = padded_range(pts().flat_map(|p| {
        let (lo, hi) = p.band.unwrap_or((p.y, p.y));
        [p.y, lo, hi]
    }));
    // The legend goes in a strip below the chart, so it can never cover a line or a band.
    let legend_h = 14 + 22 * series.len() as u32;
    let root = BitMapBackend::new(path, (900, 560 + legend_h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (plot, legend) = root.split_vertically(560);
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let y = 10 + 22 * i as i32;
        legend
            .draw(&PathElement::new(
                vec![(80, y), (110, y)],
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        legend
            .draw(&Circle::new((95, y), 3, color.filled()))
            .map_err(|e| err(&e))?;
        legend
            .draw(&Text::new(
                s.name.clone(),
                (120, y - 9),
                ("sans-serif", 15).into_font().color(&BLACK),
            ))
            .map_err(|e| err(&e))?;
    }
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let banded: Vec<&Point> = s.points.iter().filter(|p| p.band.is_some()).collect();
        if banded.len() >= 2 {
            let mut poly: Vec<(f64, f64)> = banded
                .iter()
                .map(|p| (p.x, p.band.expect("filtered").1))
                .collect();
            poly.extend(
                banded
                    .iter()
                    .rev()
                    .map(|p| (p.x, p.band.expect("filtered").0)),
            );
            chart
                .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.2).filled())))
                .map_err(|e| err(&e))?;
        } else {
            // A single interval: an error bar.
            for p in banded {
                let (lo, hi) = p.band.expect("filtered");
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(p.x, lo), (p.x, hi)],
                        color.stroke_width(2),
                    )))
                    .map_err(|e| err(&e))?;
            }
        }
        let xy: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x, p.y)).collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(xy.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Bin edges and counts of `values` in `bins` equal bins over their range (a flat sample gets
/// one unit-wide bin around its value).
pub fn bin(values: &[f64], bins: usize) -> (Vec<f64>, Vec<usize>) {
    let bins = bins.max(1);
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let width = (hi - lo) / bins as f64;
    let edges: Vec<f64> = (0..=bins).map(|i| lo + width * i as f64).collect();
    let mut counts = vec![0usize; bins];
    for &v in values {
        let i = (((v - lo) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    (edges, counts)
}

/// Draws a histogram of `values` into a PNG at `path`.
pub fn histogram(path: &Path, title: &str, x_label: &str, values: &[f64]) -> Result<()> {
    ensure!(!values.is_empty(), "nothing to plot in {}", path.display());
    register_font();
    let err = draw_err(path);
    // Square-root rule, between 5 and 40 bins.
    let bins = ((values.len() as f64).sqrt().ceil() as usize).clamp(5, 40);
    let (edges, counts) = bin(values, bins);
    let top = counts.iter().copied().max().unwrap_or(1) as f64 * 1.1;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(50)
        .build_cartesian_2d(edges[0]..edges[edges.len() - 1], 0.0..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("runs")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    let color = PALETTE[0];
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            Rectangle::new(
                [(edges[i], 0.0), (edges[i + 1], c as f64)],
                color.mix(0.7).filled(),
            )
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binning_counts_every_value_once() {
        let v = [1.0, 1.5, 2.0, 2.5, 3.0, 3.0];
        let (edges, counts) = bin(&v, 4);
        assert_eq!(edges.len(), 5);
        assert_eq!(counts.iter().sum::<usize>(), v.len());
        // Width 0.5 over [1, 3]: 1 | 1.5 | 2 | 2.5, 3, 3 (the top edge belongs to the last bin).
        assert_eq!(counts, vec![1, 1, 1, 3]);
        let (edges, counts) = bin(&[7.0, 7.0], 3);
        assert_eq!(counts.iter().sum::<usize>(), 2);
        assert!(edges[0] < 7.0 && edges[3] > 7.0);
    }

    #[test]
    fn plots_are_valid_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.png");
        let s = Series {
            name: "nft".into(),
            points: (0..4)
                .map(|i| Point {
                    x: 0.2 * i as f64,
                    y: 90.0 - 5.0 * i as f64,
                    band: Some((88.0 - 5.0 * i as f64, 92.0 - 5.0 * i as f64)),
                })
                .collect(),
        };
        lines(
            &p,
            "accuracy vs sigma",
            "sigma (range)",
            "accuracy (%)",
            &[s],
        )
        .unwrap();
        let h = dir.path().join("h.png");
        histogram(&h, "runs", "accuracy (%)", &[90.0, 91.0, 91.5, 93.0]).unwrap();
        for f in [p, h] {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", f.display());
            assert!(bytes.len() > 2000);
        }
        // The legend is a strip below the 560-pixel chart (one 22-pixel row per series), so
        // it never covers the data: the PNG header's height says so.
        let two = dir.path().join("two.png");
        let mut other = lines_series_for_test();
        other.name = "vanilla".into();
        lines(&two, "t", "x", "y", &[other.clone(), other]).unwrap();
        let bytes = std::fs::read(&two).unwrap();
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!(height, 560 + 14 + 2 * 22);
        assert!(lines(&dir.path().join("e.png"), "", "", "", &[]).is_err());
    }

    fn lines_series_for_test() -> Series {
        Series {
            name: "s".into(),
            points: vec![
                Point {
                    x: 0.0,
                    y: 1.0,
                    band: None,
                },
                Point {
                    x: 1.0,
                    y: 2.0,
                    band: None,
                },
            ],
        }
    }
}
