//! Candidate devices from sysfs, for `keyfleet devices`: hidraw nodes (HID
//! scanners), USB serial ports (serial scanners, IR receivers), video
//! capture devices (webcams), and removable media. Each entry carries the
//! USB vendor and product where sysfs knows them, and a note when the
//! current user cannot open the node (with the udev hint).
//!
//! [`list_in`] reads any sysfs tree, so it is tested on a fake one.
use std::path::{Path, PathBuf};

use crate::source::DeviceInfo;

/// What `keyfleet devices` says when a node is not accessible.
pub const UDEV_HINT: &str = "no read/write access for this user; install the udev rules \
     (sudo cp udev/70-keyfleet.rules /etc/udev/rules.d/ && sudo udevadm control --reload && \
     sudo udevadm trigger), then unplug and replug the device";

fn read_trim(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// Vendor and product of the nearest USB device above a sysfs device
/// directory: `"046d:0825 Logitech"` style strings, from `idVendor`,
/// `idProduct`, `manufacturer` and `product`.
fn usb_ids(dev_dir: &Path) -> (Option<String>, Option<String>) {
    let Ok(mut dir) = std::fs::canonicalize(dev_dir) else {
        return (None, None);
    };
    // A handful of levels is enough: interface -> device in practice.
    for _ in 0..8 {
        if let (Some(v), Some(p)) = (
            read_trim(&dir.join("idVendor")),
            read_trim(&dir.join("idProduct")),
        ) {
            let vendor = match read_trim(&dir.join("manufacturer")) {
                Some(m) => format!("{v} {m}"),
                None => v,
            };
            let product = match read_trim(&dir.join("product")) {
                Some(n) => format!("{p} {n}"),
                None => p,
            };
            return (Some(vendor), Some(product));
        }
        if !dir.pop() {
            break;
        }
    }
    (None, None)
}

/// `HID_ID=0003:00000C2E:00000B61` and `HID_NAME=...` from a HID device's uevent.
fn hid_ids(uevent: &str) -> (Option<String>, Option<String>) {
    let mut vendor = None;
    let mut product = None;
    let mut name = None;
    for line in uevent.lines() {
        if let Some(id) = line.strip_prefix("HID_ID=") {
            let parts: Vec<&str> = id.split(':').collect();
            if let [_, v, p] = parts.as_slice() {
                let short = |s: &str| {
                    u32::from_str_radix(s, 16)
                        .map(|n| format!("{n:04x}"))
                        .unwrap_or_else(|_| s.to_owned())
                };
                vendor = Some(short(v));
                product = Some(short(p));
            }
        } else if let Some(n) = line.strip_prefix("HID_NAME=") {
            name = Some(n.trim().to_owned());
        }
    }
    let product = match (product, name) {
        (Some(p), Some(n)) => Some(format!("{p} {n}")),
        (p, n) => p.or(n),
    };
    (vendor, product)
}

fn sorted_entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Candidates under a sysfs tree; `dev` is where their nodes are (`/dev`).
/// Access is not checked here (see [`list`]).
pub fn list_in(sys: &Path, dev: &Path) -> Vec<DeviceInfo> {
    let mut out = Vec::new();
    for (name, path) in sorted_entries(&sys.join("class/hidraw")) {
        let uevent = read_trim(&path.join("device/uevent")).unwrap_or_default();
        let (vendor, product) = hid_ids(&uevent);
        out.push(DeviceInfo {
            kind: "hid-scanner",
            path: dev.join(&name).display().to_string(),
            vendor,
            product,
            note: None,
        });
    }
    for (name, path) in sorted_entries(&sys.join("class/tty")) {
        if !(name.starts_with("ttyUSB") || name.starts_with("ttyACM")) {
            continue;
        }
        let (vendor, product) = usb_ids(&path.join("device"));
        out.push(DeviceInfo {
            kind: "serial-scanner",
            path: dev.join(&name).display().to_string(),
            vendor,
            product,
            note: Some(
                "a serial scanner or an IR receiver (--from serial-scanner or --from ir)".into(),
            ),
        });
    }
    for (name, path) in sorted_entries(&sys.join("class/video4linux")) {
        // A UVC camera makes two nodes; index 0 captures, the other carries metadata.
        if read_trim(&path.join("index")).is_some_and(|i| i != "0") {
            continue;
        }
        let (vendor, mut product) = usb_ids(&path.join("device"));
        if product.is_none() {
            product = read_trim(&path.join("name"));
        }
        out.push(DeviceInfo {
            kind: "webcam",
            path: dev.join(&name).display().to_string(),
            vendor,
            product,
            note: None,
        });
    }
    out
}

/// Whether the current user may open `path` for reading and writing.
pub fn accessible(path: &Path) -> bool {
    rustix::fs::access(
        path,
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    )
    .is_ok()
}

/// All candidates on this machine, with the udev hint on the ones this user
/// cannot open. Removable media come from [`crate::media::list`] when the
/// `file` source is built in.
pub fn list() -> Vec<DeviceInfo> {
    let mut out = list_in(Path::new("/sys"), Path::new("/dev"));
    for d in &mut out {
        if !accessible(Path::new(&d.path)) {
            d.note = Some(match d.note.take() {
                Some(n) => format!("{n}; {UDEV_HINT}"),
                None => UDEV_HINT.to_owned(),
            });
        }
    }
    #[cfg(feature = "file")]
    out.extend(crate::media::list());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    /// A fake sysfs in the kernel's shape: class entries are links into a
    /// device tree where the USB device holds idVendor and idProduct.
    #[test]
    fn lists_hidraw_tty_and_video_with_ids() {
        let sys = tempfile::tempdir().unwrap();
        let s = sys.path();
        let usb = s.join("devices/pci0000:00/0000:00:14.0/usb1/1-2");
        write(&usb.join("idVendor"), "0c2e\n");
        write(&usb.join("idProduct"), "0b61\n");
        write(&usb.join("manufacturer"), "Honeywell\n");
        write(&usb.join("product"), "Voyager 1250g\n");
        let iface = usb.join("1-2:1.0");
        let hid = iface.join("0003:0C2E:0B61.0001");
        write(
            &hid.join("uevent"),
            "DRIVER=hid-generic\nHID_ID=0003:00000C2E:00000B61\nHID_NAME=Honeywell Voyager\n",
        );
        std::fs::create_dir_all(hid.join("hidraw/hidraw0")).unwrap();
        std::fs::create_dir_all(s.join("class/hidraw")).unwrap();
        std::os::unix::fs::symlink(hid.join("hidraw/hidraw0"), s.join("class/hidraw/hidraw0"))
            .unwrap();
        std::os::unix::fs::symlink(&hid, hid.join("hidraw/hidraw0/device")).unwrap();

        let tty = iface.join("ttyACM0");
        std::fs::create_dir_all(&tty).unwrap();
        std::os::unix::fs::symlink(&iface, tty.join("device")).unwrap();
        std::fs::create_dir_all(s.join("class/tty")).unwrap();
        std::os::unix::fs::symlink(&tty, s.join("class/tty/ttyACM0")).unwrap();
        std::fs::create_dir_all(s.join("class/tty/ttyS0")).unwrap();

        let cam = s.join("devices/pci0000:00/0000:00:14.0/usb1/1-3");
        write(&cam.join("idVendor"), "046d\n");
        write(&cam.join("idProduct"), "0825\n");
        let ciface = cam.join("1-3:1.0");
        for (n, idx) in [("video0", "0"), ("video1", "1")] {
            let v = ciface.join("video4linux").join(n);
            write(&v.join("index"), idx);
            write(&v.join("name"), "UVC Camera (046d:0825)\n");
            std::os::unix::fs::symlink(&ciface, v.join("device")).unwrap();
            std::fs::create_dir_all(s.join("class/video4linux")).unwrap();
            std::os::unix::fs::symlink(&v, s.join("class/video4linux").join(n)).unwrap();
        }

        let got = list_in(s, Path::new("/dev"));
        assert_eq!(got.len(), 3, "{got:#?}");
        assert_eq!(got[0].kind, "hid-scanner");
        assert_eq!(got[0].path, "/dev/hidraw0");
        assert_eq!(got[0].vendor.as_deref(), Some("0c2e"));
        assert_eq!(got[0].product.as_deref(), Some("0b61 Honeywell Voyager"));
        assert_eq!(got[1].kind, "serial-scanner");
        assert_eq!(got[1].path, "/dev/ttyACM0");
        assert_eq!(got[1].vendor.as_deref(), Some("0c2e Honeywell"));
        assert_eq!(got[1].product.as_deref(), Some("0b61 Voyager 1250g"));
        assert_eq!(got[2].kind, "webcam");
        assert_eq!(got[2].path, "/dev/video0");
        assert_eq!(got[2].vendor.as_deref(), Some("046d"));
    }

    #[test]
    fn hid_uevent_without_name() {
        assert_eq!(
            hid_ids("HID_ID=0003:000005E0:00001200\n"),
            (Some("05e0".into()), Some("1200".into()))
        );
        assert_eq!(hid_ids("garbage"), (None, None));
    }

    #[test]
    fn access_check() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("node");
        std::fs::write(&p, "").unwrap();
        assert!(accessible(&p));
        assert!(!accessible(&d.path().join("missing")));
    }
}
