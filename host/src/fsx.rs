//! Files that survive crashes and concurrent runs: atomic writes, directory locks, and the
//! crash points the crash-safety tests kill the process at.
//!
//! - [`write_atomic`]: a temporary file in the same directory, written, `fsync`ed, renamed over
//!   the target, and the directory `fsync`ed; on any error the temporary file is removed and the
//!   previous file is left as it was. Every result file nvcim writes (`eval.json`, reports,
//!   checkpoints' JSON, packed models, ONNX files) goes through it.
//! - [`DirLock`]: an exclusive advisory lock (`flock`) on `DIR/.lock` for one process at a time
//!   per training output or sweep cell. The kernel drops the lock when its holder dies, so a lock
//!   left behind by a killed process is stale by construction: the next taker finds the file
//!   unlocked, says whose it was, and takes it over.
//! - [`crash_point`]: with `NVCIM_CRASH_AT=NAME[@K]` in the environment, the `K`-th (default
//!   first) time the process reaches the point `NAME` it sends itself SIGKILL. Only the
//!   crash-safety tests set it; see [`CRASH_POINTS`].

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context, Result, bail};

/// The crash points of `nvcim train`, in the order one epoch reaches them.
pub const CRASH_POINTS: [&str; 6] = [
    // after a training step (mid-epoch)
    "train-step",
    // inside a checkpoint write: the model file is in `checkpoint.tmp/`, the rest is not
    "checkpoint-files",
    // between the two renames that swap `checkpoint.tmp/` in (`checkpoint/` is `checkpoint.old/`)
    "checkpoint-swap",
    // between the two renames that swap `best.tmp/` in
    "best-swap",
    // after the best backbone was saved, before the epoch's checkpoint
    "after-best",
    // after the checkpoint was swapped in, before `metrics.jsonl` is rewritten
    "before-metrics",
];

/// The environment variable naming the crash point ([`crash_point`]).
pub const CRASH_ENV: &str = "NVCIM_CRASH_AT";

static CRASH_HITS: AtomicUsize = AtomicUsize::new(0);

/// Kills the process with SIGKILL when `NVCIM_CRASH_AT` names `point` and this is its `K`-th hit.
pub fn crash_point(point: &str) {
    let Ok(spec) = std::env::var(CRASH_ENV) else {
        return;
    };
    let (name, k) = match spec.split_once('@') {
        Some((n, k)) => (n, k.parse::<usize>().unwrap_or(1)),
        None => (spec.as_str(), 1),
    };
    if name != point {
        return;
    }
    if CRASH_HITS.fetch_add(1, Ordering::SeqCst) + 1 == k {
        eprintln!("{CRASH_ENV}={spec}: killing this process at `{point}`");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// `fsync`s a directory, so that renames and new entries in it survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    fs::File::open(d)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing the directory {}", d.display()))
}

/// `fsync`s a file that was written by someone else (Burn's record writer).
pub fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// What to do about a write error, when its cause is the file system's state rather than nvcim.
pub fn hint(err: &str) -> &'static str {
    if err.contains("No space left") || err.contains("os error 28") {
        " (the file system is full: free space or write to another --out)"
    } else if err.contains("Read-only file system") || err.contains("os error 30") {
        " (the file system is read-only: remount it read-write or write to another --out)"
    } else if err.contains("Permission denied") || err.contains("os error 13") {
        " (no permission to write there: fix the permissions or write to another --out)"
    } else {
        ""
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to `path` atomically: readers see the old file or the new one, never a part.
/// On error the temporary file is removed and `path` is untouched; the message names the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        let h = hint(&e.to_string());
        return Err(e).with_context(|| {
            format!(
                "cannot write {} (through {}); the previous file, if any, is unchanged{h}",
                path.display(),
                tmp.display()
            )
        });
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot rename {} to {}; the previous file, if any, is unchanged",
                tmp.display(),
                path.display()
            )
        });
    }
    sync_dir(&dir)
}

/// Writes `value` as pretty JSON (with a final newline) to `path` atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    write_atomic(path, text.as_bytes())
}

/// The file a checkpoint save writes beside its other files: the CRC-32 (IEEE) and the length of
/// each, so that a changed byte (bit rot, a bad copy) is refused on load instead of evaluated.
pub const CHECKSUMS: &str = "checksums.json";

/// Writes `dir/checksums.json` for every other file in `dir` (a save's temporary directory, so
/// it is swapped in with the files it describes).
pub fn write_checksums(dir: &Path) -> Result<()> {
    let mut files = serde_json::Map::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file() && e.file_name() != CHECKSUMS)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let bytes = std::fs::read(dir.join(&name))
            .with_context(|| format!("reading {}", dir.join(&name).display()))?;
        files.insert(
            name,
            serde_json::json!({
                "crc32": format!("{:08x}", nvcim_shared::crc::crc32(&bytes)),
                "bytes": bytes.len(),
            }),
        );
    }
    write_json_atomic(
        &dir.join(CHECKSUMS),
        &serde_json::json!({ "algorithm": "crc32-ieee", "files": files }),
    )
}

/// Checks `file` against the `checksums.json` of its directory. A directory without one (a
/// save from before nvcim wrote checksums, or a file placed there by hand) is accepted as it is.
pub fn verify_checksum(file: &Path) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let sums = dir.join(CHECKSUMS);
    if !sums.is_file() {
        return Ok(());
    }
    let table = read_json(&sums)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(entry) = table["files"].get(&name) else {
        bail!(
            "{} is not listed in {}: the checkpoint directory holds a file its save did not \
             write; restore the directory from a copy or train again",
            file.display(),
            sums.display()
        );
    };
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let crc = format!("{:08x}", nvcim_shared::crc::crc32(&bytes));
    let (want_crc, want_len) = (
        entry["crc32"].as_str().unwrap_or(""),
        entry["bytes"].as_u64().unwrap_or(u64::MAX),
    );
    if crc != want_crc || bytes.len() as u64 != want_len {
        bail!(
            "{} changed since it was saved (CRC-32 {crc}, {} bytes; {} records {want_crc}, \
             {want_len} bytes): the file is corrupt (bit rot or a bad copy); restore it from a \
             copy, or train again",
            file.display(),
            bytes.len(),
            sums.display()
        );
    }
    Ok(())
}

/// [`verify_checksum`] of every file `dir/checksums.json` lists (and that each is there).
pub fn verify_dir(dir: &Path) -> Result<()> {
    let sums = dir.join(CHECKSUMS);
    if !sums.is_file() {
        return Ok(());
    }
    let table = read_json(&sums)?;
    let files = table["files"]
        .as_object()
        .with_context(|| format!("{} has no `files` table", sums.display()))?;
    for name in files.keys() {
        let f = dir.join(name);
        if !f.is_file() {
            bail!(
                "{} is missing ({} lists it): the checkpoint is incomplete; restore it from a \
                 copy, or train again",
                f.display(),
                sums.display()
            );
        }
        verify_checksum(&f)?;
    }
    Ok(())
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// An exclusive lock on a directory (`DIR/.lock`), held until dropped or the process dies.
#[derive(Debug)]
pub struct DirLock {
    _file: fs::File,
    path: PathBuf,
    stale: Option<String>,
}

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".lock";

fn holder_text() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("pid {} on {host}", std::process::id())
}

impl DirLock {
    /// Takes the lock of `dir` (created if needed) for `what` (named in messages). Fails at once,
    /// naming the holder, when another live process holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        match Self::try_acquire(dir)? {
            Some(l) => Ok(l),
            None => {
                let path = dir.join(LOCK_FILE);
                let holder = fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "{what} {} is in use by another nvcim process ({}); wait for it to finish or \
                     stop it (the lock {} is released when that process ends)",
                    dir.display(),
                    holder_or_unknown(&holder),
                    path.display()
                )
            }
        }
    }

    /// Takes the lock of `dir` if no live process holds it; `Ok(None)` when one does.
    pub fn try_acquire(dir: &Path) -> Result<Option<DirLock>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                let h = hint(&e.to_string());
                anyhow::Error::new(e)
                    .context(format!("opening the lock file {}{h}", path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let before = fs::read_to_string(&path).unwrap_or_default();
        let stale = (!before.trim().is_empty()).then(|| before.trim().to_string());
        let mut f = &file;
        file.set_len(0)
            .and_then(|()| f.write_all(format!("{}\n", holder_text()).as_bytes()))
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing the lock file {}", path.display()))?;
        Ok(Some(DirLock {
            _file: file,
            path,
            stale,
        }))
    }

    /// The holder named in a lock file that was not locked any more (its process died without
    /// releasing it), if there was one.
    pub fn stale_holder(&self) -> Option<&str> {
        self.stale.as_deref()
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Empty the file so the next taker does not report a stale holder; the lock itself is
        // released when the file closes.
        let _ = self._file.set_len(0);
    }
}

fn holder_or_unknown(h: &str) -> String {
    let h = h.trim();
    if h.is_empty() {
        "holder unknown".into()
    } else {
        h.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_files_and_keeps_the_old_one_on_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // A target that is a directory cannot be replaced: the error names it and no
        // temporary file is left behind.
        let dir_target = d.path().join("sub");
        fs::create_dir(&dir_target).unwrap();
        let e = write_atomic(&dir_target, b"x").unwrap_err();
        assert!(format!("{e:#}").contains("sub"), "{e:#}");
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(fs::read(&p).unwrap(), b"two");
    }

    #[test]
    fn a_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let a = DirLock::acquire(d.path(), "the run directory").unwrap();
        assert!(a.stale_holder().is_none());
        // flock locks are per open file description: a second open in this process conflicts
        // exactly as another process's would.
        assert!(DirLock::try_acquire(d.path()).unwrap().is_none());
        let e = DirLock::acquire(d.path(), "the run directory").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("in use"),
            "{msg}"
        );
        drop(a);
        assert!(DirLock::try_acquire(d.path()).unwrap().is_some());
        // A lock file naming a process that died without releasing (nothing holds the flock).
        fs::write(d.path().join(LOCK_FILE), "pid 999999 on elsewhere\n").unwrap();
        let b = DirLock::acquire(d.path(), "the run directory").unwrap();
        assert_eq!(b.stale_holder(), Some("pid 999999 on elsewhere"));
        let now = fs::read_to_string(b.path()).unwrap();
        assert!(
            now.contains(&format!("pid {}", std::process::id())),
            "{now}"
        );
    }
}
