//! `speedup.svg`: speedup over plain decoding per category (and overall), a bar per
//! speculative config; `concurrency.svg`: aggregate tokens/s against concurrency, a line
//! per config.

use super::results::Results;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The chart as SVG text.
pub fn svg(results: &Results) -> anyhow::Result<String> {
    let configs: Vec<&String> = results.speculative().collect();
    let mut groups: Vec<(String, Vec<Option<f64>>)> = results
        .category_names
        .iter()
        .map(|category| {
            let bars = configs
                .iter()
                .map(|c| {
                    results
                        .configs
                        .get(*c)
                        .and_then(|r| r.categories.get(category))
                        .and_then(|s| s.speedup_geomean)
                })
                .collect();
            (category.clone(), bars)
        })
        .collect();
    groups.push((
        "overall".into(),
        configs
            .iter()
            .map(|c| {
                results
                    .configs
                    .get(*c)
                    .and_then(|r| r.overall.speedup_geomean)
            })
            .collect(),
    ));
    let top = groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().flatten())
        .fold(1.0f64, |a, &b| a.max(b));
    let y_max = (top * 1.25).max(1.3);
    let width = (140 + 110 * groups.len()).max(760) as u32;
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (width, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let caption = format!(
            "Speedup over plain decoding, {} (decode tokens/s, geometric mean per prompt)",
            results.setup.model
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(56)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..groups.len() as f64, 0f64..y_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("speedup (x)")
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()?;
        let slots = configs.len().max(1) as f64;
        for (index, name) in configs.iter().enumerate() {
            let color = COLORS[index % COLORS.len()];
            let bars = groups.iter().enumerate().filter_map(|(g, (_, bars))| {
                let value = bars[index]?;
                let left = g as f64 + 0.1 + 0.8 * index as f64 / slots;
                let right = left + 0.8 / slots;
                Some((left, right, value))
            });
            chart
                .draw_series(bars.clone().map(|(left, right, value)| {
                    Rectangle::new([(left, 0.0), (right, value)], color.filled())
                }))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            chart.draw_series(bars.map(|(left, right, value)| {
                Text::new(
                    format!("{value:.2}x"),
                    ((left + right) / 2.0, value),
                    ("sans-serif", 12)
                        .into_font()
                        .into_text_style(&root)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))?;
        }
        chart.draw_series(LineSeries::new(
            [(0.0, 1.0), (groups.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        ))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        let label_style = ("sans-serif", 13)
            .into_font()
            .into_text_style(&root)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (g, (name, _)) in groups.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
            root.draw(&Text::new(name.clone(), (x, y + 8), label_style.clone()))?;
        }
        root.present()?;
    }
    Ok(text)
}

/// `concurrency.svg`: aggregate tokens/s against concurrency, a line per config; `None`
/// when no config ran at more than one.
pub fn concurrency_svg(results: &Results) -> anyhow::Result<Option<String>> {
    let lines: Vec<(&String, Vec<(usize, f64)>)> = results
        .config_names
        .iter()
        .filter_map(|name| {
            let figures = &results.configs.get(name)?.concurrency;
            let points = figures
                .iter()
                .map(|f| (f.concurrency, f.aggregate_tokens_per_s))
                .collect::<Vec<_>>();
            (!points.is_empty()).then_some((name, points))
        })
        .collect();
    if lines.is_empty() {
        return Ok(None);
    }
    // The levels spaced evenly (1, 2, 4, 8 read as doublings).
    let mut levels: Vec<usize> = lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(level, _)| level))
        .collect();
    levels.sort_unstable();
    levels.dedup();
    let x = |level: usize| levels.iter().position(|&l| l == level).unwrap_or(0) as f64;
    let top = lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(_, value)| value))
        .fold(0.0f64, f64::max);
    let y_max = if top > 0.0 { top * 1.2 } else { 1.0 };
    let width = (140 + 110 * levels.len()).max(760) as u32;
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (width, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let caption = format!(
            "Aggregate tokens/s against concurrency, {} (one step scheduler)",
            results.setup.model
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(56)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5f64..levels.len() as f64 - 0.5, 0f64..y_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("aggregate tokens/s")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (index, (name, points)) in lines.iter().enumerate() {
            let color = COLORS[index % COLORS.len()];
            let points: Vec<(f64, f64)> = points.iter().map(|&(l, v)| (x(l), v)).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 4, color.filled())),
            )?;
            chart.draw_series(points.iter().map(|&(x, value)| {
                Text::new(
                    format!("{value:.1}"),
                    (x, value),
                    ("sans-serif", 12)
                        .into_font()
                        .into_text_style(&root)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        let label_style = ("sans-serif", 13)
            .into_font()
            .into_text_style(&root)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (position, level) in levels.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(position as f64, 0.0));
            let label = format!("concurrency {level}");
            root.draw(&Text::new(label, (x, y + 8), label_style.clone()))?;
        }
        root.present()?;
    }
    Ok(Some(text))
}
