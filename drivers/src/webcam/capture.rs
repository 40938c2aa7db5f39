//! The device shell: V4L2 capture through `nokhwa`, frames handed over as luma.
//!
//! A capture thread owns the camera, converts each frame with
//! [`frame::to_luma`](super::frame::to_luma) and offers it on a channel of one
//! slot; frames that arrive while the decoder is still busy are dropped, so the
//! decoder always works on a recent frame. Nothing here decodes QR codes.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::GrayImage;
use nokhwa::utils::{CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType};
use nokhwa::Camera;

use super::frame::{to_luma, PixelLayout};
use crate::source::SourceError;

/// Formats we can turn into luma, in the order we prefer them at equal size and rate.
const USABLE: &[FrameFormat] = &[
    FrameFormat::YUYV,
    FrameFormat::MJPEG,
    FrameFormat::GRAY,
    FrameFormat::NV12,
    FrameFormat::RAWRGB,
    FrameFormat::RAWBGR,
];

/// The resolution we aim for: enough pixels for a small label, cheap to decode.
const WANT_PIXELS: f64 = 1280.0 * 720.0;
/// Below this frame rate a hand-held label smears; prefer another format.
const MIN_FPS: u32 = 15;
/// How long the camera may take to open and deliver its first frame.
const OPEN_WAIT: Duration = Duration::from_secs(10);
/// Consecutive undecodable frames (corrupt MJPEG) before we give up.
const MAX_BAD_FRAMES: u32 = 60;

fn layout(f: FrameFormat) -> PixelLayout {
    match f {
        FrameFormat::MJPEG => PixelLayout::Mjpeg,
        FrameFormat::YUYV => PixelLayout::Yuyv,
        FrameFormat::NV12 => PixelLayout::Nv12,
        FrameFormat::GRAY => PixelLayout::Gray,
        FrameFormat::RAWRGB => PixelLayout::Rgb,
        FrameFormat::RAWBGR => PixelLayout::Bgr,
    }
}

/// Pick one of the formats the camera offers: the resolution nearest 1280x720
/// (by pixel count, on a log scale), then a frame rate of at least 15 fps, then
/// the cheapest layout to convert (YUYV before MJPEG), then the higher rate.
pub fn choose_format(offered: &[CameraFormat]) -> Option<CameraFormat> {
    offered
        .iter()
        .filter(|f| USABLE.contains(&f.format()) && f.width() > 0 && f.height() > 0)
        .min_by_key(|f| {
            let pixels = f64::from(f.width()) * f64::from(f.height());
            let distance = ((pixels / WANT_PIXELS).ln().abs() * 10.0).round() as u64;
            let slow = f.frame_rate() < MIN_FPS;
            let rank = USABLE
                .iter()
                .position(|u| *u == f.format())
                .unwrap_or(USABLE.len());
            (distance, slow, rank, std::cmp::Reverse(f.frame_rate()))
        })
        .copied()
}

/// A running capture from one V4L2 device.
pub struct Capture {
    rx: Receiver<Result<GrayImage, SourceError>>,
    stop: Arc<AtomicBool>,
    /// The format in use, for logs: `1280x720 MJPEG @30`.
    pub format: String,
}

impl Capture {
    /// Open `/dev/video<index>` (`path` for messages), choose a format and start streaming.
    pub fn start(index: u32, path: &str) -> Result<Capture, SourceError> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (tx, rx) = mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = Arc::clone(&stop);
        std::thread::Builder::new()
            .name(format!("webcam {path}"))
            .spawn(move || run(index, ready_tx, tx, stop_thread))?;
        let open_err = |reason: String| SourceError::Open {
            path: path.to_string(),
            reason,
        };
        match ready_rx.recv_timeout(OPEN_WAIT) {
            Ok(Ok(format)) => {
                tracing::info!(device = path, %format, "webcam streaming");
                Ok(Capture { rx, stop, format })
            }
            Ok(Err(reason)) => Err(open_err(reason)),
            Err(RecvTimeoutError::Timeout) => {
                stop.store(true, Ordering::Relaxed);
                Err(open_err(format!(
                    "the camera did not start streaming within {OPEN_WAIT:?}"
                )))
            }
            Err(RecvTimeoutError::Disconnected) => Err(open_err(
                "the capture thread stopped while opening the camera".into(),
            )),
        }
    }

    /// The next frame, waiting until `deadline` at most (`timeout` is what the
    /// caller asked for, for the error).
    pub fn next_frame(
        &mut self,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Result<GrayImage, SourceError> {
        let ended = || SourceError::Ended("the capture thread stopped (camera unplugged?)".into());
        match (deadline, timeout) {
            (Some(d), Some(t)) => {
                let left = d.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => Err(SourceError::Timeout(t)),
                    Err(RecvTimeoutError::Disconnected) => Err(ended()),
                }
            }
            _ => self.rx.recv().map_err(|_| ended())?,
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // The thread sees the flag after its current frame, stops the stream and
        // closes the device. Not joined: a camera stuck in a read must not hang us.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn open_camera(index: u32) -> Result<(Camera, CameraFormat), String> {
    let mut cam = Camera::new(
        CameraIndex::Index(index),
        RequestedFormat::with_formats(RequestedFormatType::None, USABLE),
    )
    .map_err(|e| e.to_string())?;
    let offered = cam.compatible_camera_formats().map_err(|e| e.to_string())?;
    let chosen = choose_format(&offered).ok_or_else(|| {
        let list: Vec<String> = offered.iter().map(|f| f.to_string()).collect();
        format!(
            "the camera offers no format we can read (offered: {})",
            list.join(", ")
        )
    })?;
    cam.set_camera_requset(RequestedFormat::with_formats(
        RequestedFormatType::Exact(chosen),
        USABLE,
    ))
    .map_err(|e| format!("cannot set {chosen}: {e}"))?;
    cam.open_stream().map_err(|e| e.to_string())?;
    let in_use = cam_format(&cam, chosen);
    Ok((cam, in_use))
}

fn cam_format(cam: &Camera, fallback: CameraFormat) -> CameraFormat {
    let f = cam.camera_format();
    if f.width() > 0 && f.height() > 0 {
        f
    } else {
        fallback
    }
}

fn run(
    index: u32,
    ready: mpsc::Sender<Result<String, String>>,
    tx: SyncSender<Result<GrayImage, SourceError>>,
    stop: Arc<AtomicBool>,
) {
    let (mut cam, fmt) = match open_camera(index) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(format!(
        "{}x{} {} @{}",
        fmt.width(),
        fmt.height(),
        fmt.format(),
        fmt.frame_rate()
    )));
    let mut bad = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let item = match cam.frame() {
            Ok(buf) => {
                let res = buf.resolution();
                match to_luma(
                    layout(buf.source_frame_format()),
                    res.width(),
                    res.height(),
                    buf.buffer(),
                ) {
                    Ok(img) => {
                        bad = 0;
                        Ok(img)
                    }
                    Err(e) => {
                        bad += 1;
                        tracing::debug!(error = %e, "frame skipped");
                        if bad < MAX_BAD_FRAMES {
                            continue;
                        }
                        Err(SourceError::Malformed {
                            what: format!("{bad} frames in a row did not convert: {e}"),
                        })
                    }
                }
            }
            Err(e) => Err(SourceError::Ended(format!(
                "the camera stopped delivering frames: {e}"
            ))),
        };
        let fatal = item.is_err();
        match tx.try_send(item) {
            // The decoder is busy with an earlier frame: drop this one.
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => break,
        }
        if fatal {
            break;
        }
    }
    let _ = cam.stop_stream();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(w: u32, h: u32, ff: FrameFormat, fps: u32) -> CameraFormat {
        CameraFormat::new_from(w, h, ff, fps)
    }

    #[test]
    fn prefers_720p_then_rate_then_yuyv() {
        let offered = [
            f(640, 480, FrameFormat::YUYV, 30),
            f(1280, 720, FrameFormat::YUYV, 10),
            f(1280, 720, FrameFormat::MJPEG, 30),
            f(1920, 1080, FrameFormat::MJPEG, 30),
        ];
        // YUYV 720p only runs at 10 fps on USB 2: MJPEG 720p at 30 wins.
        assert_eq!(choose_format(&offered), Some(offered[2]));
        let offered = [
            f(1280, 720, FrameFormat::MJPEG, 30),
            f(1280, 720, FrameFormat::YUYV, 30),
        ];
        assert_eq!(choose_format(&offered), Some(offered[1]));
    }

    #[test]
    fn takes_what_there_is() {
        let offered = [f(320, 240, FrameFormat::GRAY, 60)];
        assert_eq!(choose_format(&offered), Some(offered[0]));
        assert_eq!(choose_format(&[]), None);
        let offered = [
            f(3840, 2160, FrameFormat::MJPEG, 30),
            f(800, 600, FrameFormat::NV12, 30),
        ];
        assert_eq!(choose_format(&offered), Some(offered[1]));
    }
}
