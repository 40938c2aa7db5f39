//! Decode rate and time per frame of the webcam decoder against `zbarimg`.
//!
//!     cargo run --release -p keyfleet-drivers --example qr_measure -- [--misses] [--each] DIR...
//!
//! Each DIR holds images with the expected payload in a `.txt` of the same
//! stem (fixtures/webcam/generated, or zxing's blackbox/qrcode-N folders).
//! Prints one markdown table row per folder: cases, how many each decoder got
//! right, and the median / 90th percentile / worst time per frame. Our time is
//! decoding only; zbarimg's is a whole process (loading the image included).
//! `--misses` lists the images each decoder missed; `--each` also runs every
//! strategy alone, to see what each one adds; `--explain` shows what each
//! strategy made of every image we missed (grids found, decode errors).
//! `--time IMAGE...` times the whole list and each strategy on single images
//! (a frame without a code pays for every strategy).
use std::path::PathBuf;
use std::time::Duration;

use keyfleet_drivers::webcam::measure::{load_cases, measure_ours, measure_zbarimg, Outcome};
use keyfleet_drivers::webcam::DEFAULT_STRATEGIES;

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// `--time`: the whole strategy list on each image (best of 5 runs), with
/// the time each strategy takes alone: what a frame costs when no code is in it.
fn time_each(files: &[PathBuf]) -> std::process::ExitCode {
    use keyfleet_drivers::webcam::{decode_frame, decode_with, load_frame};
    for f in files {
        let img = match load_frame(f) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let best = |run: &dyn Fn() -> usize| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    let n = run();
                    (t.elapsed(), n)
                })
                .min()
                .unwrap_or_default()
        };
        let (all, found) = best(&|| decode_frame(&img).len());
        let per: Vec<String> = DEFAULT_STRATEGIES
            .iter()
            .map(|s| {
                format!(
                    "{} {}",
                    s.name,
                    ms(best(&|| decode_with(&img, std::slice::from_ref(s)).payloads.len()).0)
                )
            })
            .collect();
        println!(
            "{} {}x{}: {} ms, {found} payload(s) [{}]",
            f.display(),
            img.width(),
            img.height(),
            ms(all),
            per.join(", ")
        );
    }
    std::process::ExitCode::SUCCESS
}

fn main() -> std::process::ExitCode {
    let mut misses = false;
    let mut each = false;
    let mut explain = false;
    let mut time_files = false;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--misses" => misses = true,
            "--each" => each = true,
            "--explain" => explain = true,
            "--time" => time_files = true,
            _ => dirs.push(a.into()),
        }
    }
    keyfleet_drivers::webcam::quiet_rqrr_panics();
    if dirs.is_empty() {
        eprintln!("usage: qr_measure [--misses] [--each] [--explain] DIR...\n       qr_measure --time IMAGE...");
        return std::process::ExitCode::from(2);
    }
    if time_files {
        return time_each(&dirs);
    }
    println!("| folder | cases | ours right | zbarimg right | ours ms/frame median / p90 / max | zbarimg ms/frame median |");
    println!("|---|---:|---:|---:|---:|---:|");
    let (mut n, mut ours_total, mut zbar_total) = (0, 0, 0);
    let mut zbar_ok = true;
    let mut all_ours = Outcome::default();
    for dir in &dirs {
        let cases = match load_cases(dir) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                return std::process::ExitCode::FAILURE;
            }
        };
        let ours = measure_ours(&cases, DEFAULT_STRATEGIES);
        let zbar = measure_zbarimg(&cases);
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (zr, zm) = match &zbar {
            Ok(z) => (z.right.to_string(), ms(z.median())),
            Err(e) => {
                zbar_ok = false;
                eprintln!("zbarimg skipped: {e}");
                ("-".into(), "-".into())
            }
        };
        println!(
            "| {name} | {} | {} | {zr} | {} / {} / {} | {zm} |",
            cases.len(),
            ours.right,
            ms(ours.median()),
            ms(ours.p90()),
            ms(ours.max())
        );
        n += cases.len();
        ours_total += ours.right;
        if let Ok(z) = &zbar {
            zbar_total += z.right;
        }
        if misses {
            for m in &ours.misses {
                eprintln!("  ours missed    {}", m.display());
            }
            if let Ok(z) = &zbar {
                for m in &z.misses {
                    eprintln!("  zbarimg missed {}", m.display());
                }
            }
        }
        all_ours.times.extend(ours.times.iter().copied());
        for (s, k) in ours.by_strategy {
            match all_ours.by_strategy.iter_mut().find(|(x, _)| *x == s) {
                Some((_, c)) => *c += k,
                None => all_ours.by_strategy.push((s, k)),
            }
        }
        if explain {
            for m in &ours.misses {
                eprintln!("{}:", m.display());
                let Ok(img) = keyfleet_drivers::webcam::load_frame(m) else {
                    continue;
                };
                for a in keyfleet_drivers::webcam::explain(&img, DEFAULT_STRATEGIES) {
                    if a.applied {
                        let r: Vec<String> = a
                            .results
                            .iter()
                            .map(|r| match r {
                                Ok(p) => format!("ok({} chars)", p.chars().count()),
                                Err(e) => e.clone(),
                            })
                            .collect();
                        eprintln!("    {:12} grids {} {}", a.strategy, a.grids, r.join("; "));
                    }
                }
            }
        }
        if each {
            for s in DEFAULT_STRATEGIES {
                let alone = measure_ours(&cases, std::slice::from_ref(s));
                eprintln!(
                    "  {name}: {} alone: {}/{}  median {} ms",
                    s.name,
                    alone.right,
                    cases.len(),
                    ms(alone.median())
                );
            }
        }
    }
    if dirs.len() > 1 {
        let zt = if zbar_ok {
            zbar_total.to_string()
        } else {
            "-".into()
        };
        println!(
            "| **all** | {n} | {ours_total} | {zt} | {} / {} / {} | |",
            ms(all_ours.median()),
            ms(all_ours.p90()),
            ms(all_ours.max())
        );
    }
    let found: Vec<String> = all_ours
        .by_strategy
        .iter()
        .map(|(s, k)| format!("{s} {k}"))
        .collect();
    println!(
        "\nfound by strategy (first that yielded): {}",
        found.join(", ")
    );
    std::process::ExitCode::SUCCESS
}
