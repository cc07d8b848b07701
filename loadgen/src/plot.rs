//! The `--plot` PNG: throughput and p99 latency per time bucket, drawn into an RGB buffer with
//! a built-in 5x7 pixel font (no font files, no plotting crate) and encoded as PNG.

use std::io;
use std::path::Path;

use crate::load::Record;

/// One time bucket: its start (s since the first request), completions per second, p99 (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub t_s: f64,
    pub per_s: f64,
    pub p99_ms: f64,
    pub count: u64,
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
    let n = span_us.div_ceil(bucket_us) as usize;
    let mut lat: Vec<Vec<u64>> = vec![Vec::new(); n.max(1)];
    for r in records {
        let i = ((r.start_us + r.latency_us - t0) / bucket_us) as usize;
        lat[i.min(n - 1)].push(r.latency_us);
    }
    let points = lat
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            let start = i as u64 * bucket_us;
            let width_us = (span_us - start).min(bucket_us).max(1);
            let count = v.len() as u64;
            let p99 = if v.is_empty() {
                0.0
            } else {
                let k = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
                let (_, x, _) = v.select_nth_unstable(k);
                *x as f64 / 1000.0
            };
            Point { t_s: start as f64 / 1e6, per_s: count as f64 * 1e6 / width_us as f64, p99_ms: p99, count }
        })
        .collect();
    (bucket_us as f64 / 1e6, points)
}

type Rgb = [u8; 3];
const BLACK: Rgb = [30, 30, 30];
const GRID: Rgb = [225, 225, 225];
const BLUE: Rgb = [52, 101, 164];
const RED: Rgb = [204, 0, 0];
const MARK: Rgb = [78, 154, 6];

pub struct Canvas {
    w: i32,
    h: i32,
    px: Vec<u8>,
}

impl Canvas {
    pub fn new(w: i32, h: i32) -> Canvas {
        Canvas { w, h, px: vec![255; (w * h * 3) as usize] }
    }

    fn put(&mut self, x: i32, y: i32, c: Rgb) {
        if x >= 0 && y >= 0 && x < self.w && y < self.h {
            let i = ((y * self.w + x) * 3) as usize;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fill [x0, x1) x [y0, y1).
    fn fill(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, c: Rgb) {
        for y in y0.max(0)..y1.min(self.h) {
            for x in x0.max(0)..x1.min(self.w) {
                self.put(x, y, c);
            }
        }
    }

    fn line(&mut self, (mut x0, mut y0): (i32, i32), (x1, y1): (i32, i32), c: Rgb) {
        let dx = (x1 - x0).abs();
        let dy = -(y1 - y0).abs();
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.fill(x0, y0, x0 + 2, y0 + 2, c);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    fn text(&mut self, x: i32, y: i32, s: &str, scale: i32, c: Rgb) {
        let mut cx = x;
        for ch in s.chars() {
            let g = glyph(ch.to_ascii_uppercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (cx + col * scale, y + row as i32 * scale);
                        self.fill(px, py, px + scale, py + scale, c);
                    }
                }
            }
            cx += 6 * scale;
        }
    }

    pub fn text_width(s: &str, scale: i32) -> i32 {
        (s.chars().count() as i32 * 6 - 1).max(0) * scale
    }

    /// The picture as a PNG file (8-bit RGB, zlib level 6).
    pub fn png(&self) -> Vec<u8> {
        let row = (self.w * 3) as usize;
        let mut raw = Vec::with_capacity((row + 1) * self.h as usize);
        for y in 0..self.h as usize {
            raw.push(0); // filter: none
            raw.extend_from_slice(&self.px[y * row..(y + 1) * row]);
        }
        let z = miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6);
        let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, ty: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(ty);
    out.extend_from_slice(data);
    let mut h = crc32fast::Hasher::new();
    h.update(ty);
    h.update(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

/// 1, 2 or 5 times a power of ten, near `raw`.
pub fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

pub fn tick_label(v: f64, step: f64) -> String {
    if v.abs() < step * 1e-6 {
        "0".to_string()
    } else if step >= 1000.0 && (v / 1000.0).fract().abs() < 1e-9 {
        format!("{}K", (v / 1000.0).round() as i64)
    } else if step >= 1.0 {
        format!("{}", v.round() as i64)
    } else {
        let d = (-step.log10()).ceil().max(0.0) as usize;
        format!("{v:.d$}")
    }
}

struct Panel<'a> {
    x0: i32,
    y0: i32,
    x1: i32,
    y1: i32,
    title: &'a str,
    color: Rgb,
    bars: bool,
}

fn draw_panel(cv: &mut Canvas, p: &Panel, pts: &[(f64, f64)], bucket_s: f64, t_max: f64, marks: &[(f64, String)]) {
    let vmax_data = pts.iter().map(|&(_, v)| v).fold(0.0, f64::max);
    let vstep = nice_step(vmax_data.max(1e-3) * 1.1 / 5.0);
    let vmax = (vmax_data * 1.1 / vstep).ceil().max(1.0) * vstep;
    let (w, h) = ((p.x1 - p.x0) as f64, (p.y1 - p.y0) as f64);
    let sx = |t: f64| p.x0 + (t / t_max * w).round() as i32;
    let sy = |v: f64| p.y1 - (v / vmax * h).round() as i32;

    cv.text(p.x0, p.y0 - 24, p.title, 2, BLACK);
    // Horizontal grid and value labels.
    let mut v = 0.0;
    while v <= vmax + vstep * 1e-6 {
        let y = sy(v);
        cv.fill(p.x0, y, p.x1, y + 1, GRID);
        let label = tick_label(v, vstep);
        cv.text(p.x0 - 8 - Canvas::text_width(&label, 2), y - 7, &label, 2, BLACK);
        v += vstep;
    }
    // Time ticks and labels.
    let tstep = nice_step(t_max / 8.0);
    let mut t = 0.0;
    while t <= t_max + tstep * 1e-6 {
        let x = sx(t);
        cv.fill(x, p.y0, x + 1, p.y1, GRID);
        cv.fill(x, p.y1, x + 1, p.y1 + 6, BLACK);
        let label = tick_label(t, tstep);
        cv.text(x - Canvas::text_width(&label, 2) / 2, p.y1 + 10, &label, 2, BLACK);
        t += tstep;
    }
    // Phase and run boundaries: dashed lines with a label.
    for (t, label) in marks {
        let x = sx(*t);
        let mut y = p.y0;
        while y < p.y1 {
            cv.fill(x, y, x + 2, (y + 6).min(p.y1), MARK);
            y += 12;
        }
        cv.text(x + 5, p.y0 + 6, label, 1, MARK);
    }
    // Data.
    if p.bars {
        for &(t, v) in pts {
            let (xa, xb) = (sx(t), sx(t + bucket_s).max(sx(t) + 1));
            cv.fill(xa, sy(v), xb - if xb - xa > 3 { 1 } else { 0 }, p.y1, p.color);
        }
    } else {
        let xy: Vec<(i32, i32)> = pts.iter().map(|&(t, v)| (sx(t + bucket_s / 2.0), sy(v))).collect();
        for wnd in xy.windows(2) {
            cv.line(wnd[0], wnd[1], p.color);
        }
        for &(x, y) in &xy {
            cv.fill(x - 2, y - 2, x + 4, y + 4, p.color);
        }
    }
    // Frame.
    cv.fill(p.x0, p.y0, p.x1, p.y0 + 1, BLACK);
    cv.fill(p.x0, p.y1, p.x1 + 1, p.y1 + 1, BLACK);
    cv.fill(p.x0, p.y0, p.x0 + 1, p.y1, BLACK);
    cv.fill(p.x1, p.y0, p.x1 + 1, p.y1, BLACK);
}

/// Draw the two panels for `records` under `title`; `marks` are (µs since the invocation began,
/// label) of phase or run starts.
pub fn render(records: &[Record], title: &str, marks: &[(u64, String)]) -> Canvas {
    let (w, h) = (1200, 760);
    let mut cv = Canvas::new(w, h);
    let (bucket_s, pts) = series(records);
    let t0 = records.iter().map(|r| r.start_us).min().unwrap_or(0);
    let marks: Vec<(f64, String)> =
        marks.iter().filter(|(t, _)| *t > t0).map(|(t, l)| ((t - t0) as f64 / 1e6, l.to_ascii_uppercase())).collect();
    let t_max = pts.last().map(|p| p.t_s + bucket_s).unwrap_or(1.0).max(bucket_s);
    let per = if bucket_s >= 1.0 { "PER SECOND".to_string() } else { format!("PER {:.0} MS BUCKET", bucket_s * 1000.0) };
    cv.text(110, 12, title, 2, BLACK);
    let thr: Vec<(f64, f64)> = pts.iter().map(|p| (p.t_s, p.per_s)).collect();
    let p99: Vec<(f64, f64)> = pts.iter().filter(|p| p.count > 0).map(|p| (p.t_s, p.p99_ms)).collect();
    let top = format!("THROUGHPUT (REQ/S), {per}");
    let bottom = format!("P99 LATENCY (MS), {per}");
    draw_panel(
        &mut cv,
        &Panel { x0: 110, y0: 80, x1: w - 30, y1: 350, title: &top, color: BLUE, bars: true },
        &thr,
        bucket_s,
        t_max,
        &marks,
    );
    draw_panel(
        &mut cv,
        &Panel { x0: 110, y0: 440, x1: w - 30, y1: 700, title: &bottom, color: RED, bars: false },
        &p99,
        bucket_s,
        t_max,
        &marks,
    );
    let xt = "TIME SINCE START (S)";
    cv.text((w - Canvas::text_width(xt, 2)) / 2, 735, xt, 2, BLACK);
    cv
}

pub fn write(path: &Path, records: &[Record], title: &str, marks: &[(u64, String)]) -> io::Result<()> {
    std::fs::write(path, render(records, title, marks).png())
}

/// 5x7 glyphs, one byte per row, bit 4 = leftmost column. Unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        'x' | '*' => [0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::OpKind;

    fn rec(start_us: u64, latency_us: u64) -> Record {
        Record { start_us, latency_us, status: 201, kind: OpKind::Post, attempts: 1 }
    }

    #[test]
    fn buckets_count_completions_and_p99() {
        // 100 requests finishing in the first 100 ms, 50 in the second.
        let mut r: Vec<Record> = (0..100).map(|i| rec(i * 900, 100 + i)).collect();
        r.extend((0..50).map(|i| rec(100_000 + i * 1000, 5_000)));
        let (b, pts) = series(&r);
        assert_eq!(b, 0.1);
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].count, 100);
        assert!((pts[0].per_s - 1000.0).abs() < 1e-6, "{}", pts[0].per_s);
        assert!((pts[0].p99_ms - 0.198).abs() < 1e-9, "{}", pts[0].p99_ms);
        assert_eq!(pts[1].count, 50);
        assert_eq!(pts[1].p99_ms, 5.0);
    }

    #[test]
    fn nice_numbers() {
        assert_eq!(nice_step(13.0), 20.0);
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(4200.0), 5000.0);
        assert_eq!(tick_label(20000.0, 5000.0), "20K");
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(3.0, 1.0), "3");
        assert_eq!(tick_label(0.0, 5000.0), "0");
    }

    #[test]
    fn png_has_signature_and_valid_chunks() {
        let r: Vec<Record> = (0..1000).map(|i| rec(i * 1000, 500 + i % 50)).collect();
        let png = render(&r, "TEST", &[(500_000, "phase 2".into())]).png();
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1200);
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
        // The image data inflates back to height x (1 + width x 3) bytes.
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&png[41..41 + idat_len]).unwrap();
        assert_eq!(raw.len(), 760 * (1 + 1200 * 3));
    }
}
