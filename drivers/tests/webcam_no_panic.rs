//! The webcam decoder and frame conversion never panic, whatever the pixels:
//! random frames of odd sizes (0x0, 1xN, Nx1), frames full of finder-pattern
//! look-alikes (which send rqrr down its grid-fitting paths), random bytes as
//! camera frames and as image files.
#![cfg(feature = "webcam")]

use image::{GrayImage, Luma};
use keyfleet_drivers::webcam::frame::{to_luma, PixelLayout};
use keyfleet_drivers::webcam::{self, decode_frame};
use proptest::prelude::*;

/// Nested squares 7:5:3 like a QR finder pattern, at `(x, y)` with module `m`.
fn finder(img: &mut GrayImage, x: u32, y: u32, m: u32) {
    for dy in 0..7 * m {
        for dx in 0..7 * m {
            let (cx, cy) = (dx / m, dy / m);
            let ring = cx.min(cy).min(6 - cx).min(6 - cy);
            let dark = ring != 1;
            if x + dx < img.width() && y + dy < img.height() {
                img.put_pixel(x + dx, y + dy, Luma([if dark { 0 } else { 255 }]));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_frames_of_any_size(w in 0u32..90, h in 0u32..90, seed in any::<u64>()) {
        let mut s = seed | 1;
        let img = GrayImage::from_fn(w, h, |_, _| {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            Luma([(s >> 32) as u8])
        });
        let _ = decode_frame(&img);
    }

    #[test]
    fn frames_full_of_finder_look_alikes(
        w in 21u32..260, h in 21u32..260,
        finders in proptest::collection::vec((0u32..260, 0u32..260, 1u32..6), 0..9),
        noise in any::<bool>(),
    ) {
        let mut img = GrayImage::from_pixel(w, h, Luma([if noise { 90 } else { 255 }]));
        for (x, y, m) in finders {
            finder(&mut img, x, y, m);
        }
        let _ = decode_frame(&img);
    }

    #[test]
    fn random_bytes_as_camera_frames(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        w in 0u32..80, h in 0u32..80, layout in 0usize..6,
    ) {
        let layout = [PixelLayout::Mjpeg, PixelLayout::Yuyv, PixelLayout::Nv12, PixelLayout::Gray, PixelLayout::Rgb, PixelLayout::Bgr][layout];
        if let Ok(img) = to_luma(layout, w, h, &bytes) {
            let _ = decode_frame(&img);
        }
    }

    #[test]
    fn random_bytes_as_image_files(bytes in proptest::collection::vec(any::<u8>(), 0..2048), ext in 0usize..4) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("frame.{}", ["png", "jpg", "bmp", "pgm"][ext]));
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = webcam::load_frame(&path) {
            prop_assert!(e.to_string().contains("frame."), "{}", e);
        }
    }
}

#[test]
fn truncated_image_headers_are_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let jpeg = dir.path().join("cut.jpg");
    // A JPEG start-of-image and a frame header claiming 64000x64000, then nothing.
    std::fs::write(
        &jpeg,
        [
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0xFA, 0x00, 0xFA, 0x00, 0x01, 0x01, 0x11,
            0x00,
        ],
    )
    .unwrap();
    let err = webcam::load_frame(&jpeg).unwrap_err().to_string();
    assert!(err.contains("cut.jpg"), "{err}");
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let err = webcam::load_frame(&empty).unwrap_err().to_string();
    assert!(err.contains("empty.png"), "{err}");
}
