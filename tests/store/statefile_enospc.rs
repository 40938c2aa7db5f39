//! A full disk never costs the agent its state: on a 16 KiB tmpfs, a write
//! that does not fit fails with a clear "no space" error naming the file, the
//! previous file stays intact and readable, and no temporary file is left.
//!
//! Needs root (to mount a tmpfs); elsewhere it is skipped with the reason printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use keyfleet::statefile::{self, StateFileError};

/// A tiny tmpfs, unmounted when dropped.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> Result<TinyFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TinyFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn full_disk_leaves_the_previous_state_intact() {
    let fs = match TinyFs::mount("16k") {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("skipped full_disk_leaves_the_previous_state_intact: {reason}");
            return;
        }
    };
    let path = fs.path().join("agent.state");
    let good = vec![b'g'; 2_000];
    statefile::write(&path, &good).expect("a small state fits");

    let big = vec![b'B'; 64 * 1024];
    let err = statefile::write(&path, &big).expect_err("64 KiB cannot fit in 16 KiB");
    assert!(matches!(err, StateFileError::NoSpace { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("previous file is intact"),
        "{msg}"
    );

    let back = statefile::read(&path)
        .unwrap()
        .expect("the old file is still there");
    assert_eq!(back.as_slice(), good.as_slice());
    assert_eq!(
        entries(fs.path()),
        vec![path.clone()],
        "no temporary file left behind"
    );

    // After space is freed, writing works again.
    let smaller = vec![b's'; 3_000];
    statefile::write(&path, &smaller).unwrap();
    assert_eq!(
        statefile::read(&path).unwrap().unwrap().as_slice(),
        smaller.as_slice()
    );
}

#[test]
fn full_disk_when_old_and_new_cannot_coexist() {
    let fs = match TinyFs::mount("16k") {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("skipped full_disk_when_old_and_new_cannot_coexist: {reason}");
            return;
        }
    };
    // Old state 8000 bytes (2 pages), new 9000 bytes (3 pages): each fits alone,
    // but the new one must be complete before the old one goes.
    let path = fs.path().join("agent.state");
    let old = vec![b'o'; 8_000];
    statefile::write(&path, &old).unwrap();
    let err = statefile::write(&path, &vec![b'n'; 9_000]).expect_err("no room for both");
    assert!(matches!(err, StateFileError::NoSpace { .. }), "{err:?}");
    assert_eq!(
        statefile::read(&path).unwrap().unwrap().as_slice(),
        old.as_slice()
    );
    assert_eq!(entries(fs.path()), vec![path]);
}
