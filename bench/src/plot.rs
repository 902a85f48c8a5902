//! Latency-vs-throughput curves of `lookup-bench` as a PNG (plotters, fonts
//! rendered by ab_glyph from DejaVu Sans, Debian's `fonts-dejavu-core`).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde_json::Value;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One panel per transport: p99 latency (ms, log scale) against keys/s, a
/// line per system.
pub fn latency_curves(report: &Value, out: &Path) -> anyhow::Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("reading {FONT} (Debian: fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;

    let curves = report["curves"].as_array().context("curves")?;
    let mut transports: Vec<&str> = curves.iter().filter_map(|c| c["transport"].as_str()).collect();
    transports.dedup();
    let root = BitMapBackend::new(out, (1000, 480 * transports.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((transports.len().max(1), 1));
    let colors = [RED, BLUE, GREEN, BLACK];
    for (panel, transport) in panels.iter().zip(&transports) {
        let series: Vec<(&str, Vec<(f64, f64)>)> = curves
            .iter()
            .filter(|c| c["transport"].as_str() == Some(transport))
            .map(|c| {
                let pts = c["points"]
                    .as_array()
                    .map(|p| {
                        p.iter().filter_map(|p| Some((p["keys_s"].as_f64()?, p["p99_us"].as_f64()? / 1000.0))).collect()
                    })
                    .unwrap_or_default();
                (c["system"].as_str().unwrap_or("?"), pts)
            })
            .collect();
        let x_max = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0, f64::max) * 1.05;
        let y_max = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(1.0, f64::max) * 1.5;
        let title = format!(
            "{transport}: p99 latency vs throughput ({} keys, batch {}, {} clients)",
            report["keys"], report["batch"], report["clients"]
        );
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (0.01..y_max).log_scale())?;
        chart.configure_mesh().x_desc("keys/s").y_desc("p99 latency (ms)").draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}
