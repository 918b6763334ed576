//! Plots as hand-written SVG: grouped bars, stacked horizontal bars with
//! goal marks, and lines on a logarithmic x axis. No dependencies; the
//! files open in any browser and render on GitHub.

use std::fmt::Write as _;

const PALETTE: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];
const FONT: &str = "font-family=\"sans-serif\" font-size=\"12\"";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" upper bound for an axis holding `max`.
fn nice(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= max {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn header(w: u32, h: u32, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" {FONT}>\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        w / 2,
        esc(title)
    )
}

fn legend(s: &mut String, x: f64, y: f64, names: &[String]) {
    let mut cx = x;
    for (i, n) in names.iter().enumerate() {
        let _ = writeln!(
            s,
            "<rect x=\"{cx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            y - 9.0,
            PALETTE[i % PALETTE.len()],
            cx + 14.0,
            y,
            esc(n)
        );
        cx += 24.0 + 7.0 * n.len() as f64;
    }
}

/// Vertical grouped bars: one group per category, one bar per series
/// (`None`: no bar, "n/a" written). An optional horizontal reference line.
pub fn bars(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<Option<f64>>)],
    reference: Option<(f64, &str)>,
) -> String {
    let (w, h) = (720u32, 380u32);
    let (left, right, top, bottom) = (70.0, 20.0, 50.0, 60.0);
    let pw = w as f64 - left - right;
    let ph = h as f64 - top - bottom;
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().flatten())
        .copied()
        .chain(reference.map(|r| r.0))
        .fold(0.0, f64::max);
    let ymax = nice(max * 1.05);
    let mut s = header(w, h, title);
    for k in 0..=5 {
        let v = ymax * k as f64 / 5.0;
        let y = top + ph - ph * v / ymax;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + pw,
            left - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate(16,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        top + ph / 2.0,
        esc(y_label)
    );
    let gw = pw / categories.len().max(1) as f64;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    for (c, cat) in categories.iter().enumerate() {
        let gx = left + gw * c as f64 + gw * 0.1;
        for (i, (_, vals)) in series.iter().enumerate() {
            let x = gx + bw * i as f64;
            match vals.get(c).copied().flatten() {
                Some(v) => {
                    let bh = ph * v.max(0.0) / ymax;
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                        top + ph - bh,
                        bw * 0.92,
                        PALETTE[i % PALETTE.len()],
                        esc(cat),
                        fmt_tick(v)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#888\" font-size=\"10\">n/a</text>",
                        x + bw / 2.0,
                        top + ph - 4.0
                    );
                }
            }
        }
        // A name too wide for its group (many paths) goes on two lines,
        // broken after an underscore.
        let lines = wrap_label(cat, (gw / 6.5) as usize);
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">",
            gx + gw * 0.4,
            top + ph + 18.0,
        );
        for (k, l) in lines.iter().enumerate() {
            let _ = write!(
                s,
                "<tspan x=\"{:.1}\" dy=\"{}\">{}</tspan>",
                gx + gw * 0.4,
                if k == 0 { 0 } else { 14 },
                esc(l)
            );
        }
        let _ = writeln!(s, "</text>");
    }
    if let Some((v, label)) = reference {
        let y = top + ph - ph * v / ymax;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e15759\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#e15759\">{}</text>",
            left + pw,
            left + pw,
            y - 4.0,
            esc(label)
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#333\"/><line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        top + ph,
        left + pw,
        top + ph,
        top + ph
    );
    let names: Vec<String> = series.iter().map(|x| x.0.clone()).collect();
    legend(&mut s, left, h as f64 - 12.0, &names);
    s.push_str("</svg>\n");
    s
}

/// `label` in lines of at most about `max` characters, broken only after
/// underscores (a word longer than `max` stays whole).
fn wrap_label(label: &str, max: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for part in label.split_inclusive('_') {
        if !cur.is_empty() && cur.len() + part.len() > max {
            lines.push(std::mem::take(&mut cur));
        }
        cur.push_str(part);
    }
    lines.push(cur);
    lines
}

/// Horizontal stacked bars: one row per item, one segment per part
/// (negative parts are drawn as zero), and a goal mark per row.
pub fn stacked(
    title: &str,
    x_label: &str,
    parts: &[String],
    rows: &[(String, Vec<f64>, Option<f64>)],
) -> String {
    let (w, h) = (720u32, 110 + 34 * rows.len() as u32);
    let (left, right, top) = (130.0, 30.0, 40.0);
    let pw = w as f64 - left - right;
    let max = rows
        .iter()
        .map(|r| {
            r.1.iter()
                .map(|v| v.max(0.0))
                .sum::<f64>()
                .max(r.2.unwrap_or(0.0))
        })
        .fold(0.0, f64::max);
    let xmax = nice(max * 1.05);
    let mut s = header(w, h, title);
    let ph = 34.0 * rows.len() as f64;
    for k in 0..=5 {
        let v = xmax * k as f64 / 5.0;
        let x = left + pw * v / xmax;
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + ph,
            top + ph + 16.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        left + pw / 2.0,
        top + ph + 34.0,
        esc(x_label)
    );
    for (r, (name, vals, goal)) in rows.iter().enumerate() {
        let y = top + 34.0 * r as f64 + 6.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            y + 16.0,
            esc(name)
        );
        let mut x = left;
        for (i, v) in vals.iter().enumerate() {
            let bw = pw * v.max(0.0) / xmax;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"22\" fill=\"{}\"><title>{}: {v:.1}</title></rect>",
                PALETTE[i % PALETTE.len()],
                esc(&parts[i])
            );
            x += bw;
        }
        let total: f64 = vals.iter().sum();
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{total:+.0}</text>",
            x + 4.0,
            y + 15.0
        );
        if let Some(g) = goal {
            let gx = left + pw * g / xmax;
            let _ = writeln!(
                s,
                "<line x1=\"{gx:.1}\" x2=\"{gx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e15759\" stroke-width=\"2\"/>",
                y - 3.0,
                y + 25.0
            );
        }
    }
    legend(&mut s, left, h as f64 - 10.0, parts);
    let gx = left + 40.0 + 60.0 * parts.len() as f64;
    let _ = writeln!(
        s,
        "<line x1=\"{gx:.1}\" x2=\"{gx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e15759\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\">goal</text>",
        h as f64 - 21.0,
        h as f64 - 7.0,
        gx + 5.0,
        h as f64 - 10.0
    );
    s.push_str("</svg>\n");
    s
}

/// Lines over a logarithmic x axis (values > 0), linear y from 0.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (w, h) = (720u32, 380u32);
    let (left, right, top, bottom) = (70.0, 20.0, 50.0, 60.0);
    let pw = w as f64 - left - right;
    let ph = h as f64 - top - bottom;
    let pts = || series.iter().flat_map(|s| s.1.iter());
    let xmin = pts().map(|p| p.0).fold(f64::MAX, f64::min).max(1e-9);
    let xmaxv = pts().map(|p| p.0).fold(0.0, f64::max);
    let (lx0, lx1) = (
        xmin.log10().floor(),
        xmaxv.log10().ceil().max(xmin.log10().floor() + 1.0),
    );
    let ymax = nice(pts().map(|p| p.1).fold(0.0, f64::max) * 1.05);
    let px = |x: f64| left + pw * (x.max(1e-9).log10() - lx0) / (lx1 - lx0);
    let py = |y: f64| top + ph - ph * y / ymax;
    let mut s = header(w, h, title);
    for k in 0..=5 {
        let v = ymax * k as f64 / 5.0;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + pw,
            py(v),
            py(v),
            left - 6.0,
            py(v) + 4.0,
            fmt_tick(v)
        );
    }
    let mut d = lx0;
    while d <= lx1 + 1e-9 {
        let x = px(10f64.powf(d));
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + ph,
            top + ph + 16.0,
            fmt_tick(10f64.powf(d))
        );
        d += 1.0;
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text transform=\"translate(16,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        left + pw / 2.0,
        top + ph + 34.0,
        esc(x_label),
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, (name, p)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for (x, y) in p {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"><title>{}: {} -> {}</title></circle>",
                px(*x),
                py(*y),
                esc(name),
                fmt_tick(*x),
                fmt_tick(*y)
            );
        }
    }
    let names: Vec<String> = series.iter().map(|x| x.0.clone()).collect();
    legend(&mut s, left, h as f64 - 12.0, &names);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(7.3), 10.0);
        assert_eq!(nice(180.0), 200.0);
        assert_eq!(nice(2100.0), 2500.0);
    }

    #[test]
    fn long_labels_break_after_underscores() {
        assert_eq!(wrap_label("mesh", 10), ["mesh"]);
        assert_eq!(wrap_label("mesh_forward", 16), ["mesh_forward"]);
        assert_eq!(
            wrap_label("mesh_forward_direct", 16),
            ["mesh_forward_", "direct"]
        );
        assert_eq!(wrap_label("averyverylongword", 4), ["averyverylongword"]);
    }

    #[test]
    fn plots_are_well_formed() {
        let b = bars(
            "t <x>",
            "y",
            &["a".into(), "b".into()],
            &[("s".into(), vec![Some(1.0), None])],
            Some((0.5, "ref")),
        );
        assert!(
            b.starts_with("<svg") && b.trim_end().ends_with("</svg>") && b.contains("&lt;x&gt;")
        );
        let s = stacked(
            "t",
            "ns",
            &["x".into(), "y".into()],
            &[("p".into(), vec![1.0, -2.0], Some(3.0))],
        );
        assert!(s.contains("<rect") && s.trim_end().ends_with("</svg>"));
        let l = lines(
            "t",
            "x",
            "y",
            &[("s".into(), vec![(1.0, 1.0), (100.0, 2.0)])],
        );
        assert!(l.contains("<polyline"));
    }
}
