//! QR decoding: decode rate and median time per frame of the webcam decoder
//! (`keyfleet_drivers::webcam`) against `zbarimg` on the generated label photos,
//! by kind of degradation and frame size.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use keyfleet_drivers::webcam::measure::{load_cases, measure_ours, measure_zbarimg, Case};
use keyfleet_drivers::webcam::DEFAULT_STRATEGIES;
use serde::{Deserialize, Serialize};

use crate::stats::{median, Load};

/// The kind of degradation of a generated photo, from its file name
/// (fixtures/webcam/README.md lists them).
pub fn kind_of(image: &Path) -> &'static str {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let starts = |p: &str| stem.starts_with(p);
    if starts("clean") {
        "clean"
    } else if starts("rotated") {
        "rotated"
    } else if starts("tilt") {
        "tilted"
    } else if starts("blur") || starts("motion") {
        "blurred"
    } else if starts("noise") {
        "noisy"
    } else if starts("dim") {
        "dim"
    } else {
        "other"
    }
}

/// Kinds in table order; "other" is low contrast, shadow, small codes, heavy JPEG, combined.
pub const KINDS: [&str; 7] = [
    "clean", "rotated", "tilted", "blurred", "noisy", "dim", "other",
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QrRow {
    /// Frame size folder, e.g. `1280x720`.
    pub frame: String,
    pub kind: String,
    pub cases: usize,
    pub ours_right: usize,
    /// `None` when zbarimg is not installed.
    pub zbar_right: Option<usize>,
    /// Median ms per frame: ours (decoding only; per frame the median of `runs`
    /// runs), zbarimg (one whole process per image, loading included).
    pub ours_ms: f64,
    pub zbar_ms: Option<f64>,
    pub ours_missed: Vec<String>,
    pub zbar_missed: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QrResult {
    pub runs: usize,
    pub zbarimg_version: Option<String>,
    pub zbarimg_skipped: Option<String>,
    pub load: Load,
    pub rows: Vec<QrRow>,
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn names(v: &[PathBuf]) -> Vec<String> {
    v.iter()
        .filter_map(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .collect()
}

fn zbarimg_version() -> Option<String> {
    let out = std::process::Command::new("zbarimg")
        .arg("--version")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One row per (frame size folder, kind) and one "all" row per folder.
pub fn run(dirs: &[PathBuf], runs: usize) -> anyhow::Result<QrResult> {
    keyfleet_drivers::webcam::quiet_rqrr_panics();
    let load = Load::start();
    let mut rows = Vec::new();
    let mut skipped = None;
    for dir in dirs {
        let frame = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let all = load_cases(dir).with_context(|| format!("loading {}", dir.display()))?;
        let mut groups: Vec<(&str, Vec<Case>)> = KINDS
            .iter()
            .map(|k| {
                (
                    *k,
                    all.iter()
                        .filter(|c| kind_of(&c.image) == *k)
                        .cloned()
                        .collect(),
                )
            })
            .filter(|(_, v): &(&str, Vec<Case>)| !v.is_empty())
            .collect();
        groups.push(("all", all));
        for (kind, cases) in groups {
            let outs: Vec<_> = (0..runs.max(1))
                .map(|_| measure_ours(&cases, DEFAULT_STRATEGIES))
                .collect();
            let per_frame: Vec<f64> = (0..outs[0].times.len())
                .filter_map(|i| {
                    median(
                        &outs
                            .iter()
                            .filter_map(|o| o.times.get(i).map(ms))
                            .collect::<Vec<_>>(),
                    )
                })
                .collect();
            let ours = &outs[0];
            let zbar = match measure_zbarimg(&cases) {
                Ok(z) => Some(z),
                Err(e) => {
                    skipped = Some(e.to_string());
                    None
                }
            };
            rows.push(QrRow {
                frame: frame.clone(),
                kind: kind.to_string(),
                cases: cases.len(),
                ours_right: ours.right,
                zbar_right: zbar.as_ref().map(|z| z.right),
                ours_ms: median(&per_frame).unwrap_or(f64::NAN),
                zbar_ms: zbar
                    .as_ref()
                    .and_then(|z| median(&z.times.iter().map(ms).collect::<Vec<_>>())),
                ours_missed: names(&ours.misses),
                zbar_missed: zbar.as_ref().map(|z| names(&z.misses)).unwrap_or_default(),
            });
        }
    }
    Ok(QrResult {
        runs,
        zbarimg_version: zbarimg_version(),
        zbarimg_skipped: skipped,
        load: load.finish(),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generated_photo_has_a_kind_and_the_six_named_kinds_occur_at_both_sizes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/webcam/generated");
        for frame in ["640x480", "1280x720"] {
            let cases = load_cases(&root.join(frame)).unwrap();
            for kind in &KINDS[..6] {
                assert!(
                    cases.iter().any(|c| kind_of(&c.image) == *kind),
                    "no {kind} photo at {frame}"
                );
            }
        }
        assert_eq!(kind_of(Path::new("x/motion-9-720.jpg")), "blurred");
        assert_eq!(kind_of(Path::new("x/dim-noisy-480.jpg")), "dim");
        assert_eq!(kind_of(Path::new("x/combined-720.jpg")), "other");
    }
}
