//! Two small SVG charts written directly (text is rendered by the viewer, so no font files are
//! needed at run time): latency percentile curves and grouped bars.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn header(title: &str) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>",
        W / 2.0,
        escape(title)
    );
    svg
}

fn legend(svg: &mut String, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let x = W - RIGHT + 15.0;
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(svg, "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{color}\"/>", y - 4.0);
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{y}\">{}</text>", x + 20.0, escape(name));
    }
}

/// Latency by percentile: x is the percentile on a "nines" scale (50, 90, 99, 99.9, 99.99), y the
/// latency in milliseconds on a log scale. `series` are (name, [(percentile, ms)]).
pub fn percentile_chart(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let mut svg = header(title);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let nines = |p: f64| -(1.0 - (p / 100.0).min(0.99999)).log10();
    let (x_min, x_max) = (nines(50.0), nines(99.999));
    let values = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1)).filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (y_min, y_max) =
        if lo > hi { (-1.0, 3.0) } else { (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0)) };
    let x = |p: f64| LEFT + (nines(p) - x_min) / (x_max - x_min) * pw;
    let y = |ms: f64| TOP + ph - (ms.max(1e-3).log10() - y_min) / (y_max - y_min) * ph;
    let _ =
        writeln!(svg, "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>");
    for p in [50.0, 90.0, 99.0, 99.9, 99.99] {
        let px = x(p);
        let _ = writeln!(svg, "<line x1=\"{px}\" y1=\"{TOP}\" x2=\"{px}\" y2=\"{}\" stroke=\"#ddd\"/>", TOP + ph);
        let _ = writeln!(svg, "<text x=\"{px}\" y=\"{}\" text-anchor=\"middle\">p{p}</text>", TOP + ph + 16.0);
    }
    let mut decade = y_min;
    while decade <= y_max {
        let ms = 10f64.powf(decade);
        let py = y(ms);
        let _ = writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\" stroke=\"#ddd\"/>", LEFT + pw);
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{ms} ms</text>", LEFT - 6.0, py + 4.0);
        decade += 1.0;
    }
    let _ =
        writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">percentile</text>", LEFT + pw / 2.0, H - 12.0);
    for (i, (_, points)) in series.iter().enumerate() {
        let path: Vec<String> =
            points.iter().filter(|(p, _)| *p >= 50.0).map(|(p, ms)| format!("{:.1},{:.1}", x(*p), y(*ms))).collect();
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
    }
    legend(&mut svg, &series.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
    svg.push_str("</svg>\n");
    svg
}

/// Grouped bars: `groups` are (label, [value per series]); `series` names the bars of a group.
pub fn bar_chart(title: &str, unit: &str, series: &[String], groups: &[(String, Vec<f64>)]) -> String {
    let mut svg = header(title);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let max = groups.iter().flat_map(|g| g.1.iter().copied()).fold(0.0f64, f64::max).max(1e-9);
    let top = nice_ceiling(max);
    let _ =
        writeln!(svg, "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>");
    for step in 0..=4 {
        let value = top * step as f64 / 4.0;
        let py = TOP + ph - value / top * ph;
        let _ = writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\" stroke=\"#ddd\"/>", LEFT + pw);
        let _ =
            writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>", LEFT - 6.0, py + 4.0, short(value));
    }
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{}</text>",
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(unit)
    );
    let group_w = pw / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (g, (label, values)) in groups.iter().enumerate() {
        let gx = LEFT + g as f64 * group_w + group_w * 0.1;
        for (i, value) in values.iter().enumerate() {
            let h = value / top * ph;
            let color = COLORS[i % COLORS.len()];
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
                gx + i as f64 * bar_w,
                TOP + ph - h,
                bar_w * 0.95,
                h
            );
            // The value itself above its bar.
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                gx + i as f64 * bar_w + bar_w * 0.475,
                TOP + ph - h - 3.0,
                short(*value)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            gx + group_w * 0.4,
            TOP + ph + 16.0,
            escape(label)
        );
    }
    legend(&mut svg, series);
    svg.push_str("</svg>\n");
    svg
}

fn nice_ceiling(max: f64) -> f64 {
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|v| *v >= max).unwrap_or(max)
}

fn short(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.1}k", value / 1000.0)
    } else if value >= 10.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let cdf = percentile_chart("t", &[("quic".into(), vec![(50.0, 1.0), (99.0, 3.0), (99.9, 9.0)])]);
        assert!(cdf.starts_with("<svg") && cdf.trim_end().ends_with("</svg>") && cdf.contains("polyline"));
        let bars = bar_chart("b", "req/s", &["quic".into(), "grpc".into()], &[("c=1".into(), vec![10.0, 5.0])]);
        assert_eq!(bars.matches("<rect x=").count(), 3 + 2, "{bars}");
        assert!(bars.contains(">10</text>") && bars.contains(">5</text>"), "every bar has its value: {bars}");
        assert_eq!(nice_ceiling(730.0), 1000.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
    }
}
