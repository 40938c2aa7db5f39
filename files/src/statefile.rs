//! Atomic, owner-only, checksummed state files.
//!
//! The agent's state and the controller's secrets live in small files that must
//! survive a crash or a full disk at any instant:
//!
//! - a write goes to a temporary file in the same directory (created mode 0600),
//!   is fsynced, renamed over the target, and the directory is fsynced; so the
//!   target is always either the old complete file or the new complete file;
//! - every file starts with a one-line header `keyfleet-state v1 len=N sha256=HEX`,
//!   so a truncated or damaged file is refused with an error naming it instead of
//!   being half-read;
//! - a file written often (the agent's state, at every step of a round) is kept
//!   in two slots instead ([`Slots`]): `<path>` and `<path>.b`, overwritten in
//!   place in turn, each with a generation number in its header
//!   (`keyfleet-state v2 gen=G len=N sha256=HEX`) and made durable with one
//!   `fdatasync`. [`read`] returns the newest slot whose checksum holds: a write
//!   torn by a crash loses only itself, the other slot holding the state before
//!   it. No temporary file, no rename, no directory fsync (but once, when a
//!   slot is created), so a write is one flush of the file's own blocks and
//!   allocates no inode (with a hundred agents on one disk the inode bitmap
//!   they share was what they waited for). A write that need not survive a
//!   power loss ([`Slots::write_unsynced`]: the agent's two transitions) is
//!   not flushed and always goes to the slot that does not hold the last
//!   flushed state, so a power loss finds that state intact;
//! - readers refuse a file that group or others may read or write, and a symbolic
//!   link, and say which `chmod` fixes it.
//!
//! Payloads are handled in [`Zeroizing`] buffers because they may hold keys.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// First word of every state file.
const MAGIC: &str = "keyfleet-state";
/// The header version of a file replaced whole ([`write`]).
const VERSION: &str = "v1";
/// The header version of a slot of a two-slot file ([`Slots`]): it adds `gen=G`.
const SLOT_VERSION: &str = "v2";
/// errno of "no space left on device" on Linux.
const ENOSPC: i32 = 28;
/// A header line is never longer than this.
const MAX_HEADER: usize = 160;

/// What went wrong with a state file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no space left on the device holding {path}; the previous file is intact. \
         Free some space and try again"
    )]
    NoSpace { path: PathBuf },
    #[error(
        "{path} may be read or written by group or others (mode {mode:03o}); \
         it holds secrets: run `chmod 600 {path}`"
    )]
    FileNotPrivate { path: PathBuf, mode: u32 },
    #[error(
        "directory {path} may be entered by group or others (mode {mode:03o}); \
         run `chmod 700 {path}`"
    )]
    DirNotPrivate { path: PathBuf, mode: u32 },
    #[error("{path} is a symbolic link; keyfleet does not follow links to its state files")]
    Symlink { path: PathBuf },
    #[error("{path} is damaged: {reason}; restore it from a backup, or remove it to start over")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is intact but its content is not what keyfleet expects: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, StateFileError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateFileError + 'a {
    move |source| {
        // ENOSPC (28 on Linux); `ErrorKind::StorageFull` needs Rust 1.83.
        if source.raw_os_error() == Some(ENOSPC) {
            StateFileError::NoSpace {
                path: path.to_path_buf(),
            }
        } else {
            StateFileError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that an existing
/// `dir` is not open to group or others.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(StateFileError::Io {
                    op: "use as a directory",
                    path: dir.to_path_buf(),
                    source: io::Error::other("it exists and is not a directory"),
                });
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(StateFileError::DirNotPrivate {
                    path: dir.to_path_buf(),
                    mode,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create directory", dir)),
        Err(e) => Err(io_err("inspect", dir)(e)),
    }
}

/// Refuses a symbolic link, and a file that group or others may read or write.
pub fn check_private_file(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if meta.file_type().is_symlink() {
        return Err(StateFileError::Symlink {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StateFileError::FileNotPrivate {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The header line of `payload` in a file replaced whole (`v1`; a slot's
/// header, `v2` with its generation and padding, is [`slot_bytes`]'s).
fn header(payload: &[u8]) -> String {
    format!(
        "{MAGIC} {VERSION} len={} sha256={}\n",
        payload.len(),
        hex::encode(Sha256::digest(payload))
    )
}

/// The directory `path` is in (`.` for a bare name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Atomically replaces `path` with `payload` (owner-only, checksummed).
///
/// On any error (a full disk included) the previous file at `path`, if any, is
/// left as it was and the temporary file is removed.
pub fn write(path: &Path, payload: &[u8]) -> Result<()> {
    let dir = dir_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io_err("create a temporary file beside", path))?;
    let head = header(payload);
    // Through the plain `File`: NamedTempFile's own `Write` wraps errors and
    // hides their errno, which tells a full disk apart.
    let file = tmp.as_file_mut();
    file.write_all(head.as_bytes())
        .and_then(|()| file.write_all(payload))
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", path))?;
    // tempfile's persist is rename(2): atomic within the directory.
    tmp.persist(path)
        .map_err(|e| io_err("rename the new file onto", path)(e.error))?;
    sync_dir_of(path)
}

/// Reads and verifies `path`; `Ok(None)` when it does not exist. A file kept
/// in two slots ([`Slots`]) reads as its newest intact slot ([`read_slots`]).
pub fn read(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>> {
    Ok(read_slots(path)?.map(|r| r.payload))
}

/// What [`read_slots`] found.
pub struct SlotRead {
    pub payload: Zeroizing<Vec<u8>>,
    /// Its generation (0: a file replaced whole, which has none).
    pub generation: u64,
    /// The file it came from: `path` or its second slot.
    pub from: PathBuf,
    /// The other slot, when it exists and is damaged (a write torn by a
    /// crash, or damage since): what was wrong with it, for a warning.
    pub damaged: Option<StateFileError>,
}

/// The second slot of the two-slot file `path` ([`Slots`]): `<path>.b`.
pub fn second_slot(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".b");
    path.with_file_name(name)
}

/// Reads `path` and its second slot, if it has one, and returns the newest
/// intact one; `Ok(None)` when neither exists. A damaged slot is passed over
/// (and named in [`SlotRead::damaged`]) only when the other is intact; a slot
/// open to group or others, or a link, is refused whatever the other holds.
pub fn read_slots(path: &Path) -> Result<Option<SlotRead>> {
    let second = second_slot(path);
    let a = read_one(path);
    let b = read_one(&second);
    let is_damage = |r: &Result<Option<Slot>>| matches!(r, Err(StateFileError::Corrupt { .. }));
    let found = |(generation, payload): Slot, from: &Path, damaged| SlotRead {
        payload,
        generation,
        from: from.to_path_buf(),
        damaged,
    };
    match (a, b) {
        (Ok(None), Ok(None)) => Ok(None),
        (Ok(Some(x)), Ok(None)) => Ok(Some(found(x, path, None))),
        (Ok(None), Ok(Some(y))) => Ok(Some(found(y, &second, None))),
        (Ok(Some(x)), Ok(Some(y))) => Ok(Some(if y.0 > x.0 {
            found(y, &second, None)
        } else {
            found(x, path, None)
        })),
        (Ok(Some(x)), b) if is_damage(&b) => Ok(Some(found(x, path, b.err()))),
        (a, Ok(Some(y))) if is_damage(&a) => Ok(Some(found(y, &second, a.err()))),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// A slot's generation and payload.
type Slot = (u64, Zeroizing<Vec<u8>>);

/// One file: its checks and [`decode_generation`]; `Ok(None)` when it does not exist.
fn read_one(path: &Path) -> Result<Option<Slot>> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("inspect", path)(e)),
        Ok(_) => {}
    }
    check_private_file(path)?;
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut raw = Zeroizing::new(Vec::with_capacity(
        usize::try_from(len).unwrap_or(0).saturating_add(1),
    ));
    file.read_to_end(&mut raw).map_err(io_err("read", path))?;
    decode_generation(path, &raw).map(Some)
}

/// Verifies the bytes of a state file (header line, length, checksum) and
/// returns its payload. Pure: `path` only names the file in errors. [`read`]
/// uses it after its file checks; the fuzz target `statefile` calls it directly.
pub fn decode(path: &Path, raw: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    decode_generation(path, raw).map(|(_, payload)| payload)
}

/// [`decode`], with the slot's generation (0 for a file replaced whole).
pub fn decode_generation(path: &Path, raw: &[u8]) -> Result<(u64, Zeroizing<Vec<u8>>)> {
    let corrupt = |reason: String| StateFileError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let limit = raw.len().min(MAX_HEADER);
    let nl = raw[..limit]
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| {
            if raw.is_empty() {
                corrupt("the file is empty".into())
            } else {
                corrupt(format!("no `{MAGIC}` header line"))
            }
        })?;
    let line = std::str::from_utf8(&raw[..nl]).map_err(|_| corrupt("header is not text".into()))?;
    let mut words = line.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(corrupt(format!("no `{MAGIC}` header line")));
    }
    let generation = match words.next() {
        Some(VERSION) => 0,
        Some(SLOT_VERSION) => words
            .next()
            .and_then(|w| w.strip_prefix("gen="))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| corrupt("header has no valid gen=".into()))?,
        Some(v) => {
            return Err(corrupt(format!(
            "format {v} is not known to this keyfleet (it reads {VERSION} and {SLOT_VERSION}); use a newer keyfleet"
        )))
        }
        None => return Err(corrupt("header has no version".into())),
    };
    let len = words
        .next()
        .and_then(|w| w.strip_prefix("len="))
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| corrupt("header has no valid len=".into()))?;
    let sum = words
        .next()
        .and_then(|w| w.strip_prefix("sha256="))
        .and_then(|h| <[u8; 32]>::try_from(hex::decode(h).ok()?.as_slice()).ok())
        .ok_or_else(|| corrupt("header has no valid sha256=".into()))?;
    // A slot's padding (`Slots`): that many trailing spaces, inside `len=`
    // and the checksum, are not the payload's. A reader that predates it
    // returns them with the payload, which JSON ignores.
    let pad = match words.next().map(|w| w.strip_prefix("pad=")) {
        None => 0,
        Some(p) => p
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|p| *p <= len)
            .ok_or_else(|| corrupt("header has no valid pad=".into()))?,
    };
    let body = &raw[nl + 1..];
    if body.len() != len {
        return Err(corrupt(format!(
            "truncated or extended: the header says {len} bytes, the file holds {}",
            body.len()
        )));
    }
    if Sha256::digest(body).as_slice() != sum {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (payload, padding) = body.split_at(len - pad);
    if padding.iter().any(|b| *b != b' ') {
        return Err(corrupt("the padding is not spaces".into()));
    }
    Ok((generation, Zeroizing::new(payload.to_vec())))
}

/// A state file kept in two slots, `<path>` and [`second_slot`], overwritten
/// in place in turn (see the module docs): [`Slots::write`] goes to the slot
/// not holding the newest flushed state, under the next generation, and
/// returns once `fdatasync` has it on disk; [`Slots::write_unsynced`] goes to
/// the same slot without the flush, so it survives the process but maybe not
/// a power loss, which then finds the flushed state in the other slot. Only
/// one writer per file (the agent holds its state directory's lock).
pub struct Slots {
    paths: [PathBuf; 2],
    files: [Option<File>; 2],
    /// A slot this writer created whose name is not yet known durable (its
    /// directory not fsynced since).
    unsynced_name: [bool; 2],
    /// The slot the next write goes to: never the one holding the newest
    /// flushed state.
    next: usize,
    /// The newest generation written.
    generation: u64,
    /// Each slot's length as last set (`None`: not known, set it).
    lens: [Option<u64>; 2],
}

/// A slot's length is a multiple of this many bytes: its payload is padded
/// with spaces up to it (the header's `pad=`), so that from one write to the
/// next the file keeps its size. A write then changes no size (no
/// `ftruncate`), and its `fdatasync` writes the file's data block alone, not
/// its inode as well.
pub const SLOT_BLOCK: usize = 1024;

/// A slot's bytes: its header line (with `pad=`), the payload and the spaces
/// that make the whole a multiple of [`SLOT_BLOCK`].
fn slot_bytes(generation: u64, payload: &[u8]) -> Zeroizing<Vec<u8>> {
    // `len=` and `pad=` have fixed widths (leading zeros parse alike), so
    // the header's length does not depend on the padding it names.
    let head = |pad: usize| {
        let mut sum = Sha256::new();
        sum.update(payload);
        sum.update(" ".repeat(pad));
        format!(
            "{MAGIC} {SLOT_VERSION} gen={generation} len={:010} sha256={} pad={pad:05}\n",
            payload.len() + pad,
            hex::encode(sum.finalize())
        )
    };
    let fixed = head(0).len() + payload.len();
    let pad = fixed.div_ceil(SLOT_BLOCK) * SLOT_BLOCK - fixed;
    let line = head(pad);
    // Allocated once at its final size: no reallocation leaves a copy of
    // the payload behind.
    let mut data = Zeroizing::new(Vec::with_capacity(line.len() + payload.len() + pad));
    data.extend_from_slice(line.as_bytes());
    data.extend_from_slice(payload);
    let full = data.len() + pad;
    data.resize(full, b' ');
    data
}

impl Slots {
    /// Picks up from what is on disk: the next write goes to the slot that
    /// does not hold the newest intact state (the first slot when there is
    /// none), one generation above it. A file replaced whole by [`write`]
    /// (an older agent's) counts as generation 0. Both slots are flushed
    /// first: the newest state may be an unflushed write of the process
    /// before this one, which the page cache still holds.
    pub fn open(path: &Path) -> Slots {
        let paths = [path.to_path_buf(), second_slot(path)];
        for p in &paths {
            // Best effort: a slot that cannot be opened or flushed is read
            // (and refused, naming it) or rewritten by what follows.
            if let Ok(f) = File::open(p) {
                let _ = f.sync_data();
            }
        }
        // Nothing readable (none yet, or refused: the write then says why):
        // the first slot, generation 1.
        let (next, generation) = match read_slots(path) {
            Ok(Some(newest)) => (usize::from(newest.from == paths[0]), newest.generation),
            _ => (0, 0),
        };
        Slots {
            paths,
            files: [None, None],
            unsynced_name: [false, false],
            next,
            generation,
            lens: [None, None],
        }
    }

    /// Writes `payload` into the next slot and flushes it: on success it is
    /// the newest state on disk; on any error (a full disk included) the
    /// other slot still holds the previous flushed state, and the next write
    /// goes to the same slot again.
    pub fn write(&mut self, payload: &[u8]) -> Result<()> {
        self.put(payload, true)
    }

    /// Writes `payload` into the next slot without flushing it: the newest
    /// state for a reader (a restarted process) at once, on disk when the
    /// kernel writes it back or the next [`Slots::write`] replaces it. The
    /// slot holding the last flushed state is never touched, so a power loss
    /// before that takes the file back to it.
    pub fn write_unsynced(&mut self, payload: &[u8]) -> Result<()> {
        self.put(payload, false)
    }

    fn put(&mut self, payload: &[u8], flush: bool) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let i = self.next;
        let path = &self.paths[i];
        let generation = self.generation + 1;
        let data = slot_bytes(generation, payload);
        if self.files[i].is_none() {
            let (file, created) = open_slot(path)?;
            self.lens[i] = file.metadata().ok().map(|m| m.len());
            self.files[i] = Some(file);
            self.unsynced_name[i] = created;
        }
        let file = self.files[i].as_ref().expect("opened above");
        let len = data.len() as u64;
        // The size is set only when it changes (a payload past a block
        // boundary, a slot of an older release).
        let resize = self.lens[i] != Some(len);
        let r = file
            .write_all_at(&data, 0)
            .and_then(|()| if resize { file.set_len(len) } else { Ok(()) })
            .and_then(|()| if flush { file.sync_data() } else { Ok(()) });
        self.lens[i] = r.is_ok().then_some(len);
        r.map_err(io_err("write", path))?;
        self.generation = generation;
        if !flush {
            // The next write goes here again: the other slot keeps the
            // flushed state.
            return Ok(());
        }
        if self.unsynced_name[i] {
            // The new name must survive a crash as well as the content.
            sync_dir_of(path)?;
            self.unsynced_name[i] = false;
        }
        self.next = 1 - i;
        Ok(())
    }
}

/// Opens slot `path` for writing, creating it owner-only; whether it was
/// created. An existing one must be a private file, not a link (the state
/// directory is the owner's alone, so nothing swaps it in between).
fn open_slot(path: &Path) -> Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let existed = match fs::symlink_metadata(path) {
        Ok(_) => {
            check_private_file(path)?;
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err("inspect", path)(e)),
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err("open", path))?;
    Ok((file, !existed))
}

/// fsync of the directory `path` is in: a new name or a rename survives a crash.
fn sync_dir_of(path: &Path) -> Result<()> {
    File::open(dir_of(path))
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync the directory of", path))
}

/// Serializes `value` as JSON and writes it with [`write`].
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = to_json_zeroizing(value).map_err(|source| StateFileError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write(path, &bytes)
}

/// Reads `path` with [`read`] and parses its JSON; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let Some(bytes) = read(path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateFileError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// Serializes to JSON into a buffer allocated once at its final size, so that no
/// reallocation leaves a copy of a secret behind in freed memory.
pub fn to_json_zeroizing<T: Serialize + ?Sized>(
    value: &T,
) -> serde_json::Result<Zeroizing<Vec<u8>>> {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut *out, value)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_tmp() -> tempfile::TempDir {
        tempfile::Builder::new()
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir()
            .expect("tempdir")
    }

    #[test]
    fn round_trip_is_owner_only_and_leaves_no_temporary_file() {
        let dir = private_tmp();
        let path = dir.path().join("agent.state");
        write(&path, b"{\"epoch\":3}").unwrap();
        write(&path, b"{\"epoch\":4}").unwrap();
        assert_eq!(read(&path).unwrap().unwrap().as_slice(), b"{\"epoch\":4}");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("agent.state")]);
    }

    #[test]
    fn missing_file_is_none() {
        let dir = private_tmp();
        assert!(read(&dir.path().join("absent")).unwrap().is_none());
    }

    #[test]
    fn group_readable_file_is_refused_with_chmod_hint() {
        let dir = private_tmp();
        let path = dir.path().join("s");
        write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = read(&path).unwrap_err();
        assert!(matches!(
            err,
            StateFileError::FileNotPrivate { mode: 0o640, .. }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn symlink_is_refused() {
        let dir = private_tmp();
        let real = dir.path().join("real");
        write(&real, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(read(&link), Err(StateFileError::Symlink { .. })));
    }

    #[test]
    fn truncated_file_is_refused_naming_the_file() {
        let dir = private_tmp();
        let path = dir.path().join("agent.state");
        write(&path, b"0123456789abcdef").unwrap();
        let raw = fs::read(&path).unwrap();
        fs::write(&path, &raw[..raw.len() - 4]).unwrap();
        let err = read(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateFileError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains("agent.state") && msg.contains("truncated"),
            "{msg}"
        );
    }

    #[test]
    fn flipped_byte_is_refused() {
        let dir = private_tmp();
        let path = dir.path().join("agent.state");
        write(&path, b"0123456789abcdef").unwrap();
        let mut raw = fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        fs::write(&path, &raw).unwrap();
        let msg = read(&path).unwrap_err().to_string();
        assert!(msg.contains("checksum mismatch"), "{msg}");
    }

    #[test]
    fn empty_and_foreign_files_are_refused() {
        let dir = private_tmp();
        let path = dir.path().join("f");
        fs::write(&path, b"").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("empty"));
        fs::write(&path, b"{\"epoch\":3}\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("header"));
        fs::write(&path, b"keyfleet-state v9 len=0 sha256=00\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("v9"));
    }

    #[test]
    fn json_round_trip_and_schema_mismatch() {
        #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            epoch: u64,
        }
        let dir = private_tmp();
        let path = dir.path().join("s.json");
        write_json(&path, &S { epoch: 9 }).unwrap();
        assert_eq!(read_json::<S>(&path).unwrap(), Some(S { epoch: 9 }));
        write(&path, b"{\"other\":1}").unwrap();
        assert!(matches!(
            read_json::<S>(&path),
            Err(StateFileError::Json { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = decode(Path::new("x"), &raw);
        }

        #[test]
        fn a_changed_byte_never_yields_other_content(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            at in proptest::prelude::any::<usize>(),
            flip in 1u8..,
        ) {
            let mut raw = header(&payload).into_bytes();
            raw.extend_from_slice(&payload);
            let whole = decode(Path::new("x"), &raw).unwrap();
            proptest::prop_assert_eq!(whole.as_slice(), payload.as_slice());
            let i = at % raw.len();
            raw[i] ^= flip;
            // Either refused, or (e.g. a hex digit's case changed) the same content.
            if let Ok(back) = decode(Path::new("x"), &raw) {
                proptest::prop_assert_eq!(back.as_slice(), payload.as_slice());
            }
        }
    }

    fn payload_of(path: &Path) -> Vec<u8> {
        read(path).unwrap().expect("a state").to_vec()
    }

    #[test]
    fn slots_are_written_in_turn_and_the_newest_is_read() {
        let dir = private_tmp();
        let path = dir.path().join("state.json");
        let second = second_slot(&path);
        assert_eq!(second, dir.path().join("state.json.b"));
        // One writer all along, and a writer opened afresh each time (a
        // restarted agent): the same alternation, the generation one up.
        for fresh in [false, true] {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(&second);
            let mut w = Slots::open(&path);
            for (i, text) in [b"one".as_slice(), b"two", b"three", b"four"]
                .iter()
                .enumerate()
            {
                if fresh {
                    w = Slots::open(&path);
                }
                w.write(text).unwrap();
                assert_eq!(payload_of(&path), *text);
                let r = read_slots(&path).unwrap().unwrap();
                assert_eq!(r.generation, i as u64 + 1);
                assert_eq!(&r.from, if i % 2 == 0 { &path } else { &second });
                assert!(r.damaged.is_none());
            }
        }
        let mut w = Slots::open(&path);
        for p in [&path, &second] {
            let mode = fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary file"
        );
        // A shorter payload after a longer one leaves no stale tail.
        w.write(b"a much longer payload than the others").unwrap();
        w.write(b"x").unwrap();
        w.write(b"y").unwrap();
        assert_eq!(payload_of(&path), b"y");
    }

    /// A slot is padded with spaces to a multiple of [`SLOT_BLOCK`], so
    /// that it keeps its size from write to write (no `ftruncate`, and a
    /// flush that writes no inode); the reader strips exactly the padding the
    /// header names, and a reader that predates it gets JSON followed by
    /// spaces, which still parses.
    #[test]
    fn slots_keep_their_size_and_the_padding_is_not_the_payload() {
        let dir = private_tmp();
        let path = dir.path().join("state.json");
        let mut w = Slots::open(&path);
        let json = |n: usize| format!("{{\"k\":\"{}\"}}", "x".repeat(n)).into_bytes();
        let mut sizes = [Vec::new(), Vec::new()];
        for (i, n) in [3usize, 700, 10, 900, 1500, 40, 0, 2000]
            .into_iter()
            .enumerate()
        {
            let payload = json(n);
            w.write(&payload).unwrap();
            let slot = if i % 2 == 0 {
                path.clone()
            } else {
                second_slot(&path)
            };
            let raw = fs::read(&slot).unwrap();
            assert_eq!(raw.len() % SLOT_BLOCK, 0, "{} bytes", raw.len());
            sizes[i % 2].push(raw.len());
            assert_eq!(*read_slots(&path).unwrap().unwrap().payload, *payload);
            // What a reader without `pad=` returns: the JSON and spaces.
            let body = &raw[raw.iter().position(|b| *b == b'\n').unwrap() + 1..];
            assert!(body.starts_with(&payload) && body[payload.len()..].iter().all(|b| *b == b' '));
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["k"].as_str().unwrap().len(), n);
        }
        assert_eq!(
            sizes,
            [vec![1024, 1024, 2048, 1024], vec![1024, 2048, 1024, 3072]]
        );
        // The padding the header names must be there, and be spaces.
        let good = fs::read(&path).unwrap();
        let text = String::from_utf8(good.clone()).unwrap();
        let pad: usize = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pad=")?.parse().ok())
            .unwrap();
        let len: usize = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("len=")?.parse().ok())
            .unwrap();
        let too_much = text.replacen(&format!("pad={pad:05}"), &format!("pad={:05}", len + 1), 1);
        let e = decode(&path, too_much.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("pad="), "{e}");
        let mut not_spaces = good.clone();
        let n = not_spaces.len();
        not_spaces[n - 1] = b'x';
        // The checksum covers the padding: a changed byte there is refused too.
        assert!(decode(&path, &not_spaces).is_err());
    }

    /// The agent's transitions are written without a flush (issue 11.3):
    /// such a write, and any number of them, never touches the slot holding
    /// the last flushed state, which a power loss therefore finds intact,
    /// while a reader (a restarted process) sees the newest write at once.
    #[test]
    fn an_unsynced_write_never_overwrites_the_last_flushed_state() {
        let dir = private_tmp();
        let path = dir.path().join("state.json");
        let second = second_slot(&path);
        let slot = |p: &Path| read_one(p).unwrap().map(|(_, b)| b.to_vec());
        let mut w = Slots::open(&path);
        w.write(b"key update 2").unwrap();
        assert_eq!(slot(&path).as_deref(), Some(b"key update 2".as_slice()));
        let mut last_flushed = b"key update 2".to_vec();
        for (text, flush) in [
            (b"first transition 2".as_slice(), false),
            (b"second transition 2", false),
            (b"key update 3", true),
            (b"first transition 3", false),
        ] {
            let flushed_before = read_slots(&path).unwrap().unwrap();
            let kept = if flush {
                None
            } else {
                // The slot the last flushed write went to.
                Some(
                    [&path, &second]
                        .into_iter()
                        .find(|p| slot(p).as_ref() == Some(&last_flushed))
                        .unwrap()
                        .clone(),
                )
            };
            let kept_bytes = kept.as_ref().map(|p| fs::read(p).unwrap());
            if flush {
                w.write(text).unwrap();
                last_flushed = text.to_vec();
            } else {
                w.write_unsynced(text).unwrap();
            }
            assert_eq!(payload_of(&path), text, "a reader sees the newest write");
            assert_eq!(
                read_slots(&path).unwrap().unwrap().generation,
                flushed_before.generation + 1
            );
            if let (Some(p), Some(b)) = (kept, kept_bytes) {
                assert_eq!(fs::read(&p).unwrap(), b, "the flushed slot is untouched");
            }
        }
        // Both slots hold the two newest states: "key update 3" flushed,
        // "first transition 3" written after it.
        let mut both = [slot(&path).unwrap(), slot(&second).unwrap()];
        both.sort();
        assert_eq!(
            both,
            [b"first transition 3".to_vec(), b"key update 3".to_vec()]
        );
        // A restarted writer continues in the other slot than the newest.
        let newest = read_slots(&path).unwrap().unwrap().from;
        let mut w = Slots::open(&path);
        w.write(b"after restart").unwrap();
        assert_ne!(read_slots(&path).unwrap().unwrap().from, newest);
    }

    #[test]
    fn a_torn_write_loses_only_itself() {
        let dir = private_tmp();
        let path = dir.path().join("state.json");
        let mut first = Slots::open(&path);
        first.write(b"first").unwrap();
        first.write(b"second").unwrap();
        let newest = read_slots(&path).unwrap().unwrap();
        assert_eq!(newest.from, second_slot(&path));
        // The next write goes to the first slot; a crash tears it in every way
        // a crash can: cut short, emptied, a byte not yet written.
        let good = {
            let mut probe = Slots::open(&path);
            probe.write(b"third, never completed").unwrap();
            fs::read(&path).unwrap()
        };
        let tears: Vec<Vec<u8>> = vec![
            good[..good.len() / 2].to_vec(),
            good[..10].to_vec(),
            Vec::new(),
            {
                let mut b = good.clone();
                let n = b.len();
                b[n - 3] ^= 0x40;
                b
            },
        ];
        for torn in tears {
            fs::write(&path, &torn).unwrap();
            let r = read_slots(&path).unwrap().unwrap();
            assert_eq!(
                &*r.payload,
                b"second",
                "{:?}",
                String::from_utf8_lossy(&torn)
            );
            let damaged = r.damaged.expect("the torn slot is named");
            assert!(
                matches!(&damaged, StateFileError::Corrupt { path: p, .. } if p == &path),
                "{damaged}"
            );
            // The writer goes on in the torn slot, above the newest generation.
            let mut w = Slots::open(&path);
            w.write(b"after the crash").unwrap();
            assert_eq!(payload_of(&path), b"after the crash");
            assert!(read_slots(&path).unwrap().unwrap().damaged.is_none());
            // Put the pair back: the first slot torn again below "second".
            let mut pair = Slots::open(&path);
            pair.write(b"second").unwrap();
        }
        // Both slots damaged, or the only one: refused, naming the file.
        fs::write(&path, b"garbage").unwrap();
        fs::write(second_slot(&path), b"more garbage").unwrap();
        assert!(matches!(read(&path), Err(StateFileError::Corrupt { .. })));
        fs::remove_file(second_slot(&path)).unwrap();
        assert!(matches!(read(&path), Err(StateFileError::Corrupt { .. })));
    }

    #[test]
    fn a_slot_open_to_others_is_refused_whatever_the_other_holds() {
        let dir = private_tmp();
        let path = dir.path().join("state.json");
        let mut w = Slots::open(&path);
        w.write(b"one").unwrap();
        w.write(b"two").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read(&path),
            Err(StateFileError::FileNotPrivate { .. })
        ));
        assert!(matches!(
            Slots::open(&path).write(b"three"),
            Err(StateFileError::FileNotPrivate { .. })
        ));
    }

    #[test]
    fn a_file_replaced_whole_is_taken_over_by_the_slots() {
        let dir = private_tmp();
        let path = dir.path().join("state.json");
        write(&path, b"from an older agent").unwrap();
        assert_eq!(read_slots(&path).unwrap().unwrap().generation, 0);
        let mut w = Slots::open(&path);
        w.write(b"one").unwrap();
        // The older file is kept until the second write overwrites it.
        assert!(fs::read(&path).unwrap().ends_with(b"from an older agent"));
        assert_eq!(payload_of(&path), b"one");
        w.write(b"two").unwrap();
        assert_eq!(payload_of(&path), b"two");
        assert_eq!(read_slots(&path).unwrap().unwrap().from, path);
    }

    #[test]
    fn private_dir_is_created_0700_and_open_dir_is_refused() {
        let dir = private_tmp();
        let d = dir.path().join("a/b");
        ensure_private_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        ensure_private_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        let msg = ensure_private_dir(&d).unwrap_err().to_string();
        assert!(msg.contains("chmod 700"), "{msg}");
    }
}
