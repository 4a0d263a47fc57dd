//! `speedup.svg`: speedup over plain decoding per category (and overall), a bar per
//! speculative config.

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
