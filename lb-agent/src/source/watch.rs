//! Wakes the agent when the file source may have changed (inotify on the directory that
//! holds the file, or on the source directory), so that a change reaches the maps as soon
//! as it is written instead of at the next poll. The directory is watched rather than the
//! file: editors and `kubectl`-driven tools replace a file by a rename, and a mounted
//! ConfigMap swaps its `..data` link, neither of which a watch on the old file sees.
//!
//! Only events that finish a change wake the agent (a closed writer, a rename into place, a
//! deletion, new metadata): a file being written is not read half-way. The agent keeps
//! polling as a backstop, less often while the watch works
//! ([`crate::agent::FILE_POLL_WATCHED`]).
use std::{
    ffi::{OsStr, OsString},
    io,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::Path,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use tokio::io::unix::AsyncFd;

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct Watch {
    fd: AsyncFd<Fd>,
    /// For a single file: its name (other names in its directory are not its changes,
    /// except a ConfigMap volume's `..`-links).
    name: Option<OsString>,
}

/// The events that end a change.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

/// Whether `ev` may change a source watched for `name` (None: every file of the
/// directory).
fn relevant(ev: &InotifyEvent, name: Option<&OsStr>) -> bool {
    // A full queue lost events; the watched directory itself went or moved.
    let always = AddWatchFlags::IN_Q_OVERFLOW
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_IGNORED;
    if ev.mask.intersects(always) {
        return true;
    }
    match (&ev.name, name) {
        (_, None) | (None, _) => true,
        (Some(got), Some(want)) => {
            got.as_os_str() == want || got.as_encoded_bytes().starts_with(b"..")
        }
    }
}

/// Whether the watch can go on after `evs` (its directory is still there).
fn still_watching(evs: &[InotifyEvent]) -> bool {
    !evs.iter().any(|e| {
        e.mask.intersects(
            AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED,
        )
    })
}

impl Watch {
    /// Watches `dir`; `name` narrows it to one file's changes.
    pub fn new(dir: &Path, name: Option<OsString>) -> io::Result<Self> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        ino.add_watch(dir, mask())?;
        // SAFETY: the descriptor is the Inotify's own, which the AsyncFd owns (inside `Fd`)
        // and never closes or replaces before it is dropped.
        let fd = unsafe { AsyncFd::register(Fd(ino)) }.map_err(|e| e.into_parts().1)?;
        Ok(Watch { fd, name })
    }

    /// Waits for a change. An error (or the directory gone) ends the watch: the caller
    /// falls back to polling.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let evs = match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from))
            {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            if !still_watching(&evs) {
                return Err(io::Error::other("the watched directory went away"));
            }
            if evs.iter().any(|e| relevant(e, self.name.as_deref())) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn woken(w: &Watch) -> bool {
        tokio::time::timeout(Duration::from_millis(300), w.changed())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A rename into place and a closed writer wake the watch; another file of the same
    /// directory does not wake a one-file watch; a ConfigMap link swap does.
    #[tokio::test]
    async fn wakes_on_finished_changes_of_its_file() {
        let dir = std::env::temp_dir().join(format!("xlb-watch-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let w = Watch::new(&dir, Some("svc.yaml".into())).unwrap();
        std::fs::write(dir.join("other.yaml"), "x").unwrap();
        assert!(!woken(&w).await, "another file woke a one-file watch");
        std::fs::write(dir.join("svc.tmp"), "a").unwrap();
        assert!(!woken(&w).await);
        std::fs::rename(dir.join("svc.tmp"), dir.join("svc.yaml")).unwrap();
        assert!(woken(&w).await, "a rename into place did not wake");
        std::fs::write(dir.join("svc.yaml"), "b").unwrap();
        assert!(woken(&w).await, "a closed writer did not wake");
        std::os::unix::fs::symlink("x", dir.join("..data_tmp")).unwrap();
        assert!(woken(&w).await, "a ConfigMap link swap did not wake");
        let all = Watch::new(&dir, None).unwrap();
        std::fs::write(dir.join("other.yaml"), "y").unwrap();
        assert!(woken(&all).await, "a directory watch missed a file");
        std::fs::remove_dir_all(&dir).unwrap();
        // The files' deletions may come first.
        let ended = tokio::time::timeout(Duration::from_secs(2), async {
            while all.changed().await.is_ok() {}
        });
        assert!(
            ended.await.is_ok(),
            "the directory's removal did not end the watch"
        );
    }
}
