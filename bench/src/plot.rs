//! Plots of a run as SVG: plain line charts written by hand (a few dozen
//! lines; a plotting crate would pull in font rendering for four charts).

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 320.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 44.0;

/// A "nice" step for about five ticks over `span`.
fn tick_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart of `points` (x ascending) as an SVG document.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, points: &[(f64, f64)]) -> String {
    let max_x = points.iter().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let max_y = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let (xs, ys) = (tick_step(max_x), tick_step(max_y.max(1e-9)));
    let top_y = (max_y / ys).ceil().max(1.0) * ys;
    let top_x = (max_x / xs).ceil().max(1.0) * xs;
    let px = |x: f64| LEFT + (W - LEFT - RIGHT) * x / top_x;
    let py = |y: f64| H - BOTTOM - (H - TOP - BOTTOM) * y / top_y;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-family=\"sans-serif\" font-size=\"12\" role=\"img\" aria-label=\"{t}\">\
         <title>{t}</title><rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{cx}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{t}</text>",
        t = esc(title),
        cx = W / 2.0
    );
    let mut v = 0.0;
    while v <= top_y + ys / 2.0 {
        let y = py(v);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\">{v}</text>",
            x2 = W - RIGHT,
            tx = LEFT - 6.0,
            ty = y + 4.0,
        );
        v += ys;
    }
    let mut v = 0.0;
    while v <= top_x + xs / 2.0 {
        let x = px(v);
        let _ = write!(
            svg,
            "<text x=\"{x:.1}\" y=\"{ty}\" text-anchor=\"middle\">{v}</text>",
            ty = H - BOTTOM + 16.0
        );
        v += xs;
    }
    let _ = write!(
        svg,
        "<text x=\"{cx}\" y=\"{by}\" text-anchor=\"middle\">{xl}</text>\
         <text transform=\"translate(14 {my}) rotate(-90)\" text-anchor=\"middle\">{yl}</text>\
         <line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{b}\" stroke=\"#333\"/>\
         <line x1=\"{LEFT}\" x2=\"{r}\" y1=\"{b}\" y2=\"{b}\" stroke=\"#333\"/>",
        cx = (LEFT + W - RIGHT) / 2.0,
        by = H - 8.0,
        xl = esc(x_label),
        my = (TOP + H - BOTTOM) / 2.0,
        yl = esc(y_label),
        b = H - BOTTOM,
        r = W - RIGHT,
    );
    if !points.is_empty() {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"#01689b\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The share of `values` at or below each value: the points of a CDF
/// (at most 200, evenly spread over the sorted values).
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(200).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], 100.0 * (i + 1) as f64 / n as f64))
        .collect();
    out.push((v[n - 1], 100.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(10.0), 2.0);
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(0.7), 0.2);
        assert_eq!(tick_step(0.0), 1.0);
    }

    #[test]
    fn a_chart_is_an_svg_with_its_points() {
        let svg = line_chart(
            "Calls <up>",
            "s",
            "calls",
            &[(0.0, 0.0), (1.0, 5.0), (2.0, 10.0)],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Calls &lt;up&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        // Three points, the last at the top right of the plot area.
        assert!(
            svg.contains(&format!("{:.1},{:.1}", W - RIGHT, TOP)),
            "{svg}"
        );
        // Empty data still makes a valid (empty) chart.
        assert!(line_chart("x", "x", "y", &[]).contains("</svg>"));
    }

    #[test]
    fn a_cdf_ends_at_100_percent() {
        let c = cdf(&[3.0, 1.0, 2.0]);
        assert_eq!(c.first(), Some(&(1.0, 100.0 / 3.0)));
        assert_eq!(c.last(), Some(&(3.0, 100.0)));
        assert!(cdf(&[]).is_empty());
    }
}
