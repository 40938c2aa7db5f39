//! Generates `fixtures/webcam/`: synthetic webcam photos of key labels, each
//! with its expected payload beside it, from fixed seeds, in
//! `generated/1280x720/` and `generated/640x480/`, and the `replay-scan/` folder.
//!
//!     cargo run -p keyfleet-drivers --example webcam_fixtures -- fixtures/webcam
//!
//! A label is a QR code (EC level M, the usual for printed labels) of
//! `KF1:<node-id>:<hex form>` on an off-white card with a few printed text bars,
//! placed in a cluttered grey scene by a projective warp (rotation and
//! perspective tilt), then degraded: gaussian or motion blur, uneven light,
//! gamma (dim), low contrast, gaussian sensor noise, and JPEG compression (what
//! an MJPEG webcam delivers). Every parameter of every case is written to
//! `MANIFEST.tsv`; the same seed gives the same image byte for byte.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crc::{Crc, CRC_16_IBM_SDLC};
use image::{GrayImage, ImageBuffer, Luma, LumaA};
use imageproc::drawing::draw_filled_rect_mut;
use imageproc::filter::{gaussian_blur_f32, horizontal_filter};
use imageproc::geometric_transformations::{warp_into, Interpolation, Projection};
use imageproc::noise::gaussian_noise_mut;
use imageproc::rect::Rect;
use qrcode::{EcLevel, QrCode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// CRC-16/X-25 (= CRC-16/IBM-SDLC), the Zigbee install-code check.
const X25: Crc<u16> = Crc::<u16>::new(&CRC_16_IBM_SDLC);

/// The hex form of SPEC §6: 32 hex digits of the key, then its CRC-16/X-25 little-endian.
fn hex_form(key: &[u8; 16]) -> String {
    let crc = X25.checksum(key).to_le_bytes();
    key.iter()
        .chain(crc.iter())
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// One photo to make.
#[derive(Clone, Debug)]
struct Spec {
    name: &'static str,
    seed: u64,
    width: u32,
    height: u32,
    /// Side of the QR code (quiet zone included) in the frame, in pixels, before tilt.
    code_px: f32,
    /// In-plane rotation, degrees.
    rotate: f32,
    /// Perspective: the far edge is this much shorter than the near one (0 = facing the camera).
    tilt: f32,
    /// Which edge is far: 0 top, 1 right, 2 bottom, 3 left.
    tilt_edge: u8,
    blur: f32,
    /// Horizontal motion blur length in pixels (0 = none).
    motion: u32,
    /// Output = 255 * gain * (v/255)^gamma.
    gamma: f32,
    gain: f32,
    /// Contrast kept around mid-grey (1 = unchanged).
    contrast: f32,
    /// Light falling off from one side to the other: 0 = even, 0.6 = the dark side gets 40 %.
    shadow: f32,
    noise: f32,
    jpeg_quality: u8,
}

const BASE: Spec = Spec {
    name: "",
    seed: 0,
    width: 1280,
    height: 720,
    code_px: 260.0,
    rotate: 0.0,
    tilt: 0.0,
    tilt_edge: 0,
    blur: 0.6,
    motion: 0,
    gamma: 1.0,
    gain: 1.0,
    contrast: 1.0,
    shadow: 0.0,
    noise: 3.0,
    jpeg_quality: 80,
};

fn specs() -> Vec<Spec> {
    let s = |name, seed| Spec { name, seed, ..BASE };
    let vga = |name, seed| Spec {
        name,
        seed,
        width: 640,
        height: 480,
        code_px: 170.0,
        ..BASE
    };
    vec![
        s("clean-720", 1),
        vga("clean-480", 2),
        Spec {
            rotate: 30.0,
            ..s("rotated-30-720", 3)
        },
        Spec {
            rotate: 135.0,
            ..s("rotated-135-720", 4)
        },
        Spec {
            rotate: -70.0,
            ..vga("rotated-m70-480", 5)
        },
        Spec {
            tilt: 0.35,
            tilt_edge: 0,
            ..s("tilt-35-top-720", 6)
        },
        Spec {
            tilt: 0.45,
            tilt_edge: 3,
            rotate: 10.0,
            ..s("tilt-45-left-720", 7)
        },
        Spec {
            tilt: 0.3,
            tilt_edge: 1,
            rotate: -20.0,
            ..vga("tilt-30-right-480", 8)
        },
        Spec {
            blur: 1.8,
            ..s("blur-1.8-720", 9)
        },
        Spec {
            blur: 2.6,
            code_px: 330.0,
            ..s("blur-2.6-720", 10)
        },
        Spec {
            blur: 1.5,
            ..vga("blur-1.5-480", 11)
        },
        Spec {
            motion: 9,
            ..s("motion-9-720", 12)
        },
        Spec {
            noise: 14.0,
            ..s("noise-14-720", 13)
        },
        Spec {
            noise: 28.0,
            code_px: 320.0,
            ..s("noise-28-720", 14)
        },
        Spec {
            noise: 18.0,
            ..vga("noise-18-480", 15)
        },
        Spec {
            gamma: 1.8,
            gain: 0.3,
            noise: 4.0,
            ..s("dim-720", 16)
        },
        Spec {
            gamma: 2.2,
            gain: 0.25,
            noise: 6.0,
            ..vga("dim-noisy-480", 17)
        },
        Spec {
            contrast: 0.22,
            ..s("lowcontrast-720", 18)
        },
        Spec {
            contrast: 0.15,
            noise: 2.0,
            ..vga("lowcontrast-480", 19)
        },
        Spec {
            shadow: 0.7,
            ..s("shadow-720", 20)
        },
        Spec {
            code_px: 105.0,
            ..s("small-105-720", 21)
        },
        Spec {
            code_px: 80.0,
            blur: 0.5,
            ..s("small-80-720", 22)
        },
        Spec {
            code_px: 75.0,
            ..vga("small-75-480", 23)
        },
        Spec {
            jpeg_quality: 25,
            ..s("jpeg-q25-720", 24)
        },
        Spec {
            rotate: 25.0,
            tilt: 0.25,
            tilt_edge: 2,
            blur: 1.4,
            noise: 10.0,
            gamma: 1.5,
            gain: 0.5,
            contrast: 0.6,
            code_px: 200.0,
            ..s("combined-720", 25)
        },
        Spec {
            rotate: -40.0,
            tilt: 0.3,
            tilt_edge: 1,
            blur: 1.2,
            noise: 8.0,
            contrast: 0.4,
            code_px: 150.0,
            ..vga("combined-480", 26)
        },
    ]
}

/// Another QR code (a URL), and an empty scene, for the replay folder.
fn replay_specs() -> Vec<(Spec, Option<String>)> {
    vec![
        (
            Spec {
                noise: 6.0,
                ..BASE.clone()
            },
            None,
        ),
        (
            Spec {
                seed: 101,
                rotate: 12.0,
                ..BASE.clone()
            },
            Some("https://example.com/manual/appliance-7".to_string()),
        ),
        (
            Spec {
                seed: 102,
                rotate: -8.0,
                tilt: 0.2,
                ..BASE.clone()
            },
            None,
        ),
    ]
}

fn payload_for(rng: &mut ChaCha8Rng) -> String {
    let mut key = [0u8; 16];
    rng.fill(&mut key);
    let node = format!(
        "{}-{:02}",
        ["hall-ap", "boiler", "gate", "meter", "cam.roof"][rng.gen_range(0..5)],
        rng.gen_range(1..64)
    );
    format!("KF1:{node}:{}", hex_form(&key))
}

/// The printed label: the code with its quiet zone on an off-white card and a few text bars.
fn label(payload: &str, module: u32, rng: &mut ChaCha8Rng) -> GrayImage {
    let code =
        QrCode::with_error_correction_level(payload, EcLevel::M).expect("payload fits a QR code");
    let img: GrayImage = code
        .render::<Luma<u8>>()
        .quiet_zone(true)
        .module_dimensions(module, module)
        .dark_color(Luma([rng.gen_range(15..40)]))
        .light_color(Luma([rng.gen_range(225..245)]))
        .build();
    let (w, h) = img.dimensions();
    let margin = module * 2;
    let text_h = module * 10;
    let paper = img.get_pixel(0, 0).0[0];
    let mut card = GrayImage::from_pixel(w + 2 * margin, h + text_h + 2 * margin, Luma([paper]));
    image::imageops::overlay(&mut card, &img, i64::from(margin), i64::from(margin));
    // Printed text under the code: bars of "words".
    for line in 0..3 {
        let y = (margin + h + module * (1 + line * 3)) as i32;
        let mut x = (margin + module * 2) as i32;
        while x < (w + margin - module * 4) as i32 {
            let len = rng.gen_range(module * 2..module * 7) as i32;
            let end = (x + len).min((w + margin - module * 2) as i32);
            if end > x {
                draw_filled_rect_mut(
                    &mut card,
                    Rect::at(x, y).of_size((end - x) as u32, module * 2),
                    Luma([40]),
                );
            }
            x = end + module as i32 * 2;
        }
    }
    card
}

/// A grey, cluttered desk: a gradient and random rectangles.
fn scene(w: u32, h: u32, rng: &mut ChaCha8Rng) -> GrayImage {
    let a: f32 = rng.gen_range(60.0..160.0);
    let b: f32 = rng.gen_range(60.0..160.0);
    let mut img = GrayImage::from_fn(w, h, |x, y| {
        let t = (x as f32 / w as f32 + y as f32 / h as f32) / 2.0;
        Luma([(a + (b - a) * t) as u8])
    });
    for _ in 0..12 {
        let rw = rng.gen_range(w / 20..w / 3);
        let rh = rng.gen_range(h / 20..h / 3);
        let x = rng.gen_range(0..w) as i32 - (rw / 2) as i32;
        let y = rng.gen_range(0..h) as i32 - (rh / 2) as i32;
        draw_filled_rect_mut(
            &mut img,
            Rect::at(x, y).of_size(rw, rh),
            Luma([rng.gen_range(20..230)]),
        );
    }
    gaussian_blur_f32(&img, 2.0)
}

fn render(spec: &Spec, payload: Option<&str>) -> GrayImage {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut img = scene(spec.width, spec.height, &mut rng);
    if let Some(payload) = payload {
        let modules = QrCode::with_error_correction_level(payload, EcLevel::M)
            .expect("fits")
            .width() as f32
            + 8.0;
        let module = ((spec.code_px * 1.5 / modules).ceil() as u32).max(2);
        let card = label(payload, module, &mut rng);
        let (cw, ch) = (card.width() as f32, card.height() as f32);
        // The code (with quiet zone) is `modules * module` px of the card's width.
        let k = spec.code_px / (modules * module as f32);
        let (hw, hh) = (cw * k / 2.0, ch * k / 2.0);
        let cx = spec.width as f32 / 2.0 + rng.gen_range(-0.15..0.15) * spec.width as f32;
        let cy = spec.height as f32 / 2.0 + rng.gen_range(-0.1..0.1) * spec.height as f32;
        // Corners top-left, top-right, bottom-right, bottom-left; shrink the far edge.
        let mut q = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)];
        let far = match spec.tilt_edge {
            0 => [0, 1],
            1 => [1, 2],
            2 => [2, 3],
            _ => [3, 0],
        };
        for i in far {
            q[i].0 *= 1.0 - spec.tilt * if spec.tilt_edge % 2 == 0 { 1.0 } else { 0.3 };
            q[i].1 *= 1.0 - spec.tilt * if spec.tilt_edge % 2 == 0 { 0.3 } else { 1.0 };
        }
        let th = spec.rotate.to_radians();
        let to = q.map(|(x, y)| {
            (
                cx + x * th.cos() - y * th.sin(),
                cy + x * th.sin() + y * th.cos(),
            )
        });
        let from = [(0.0, 0.0), (cw, 0.0), (cw, ch), (0.0, ch)];
        let proj = Projection::from_control_points(from, to).expect("a proper quadrilateral");
        let card_a: ImageBuffer<LumaA<u8>, Vec<u8>> =
            ImageBuffer::from_fn(card.width(), card.height(), |x, y| {
                LumaA([card.get_pixel(x, y).0[0], 255])
            });
        let mut placed = ImageBuffer::from_pixel(spec.width, spec.height, LumaA([0u8, 0]));
        warp_into(
            &card_a,
            &proj,
            Interpolation::Bilinear,
            LumaA([0, 0]),
            &mut placed,
        );
        for (x, y, p) in img.enumerate_pixels_mut() {
            let LumaA([v, a]) = *placed.get_pixel(x, y);
            let a = f32::from(a) / 255.0;
            p.0[0] = (f32::from(p.0[0]) * (1.0 - a) + f32::from(v) * a).round() as u8;
        }
    }
    if spec.blur > 0.0 {
        img = gaussian_blur_f32(&img, spec.blur);
    }
    if spec.motion > 1 {
        let kernel = vec![1.0 / spec.motion as f32; spec.motion as usize];
        img = horizontal_filter(&img, &kernel);
    }
    let (w, sh) = (spec.width as f32, spec.shadow);
    for (x, _, p) in img.enumerate_pixels_mut() {
        let mut v = f32::from(p.0[0]) / 255.0;
        v = 0.5 + (v - 0.5) * spec.contrast;
        v = spec.gain * v.max(0.0).powf(spec.gamma);
        v *= 1.0 - sh * (x as f32 / w);
        p.0[0] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
    }
    if spec.noise > 0.0 {
        gaussian_noise_mut(&mut img, 0.0, f64::from(spec.noise), spec.seed);
    }
    img
}

fn save_jpeg(img: &GrayImage, quality: u8, path: &Path) {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode_image(img)
        .expect("jpeg encoding");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn main() {
    let out: PathBuf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fixtures/webcam".into())
        .into();
    let gen = out.join("generated");
    let replay = out.join("replay-scan");
    for size in ["1280x720", "640x480"] {
        std::fs::create_dir_all(gen.join(size)).expect("create output folder");
    }
    std::fs::create_dir_all(&replay).expect("create output folder");

    let mut manifest = String::from(
        "# name\tseed\tsize\tcode_px\trotate_deg\ttilt\ttilt_edge\tblur_sigma\tmotion_px\tgamma\tgain\tcontrast\tshadow\tnoise_sd\tjpeg_q\tpayload\n",
    );
    for spec in specs() {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x6b66_6c61_6265_6c00);
        let payload = payload_for(&mut rng);
        let img = render(&spec, Some(&payload));
        let size = format!("{}x{}", spec.width, spec.height);
        save_jpeg(
            &img,
            spec.jpeg_quality,
            &gen.join(&size).join(format!("{}.jpg", spec.name)),
        );
        std::fs::write(gen.join(&size).join(format!("{}.txt", spec.name)), &payload)
            .expect("write expected answer");
        let _ = writeln!(
            manifest,
            "{}\t{}\t{}x{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            spec.name,
            spec.seed,
            spec.width,
            spec.height,
            spec.code_px,
            spec.rotate,
            spec.tilt,
            spec.tilt_edge,
            spec.blur,
            spec.motion,
            spec.gamma,
            spec.gain,
            spec.contrast,
            spec.shadow,
            spec.noise,
            spec.jpeg_quality,
            payload
        );
        eprintln!("{}", spec.name);
    }
    std::fs::write(gen.join("MANIFEST.tsv"), manifest).expect("write manifest");

    // replay-scan/: frames in the order a camera would see them: nothing, a
    // QR code that is not a label (a URL), then the label.
    let mut rng = ChaCha8Rng::seed_from_u64(0x7265_706c_6179);
    let label_payload = payload_for(&mut rng);
    for (i, (spec, other)) in replay_specs().into_iter().enumerate() {
        let payload = match (i, other) {
            (0, _) => None,
            (_, Some(url)) => Some(url),
            _ => Some(label_payload.clone()),
        };
        let img = render(&spec, payload.as_deref());
        save_jpeg(&img, 80, &replay.join(format!("frame-{:03}.jpg", i + 1)));
    }
    std::fs::write(replay.join("expected-label.txt"), &label_payload)
        .expect("write expected answer");
    eprintln!("wrote {} and {}", gen.display(), replay.display());
}
