//! webcam: QR labels read from a V4L2 camera, or from photos with `--replay`.
//!
//! The pure core is [`decode_frame`]: one luma frame in, the QR payloads out,
//! with preprocessing (scales, binarization, contrast) where `rqrr` alone
//! misses. The camera shell ([`capture`]) only delivers luma frames; the replay
//! shell loads an image file or a folder of frames. Both feed the same loop in
//! [`WebcamSource::read_raw`], which keeps scanning until a payload passes the
//! caller's test (by default [`looks_like_key`]; the CLI passes `label::parse`)
//! or the timeout passes.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::GrayImage;

use crate::source::{Access, DeviceInfo, KeySource, SourceError, SourceOptions};

/// The `--from` name and cargo feature.
pub const NAME: &str = "webcam";

/// What [`Access::Denied`] says for a video node.
pub const FIX: &str = "install udev/70-keyfleet.rules (TAG+=\"uaccess\" on video4linux capture \
     nodes; README \"udev rules\") or join the video group";

pub mod capture;
mod decode;
pub mod frame;
pub mod measure;

pub use decode::{
    apply, decode_frame, decode_with, explain, quiet_rqrr_panics, rqrr_payloads, Attempt, Decoded,
    Scale, Step, Strategy, DEFAULT_STRATEGIES,
};

/// Decides whether a decoded payload is the key label we wait for. Payloads
/// it refuses (a URL on a box, another product's code) are skipped and the
/// scan goes on.
pub type Accept = Box<dyn FnMut(&str) -> bool + Send>;

/// File name extensions `--replay` reads as frames (case ignored).
pub const FRAME_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "bmp", "pgm", "ppm", "pnm", "tif", "tiff", "webp",
];

/// The default test for a payload: the shape of one of the SPEC §6 forms
/// (a `KF1:` label, 36 hex digits, or 41 decimal digits, separators ignored).
/// Checks are left to `label::parse`; this only skips what is plainly something else.
pub fn looks_like_key(payload: &str) -> bool {
    let t = payload.trim();
    if t.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("KF1:")) {
        return true;
    }
    let body: String = t
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '\t'))
        .collect();
    (body.len() == 36 && body.chars().all(|c| c.is_ascii_hexdigit()))
        || (body.len() == 41 && body.chars().all(|c| c.is_ascii_digit()))
}

/// Open the webcam source: `--replay` (an image file or a folder of frames)
/// when given, else `--device` (a `/dev/videoN` or a udev symlink to one),
/// else the first capture device [`list`] finds. Payloads are accepted by
/// `opts.accept`, or [`looks_like_key`] when it is `None`.
pub fn open(opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
    let accept: Accept = match opts.accept.clone() {
        Some(filter) => Box::new(move |p: &str| filter.accepts(p)),
        None => Box::new(looks_like_key),
    };
    Ok(Box::new(WebcamSource::open(opts, accept)?))
}

/// The webcam in the [registry](crate::registry).
pub static FACTORY: crate::registry::Factory = crate::registry::Factory {
    name: NAME,
    list,
    open,
};

/// A webcam or a replay of frames, scanning for a payload that `accept` takes.
pub struct WebcamSource {
    feed: Feed,
    accept: Accept,
}

enum Feed {
    Replay {
        origin: PathBuf,
        frames: Vec<PathBuf>,
        next: usize,
    },
    Camera(capture::Capture),
}

impl WebcamSource {
    /// As [`open`], with the caller's test for payloads, e.g.
    /// `Box::new(|p| label::parse(p).is_ok())` to scan until a valid label.
    pub fn open(opts: &SourceOptions, accept: Accept) -> Result<WebcamSource, SourceError> {
        quiet_rqrr_panics();
        let feed = match (&opts.replay, &opts.device) {
            (Some(path), _) => Feed::Replay {
                origin: path.clone(),
                frames: replay_frames(path)?,
                next: 0,
            },
            (None, Some(dev)) => {
                let index = video_index(dev)?;
                Feed::Camera(capture::Capture::start(index, &dev.display().to_string())?)
            }
            (None, None) => {
                let first = list().into_iter().next().ok_or_else(|| SourceError::Open {
                    path: "/sys/class/video4linux".into(),
                    reason: "no video capture device found; plug in a webcam or pass --device"
                        .into(),
                })?;
                let dev = PathBuf::from(&first.path);
                Feed::Camera(capture::Capture::start(video_index(&dev)?, &first.path)?)
            }
        };
        Ok(WebcamSource { feed, accept })
    }

    /// The next frame, or `None` when a replay has no frames left.
    fn next_frame(
        &mut self,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Result<Option<GrayImage>, SourceError> {
        match &mut self.feed {
            Feed::Replay { frames, next, .. } => {
                let Some(path) = frames.get(*next) else {
                    return Ok(None);
                };
                *next += 1;
                load_frame(path).map(Some)
            }
            Feed::Camera(cap) => cap.next_frame(deadline, timeout).map(Some),
        }
    }
}

impl KeySource for WebcamSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<String, SourceError> {
        let start = Instant::now();
        // A timeout too long to add to the clock is no deadline at all.
        let deadline = timeout.and_then(|t| start.checked_add(t));
        let (mut frames, mut refused) = (0usize, 0usize);
        loop {
            if let (Some(d), Some(t)) = (deadline, timeout) {
                // Checked between frames: a frame being decoded is finished first.
                if Instant::now() >= d {
                    return Err(SourceError::Timeout(t));
                }
            }
            let Some(img) = self.next_frame(deadline, timeout)? else {
                let origin = match &self.feed {
                    Feed::Replay { origin, .. } => origin.display().to_string(),
                    Feed::Camera(_) => String::from("the camera"),
                };
                return Err(SourceError::NoEntry(if refused > 0 {
                    format!("{frames} frame(s) of {origin} held {refused} QR code(s), none of them a key label (--raw shows their text)")
                } else {
                    format!("no readable QR code in the {frames} frame(s) of {origin}; photograph the label closer, sharper or better lit")
                }));
            };
            frames += 1;
            let t0 = Instant::now();
            let payloads = decode_frame(&img);
            tracing::debug!(
                frame = frames,
                ms = t0.elapsed().as_millis() as u64,
                found = payloads.len(),
                "frame decoded"
            );
            for p in payloads {
                if (self.accept)(&p) {
                    return Ok(p);
                }
                refused += 1;
                // The payload may be anything; log its size, not its content.
                tracing::info!(
                    chars = p.chars().count(),
                    "QR code that is not a key label; still scanning"
                );
            }
        }
    }
}

/// The frames a `--replay` path stands for: the file itself, or the image
/// files of a folder in name order (other files, such as expected answers, are ignored).
pub fn replay_frames(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let open_err = |reason: String| SourceError::Open {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| open_err(e.to_string()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut frames = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| open_err(e.to_string()))? {
        let p = entry.map_err(|e| open_err(e.to_string()))?.path();
        if p.is_file() && has_frame_extension(&p) {
            frames.push(p);
        }
    }
    if frames.is_empty() {
        return Err(open_err(format!(
            "the folder holds no frames (image files ending in .{})",
            FRAME_EXTENSIONS.join(", .")
        )));
    }
    frames.sort();
    Ok(frames)
}

fn has_frame_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| FRAME_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Load one image file as luma; the error names the file and why it failed.
pub fn load_frame(path: &Path) -> Result<GrayImage, SourceError> {
    let bad = |why: String| SourceError::Malformed {
        what: format!("image {}: {why}", path.display()),
    };
    let reader = image::ImageReader::open(path)
        .map_err(|e| bad(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    Ok(img.to_luma8())
}

/// `/dev/videoN` (or a udev symlink to it) to N.
fn video_index(dev: &Path) -> Result<u32, SourceError> {
    let real = std::fs::canonicalize(dev).map_err(|e| SourceError::Open {
        path: dev.display().to_string(),
        reason: e.to_string(),
    })?;
    real.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("video"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| SourceError::Open {
            path: dev.display().to_string(),
            reason: format!("{} is not a V4L2 video node (/dev/videoN)", real.display()),
        })
}

/// Video capture devices, from /sys/class/video4linux.
pub fn list() -> Vec<DeviceInfo> {
    list_in(Path::new("/sys/class/video4linux"), Path::new("/dev"))
}

/// [`list`] over a given sysfs class folder and /dev (tests use a fake tree).
///
/// Each `videoN` whose `index` is 0 is listed (UVC cameras add a second node,
/// index 1, for metadata, which cannot capture). Vendor and product come from
/// the USB device above the interface when there is one, else the V4L2 name.
pub fn list_in(class: &Path, dev: &Path) -> Vec<DeviceInfo> {
    let Ok(entries) = std::fs::read_dir(class) else {
        return Vec::new();
    };
    let mut nodes: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u32 = name.strip_prefix("video")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    nodes.sort();
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let mut out = Vec::new();
    for (n, sys) in nodes {
        if read(sys.join("index")).is_some_and(|i| i != "0") {
            continue;
        }
        let usb = [sys.join("device/.."), sys.join("device")]
            .into_iter()
            .find(|d| d.join("idVendor").is_file());
        let (vendor, product) = match &usb {
            Some(u) => {
                let vid = read(u.join("idVendor"));
                let pid = read(u.join("idProduct"));
                let with_id = |name: Option<String>, id: Option<String>| match (name, id) {
                    (Some(n), Some(i)) => Some(format!("{n} ({i})")),
                    (n, i) => n.or(i),
                };
                (
                    with_id(read(u.join("manufacturer")), vid),
                    with_id(
                        read(u.join("product")).or_else(|| read(sys.join("name"))),
                        pid,
                    ),
                )
            }
            None => (None, read(sys.join("name"))),
        };
        let node = dev.join(format!("video{n}"));
        out.push(DeviceInfo {
            kind: NAME,
            path: node.display().to_string(),
            vendor,
            product,
            note: None,
            access: Access::check(&node, FIX),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_like_key_takes_the_three_forms_only() {
        assert!(looks_like_key(
            "KF1:node-1:00112233445566778899aabbccddeeff1234"
        ));
        assert!(looks_like_key("kf1:x:..."));
        assert!(looks_like_key(
            "0011 2233 4455 6677 8899 AABB CCDD EEFF 1234"
        ));
        assert!(looks_like_key(&"1".repeat(41)));
        assert!(!looks_like_key("https://example.com/product/42"));
        assert!(!looks_like_key(&"1".repeat(40)));
        assert!(!looks_like_key(""));
        assert!(!looks_like_key("ééé")); // byte 4 inside a character: no panic
    }

    #[test]
    fn list_reads_a_sysfs_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let class = tmp.path().join("class");
        let usb = tmp.path().join("usb1/1-1");
        let intf = usb.join("1-1:1.0");
        std::fs::create_dir_all(&intf).unwrap();
        for (f, v) in [
            ("idVendor", "046d\n"),
            ("idProduct", "0825\n"),
            ("manufacturer", "Logitech\n"),
            ("product", "C270 HD WEBCAM\n"),
        ] {
            std::fs::write(usb.join(f), v).unwrap();
        }
        for (node, index) in [("video0", "0"), ("video1", "1"), ("video2", "0")] {
            let d = class.join(node);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("index"), index).unwrap();
            std::fs::write(d.join("name"), format!("cam {node}\n")).unwrap();
        }
        std::os::unix::fs::symlink(&intf, class.join("video0/device")).unwrap();
        let dev = tmp.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("video0"), "").unwrap();

        let got = list_in(&class, &dev);
        assert_eq!(got.len(), 2, "{got:?}"); // video1 is a metadata node
        assert_eq!(got[0].path, dev.join("video0").display().to_string());
        assert_eq!(got[0].vendor.as_deref(), Some("Logitech (046d)"));
        assert_eq!(got[0].product.as_deref(), Some("C270 HD WEBCAM (0825)"));
        assert_eq!(got[0].full_note(), None);
        assert_eq!(got[0].access, Access::Granted);
        assert_eq!(got[1].vendor, None);
        assert_eq!(got[1].product.as_deref(), Some("cam video2"));
        // No /dev/video2 in the fake tree.
        assert!(got[1].path.ends_with("video2"), "{}", got[1].path);
        assert!(
            matches!(&got[1].access, Access::Unavailable { reason } if reason.contains("No such file")),
            "{:?}",
            got[1].access
        );
    }

    #[test]
    fn video_index_refuses_other_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("ttyUSB0");
        std::fs::write(&f, "").unwrap();
        let err = video_index(&f).unwrap_err().to_string();
        assert!(err.contains("not a V4L2 video node"), "{err}");
        let v = tmp.path().join("video7");
        std::fs::write(&v, "").unwrap();
        assert_eq!(video_index(&v).unwrap(), 7);
        std::os::unix::fs::symlink(&v, tmp.path().join("by-id-cam")).unwrap();
        assert_eq!(video_index(&tmp.path().join("by-id-cam")).unwrap(), 7);
    }
}
