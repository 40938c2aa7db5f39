//! Decode rate and time per frame over a folder of photos with expected
//! answers, for our decoder and for `zbarimg` (zbar-tools), side by side.
//!
//! A case is an image file with a `.txt` beside it of the same stem holding the
//! expected payload (the layout of zxing's blackbox test folders and of
//! `fixtures/webcam/`). Used by `examples/qr_measure.rs`, by the fixture tests
//! and by the benchmarks.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::decode::{decode_with, Strategy};
use super::{has_frame_extension, load_frame};
use crate::source::SourceError;

/// One photo and the payload it must decode to.
#[derive(Debug, Clone)]
pub struct Case {
    pub image: PathBuf,
    pub expected: String,
}

/// The result of one decoder over a set of cases.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub total: usize,
    pub right: usize,
    /// Time per frame, in case order (ours: decoding only, the image already
    /// loaded; zbarimg: the whole process, loading included).
    pub times: Vec<Duration>,
    /// Cases not decoded right.
    pub misses: Vec<PathBuf>,
    /// For ours: how many cases each strategy found (name, count).
    pub by_strategy: Vec<(&'static str, usize)>,
}

impl Outcome {
    /// Median time per frame.
    pub fn median(&self) -> Duration {
        percentile(&self.times, 50)
    }
    /// 90th percentile time per frame.
    pub fn p90(&self) -> Duration {
        percentile(&self.times, 90)
    }
    pub fn max(&self) -> Duration {
        self.times.iter().copied().max().unwrap_or_default()
    }
}

fn percentile(times: &[Duration], p: usize) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    match t.len() {
        0 => Duration::ZERO,
        n => t[((n - 1) * p / 100).min(n - 1)],
    }
}

/// Expected payloads are compared exactly, but a trailing newline in the
/// `.txt` (an editor's) or in the decoder's output does not count.
pub fn same_payload(got: &str, expected: &str) -> bool {
    got.trim_end_matches(['\r', '\n']) == expected.trim_end_matches(['\r', '\n'])
}

/// The cases of one folder (not recursive): image files with a `.txt` beside them, by name.
pub fn load_cases(dir: &Path) -> Result<Vec<Case>, SourceError> {
    let open_err = |reason: String| SourceError::Open {
        path: dir.display().to_string(),
        reason,
    };
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| open_err(e.to_string()))? {
        let image = entry.map_err(|e| open_err(e.to_string()))?.path();
        if !image.is_file() || !has_frame_extension(&image) {
            continue;
        }
        let txt = image.with_extension("txt");
        let Ok(bytes) = std::fs::read(&txt) else {
            continue;
        };
        cases.push(Case {
            image,
            expected: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    if cases.is_empty() {
        return Err(open_err(
            "no image file with an expected-answer .txt beside it".into(),
        ));
    }
    cases.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(cases)
}

/// Our decoder with the given strategies over every case. An image that does
/// not load counts as a miss.
pub fn measure_ours(cases: &[Case], strategies: &[Strategy]) -> Outcome {
    let mut out = Outcome {
        total: cases.len(),
        ..Outcome::default()
    };
    for c in cases {
        let Ok(img) = load_frame(&c.image) else {
            out.misses.push(c.image.clone());
            continue;
        };
        let t0 = Instant::now();
        let d = decode_with(&img, strategies);
        out.times.push(t0.elapsed());
        if d.payloads.iter().any(|p| same_payload(p, &c.expected)) {
            out.right += 1;
            if let Some(name) = d.strategy {
                match out.by_strategy.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, k)) => *k += 1,
                    None => out.by_strategy.push((name, 1)),
                }
            }
        } else {
            out.misses.push(c.image.clone());
        }
    }
    out
}

/// Why `zbarimg` cannot be compared against.
#[derive(Debug, thiserror::Error)]
pub enum ZbarError {
    #[error("zbarimg is not installed (Debian: apt-get install zbar-tools)")]
    Missing,
    #[error("zbarimg failed on {file}: {why}")]
    Failed { file: String, why: String },
}

/// Whether `zbarimg` can be run.
pub fn zbarimg_available() -> bool {
    Command::new("zbarimg")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The QR payloads `zbarimg` finds in one image (QR only, XML output so that
/// payloads with newlines survive).
pub fn zbarimg_decode(image: &Path) -> Result<Vec<String>, ZbarError> {
    let out = Command::new("zbarimg")
        .args(["--quiet", "--xml", "-Sdisable", "-Sqrcode.enable"])
        .arg(image)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ZbarError::Missing,
            _ => ZbarError::Failed {
                file: image.display().to_string(),
                why: e.to_string(),
            },
        })?;
    // Exit 4: no symbol found, 0: found; anything else is an error.
    match out.status.code() {
        Some(0) | Some(4) => Ok(cdata_payloads(&String::from_utf8_lossy(&out.stdout))),
        _ => Err(ZbarError::Failed {
            file: image.display().to_string(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// The `<data><![CDATA[...]]></data>` contents of zbarimg's XML output.
pub fn cdata_payloads(xml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<![CDATA[") {
        let after = &rest[i + 9..];
        let Some(j) = after.find("]]>") else { break };
        out.push(after[..j].to_string());
        rest = &after[j + 3..];
    }
    out
}

/// `zbarimg` over every case, one process per image.
pub fn measure_zbarimg(cases: &[Case]) -> Result<Outcome, ZbarError> {
    if !zbarimg_available() {
        return Err(ZbarError::Missing);
    }
    let mut out = Outcome {
        total: cases.len(),
        ..Outcome::default()
    };
    for c in cases {
        let t0 = Instant::now();
        let got = zbarimg_decode(&c.image)?;
        out.times.push(t0.elapsed());
        if got.iter().any(|p| same_payload(p, &c.expected)) {
            out.right += 1;
        } else {
            out.misses.push(c.image.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdata_is_extracted_with_newlines() {
        let xml = "<barcodes><source href='a.png'><index num='0'><symbol type='QR-Code'><data><![CDATA[line1\nline2]]></data></symbol><symbol><data><![CDATA[KF1:x]]></data></symbol></index></source></barcodes>";
        assert_eq!(
            cdata_payloads(xml),
            vec!["line1\nline2".to_string(), "KF1:x".to_string()]
        );
        assert!(cdata_payloads("<![CDATA[unterminated").is_empty());
    }

    #[test]
    fn trailing_newlines_do_not_count() {
        assert!(same_payload("abc\n", "abc"));
        assert!(same_payload("abc", "abc\r\n"));
        assert!(!same_payload("abc ", "abc"));
    }

    #[test]
    fn percentiles() {
        let t: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let o = Outcome {
            times: t,
            ..Outcome::default()
        };
        assert_eq!(o.median(), Duration::from_millis(5));
        assert_eq!(o.p90(), Duration::from_millis(9));
        assert_eq!(o.max(), Duration::from_millis(10));
        assert_eq!(Outcome::default().median(), Duration::ZERO);
    }
}
