//! The `--plot` file: an SVG drawn with plotters, three panels over the same run:
//! throughput per time bucket, p50 and p99 latency per time bucket, and a latency histogram.
//!
//! SVG because its text is rendered by the viewer: a bitmap backend would need a TTF font on
//! the machine that draws it, and the bench machines may have none.

use std::io;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::load::Record;

/// One time bucket: its start (s since the first request), completions per second (all and
/// failed ones), p50 and p99 of the requests completing in it (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub t_s: f64,
    /// The bucket's width (the last one may be cut short, or merged into the one before).
    pub width_s: f64,
    pub per_s: f64,
    pub failed_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub count: u64,
}

/// The value at quantile `q` of `v` (nearest rank; `v` is reordered).
fn quantile(v: &mut [u64], q: f64) -> u64 {
    let k = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    *v.select_nth_unstable(k).1
}

/// Requests bucketed by completion time: 1 s buckets for runs of 20 s or more, else 100 ms
/// (a 3-second run would otherwise be three dots). Returns the bucket width in seconds too.
pub fn series(records: &[Record]) -> (f64, Vec<Point>) {
    if records.is_empty() {
        return (1.0, Vec::new());
    }
    let t0 = records.iter().map(|r| r.start_us).min().unwrap_or(0);
    let t_end = records.iter().map(|r| r.start_us + r.latency_us).max().unwrap_or(t0).max(t0 + 1);
    let span_us = t_end - t0;
    let bucket_us: u64 = if span_us >= 20_000_000 { 1_000_000 } else { 100_000 };
    let mut n = span_us.div_ceil(bucket_us) as usize;
    // A last bucket under half a bucket wide holds a few stragglers whose rate over its
    // sliver of time would spike the axis: it joins the bucket before.
    if n > 1 && span_us - (n as u64 - 1) * bucket_us < bucket_us / 2 {
        n -= 1;
    }
    let mut lat: Vec<(Vec<u64>, u64)> = vec![(Vec::new(), 0); n.max(1)];
    for r in records {
        let i = (((r.start_us + r.latency_us - t0) / bucket_us) as usize).min(n - 1);
        lat[i].0.push(r.latency_us);
        if !r.kind.is_success(r.status) {
            lat[i].1 += 1;
        }
    }
    let points = lat
        .into_iter()
        .enumerate()
        .map(|(i, (mut v, failed))| {
            let start = i as u64 * bucket_us;
            // The last bucket's rate is over the time it covers (shorter or longer than a bucket).
            let width_us = if i + 1 == n { (span_us - start).max(1) } else { bucket_us } as f64;
            let count = v.len() as u64;
            let (p50, p99) = if v.is_empty() { (0, 0) } else { (quantile(&mut v, 0.5), quantile(&mut v, 0.99)) };
            Point {
                t_s: start as f64 / 1e6,
                width_s: width_us / 1e6,
                per_s: count as f64 * 1e6 / width_us,
                failed_per_s: failed as f64 * 1e6 / width_us,
                p50_ms: p50 as f64 / 1000.0,
                p99_ms: p99 as f64 / 1000.0,
                count,
            }
        })
        .collect();
    (bucket_us as f64 / 1e6, points)
}

/// One bar of the latency histogram: [lo_ms, hi_ms) and how many requests fell in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bin {
    pub lo_ms: f64,
    pub hi_ms: f64,
    pub count: u64,
}

/// Latencies in `bins` bins of equal width on a log scale from the fastest to the slowest
/// request: load latencies have long tails, and equal linear bins would put nearly every
/// request in the first bar.
pub fn histogram(records: &[Record], bins: usize) -> Vec<Bin> {
    let bins = bins.max(1);
    let Some(min) = records.iter().map(|r| r.latency_us.max(1)).min() else { return Vec::new() };
    let max = records.iter().map(|r| r.latency_us.max(1)).max().unwrap_or(min);
    let (lo, hi) = ((min as f64).ln(), ((max as f64) * 1.0001).ln().max((min as f64).ln() + 1e-3));
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0u64; bins];
    for r in records {
        let i = (((r.latency_us.max(1) as f64).ln() - lo) / width) as usize;
        counts[i.min(bins - 1)] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, count)| Bin { lo_ms: (lo + width * i as f64).exp() / 1000.0, hi_ms: (lo + width * (i + 1) as f64).exp() / 1000.0, count })
        .collect()
}

const THROUGHPUT: RGBColor = RGBColor(52, 101, 164);
const FAILED: RGBColor = RGBColor(204, 0, 0);
const P50: RGBColor = RGBColor(78, 154, 6);
const P99: RGBColor = RGBColor(245, 121, 0);
const MARK: RGBColor = RGBColor(117, 80, 123);
const FONT: &str = "sans-serif";

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type PlotResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Tick labels without float noise: `0.30000000000000004` as `0.3`, `20000` as `20k`.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let k = v / 1000.0;
        if k.fract().abs() < 1e-9 {
            format!("{}k", k as i64)
        } else {
            format!("{k:.1}k")
        }
    } else if a >= 100.0 || a == 0.0 || (v.fract().abs() < 1e-9) {
        format!("{}", v.round() as i64)
    } else if a >= 1.0 {
        trim(format!("{v:.2}"))
    } else {
        // Enough decimals for two significant digits.
        let d = (-a.log10()).ceil() as usize + 1;
        trim(format!("{v:.d$}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Vertical dashed lines with their labels at the phase (or run) starts, in a time panel.
fn draw_marks<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    marks: &[(f64, String)],
    y_top: f64,
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    for (i, (t, label)) in marks.iter().enumerate() {
        let s = chart.draw_series(DashedLineSeries::new(vec![(*t, 0.0), (*t, y_top)], 6, 6, MARK.stroke_width(2)))?;
        if i == 0 {
            s.label("phase or run start").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MARK.stroke_width(2)));
        }
        chart.draw_series(std::iter::once(Text::new(format!(" {label}"), (*t, y_top * 0.97), (FONT, 13).into_font().color(&MARK))))?;
    }
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, DB, CT>) -> PlotResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.6))
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

/// Room above the highest value so the legend box does not cover the data.
fn headroom(max: f64) -> f64 {
    if max > 0.0 && max.is_finite() {
        max * 1.3
    } else {
        1.0
    }
}

/// A panel over the run's time axis (0 to `t_max` seconds) and 0 to `y_top`, with its
/// caption, axis descriptions and grid drawn: the throughput and latency panels share it.
fn time_panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    y_desc: &str,
    t_max: f64,
    y_top: f64,
) -> PlotResult<ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..t_max, 0.0..y_top)?;
    chart
        .configure_mesh()
        .x_desc("time since the first request (s)")
        .y_desc(y_desc)
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .draw()?;
    Ok(chart)
}

fn draw_throughput(area: &Area, pts: &[Point], bucket_s: f64, t_max: f64, marks: &[(f64, String)]) -> PlotResult {
    let per = bucket_label(bucket_s);
    let y_top = headroom(pts.iter().map(|p| p.per_s).fold(0.0, f64::max));
    let mut chart = time_panel(area, &format!("Throughput ({per})"), "completed requests per second", t_max, y_top)?;
    // Step lines: a bucket's rate holds over the whole bucket.
    let step = |f: fn(&Point) -> f64| pts.iter().flat_map(move |p| [(p.t_s, f(p)), ((p.t_s + p.width_s).min(t_max), f(p))]);
    chart
        .draw_series(AreaSeries::new(step(|p| p.per_s), 0.0, THROUGHPUT.mix(0.2)).border_style(THROUGHPUT.stroke_width(2)))?
        .label("all requests (req/s)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], THROUGHPUT.mix(0.5).filled()));
    if pts.iter().any(|p| p.failed_per_s > 0.0) {
        chart
            .draw_series(LineSeries::new(step(|p| p.failed_per_s), FAILED.stroke_width(2)))?
            .label("failed requests (req/s)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], FAILED.stroke_width(2)));
    }
    draw_marks(&mut chart, marks, y_top)?;
    legend(&mut chart)
}

fn draw_latency_over_time(area: &Area, pts: &[Point], bucket_s: f64, t_max: f64, marks: &[(f64, String)]) -> PlotResult {
    let per = bucket_label(bucket_s);
    let with_data: Vec<&Point> = pts.iter().filter(|p| p.count > 0).collect();
    let y_top = headroom(with_data.iter().map(|p| p.p99_ms).fold(0.0, f64::max));
    let mut chart = time_panel(area, &format!("Latency over time ({per}, by completion time)"), "latency (ms)", t_max, y_top)?;
    let mid = |p: &Point| p.t_s + p.width_s / 2.0;
    for (name, color, f) in [("p99 (ms)", P99, (|p: &Point| p.p99_ms) as fn(&Point) -> f64), ("p50 (ms)", P50, |p: &Point| p.p50_ms)] {
        chart
            .draw_series(LineSeries::new(with_data.iter().map(|p| (mid(p), f(p))), color.stroke_width(2)).point_size(2))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    draw_marks(&mut chart, marks, y_top)?;
    legend(&mut chart)
}

fn draw_histogram(area: &Area, records: &[Record]) -> PlotResult {
    let bins = histogram(records, 60);
    let (lo, hi) = match (bins.first(), bins.last()) {
        (Some(a), Some(b)) => (a.lo_ms, b.hi_ms),
        _ => (0.001, 1.0),
    };
    let y_top = headroom(bins.iter().map(|b| b.count).max().unwrap_or(0) as f64);
    let mut chart = ChartBuilder::on(area)
        .caption("Latency histogram (all requests, log scale)", (FONT, 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(log_ticks(lo, hi)), 0.0..y_top)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("requests per bin")
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .draw()?;
    chart
        .draw_series(
            bins.iter()
                .filter(|b| b.count > 0)
                .map(|b| Rectangle::new([(b.lo_ms, 0.0), (b.hi_ms, b.count as f64)], THROUGHPUT.mix(0.7).filled())),
        )?
        .label("requests")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], THROUGHPUT.mix(0.7).filled()));
    let mut lat: Vec<u64> = records.iter().map(|r| r.latency_us).collect();
    if !lat.is_empty() {
        for (name, q, color) in [("p50", 0.5, P50), ("p99", 0.99, P99), ("p99.9", 0.999, FAILED)] {
            let v = (quantile(&mut lat, q).max(1) as f64 / 1000.0).clamp(lo, hi);
            chart
                .draw_series(DashedLineSeries::new(vec![(v, 0.0), (v, y_top)], 6, 4, color.stroke_width(2)))?
                .label(format!("{name} = {} ms", tick_label(v)))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    legend(&mut chart)
}

/// Tick values for a log axis from `lo` to `hi`: 1-2-5 per decade, finer mantissas when the
/// range spans too little for that to give four ticks, and plain linear steps when even those
/// are too few (a narrow range is nearly linear on a log scale anyway).
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && hi.is_finite()) {
        return vec![];
    }
    let sets: [&[f64]; 3] = [&[1.0, 2.0, 5.0], &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0], &[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0]];
    for set in sets {
        let mut ticks = Vec::new();
        let mut decade = 10f64.powf(lo.log10().floor());
        while decade <= hi {
            for m in set {
                let v = m * decade;
                if v >= lo && v <= hi {
                    ticks.push(v);
                }
            }
            decade *= 10.0;
        }
        if ticks.len() >= 4 {
            return ticks;
        }
    }
    let step = nice_step((hi - lo) / 5.0);
    let mut v = (lo / step).ceil() * step;
    let mut ticks = Vec::new();
    while v <= hi {
        ticks.push(v);
        v += step;
    }
    ticks
}

/// 1, 2 or 5 times a power of ten, at or above `raw`.
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw * 0.999).unwrap_or(10.0 * mag)
}

fn bucket_label(bucket_s: f64) -> String {
    if bucket_s >= 1.0 {
        format!("{} s buckets", tick_label(bucket_s))
    } else {
        format!("{:.0} ms buckets", bucket_s * 1000.0)
    }
}

/// The SVG document for `records` under `title`; `marks` are (µs since the invocation began,
/// label) of phase or run starts.
pub fn render(records: &[Record], title: &str, marks: &[(u64, String)]) -> io::Result<String> {
    let mut svg = String::new();
    draw(&mut svg, records, title, marks).map_err(|e| io::Error::other(format!("cannot draw the plot: {e}")))?;
    Ok(svg)
}

fn draw(svg: &mut String, records: &[Record], title: &str, marks: &[(u64, String)]) -> PlotResult {
    let (bucket_s, pts) = series(records);
    let t0 = records.iter().map(|r| r.start_us).min().unwrap_or(0);
    // Marks are relative to the invocation; the time axis starts at the first request.
    let marks: Vec<(f64, String)> = marks.iter().filter(|(t, _)| *t > t0).map(|(t, l)| ((t - t0) as f64 / 1e6, l.clone())).collect();
    let t_max = pts.last().map(|p| p.t_s + p.width_s).unwrap_or(1.0).max(bucket_s);
    let root = SVGBackend::with_string(svg, (1200, 1260)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 22))?;
    let panels = root.split_evenly((3, 1));
    draw_throughput(&panels[0], &pts, bucket_s, t_max, &marks)?;
    draw_latency_over_time(&panels[1], &pts, bucket_s, t_max, &marks)?;
    draw_histogram(&panels[2], records)?;
    root.present()?;
    Ok(())
}

/// Write the SVG to `path` as given (whatever its extension: the caller names the file).
pub fn write(path: &Path, records: &[Record], title: &str, marks: &[(u64, String)]) -> io::Result<()> {
    std::fs::write(path, render(records, title, marks)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::OpKind;

    fn rec(start_us: u64, latency_us: u64) -> Record {
        Record { start_us, latency_us, status: 201, kind: OpKind::Post, attempts: 1 }
    }

    #[test]
    fn buckets_count_completions_failures_and_percentiles() {
        // 100 requests finishing in the first 100 ms, 50 in the second (10 of them failed).
        let mut r: Vec<Record> = (0..100).map(|i| rec(i * 900, 100 + i)).collect();
        r.extend((0..50).map(|i| Record { status: if i < 10 { 503 } else { 201 }, ..rec(100_000 + i * 1000, 5_000) }));
        let (b, pts) = series(&r);
        assert_eq!(b, 0.1);
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].count, 100);
        assert!((pts[0].per_s - 1000.0).abs() < 1e-6, "{}", pts[0].per_s);
        assert_eq!(pts[0].failed_per_s, 0.0);
        assert!((pts[0].p99_ms - 0.198).abs() < 1e-9, "{}", pts[0].p99_ms);
        assert!((pts[0].p50_ms - 0.149).abs() < 1e-9, "{}", pts[0].p50_ms);
        assert!((pts[1].width_s - 0.054).abs() < 1e-9, "{}", pts[1].width_s);
        assert_eq!(pts[1].count, 50);
        assert_eq!(pts[1].p99_ms, 5.0);
        assert!(pts[1].failed_per_s > 0.0);
    }

    #[test]
    fn a_short_last_bucket_joins_the_one_before() {
        // 100 requests in the first 100 ms and one straggler 10 ms later: two buckets would
        // rate the straggler at 100 req/s over its 10 ms.
        let mut r: Vec<Record> = (0..100).map(|i| rec(i * 990, 10)).collect();
        r.push(rec(109_000, 1000));
        let (_, pts) = series(&r);
        assert_eq!(pts.len(), 1);
        assert_eq!(pts[0].count, 101);
        assert!((pts[0].width_s - 0.11).abs() < 1e-9);
    }

    #[test]
    fn histogram_bins_cover_every_request_on_a_log_scale() {
        let r: Vec<Record> = (1..=1000).map(|i| rec(i, i * 10)).collect();
        let h = histogram(&r, 20);
        assert_eq!(h.len(), 20);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 1000);
        assert!((h[0].lo_ms - 0.01).abs() < 1e-9, "{}", h[0].lo_ms);
        assert!(h[19].hi_ms >= 10.0, "{}", h[19].hi_ms);
        // Equal widths in log space: each bin's hi/lo ratio is the same.
        let ratio = h[0].hi_ms / h[0].lo_ms;
        assert!(h.iter().all(|b| (b.hi_ms / b.lo_ms - ratio).abs() < 1e-6));
        // All latencies equal: one non-empty bin, nothing lost.
        let same: Vec<Record> = (0..10).map(|i| rec(i, 500)).collect();
        assert_eq!(histogram(&same, 5).iter().map(|b| b.count).sum::<u64>(), 10);
        assert!(histogram(&[], 5).is_empty());
    }

    #[test]
    fn log_axis_ticks() {
        assert_eq!(log_ticks(0.05, 80.0), vec![0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        // Under a decade: finer mantissas.
        let t = log_ticks(0.4, 3.0);
        assert!(t.len() >= 4 && t.contains(&1.5) && t.first() >= Some(&0.4) && t.last() <= Some(&3.0), "{t:?}");
        // A narrow range: linear steps, still inside it.
        let t = log_ticks(0.5, 0.52);
        assert!(t.len() >= 2 && t.iter().all(|v| (0.5..=0.52).contains(v)), "{t:?}");
        assert!(log_ticks(0.0, 1.0).is_empty());
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(20000.0), "20k");
        assert_eq!(tick_label(12500.0), "12.5k");
        assert_eq!(tick_label(0.30000000000000004), "0.3");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.0125), "0.013");
        assert_eq!(tick_label(350.0), "350");
    }

    /// The contents of the SVG's `<text>` elements, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string())).collect()
    }

    #[test]
    fn svg_has_the_three_panels_axes_and_legends() {
        let mut r: Vec<Record> = (0..2000).map(|i| rec(i * 1000, 500 + (i % 50) * 20)).collect();
        r[7].status = 500;
        let svg = render(&r, "liftlog-load post: 2000 requests", &[(1_000_000, "phase 2: 128 workers".into())]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let found = texts(&svg);
        for text in [
            "liftlog-load post: 2000 requests",
            "Throughput (100 ms buckets)",
            "Latency over time (100 ms buckets, by completion time)",
            "Latency histogram (all requests, log scale)",
            "time since the first request (s)",
            "completed requests per second",
            "latency (ms)",
            "latency (ms, log scale)",
            "requests per bin",
            "all requests (req/s)",
            "failed requests (req/s)",
            "p50 (ms)",
            "p99 (ms)",
            "phase or run start",
            "phase 2: 128 workers",
            "p99.9 = ",
        ] {
            assert!(found.iter().any(|t| t.starts_with(text)), "the SVG lacks the text {text:?}: {found:?}");
        }
        // Tick labels on the axes: the throughput axis reaches 1000 req/s (one request a ms).
        assert!(found.iter().any(|t| t == "1000"), "{found:?}");
        if let Ok(dir) = std::env::var("LIFTLOG_LOAD_PLOT_DIR") {
            // To look at it: LIFTLOG_LOAD_PLOT_DIR=/tmp cargo test -p liftlog-load svg_has
            std::fs::write(Path::new(&dir).join("liftlog-load-test-plot.svg"), &svg).unwrap();
        }
        // A run without failures has no failure line, and an empty run still draws.
        let ok: Vec<Record> = (0..10).map(|i| rec(i * 1000, 300)).collect();
        assert!(!texts(&render(&ok, "t", &[]).unwrap()).iter().any(|t| t.contains("failed requests")));
        assert!(texts(&render(&[], "empty", &[]).unwrap()).contains(&"empty".to_string()));
    }
}
