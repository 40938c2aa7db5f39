//! Camera frame bytes to luma: the only thing the capture shell hands the decoder.
use image::GrayImage;

/// The pixel layouts a V4L2 camera delivers that we can turn into luma.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLayout {
    /// Motion JPEG: each frame a JPEG (often without Huffman tables; the decoder adds the default ones).
    Mjpeg,
    /// YUYV 4:2:2: Y0 U Y1 V, luma in every even byte.
    Yuyv,
    /// NV12: a full-size luma plane followed by interleaved chroma.
    Nv12,
    /// 8-bit grey.
    Gray,
    /// 24-bit RGB.
    Rgb,
    /// 24-bit BGR.
    Bgr,
}

/// A frame that cannot be converted: too short for its size, or a broken JPEG.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("{layout:?} frame {width}x{height} needs {needed} bytes, got {got}; the camera sent a truncated frame")]
    Short {
        layout: PixelLayout,
        width: u32,
        height: u32,
        needed: usize,
        got: usize,
    },
    #[error("MJPEG frame does not decode: {0}")]
    Jpeg(String),
}

/// Luma (the Y of YUV, what a QR decoder needs) of one frame.
pub fn to_luma(
    layout: PixelLayout,
    width: u32,
    height: u32,
    bytes: &[u8],
) -> Result<GrayImage, FrameError> {
    let px = width as usize * height as usize;
    let need = |n: usize| -> Result<(), FrameError> {
        if bytes.len() < n {
            Err(FrameError::Short {
                layout,
                width,
                height,
                needed: n,
                got: bytes.len(),
            })
        } else {
            Ok(())
        }
    };
    let from_vec = |v: Vec<u8>| {
        GrayImage::from_raw(width, height, v).ok_or(FrameError::Short {
            layout,
            width,
            height,
            needed: px,
            got: bytes.len(),
        })
    };
    match layout {
        PixelLayout::Mjpeg => {
            let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
                .map_err(|e| FrameError::Jpeg(e.to_string()))?;
            Ok(img.to_luma8())
        }
        PixelLayout::Yuyv => {
            need(px * 2)?;
            from_vec(bytes.iter().step_by(2).take(px).copied().collect())
        }
        PixelLayout::Nv12 | PixelLayout::Gray => {
            need(px)?;
            from_vec(bytes[..px].to_vec())
        }
        PixelLayout::Rgb | PixelLayout::Bgr => {
            need(px * 3)?;
            let (ri, bi) = if layout == PixelLayout::Rgb {
                (0, 2)
            } else {
                (2, 0)
            };
            from_vec(
                bytes
                    .chunks_exact(3)
                    .take(px)
                    .map(|c| {
                        // ITU-R BT.601 luma, integer weights summing to 256.
                        let y =
                            77 * u32::from(c[ri]) + 150 * u32::from(c[1]) + 29 * u32::from(c[bi]);
                        (y >> 8) as u8
                    })
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_takes_every_even_byte() {
        let bytes = [10, 200, 20, 201, 30, 202, 40, 203];
        let img = to_luma(PixelLayout::Yuyv, 2, 2, &bytes).unwrap();
        assert_eq!(img.as_raw(), &vec![10, 20, 30, 40]);
    }

    #[test]
    fn short_frames_are_refused_with_sizes() {
        let err = to_luma(PixelLayout::Yuyv, 4, 4, &[0; 31]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Yuyv frame 4x4 needs 32 bytes, got 31; the camera sent a truncated frame"
        );
        assert!(to_luma(PixelLayout::Gray, 1280, 720, &[]).is_err());
        assert!(to_luma(PixelLayout::Rgb, 2, 1, &[0; 5]).is_err());
    }

    #[test]
    fn nv12_uses_the_luma_plane() {
        let bytes = [1, 2, 3, 4, 99, 99];
        assert_eq!(
            to_luma(PixelLayout::Nv12, 2, 2, &bytes).unwrap().as_raw(),
            &vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn rgb_and_bgr_weigh_green_most() {
        let g = to_luma(PixelLayout::Rgb, 1, 1, &[0, 255, 0])
            .unwrap()
            .get_pixel(0, 0)
            .0[0];
        let r = to_luma(PixelLayout::Rgb, 1, 1, &[255, 0, 0])
            .unwrap()
            .get_pixel(0, 0)
            .0[0];
        let b = to_luma(PixelLayout::Bgr, 1, 1, &[255, 0, 0])
            .unwrap()
            .get_pixel(0, 0)
            .0[0];
        assert!(g > r && r > b, "{g} {r} {b}");
    }

    #[test]
    fn mjpeg_frame_decodes_to_its_luma() {
        let src = GrayImage::from_fn(32, 16, |x, _| image::Luma([if x < 16 { 20 } else { 230 }]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&src)
            .unwrap();
        let img = to_luma(PixelLayout::Mjpeg, 32, 16, &jpeg).unwrap();
        assert_eq!(img.dimensions(), (32, 16));
        assert!(img.get_pixel(2, 8).0[0] < 60 && img.get_pixel(30, 8).0[0] > 190);
        assert!(matches!(
            to_luma(PixelLayout::Mjpeg, 32, 16, b"not a jpeg"),
            Err(FrameError::Jpeg(_))
        ));
    }
}
