//! `keyfleet read-key --from file --device` on real loop-mounted images.
//!
//! Each test builds a filesystem image (ext4 with `mke2fs -d`, which keeps
//! the files' modes; FAT with `mkfs.vfat` and `mcopy`), attaches it to a loop
//! device, and lets keyfleet find, mount, read and unmount it. They need root
//! and loop devices; without them each test prints why it is skipped. The
//! FAT tests also need the kernel's vfat driver.
#![cfg(feature = "file")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use keyfleet_drivers::media;

/// losetup's search for a free device is not safe against itself in parallel.
static LOSETUP: Mutex<()> = Mutex::new(());

const LABEL: &str = "KF1:pump-07:83FED3407A939723A5C639B26916D505C3B5";
const CHECK: &str = "0cc7776b";

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: mounting a loop device needs root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control: loop devices are unavailable".into());
    }
    None
}

macro_rules! need_root_and_loop {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

struct Loop {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn attach(dir: tempfile::TempDir, img: &Path) -> Option<Loop> {
        let _g = LOSETUP.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(img)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Loop { dev, _dir: dir })
    }

    fn dev_str(&self) -> &str {
        self.dev.to_str().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 image holding `files` (path, content, mode), on a loop device.
fn ext4_medium(files: &[(&str, &str, u32)]) -> Option<Loop> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for (p, content, mode) in files {
        let p = src.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    std::fs::create_dir_all(&src).unwrap();
    let img = dir.path().join("medium.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("8M"));
    Loop::attach(dir, &img)
}

fn keyfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(args)
        .output()
        .unwrap()
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// The loop device is mounted nowhere (keyfleet unmounted its private
/// mount). Only this device is looked at: other tests run in parallel.
fn assert_not_mounted(l: &Loop) {
    let mi = mountinfo();
    let mounted = mi.lines().any(|x| {
        x.split_once(" - ")
            .and_then(|(_, r)| r.split(' ').nth(1))
            .is_some_and(|source| source == l.dev_str())
    });
    assert!(!mounted, "{} still mounted:\n{mi}", l.dev_str());
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn ext4_medium_is_mounted_read_and_unmounted() {
    need_root_and_loop!();
    let Some(l) = ext4_medium(&[("keyfleet/pump-07.key", &format!("{LABEL}\n"), 0o600)]) else {
        return;
    };
    let out = keyfleet(&[
        "read-key",
        "--from",
        "file",
        "--device",
        l.dev_str(),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["source"], "file");
    assert_eq!(v["node_id"], "pump-07");
    assert_eq!(v["key_check"], CHECK);
    assert_not_mounted(&l);
}

#[test]
fn private_mount_is_read_only_nosuid_nodev_noexec() {
    need_root_and_loop!();
    let Some(l) = ext4_medium(&[("keyfleet/a.key", LABEL, 0o600)]) else {
        return;
    };
    let m = media::mount_private(&l.dev).expect("mount");
    let at = m.path().to_str().unwrap().to_owned();
    let line = mountinfo()
        .lines()
        .find(|x| x.split(' ').nth(4) == Some(at.as_str()))
        .map(str::to_owned)
        .expect("mount listed in mountinfo");
    let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.contains(&o), "{o} missing in {line}");
    }
    assert_eq!(m.fs_type, "ext4");
    drop(m);
    assert!(!Path::new(&at).exists(), "mount directory left behind");
    assert_not_mounted(&l);
}

#[test]
fn world_readable_key_file_on_medium_is_refused() {
    need_root_and_loop!();
    let Some(l) = ext4_medium(&[("keyfleet/pump-07.key", LABEL, 0o644)]) else {
        return;
    };
    let out = keyfleet(&["read-key", "--from", "file", "--device", l.dev_str()]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mode 0644") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert_not_mounted(&l);
}

#[test]
fn several_key_files_need_path_and_links_are_refused() {
    need_root_and_loop!();
    let other = "KF1:gate-1:83FED3407A939723A5C639B26916D505C3B5";
    let Some(l) = ext4_medium(&[
        ("keyfleet/pump-07.key", LABEL, 0o600),
        ("keyfleet/gate-1.key", other, 0o600),
    ]) else {
        return;
    };
    let out = keyfleet(&["read-key", "--from", "file", "--device", l.dev_str()]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 key files found") && err.contains("--path"),
        "{err}"
    );

    let out = keyfleet(&[
        "read-key",
        "--from",
        "file",
        "--device",
        l.dev_str(),
        "--path",
        "keyfleet/gate-1.key",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["node_id"], "gate-1");
    assert_not_mounted(&l);
}

#[test]
fn symlinked_key_file_on_medium_is_refused() {
    need_root_and_loop!();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src/keyfleet");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("real.key"), LABEL).unwrap();
    std::fs::set_permissions(src.join("real.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("real.key", src.join("link.key")).unwrap();
    let img = dir.path().join("m.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(dir.path().join("src"))
        .arg(&img)
        .arg("8M"));
    let Some(l) = Loop::attach(dir, &img) else {
        return;
    };
    let out = keyfleet(&[
        "read-key",
        "--from",
        "file",
        "--device",
        l.dev_str(),
        "--path",
        "keyfleet/link.key",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symbolic link"), "{err}");
    // Searching by the convention finds only the real file.
    let out = keyfleet(&[
        "read-key",
        "--from",
        "file",
        "--device",
        l.dev_str(),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_not_mounted(&l);
}

#[test]
fn already_mounted_device_is_read_where_it_is() {
    need_root_and_loop!();
    let Some(l) = ext4_medium(&[("keyfleet/pump-07.key", LABEL, 0o600)]) else {
        return;
    };
    let at = tempfile::tempdir().unwrap();
    run(Command::new("mount")
        .args(["-o", "ro", l.dev_str()])
        .arg(at.path()));
    let out = keyfleet(&[
        "read-key",
        "--from",
        "file",
        "--device",
        l.dev_str(),
        "--json",
    ]);
    let _ = Command::new("umount").arg(at.path()).status();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["key_check"], CHECK);
}

/// A FAT image with `keyfleet/<name>` holding `text`, made without mounting.
fn fat_medium(name: &str, text: &str) -> Option<Loop> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    let src = dir.path().join(name);
    std::fs::write(&src, text).unwrap();
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "KEYS"])
        .arg(&img)
        .arg("8192"));
    run(Command::new("mmd").arg("-i").arg(&img).arg("::keyfleet"));
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&img)
        .arg(&src)
        .arg(format!("::keyfleet/{name}")));
    Loop::attach(dir, &img)
}

/// Whether the kernel mounts FAT here (the module may be absent in a container).
fn vfat_works(l: &Loop) -> bool {
    let at = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "vfat", "-o", "ro", l.dev_str()])
        .arg(at.path())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        let _ = Command::new("umount").arg(at.path()).status();
    } else {
        eprintln!("SKIPPED: this kernel cannot mount vfat (no vfat driver, e.g. in a container)");
    }
    ok
}

#[test]
fn fat_medium_gets_owner_only_masks_and_reads() {
    need_root_and_loop!();
    let Some(l) = fat_medium("pump-07.key", LABEL) else {
        return;
    };
    if !vfat_works(&l) {
        return;
    }
    let out = keyfleet(&[
        "read-key",
        "--from",
        "file",
        "--device",
        l.dev_str(),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["key_check"], CHECK);
    assert_not_mounted(&l);
}

#[test]
fn fat_automounted_with_loose_masks_is_refused_with_the_remedy() {
    need_root_and_loop!();
    let Some(l) = fat_medium("pump-07.key", LABEL) else {
        return;
    };
    if !vfat_works(&l) {
        return;
    }
    // As a desktop automount does it: files come out 0644.
    let at = tempfile::tempdir().unwrap();
    run(Command::new("mount")
        .args(["-t", "vfat", "-o", "ro,fmask=0133,dmask=0022", l.dev_str()])
        .arg(at.path()));
    let out = keyfleet(&["read-key", "--from", "file", "--device", l.dev_str()]);
    let _ = Command::new("umount").arg(at.path()).status();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no permission bits") && err.contains("fmask=0177"),
        "{err}"
    );
}

#[test]
fn medium_cannot_point_at_files_off_the_medium() {
    need_root_and_loop!();
    // A file on this machine that a hostile medium's link points to.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x.key"), LABEL).unwrap();
    std::fs::set_permissions(
        outside.path().join("x.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::os::unix::fs::symlink(outside.path(), src.join("keyfleet")).unwrap();
    let img = dir.path().join("m.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("8M"));
    let Some(l) = Loop::attach(dir, &img) else {
        return;
    };
    for rel in ["keyfleet/x.key", "../../../../../../../etc/hostname"] {
        let out = keyfleet(&[
            "read-key",
            "--from",
            "file",
            "--device",
            l.dev_str(),
            "--path",
            rel,
        ]);
        assert_eq!(out.status.code(), Some(3), "{rel}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("symbolic link") || err.contains("leads off the medium"),
            "{rel}: {err}"
        );
        assert!(out.stdout.is_empty());
    }
    assert_not_mounted(&l);
}
