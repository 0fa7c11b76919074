//! Exclusive advisory locks on lock files (`flock`), safe against the file being removed by the
//! previous holder: after locking, the path must still name the locked inode, else we retry.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A held lock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another invocation held it for the whole timeout.
    #[error("{0} is held by another invocation; try again")]
    Busy(PathBuf),
    /// Filesystem error.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// Lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl FileLock {
    /// Takes the lock at `path` (creating the file), waiting at most `timeout`.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<FileLock, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err)?;
            loop {
                // SAFETY: flock on a descriptor we own; no memory is passed.
                let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if rc == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {
                        if Instant::now() >= deadline {
                            return Err(LockError::Busy(path.to_path_buf()));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    _ => return Err(io_err(e)),
                }
            }
            let held = file.metadata().map_err(io_err)?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(FileLock {
                        file,
                        path: path.to_path_buf(),
                    })
                }
                // The previous holder removed (and maybe recreated) the file: lock the new one.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// Removes the lock file, then releases the lock. Waiters retry on the new file.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_and_removable() {
        let dir = std::env::temp_dir().join(format!("vp-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.lock");
        let l = FileLock::acquire(&p, Duration::from_secs(1)).unwrap();
        assert!(matches!(
            FileLock::acquire(&p, Duration::from_millis(30)),
            Err(LockError::Busy(_))
        ));
        l.remove();
        assert!(!p.exists());
        let l = FileLock::acquire(&p, Duration::from_millis(30)).unwrap();
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
