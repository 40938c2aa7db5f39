//! `--from file`: a key file on removable media (SPEC §6, claim 12).
//!
//! Where the key is looked for:
//! - `--path FILE` alone: that one file.
//! - `--device DEV` (a block device such as `/dev/sdb1`): where DEV is
//!   already mounted, that mount; otherwise keyfleet mounts it itself,
//!   read-only with `nosuid,nodev,noexec`, in a private temporary directory
//!   and unmounts it afterwards (this needs root). `--path` is then relative
//!   to the medium's root.
//! - neither: every mounted removable medium (sysfs `removable` = 1, or
//!   attached over USB, or an SD card), found from `/sys/block` and
//!   `/proc/self/mountinfo`.
//!
//! On a medium the key file is `keyfleet/<name>.key` (or `<name>.kfkey` at
//! the root); exactly one must be there, otherwise `--path` chooses. It holds
//! one form of [`crate::label`] as text.
//!
//! A key file is refused when it is a symbolic link (opened with
//! `O_NOFOLLOW`, checked on the opened descriptor; on a medium no component
//! of its path may be a link nor lead off the medium, see
//! [`read_key_file_beneath`]), not a regular file,
//! accessible by group or others (any bit of `0o077`, as ssh does for its
//! keys), or larger than 4 KiB. FAT, exFAT and NTFS have no permission bits:
//! the mode comes from the mount options (`fmask`, `umask`). A desktop's
//! automount usually gives files mode 0644, which is refused; either remount
//! with `fmask=0177,dmask=0077`, or unmount and let keyfleet mount the device
//! with `--device`, which passes `uid=<you>,fmask=0177,dmask=0077`.
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};
use zeroize::Zeroizing;

use crate::source::{Access, DeviceInfo, KeySource, SourceError, SourceOptions};

/// The `--from` name and cargo feature.
pub const NAME: &str = "file";

/// Largest key file accepted.
pub const MAX_KEY_FILE: u64 = 4096;
/// The folder at a medium's root that holds key files.
pub const KEY_DIR: &str = "keyfleet";
/// Key files in [`KEY_DIR`] end in `.key`; at the root they end in `.kfkey`.
pub const KEY_EXT: &str = "key";
pub const ROOT_KEY_EXT: &str = "kfkey";
/// Mode bits for group and others; a key file must have none of them.
const GROUP_OTHER: u32 = 0o077;
/// Filesystems whose permission bits come from mount options.
const NO_PERMISSION_FS: &[&str] = &["vfat", "msdos", "exfat", "ntfs", "ntfs3", "fuseblk"];

/// Why a key file or a medium was refused. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{path} is a symbolic link; key files are not read through links: copy the file itself onto the medium")]
    Symlink { path: PathBuf },
    #[error("{path} leads off the medium; a key file must be on the medium itself")]
    Escapes { path: PathBuf },
    #[error("{path} is not a regular file; give the key file itself")]
    NotRegular { path: PathBuf },
    #[error("{path} is accessible by group or others (mode {mode:04o}); make it owner-only: chmod 600 {path}{hint}")]
    Permissive {
        path: PathBuf,
        mode: u32,
        /// Extra advice for filesystems without permission bits.
        hint: String,
    },
    #[error("{path} is {size} bytes, more than the 4096 a key file may have; a key file holds one label or key form: is this the right file?")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path} is not UTF-8 text; a key file holds a label or key form as text")]
    NotText { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no key file (keyfleet/*.key or *.kfkey) found; searched: {searched}")]
    NoKeyFile { searched: String },
    #[error("{count} key files found ({files}); choose one with --path")]
    Many { count: usize, files: String },
    #[error(
        "no mounted removable medium found{unmounted}; insert one, or give --device or --path"
    )]
    NoMedium { unmounted: String },
    #[error("cannot mount {device}: {reason}")]
    Mount { device: PathBuf, reason: String },
}

impl From<MediaError> for SourceError {
    /// A mount failure is a device that cannot be opened; every other refusal
    /// travels as an I/O error whose message is the refusal itself.
    fn from(e: MediaError) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            MediaError::Mount { device, reason } => {
                return SourceError::Open {
                    path: device.display().to_string(),
                    reason: reason.clone(),
                }
            }
            MediaError::Io { source, .. } => source.kind(),
            MediaError::Symlink { .. } | MediaError::Permissive { .. } => {
                ErrorKind::PermissionDenied
            }
            MediaError::NoKeyFile { .. } | MediaError::NoMedium { .. } => ErrorKind::NotFound,
            _ => ErrorKind::InvalidData,
        };
        SourceError::Io(std::io::Error::new(kind, e.to_string()))
    }
}

/// Reads one key file with the checks above. The text is zeroed on drop.
pub fn read_key_file(path: &Path) -> Result<Zeroizing<String>, MediaError> {
    let fd =
        rustix::fs::open(path, KEY_OPEN_FLAGS, Mode::empty()).map_err(|e| open_error(path, e))?;
    check_and_read(File::from(fd), path)
}

/// O_NONBLOCK: a FIFO planted as a key file must not hang the open or the read.
const KEY_OPEN_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY);

fn open_error(path: &Path, e: rustix::io::Errno) -> MediaError {
    if e == rustix::io::Errno::LOOP {
        MediaError::Symlink {
            path: path.to_owned(),
        }
    } else if e == rustix::io::Errno::XDEV {
        MediaError::Escapes {
            path: path.to_owned(),
        }
    } else {
        MediaError::Io {
            path: path.to_owned(),
            source: e.into(),
        }
    }
}

/// Reads `rel` under a medium's root: no component may be a symbolic link
/// and the path may not leave the medium (`openat2` with `RESOLVE_BENEATH`
/// and `RESOLVE_NO_SYMLINKS`), so a medium cannot point keyfleet at a file
/// elsewhere on the machine. Kernels before 5.6 lack `openat2`; there only
/// the last component is checked (`O_NOFOLLOW`) and `..` is refused.
pub fn read_key_file_beneath(root: &Path, rel: &Path) -> Result<Zeroizing<String>, MediaError> {
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let shown = root.join(rel);
    let dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| open_error(root, e))?;
    let resolve = rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_SYMLINKS;
    let fd = match rustix::fs::openat2(&dir, rel, KEY_OPEN_FLAGS, Mode::empty(), resolve) {
        Err(rustix::io::Errno::NOSYS) => {
            if rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(MediaError::Escapes { path: shown });
            }
            rustix::fs::openat(&dir, rel, KEY_OPEN_FLAGS, Mode::empty())
        }
        other => other,
    }
    .map_err(|e| open_error(&shown, e))?;
    check_and_read(File::from(fd), &shown)
}

/// The checks on an opened key file, then its text.
fn check_and_read(file: File, path: &Path) -> Result<Zeroizing<String>, MediaError> {
    let io = |source| MediaError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(MediaError::Symlink {
            path: path.to_owned(),
        });
    }
    if !meta.file_type().is_file() {
        return Err(MediaError::NotRegular {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER != 0 {
        let hint = fs_type_of(meta.dev())
            .map(|fs| permission_hint(&fs))
            .unwrap_or_default();
        return Err(MediaError::Permissive {
            path: path.to_owned(),
            mode,
            hint,
        });
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(MediaError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    // Read at most one byte past the limit, in case the file grew after fstat.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE as usize + 1));
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(MediaError::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
        });
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| MediaError::NotText {
        path: path.to_owned(),
    })?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// The advice added to a mode refusal on a filesystem without permission bits.
fn permission_hint(fs: &str) -> String {
    if NO_PERMISSION_FS.contains(&fs) {
        format!(
            "; but {fs} has no permission bits, its mount options decide the mode: remount with \
             fmask=0177,dmask=0077, or unmount it and let keyfleet mount it: \
             keyfleet read-key --from file --device <block device>"
        )
    } else {
        String::new()
    }
}

/// Key files on a medium mounted at `root`, by the convention above, sorted.
/// Links are skipped here and refused if given with `--path`.
pub fn find_key_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut scan = |dir: &Path, ext: &str| {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            if is_file
                && !name.starts_with('.')
                && p.extension().and_then(|x| x.to_str()) == Some(ext)
            {
                out.push(p);
            }
        }
    };
    let dir = root.join(KEY_DIR);
    // The folder itself must not be a link to somewhere else.
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        scan(&dir, KEY_EXT);
    }
    scan(root, ROOT_KEY_EXT);
    out.sort();
    out
}

/// One mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted device.
    pub dev: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Parses `/proc/self/mountinfo` (proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                dev: (*l.get(2)?).to_owned(),
                mount_point: PathBuf::from(unescape_mount(l.get(4)?)),
                fs_type: (*r.first()?).to_owned(),
                source: unescape_mount(r.get(1)?),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(&[b'\\', a, b1, c]) = b.get(i..i + 4) {
            if [a, b1, c].iter().all(|x| (b'0'..=b'7').contains(x)) {
                let v = u32::from(a - b'0') * 64 + u32::from(b1 - b'0') * 8 + u32::from(c - b'0');
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

fn dev_string(dev: u64) -> String {
    format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
}

fn fs_type_of(dev: u64) -> Option<String> {
    let d = dev_string(dev);
    mounts().into_iter().find(|m| m.dev == d).map(|m| m.fs_type)
}

/// A removable block device (a whole disk, or one of its partitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Medium {
    /// `/dev/<name>`.
    pub device: PathBuf,
    /// `major:minor`.
    pub dev: String,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub mounts: Vec<Mount>,
}

fn read_trim(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// Removable block devices under a sysfs tree (`/sys` normally), with their
/// mounts from `mountinfo`. A disk counts as removable when its `removable`
/// attribute is 1 or its device path runs through USB. Partitions are
/// listed instead of their disk when it has any; empty slots (size 0, a card
/// reader without a card) are left out.
pub fn removable_media(sys: &Path, mountinfo: &[Mount]) -> Vec<Medium> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(sys.join("block")) else {
        return out;
    };
    let mut disks: Vec<_> = entries.flatten().collect();
    disks.sort_by_key(|e| e.file_name());
    for disk in disks {
        let dpath = disk.path();
        let name = disk.file_name().to_string_lossy().into_owned();
        // SD cards in a built-in reader report removable=0 but are removable media.
        let sd_card = name.starts_with("mmcblk")
            && read_trim(&dpath.join("device/type")).is_some_and(|t| t == "SD" || t == "MMC");
        let removable = read_trim(&dpath.join("removable")).as_deref() == Some("1") || sd_card;
        let usb = std::fs::canonicalize(&dpath)
            .map(|p| p.to_string_lossy().contains("/usb"))
            .unwrap_or(false);
        if !(removable || usb) {
            continue;
        }
        let vendor = read_trim(&dpath.join("device/vendor"));
        let model = read_trim(&dpath.join("device/model"));
        let mut parts: Vec<PathBuf> = std::fs::read_dir(&dpath)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("partition").exists())
                    .collect()
            })
            .unwrap_or_default();
        parts.sort();
        if parts.is_empty() {
            parts.push(dpath.clone());
        }
        for p in parts {
            let size = read_trim(&p.join("size")).and_then(|s| s.parse::<u64>().ok());
            if size == Some(0) {
                continue;
            }
            let Some(dev) = read_trim(&p.join("dev")) else {
                continue;
            };
            let pname = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| name.clone());
            out.push(Medium {
                device: PathBuf::from("/dev").join(pname),
                mounts: mountinfo.iter().filter(|m| m.dev == dev).cloned().collect(),
                dev,
                vendor: vendor.clone(),
                model: model.clone(),
            });
        }
    }
    out
}

/// Removable media for `keyfleet devices`.
pub fn list() -> Vec<DeviceInfo> {
    removable_media(Path::new("/sys"), &mounts())
        .into_iter()
        .map(|m| {
            let note = if m.mounts.is_empty() {
                "not mounted; keyfleet mounts it read-only with --device (needs root)".to_owned()
            } else {
                let at: Vec<String> = m
                    .mounts
                    .iter()
                    .map(|x| format!("{} ({})", x.mount_point.display(), x.fs_type))
                    .collect();
                format!("mounted at {}", at.join(", "))
            };
            DeviceInfo {
                kind: NAME,
                path: m.device.display().to_string(),
                vendor: m.vendor,
                product: m.model,
                note: Some(note),
                // Read where it is mounted, or mounted by keyfleet as root: never opened as a node.
                access: Access::NotChecked,
            }
        })
        .collect()
}

/// A medium keyfleet mounted itself; unmounted (and its directory removed) on drop.
pub struct PrivateMount {
    dir: Option<tempfile::TempDir>,
    pub fs_type: String,
}

impl PrivateMount {
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/"), |d| d.path())
    }
}

impl Drop for PrivateMount {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if let Err(e) = rustix::mount::unmount(dir.path(), UnmountFlags::empty()) {
                tracing::warn!(dir = %dir.path().display(), error = %e, "unmount failed; trying a lazy unmount");
                let _ = rustix::mount::unmount(dir.path(), UnmountFlags::DETACH);
            }
            let _ = dir.close();
        }
    }
}

/// Filesystem types tried when mounting, the usual removable ones first,
/// then whatever else the kernel has loaded for block devices.
fn fs_types_to_try() -> Vec<String> {
    let mut types: Vec<String> = [
        "vfat", "exfat", "ext4", "iso9660", "udf", "ntfs3", "btrfs", "xfs", "f2fs", "ext3", "ext2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Ok(text) = std::fs::read_to_string("/proc/filesystems") {
        for line in text.lines() {
            if line.starts_with("nodev") {
                continue;
            }
            let t = line.trim();
            if !t.is_empty() && t != "fuseblk" && !types.iter().any(|x| x == t) {
                types.push(t.to_owned());
            }
        }
    }
    types
}

/// Mounts `device` read-only, `nosuid,nodev,noexec`, in a fresh private
/// directory. Filesystems without permission bits get owner-only masks for
/// the current user, so their files pass the mode check.
pub fn mount_private(device: &Path) -> Result<PrivateMount, MediaError> {
    let merr = |reason: String| MediaError::Mount {
        device: device.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(device).map_err(|e| merr(e.to_string()))?;
    if !meta.file_type().is_block_device() {
        return Err(merr(
            "not a block device; give a partition such as /dev/sdb1 (see `keyfleet devices`)"
                .into(),
        ));
    }
    let dir = tempfile::Builder::new()
        .prefix("keyfleet-media-")
        .tempdir()
        .map_err(|e| merr(format!("cannot make a mount directory: {e}")))?;
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let mut tried = Vec::new();
    for fs in fs_types_to_try() {
        let data = if NO_PERMISSION_FS.contains(&fs.as_str()) {
            format!("uid={uid},gid={gid},fmask=0177,dmask=0077")
        } else {
            String::new()
        };
        let data = CString::new(data).map_err(|e| merr(e.to_string()))?;
        match rustix::mount::mount(device, dir.path(), fs.as_str(), flags, data.as_c_str()) {
            Ok(()) => {
                tracing::debug!(device = %device.display(), fs, "mounted read-only");
                return Ok(PrivateMount {
                    dir: Some(dir),
                    fs_type: fs,
                });
            }
            Err(e) if e == rustix::io::Errno::PERM || e == rustix::io::Errno::ACCESS => {
                return Err(merr(format!(
                    "{e}; mounting needs root: run keyfleet with sudo, or mount the medium yourself \
                     (udisksctl mount -b {}) and give the file with --path",
                    device.display()
                )));
            }
            Err(e) if e == rustix::io::Errno::BUSY => {
                return Err(merr(format!(
                    "{e}; the device is in use, perhaps mounted elsewhere; give the file with --path"
                )));
            }
            Err(e) => tried.push(format!("{fs}: {e}")),
        }
    }
    Err(merr(format!(
        "no filesystem the kernel knows fits ({}); is it formatted, and is the filesystem's kernel \
         module available? If it is a whole disk, give its partition (such as /dev/sdb1, see \
         `keyfleet devices`)",
        tried.join("; ")
    )))
}

/// Where the key came from, for the source's log line.
fn pick_one(files: Vec<PathBuf>, searched: &[PathBuf]) -> Result<PathBuf, MediaError> {
    match files.len() {
        0 => Err(MediaError::NoKeyFile {
            searched: searched
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        1 => Ok(files.into_iter().next().unwrap_or_default()),
        count => Err(MediaError::Many {
            count,
            files: files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Reads the key text from a medium's root: `rel` when given, else the one
/// key file found by the convention.
fn read_from_root(root: &Path, rel: Option<&Path>) -> Result<Zeroizing<String>, MediaError> {
    let rel = match rel {
        Some(r) => r.to_owned(),
        None => {
            let file = pick_one(find_key_files(root), &[root.to_owned()])?;
            file.strip_prefix(root).map(Path::to_owned).unwrap_or(file)
        }
    };
    tracing::info!(root = %root.display(), file = %rel.display(), "reading key file");
    read_key_file_beneath(root, &rel)
}

struct FileSource {
    opts: SourceOptions,
}

/// The key file source in the [registry](crate::registry).
pub static FACTORY: crate::registry::Factory = crate::registry::Factory {
    name: NAME,
    list,
    open,
};

/// Opens the file source; the search happens on [`KeySource::read_raw`].
pub fn open(opts: &SourceOptions) -> Result<Box<dyn KeySource>, SourceError> {
    let mut opts = opts.clone();
    if opts.path.is_none() && opts.device.is_none() {
        // `--replay FILE` means the same as `--path FILE` here: a key file is its own recording.
        opts.path = opts.replay.clone();
    }
    Ok(Box::new(FileSource { opts }))
}

/// Reads the key text as described in the module documentation.
pub fn read(opts: &SourceOptions) -> Result<Zeroizing<String>, MediaError> {
    if let Some(device) = &opts.device {
        let rdev = std::fs::metadata(device)
            .map_err(|e| MediaError::Mount {
                device: device.clone(),
                reason: e.to_string(),
            })?
            .rdev();
        let d = dev_string(rdev);
        if let Some(m) = mounts().into_iter().find(|m| m.dev == d) {
            tracing::info!(device = %device.display(), at = %m.mount_point.display(), "already mounted; reading there");
            return read_from_root(&m.mount_point, opts.path.as_deref());
        }
        let mounted = mount_private(device)?;
        let r = read_from_root(mounted.path(), opts.path.as_deref());
        drop(mounted);
        return r;
    }
    if let Some(p) = &opts.path {
        return read_key_file(p);
    }
    let media = removable_media(Path::new("/sys"), &mounts());
    let roots: Vec<PathBuf> = media
        .iter()
        .flat_map(|m| m.mounts.iter().map(|x| x.mount_point.clone()))
        .collect();
    if roots.is_empty() {
        let unmounted: Vec<String> = media
            .iter()
            .map(|m| m.device.display().to_string())
            .collect();
        return Err(MediaError::NoMedium {
            unmounted: if unmounted.is_empty() {
                String::new()
            } else {
                format!(
                    " (removable but not mounted: {}; give one with --device)",
                    unmounted.join(", ")
                )
            },
        });
    }
    let files: Vec<(PathBuf, PathBuf)> = roots
        .iter()
        .flat_map(|r| find_key_files(r).into_iter().map(move |f| (r.clone(), f)))
        .collect();
    let file = pick_one(files.iter().map(|(_, f)| f.clone()).collect(), &roots)?;
    let (root, _) =
        files
            .iter()
            .find(|(_, f)| *f == file)
            .ok_or_else(|| MediaError::NoKeyFile {
                searched: file.display().to_string(),
            })?;
    let rel = file.strip_prefix(root).unwrap_or(&file);
    read_key_file_beneath(root, rel)
}

impl KeySource for FileSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read_raw(&mut self, _timeout: Option<Duration>) -> Result<String, SourceError> {
        let text = read(&self.opts)?;
        Ok(text.as_str().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_mode(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn reads_owner_only_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.key");
        write_mode(&p, "KF1:n1:83FED3407A939723A5C639B26916D505C3B5\n", 0o600);
        assert_eq!(
            read_key_file(&p).unwrap().as_str(),
            "KF1:n1:83FED3407A939723A5C639B26916D505C3B5\n"
        );
        write_mode(&p, "x", 0o400);
        assert!(read_key_file(&p).is_ok());
    }

    #[test]
    fn refuses_group_or_other_access() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.key");
        for mode in [0o640, 0o604, 0o644, 0o620, 0o602] {
            write_mode(&p, "x", mode);
            let e = read_key_file(&p).unwrap_err();
            assert!(
                matches!(e, MediaError::Permissive { mode: m, .. } if m == mode),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
    }

    #[test]
    fn fat_refusal_explains_mount_masks() {
        for fs in ["vfat", "exfat", "ntfs3"] {
            let h = permission_hint(fs);
            assert!(
                h.contains("no permission bits") && h.contains("fmask=0177"),
                "{h}"
            );
            assert!(h.contains("--device"), "{h}");
        }
        assert_eq!(permission_hint("ext4"), "");
    }

    #[test]
    fn refuses_symlink() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("real.key");
        write_mode(&target, "x", 0o600);
        let link = d.path().join("link.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = read_key_file(&link).unwrap_err();
        assert!(matches!(e, MediaError::Symlink { .. }), "{e:?}");
        assert!(e.to_string().contains("symbolic link"));
    }

    #[test]
    fn beneath_refuses_links_in_any_component_and_escapes() {
        let medium = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        write_mode(&elsewhere.path().join("x.key"), "secret", 0o600);
        write_mode(&medium.path().join("ok.key"), "x", 0o600);
        std::os::unix::fs::symlink(elsewhere.path(), medium.path().join("keyfleet")).unwrap();
        assert_eq!(
            read_key_file_beneath(medium.path(), Path::new("ok.key"))
                .unwrap()
                .as_str(),
            "x"
        );
        // keyfleet/ is a link to a folder off the medium: refused, though x.key itself is no link.
        let e = read_key_file_beneath(medium.path(), Path::new("keyfleet/x.key")).unwrap_err();
        assert!(matches!(e, MediaError::Symlink { .. }), "{e:?}");
        let up = Path::new("..")
            .join(elsewhere.path().file_name().unwrap())
            .join("x.key");
        let e = read_key_file_beneath(medium.path(), &up).unwrap_err();
        assert!(matches!(e, MediaError::Escapes { .. }), "{e:?}");
        assert!(e.to_string().contains("leads off the medium"), "{e}");
    }

    #[test]
    fn refuses_large_file_and_non_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.key");
        write_mode(&p, &"1".repeat(4097), 0o600);
        let e = read_key_file(&p).unwrap_err();
        assert!(
            matches!(e, MediaError::TooLarge { size: 4097, .. }),
            "{e:?}"
        );
        write_mode(&p, &"1".repeat(4096), 0o600);
        assert!(read_key_file(&p).is_ok());
        let e = read_key_file(d.path()).unwrap_err();
        assert!(matches!(e, MediaError::NotRegular { .. }), "{e:?}");
        let p = d.path().join("bin.key");
        std::fs::write(&p, [0xff, 0xfe, 0x00]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_key_file(&p).unwrap_err(),
            MediaError::NotText { .. }
        ));
    }

    #[test]
    fn finds_key_files_by_convention() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("keyfleet")).unwrap();
        write_mode(&d.path().join("keyfleet/pump-07.key"), "x", 0o600);
        write_mode(&d.path().join("keyfleet/notes.txt"), "x", 0o600);
        write_mode(&d.path().join("keyfleet/.hidden.key"), "x", 0o600);
        write_mode(&d.path().join("gate.kfkey"), "x", 0o600);
        write_mode(&d.path().join("other.key"), "x", 0o600);
        let found = find_key_files(d.path());
        assert_eq!(
            found,
            vec![
                d.path().join("gate.kfkey"),
                d.path().join("keyfleet/pump-07.key")
            ]
        );
        let e = pick_one(found, &[d.path().to_owned()]).unwrap_err();
        assert!(e.to_string().contains("2 key files found"), "{e}");
        assert!(e.to_string().contains("--path"));
    }

    #[test]
    fn key_dir_through_a_link_is_not_searched() {
        let d = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        write_mode(&elsewhere.path().join("x.key"), "x", 0o600);
        std::os::unix::fs::symlink(elsewhere.path(), d.path().join("keyfleet")).unwrap();
        assert!(find_key_files(d.path()).is_empty());
        let e = pick_one(vec![], &[d.path().to_owned()]).unwrap_err();
        assert!(e.to_string().contains("keyfleet/*.key"), "{e}");
    }

    #[test]
    fn mountinfo_parsing() {
        // Lines as the kernel writes them (proc(5)), one with an escaped space.
        let text = "\
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
412 30 8:17 / /media/anna/KEY\\040STICK rw,nosuid,nodev,relatime shared:231 - vfat /dev/sdb1 rw,uid=1000,gid=1000,fmask=0022,dmask=0022
garbage line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].dev, "8:17");
        assert_eq!(m[1].mount_point, PathBuf::from("/media/anna/KEY STICK"));
        assert_eq!(m[1].fs_type, "vfat");
        assert_eq!(m[1].source, "/dev/sdb1");
    }

    /// A fake sysfs: a USB stick with one partition, a card reader without a
    /// card, and a fixed disk.
    #[test]
    fn removable_media_from_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let b = sys.path().join("block");
        let mk = |p: &str, files: &[(&str, &str)]| {
            let dir = b.join(p);
            std::fs::create_dir_all(&dir).unwrap();
            for (f, v) in files {
                std::fs::create_dir_all(dir.join(f).parent().unwrap()).unwrap();
                std::fs::write(dir.join(f), v).unwrap();
            }
        };
        mk(
            "sdb",
            &[
                ("removable", "1\n"),
                ("dev", "8:16\n"),
                ("size", "30031872\n"),
                ("device/vendor", "SanDisk \n"),
                ("device/model", "Cruzer Blade    \n"),
            ],
        );
        mk(
            "sdb/sdb1",
            &[
                ("partition", "1\n"),
                ("dev", "8:17\n"),
                ("size", "30029824\n"),
            ],
        );
        mk(
            "sdc",
            &[("removable", "1\n"), ("dev", "8:32\n"), ("size", "0\n")],
        );
        mk(
            "vda",
            &[("removable", "0\n"), ("dev", "254:0\n"), ("size", "100\n")],
        );
        mk(
            "mmcblk0",
            &[
                ("removable", "0\n"),
                ("dev", "179:0\n"),
                ("size", "62333952\n"),
                ("device/type", "SD\n"),
            ],
        );
        mk(
            "mmcblk0/mmcblk0p1",
            &[
                ("partition", "1\n"),
                ("dev", "179:1\n"),
                ("size", "62331904\n"),
            ],
        );
        let mi =
            parse_mountinfo("412 30 8:17 / /media/anna/STICK rw - vfat /dev/sdb1 rw,fmask=0022\n");
        let media = removable_media(sys.path(), &mi);
        assert_eq!(media.len(), 2, "{media:?}");
        assert_eq!(media[0].device, PathBuf::from("/dev/mmcblk0p1"));
        assert!(media[0].mounts.is_empty());
        let media = &media[1..];
        assert_eq!(media[0].device, PathBuf::from("/dev/sdb1"));
        assert_eq!(media[0].vendor.as_deref(), Some("SanDisk"));
        assert_eq!(media[0].model.as_deref(), Some("Cruzer Blade"));
        assert_eq!(
            media[0].mounts[0].mount_point,
            PathBuf::from("/media/anna/STICK")
        );
    }

    #[test]
    fn mount_refuses_non_block_device() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, b"").unwrap();
        let e = mount_private(&p).err().unwrap();
        assert!(e.to_string().contains("not a block device"), "{e}");
    }
}
