//! QR decoding of one luma frame: `rqrr` first, then preprocessing before giving up.
//!
//! [`decode_frame`] is a pure function (a frame in, the payloads out). It runs
//! the [`DEFAULT_STRATEGIES`] in order and stops at the first one that yields a
//! payload, so a sharp, well lit label costs one `rqrr` pass and only a hard
//! frame (small, blurred, dim, noisy, low contrast) pays for the rest.
use std::panic::{catch_unwind, AssertUnwindSafe};

use image::imageops::{self, FilterType};
use image::{GrayImage, Luma};
use imageproc::contrast::{self, ThresholdType};
use imageproc::filter;
use imageproc::geometric_transformations::{rotate_about_center, Interpolation, Projection};

/// A QR code has at least 21 modules a side; below this no frame can hold one.
const MIN_SIDE: u32 = 21;

/// How a frame is resized before the filters run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// The frame as captured.
    Native,
    /// Shrink so that the longer side is at most this many pixels (never enlarges).
    FitWithin(u32),
    /// Enlarge by this factor when the longer side is at most `max_side` pixels
    /// (codes whose modules are 1–2 pixels wide); skipped on larger frames.
    Enlarge { factor: u32, max_side: u32 },
}

/// One filter applied after scaling, in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Map the 1st..99th percentile of intensities to 0..255 (dim or washed-out frames).
    Stretch,
    /// Global histogram equalization.
    Equalize,
    /// Gaussian blur with this sigma (sensor noise, JPEG blocks).
    Blur(f32),
    /// Unsharp mask (sigma, amount) for defocus.
    Sharpen(f32, f32),
    /// Global Otsu binarization.
    Otsu,
    /// Local mean binarization; the window radius is this fraction of the shorter side.
    Adaptive(f32),
    /// Local contrast normalization (a CLAHE-like equalization): each pixel
    /// relative to the mean and spread of a window of this fraction of the shorter side.
    LocalNormalize(f32),
    /// Black and white swapped (light code on a dark label).
    Invert,
    /// Turn by this many degrees about the centre (rqrr finds finder patterns
    /// along rows, which works best on codes near upright).
    Rotate(f32),
}

/// One attempt: a scale, a chain of filters, then `rqrr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Strategy {
    /// A short name for reports (`qr_measure --each`).
    pub name: &'static str,
    pub scale: Scale,
    pub steps: &'static [Step],
}

/// The strategies [`decode_frame`] runs, cheapest and most often right first.
/// Chosen by measurement on `fixtures/webcam/` and public phone photos
/// (see `fixtures/webcam/README.md`).
pub const DEFAULT_STRATEGIES: &[Strategy] = &[
    // Most frames: rqrr as is (its own row-wise adaptive threshold).
    Strategy {
        name: "raw",
        scale: Scale::Native,
        steps: &[],
    },
    // Phone photos and large frames: smaller is faster and smooths sensor noise.
    Strategy {
        name: "fit1280",
        scale: Scale::FitWithin(1280),
        steps: &[],
    },
    // Defocus and motion blur; also lifts dim and low-contrast frames.
    Strategy {
        name: "sharpen",
        scale: Scale::Native,
        steps: &[Step::Sharpen(2.0, 1.5), Step::Stretch],
    },
    // rqrr looks for finder patterns along rows; turned codes read better at another angle.
    Strategy {
        name: "rot-20",
        scale: Scale::Native,
        steps: &[Step::Rotate(-20.0)],
    },
    // Uneven light, shadows, noise: a local-mean binarization after a light blur.
    Strategy {
        name: "adaptive",
        scale: Scale::Native,
        steps: &[Step::Blur(1.0), Step::Adaptive(0.04)],
    },
    // Small codes (modules of 1-2 pixels).
    Strategy {
        name: "x2",
        scale: Scale::Enlarge {
            factor: 2,
            max_side: 1280,
        },
        steps: &[],
    },
    Strategy {
        name: "rot90",
        scale: Scale::Native,
        steps: &[Step::Rotate(90.0)],
    },
    Strategy {
        name: "x2-adaptive",
        scale: Scale::Enlarge {
            factor: 2,
            max_side: 800,
        },
        steps: &[Step::Blur(1.0), Step::Adaptive(0.03)],
    },
];

/// What one frame gave: the payloads (distinct, in the order found) and the
/// strategy that found them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decoded {
    pub payloads: Vec<String>,
    pub strategy: Option<&'static str>,
}

/// Every QR payload found in `frame`, with the [`DEFAULT_STRATEGIES`].
/// Never panics; an empty vector means no code could be read.
pub fn decode_frame(frame: &GrayImage) -> Vec<String> {
    decode_with(frame, DEFAULT_STRATEGIES).payloads
}

/// [`decode_frame`] with a chosen list of strategies; stops at the first that yields.
pub fn decode_with(frame: &GrayImage, strategies: &[Strategy]) -> Decoded {
    if frame.width() < MIN_SIDE || frame.height() < MIN_SIDE {
        return Decoded::default();
    }
    for s in strategies {
        let payloads = apply(frame, s)
            .map(|img| rqrr_payloads(&img))
            .unwrap_or_default();
        if !payloads.is_empty() {
            return Decoded {
                payloads,
                strategy: Some(s.name),
            };
        }
    }
    Decoded::default()
}

/// The frame after a strategy's scale and filters, or `None` when the strategy
/// does not apply to a frame of this size.
pub fn apply(frame: &GrayImage, s: &Strategy) -> Option<GrayImage> {
    let (w, h) = frame.dimensions();
    let long = w.max(h);
    let mut img = match s.scale {
        Scale::Native => frame.clone(),
        Scale::FitWithin(max) => {
            if long <= max {
                return None; // same as Native with these steps; nothing new to try
            }
            let k = f64::from(max) / f64::from(long);
            let (nw, nh) = (scaled(w, k), scaled(h, k));
            imageops::resize(frame, nw, nh, FilterType::Triangle)
        }
        Scale::Enlarge { factor, max_side } => {
            if long > max_side || factor < 2 {
                return None;
            }
            imageops::resize(
                frame,
                w.saturating_mul(factor),
                h.saturating_mul(factor),
                FilterType::CatmullRom,
            )
        }
    };
    if img.width() < MIN_SIDE || img.height() < MIN_SIDE {
        return None;
    }
    let short = img.width().min(img.height());
    for step in s.steps {
        img = match *step {
            Step::Stretch => stretch(&img),
            Step::Equalize => contrast::equalize_histogram(&img),
            Step::Blur(sigma) => filter::gaussian_blur_f32(&img, sigma.max(0.1)),
            Step::Sharpen(sigma, amount) => filter::sharpen_gaussian(&img, sigma.max(0.1), amount),
            Step::Otsu => {
                let level = contrast::otsu_level(&img);
                contrast::threshold(&img, level, ThresholdType::Binary)
            }
            Step::Adaptive(frac) => contrast::adaptive_threshold(&img, radius(short, frac)),
            Step::LocalNormalize(frac) => local_normalize(&img, radius(short, frac)),
            Step::Rotate(deg) => {
                let fill = Luma([median_level(&img)]);
                rotate_about_center(&img, deg.to_radians(), Interpolation::Bilinear, fill)
            }
            Step::Invert => {
                let mut inv = img;
                imageops::invert(&mut inv);
                inv
            }
        };
    }
    Some(img)
}

fn scaled(v: u32, k: f64) -> u32 {
    // k is in (0, 1], so the result fits in u32.
    ((f64::from(v) * k).round() as u32).max(1)
}

fn radius(short: u32, frac: f32) -> u32 {
    ((short as f32 * frac).round() as u32).max(2)
}

fn median_level(img: &GrayImage) -> u8 {
    let mut hist = [0u64; 256];
    for p in img.pixels() {
        hist[usize::from(p.0[0])] += 1;
    }
    let half = (img.width() as u64 * img.height() as u64) / 2;
    let mut acc = 0;
    for (v, &n) in hist.iter().enumerate() {
        acc += n;
        if acc > half {
            return v as u8;
        }
    }
    255
}

/// Linear contrast stretch between the 1st and 99th percentiles.
fn stretch(img: &GrayImage) -> GrayImage {
    let mut hist = [0u64; 256];
    for p in img.pixels() {
        hist[usize::from(p.0[0])] += 1;
    }
    let total: u64 = hist.iter().sum();
    let cut = total / 100;
    let mut acc = 0;
    let mut lo = 0u8;
    for (v, &n) in hist.iter().enumerate() {
        acc += n;
        if acc > cut {
            lo = v as u8;
            break;
        }
    }
    acc = 0;
    let mut hi = 255u8;
    for (v, &n) in hist.iter().enumerate().rev() {
        acc += n;
        if acc > cut {
            hi = v as u8;
            break;
        }
    }
    if hi <= lo {
        return img.clone();
    }
    contrast::stretch_contrast(img, lo, hi, 0, 255)
}

/// Each pixel's distance from its neighbourhood mean in units of the
/// neighbourhood's standard deviation, mapped to 0..255: flattens uneven
/// lighting and lifts low local contrast.
fn local_normalize(img: &GrayImage, r: u32) -> GrayImage {
    let (w, h) = img.dimensions();
    let (wu, hu) = (w as usize, h as usize);
    // Integral images of values and squares (one row and column of zeros first).
    let stride = wu + 1;
    let mut sum = vec![0u64; stride * (hu + 1)];
    let mut sq = vec![0u64; stride * (hu + 1)];
    for y in 0..hu {
        let mut rs = 0u64;
        let mut rq = 0u64;
        for x in 0..wu {
            let v = u64::from(img.as_raw()[y * wu + x]);
            rs += v;
            rq += v * v;
            sum[(y + 1) * stride + x + 1] = sum[y * stride + x + 1] + rs;
            sq[(y + 1) * stride + x + 1] = sq[y * stride + x + 1] + rq;
        }
    }
    let r = r as usize;
    let mut out = GrayImage::new(w, h);
    for y in 0..hu {
        let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(hu));
        for x in 0..wu {
            let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(wu));
            let n = ((y1 - y0) * (x1 - x0)) as f64;
            let area = |t: &[u64]| {
                (t[y1 * stride + x1] + t[y0 * stride + x0]) as f64
                    - (t[y0 * stride + x1] + t[y1 * stride + x0]) as f64
            };
            let mean = area(&sum) / n;
            let var = (area(&sq) / n - mean * mean).max(0.0);
            // A floor on the spread keeps flat, noisy areas grey instead of amplifying noise.
            let sd = var.sqrt().max(8.0);
            let v = f64::from(img.as_raw()[y * wu + x]);
            let z = (v - mean) / sd;
            out.as_mut()[y * wu + x] = (128.0 + 64.0 * z).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// `rqrr` over one prepared frame: the distinct payloads of every grid that decodes.
///
/// `rqrr` is outside code fed with camera pixels; a panic inside it (a bug in
/// the library) is caught and counted as "nothing found" so that one odd frame
/// never ends the scan.
pub fn rqrr_payloads(img: &GrayImage) -> Vec<String> {
    let (mut out, missed) = rqrr_pass(img);
    // A grid was found but did not decode: rqrr's sampling grid was off
    // (rotation, tilt, a bent label) or its binarization lost modules. Sample
    // the modules again ourselves, nudging the corners it found.
    for (bounds, size) in missed.into_iter().take(MAX_RESAMPLED) {
        if let Some(p) = resample(img, &bounds, size) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Corners (top-left, top-right, bottom-right, bottom-left) and modules a side
/// of a grid that `rqrr` found but could not decode.
type Missed = ([(f32, f32); 4], usize);

fn rqrr_pass(img: &GrayImage) -> (Vec<String>, Vec<Missed>) {
    if img.width() < MIN_SIDE || img.height() < MIN_SIDE {
        return (Vec::new(), Vec::new());
    }
    let run = || {
        let mut prepared = rqrr::PreparedImage::prepare(img.clone());
        let mut out: Vec<String> = Vec::new();
        let mut missed = Vec::new();
        for grid in prepared.detect_grids() {
            let mut bytes = Vec::new();
            if grid.decode_to(&mut bytes).is_ok() {
                let text = bytes_to_text(bytes);
                if !out.contains(&text) {
                    out.push(text);
                }
            } else {
                use rqrr::BitGrid;
                let b = grid.bounds.map(|p| (p.x as f32, p.y as f32));
                missed.push((b, grid.grid.size()));
            }
        }
        (out, missed)
    };
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
        tracing::warn!(
            width = img.width(),
            height = img.height(),
            "rqrr panicked on a frame; skipped"
        );
        (Vec::new(), Vec::new())
    })
}

/// Grids per pass that [`resample`] tries (each costs ~100 decodes).
const MAX_RESAMPLED: usize = 2;
/// Modules narrower than this (in pixels) cannot be sampled.
const MIN_MODULE_PX: f32 = 1.5;
/// Corner nudges tried by [`resample`], in modules. Measured: nudges of a
/// whole module as well cost three times the time for no more codes read.
const NUDGES: [f32; 3] = [0.0, -0.5, 0.5];

/// Read the modules of a grid that rqrr located but could not decode: each
/// module is the mean of a small patch around its centre, thresholded at the
/// Otsu level of the code's own area, then (unnudged only) at the mean of the
/// surrounding modules. The corners are then nudged one at a time by half a
/// module (the fourth corner, which rqrr estimates, first). rqrr's
/// Reed-Solomon decoder checks every attempt, so a wrong nudge cannot produce
/// a wrong payload; it only costs time (at most 33 decodes per grid).
fn resample(img: &GrayImage, bounds: &[(f32, f32); 4], size: usize) -> Option<String> {
    if !(21..=177).contains(&size) || bounds.iter().any(|p| !p.0.is_finite() || !p.1.is_finite()) {
        return None;
    }
    let n = size as f32 + 1.0;
    let grid_pts = [(0.0, 0.0), (n, 0.0), (n, n), (0.0, n)];
    let base = Projection::from_control_points(grid_pts, *bounds)?;
    // Module size in pixels, and the code's area for the threshold.
    let (x0, x1) = bounds
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = bounds
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (w, h) = img.dimensions();
    let clampx = |v: f32| (v.max(0.0) as u32).min(w.saturating_sub(1));
    let clampy = |v: f32| (v.max(0.0) as u32).min(h.saturating_sub(1));
    let (cx0, cx1, cy0, cy1) = (clampx(x0), clampx(x1), clampy(y0), clampy(y1));
    if cx1 <= cx0 || cy1 <= cy0 {
        return None;
    }
    let area = imageops::crop_imm(img, cx0, cy0, cx1 - cx0 + 1, cy1 - cy0 + 1).to_image();
    let level = contrast::otsu_level(&area);
    let module_px = (x1 - x0).max(y1 - y0) / n;
    if module_px < MIN_MODULE_PX {
        return None; // a grid finer than the pixels: a false detection
    }
    let r = ((module_px / 4.0).floor() as i64).min(2);
    let mean_at = |x: f32, y: f32| -> u8 {
        let (cx, cy) = (x.round() as i64, y.round() as i64);
        let (mut sum, mut k) = (0u32, 0u32);
        for dy in -r..=r {
            for dx in -r..=r {
                let (px, py) = (cx + dx, cy + dy);
                if px >= 0 && py >= 0 && (px as u32) < w && (py as u32) < h {
                    sum += u32::from(img.get_pixel(px as u32, py as u32).0[0]);
                    k += 1;
                }
            }
        }
        sum.checked_div(k).map_or(255, |v| v as u8)
    };
    let try_decode = |proj: &Projection, local_too: bool| -> Option<String> {
        let samples: Vec<u8> = (0..size * size)
            .map(|i| {
                let (px, py) = *proj * ((i % size) as f32 + 0.5, (i / size) as f32 + 0.5);
                mean_at(px, py)
            })
            .collect();
        let decode = |dark: &dyn Fn(usize, usize) -> bool| {
            let grid = rqrr::SimpleGrid::from_func(size, dark);
            let mut bytes = Vec::new();
            rqrr::Grid::new(grid).decode_to(&mut bytes).ok()?;
            Some(bytes_to_text(bytes))
        };
        // One threshold for the whole code, then a local one (the mean of the
        // surrounding 7x7 modules) for uneven light and blur.
        decode(&|x, y| samples[y * size + x] < level).or_else(|| {
            if !local_too {
                return None;
            }
            let local = local_module_means(&samples, size, 3);
            decode(&|x, y| {
                let i = y * size + x;
                samples[i] < local[i]
            })
        })
    };
    let run = || {
        if let Some(p) = try_decode(&base, true) {
            return Some(p);
        }
        for corner in [2usize, 1, 3, 0] {
            for dy in NUDGES {
                for dx in NUDGES {
                    if dx == 0.0 && dy == 0.0 {
                        continue;
                    }
                    let mut moved = grid_pts;
                    moved[corner].0 += dx;
                    moved[corner].1 += dy;
                    // Same image corners, shifted grid coordinates: the grid slides under that corner.
                    if let Some(proj) = Projection::from_control_points(moved, *bounds) {
                        if let Some(p) = try_decode(&proj, false) {
                            return Some(p);
                        }
                    }
                }
            }
        }
        None
    };
    catch_unwind(AssertUnwindSafe(run)).ok().flatten()
}

/// Keep panics raised inside `rqrr` (caught by [`rqrr_payloads`] and counted
/// as "nothing found") off stderr, where they would look like a crash to the
/// installer. Wraps the panic hook in place once; panics anywhere else still
/// reach the previous hook unchanged.
pub fn quiet_rqrr_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_rqrr = info.location().is_some_and(|l| l.file().contains("rqrr"));
            if !in_rqrr {
                previous(info);
            }
        }));
    });
}

/// What `rqrr` made of a frame after one strategy, to diagnose a miss.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub strategy: &'static str,
    /// `false` when the strategy does not apply to a frame of this size.
    pub applied: bool,
    /// Grids (three finder patterns in a plausible layout) found.
    pub grids: usize,
    /// Per grid: the payload, or why it did not decode (then also after our resampling).
    pub results: Vec<Result<String, String>>,
}

/// Every strategy on `frame`, without stopping at the first that yields (`qr_measure --explain`).
pub fn explain(frame: &GrayImage, strategies: &[Strategy]) -> Vec<Attempt> {
    strategies
        .iter()
        .map(|s| {
            let Some(img) = apply(frame, s) else {
                return Attempt {
                    strategy: s.name,
                    applied: false,
                    grids: 0,
                    results: Vec::new(),
                };
            };
            let run = || {
                let mut prepared = rqrr::PreparedImage::prepare(img.clone());
                prepared
                    .detect_grids()
                    .iter()
                    .map(|g| {
                        use rqrr::BitGrid;
                        let mut bytes = Vec::new();
                        match g.decode_to(&mut bytes) {
                            Ok(_) => Ok(bytes_to_text(bytes)),
                            Err(e) => {
                                let b = g.bounds.map(|p| (p.x as f32, p.y as f32));
                                resample(&img, &b, g.grid.size())
                                    .ok_or_else(|| format!("{e}, also after resampling"))
                            }
                        }
                    })
                    .collect::<Vec<_>>()
            };
            let results = catch_unwind(AssertUnwindSafe(run))
                .unwrap_or_else(|_| vec![Err("rqrr panicked".into())]);
            Attempt {
                strategy: s.name,
                applied: true,
                grids: results.len(),
                results,
            }
        })
        .collect()
}

/// For each module, the mean of the module samples within `k` modules of it
/// (a summed-area table over the `size` x `size` samples).
fn local_module_means(samples: &[u8], size: usize, k: usize) -> Vec<u8> {
    let stride = size + 1;
    let mut sat = vec![0u32; stride * stride];
    for y in 0..size {
        let mut row = 0u32;
        for x in 0..size {
            row += u32::from(samples[y * size + x]);
            sat[(y + 1) * stride + x + 1] = sat[y * stride + x + 1] + row;
        }
    }
    (0..size * size)
        .map(|i| {
            let (x, y) = (i % size, i / size);
            let (x0, x1) = (x.saturating_sub(k), (x + k + 1).min(size));
            let (y0, y1) = (y.saturating_sub(k), (y + k + 1).min(size));
            let sum = sat[y1 * stride + x1] + sat[y0 * stride + x0]
                - sat[y0 * stride + x1]
                - sat[y1 * stride + x0];
            let n = ((x1 - x0) * (y1 - y0)) as u32;
            sum.checked_div(n).map_or(128, |v| v as u8)
        })
        .collect()
}

/// QR byte mode is ISO-8859-1 unless an ECI says otherwise; most encoders write
/// UTF-8 anyway. Take UTF-8 when the bytes are valid UTF-8, else Latin-1.
fn bytes_to_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => e.into_bytes().iter().map(|&b| char::from(b)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A label's code drawn at `module` pixels per module in the middle of a grey `w`x`h` frame.
    fn label_frame(payload: &str, module: u32, w: u32, h: u32) -> GrayImage {
        let code =
            qrcode::QrCode::with_error_correction_level(payload, qrcode::EcLevel::M).unwrap();
        let img: GrayImage = code
            .render::<Luma<u8>>()
            .quiet_zone(true)
            .module_dimensions(module, module)
            .build();
        let mut frame = GrayImage::from_pixel(w, h, Luma([120]));
        let (x, y) = ((w - img.width()) / 2, (h - img.height()) / 2);
        imageops::overlay(&mut frame, &img, i64::from(x), i64::from(y));
        frame
    }

    // The decoder reads any payload; its CRC is not checked here.
    const PAYLOAD: &str = "KF1:unit-7:00112233445566778899AABBCCDDEEFF8C3B";

    #[test]
    fn reads_a_clean_label_with_the_first_strategy() {
        let d = decode_with(&label_frame(PAYLOAD, 4, 320, 240), DEFAULT_STRATEGIES);
        assert_eq!(d.payloads, vec![PAYLOAD.to_string()]);
        assert_eq!(d.strategy, Some("raw"));
    }

    #[test]
    fn reads_a_turned_and_blurred_label() {
        let frame = label_frame(PAYLOAD, 4, 320, 320);
        let turned = rotate_about_center(
            &frame,
            33f32.to_radians(),
            Interpolation::Bilinear,
            Luma([120]),
        );
        let blurred = filter::gaussian_blur_f32(&turned, 1.6);
        assert_eq!(decode_frame(&blurred), vec![PAYLOAD.to_string()]);
    }

    #[test]
    fn reads_a_small_code_by_enlarging_it() {
        // Modules of 1.5 pixels: rqrr alone cannot separate them.
        let big = label_frame(PAYLOAD, 3, 640, 480);
        let small = imageops::resize(&big, 320, 240, FilterType::Triangle);
        let d = decode_with(&small, DEFAULT_STRATEGIES);
        assert_eq!(d.payloads, vec![PAYLOAD.to_string()]);
        assert_ne!(
            d.strategy,
            Some("raw"),
            "expected a preprocessing strategy to be needed"
        );
    }

    #[test]
    fn frames_too_small_for_a_code_yield_nothing() {
        for (w, h) in [(0, 0), (1, 1), (1, 500), (500, 1), (20, 20), (21, 3)] {
            assert!(decode_frame(&GrayImage::new(w, h)).is_empty(), "{w}x{h}");
        }
    }

    #[test]
    fn flat_frames_yield_nothing_and_do_not_panic() {
        for v in [0u8, 128, 255] {
            let img = GrayImage::from_pixel(64, 48, image::Luma([v]));
            assert!(decode_frame(&img).is_empty());
        }
    }

    #[test]
    fn latin1_fallback_for_non_utf8_bytes() {
        assert_eq!(bytes_to_text(vec![b'a', 0xE9]), "a\u{e9}");
        assert_eq!(bytes_to_text("é".as_bytes().to_vec()), "é");
    }

    #[test]
    fn stretch_spreads_a_narrow_range() {
        let mut img = GrayImage::new(100, 1);
        for x in 0..100 {
            img.put_pixel(x, 0, image::Luma([100 + (x as u8) / 5]));
        }
        let s = stretch(&img);
        assert!(s.get_pixel(0, 0).0[0] < 10);
        assert!(s.get_pixel(99, 0).0[0] > 245);
    }

    #[test]
    fn every_strategy_handles_odd_sizes() {
        for (w, h) in [(21, 21), (22, 1000), (1000, 22), (37, 53)] {
            let img =
                GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 13) % 256) as u8]));
            for s in DEFAULT_STRATEGIES {
                let _ = apply(&img, s);
            }
        }
    }
}
