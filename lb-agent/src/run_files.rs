//! The records the agent keeps in its run directory (`agent.json`, `lb-addresses.json`),
//! written by a thread of their own instead of the agent's loop.
//!
//! Each write replaces its file whole (a temporary file renamed over it: a reader sees the
//! old content or the new, never a part). On ext4 a rename over an existing file (and a
//! rewrite after truncating to zero, the plain `std::fs::write`) starts writing the data
//! out before the rename returns (its `auto_da_alloc` heuristic); on a busy disk that took
//! up to half a second, measured in the control-plane benchmark, and while the loop wrote
//! them itself after each pass, the next change waited for it: one endpoint change every
//! few hundred took 0.1-0.8 s to reach the maps. Now the loop hands the new content over
//! and goes on; only each file's latest content is written, so a burst of passes costs one
//! write per file. The files lag the maps by the time a write takes; dropping the writer
//! writes what is still pending first.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
};

/// See the module docs.
pub struct RunFiles {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when something is pending or the writer should stop (the thread waits on
    /// it), and when a round of writes ended (`flush` waits on it).
    cv: Condvar,
}

#[derive(Default)]
struct State {
    /// The latest content of each file not written yet.
    pending: BTreeMap<PathBuf, Vec<u8>>,
    /// The thread is writing what it took from `pending`.
    writing: bool,
    stop: bool,
    /// The last error of each file, so that a lasting one is logged once.
    failed: BTreeMap<PathBuf, String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RunFiles {
    /// Starts the writer thread.
    pub fn new() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("xlb-run-files".into())
            .spawn(move || writer(&s))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for `path` to hold `bytes`, replacing content asked for earlier and not
    /// written yet; returns at once.
    pub fn write(&self, path: PathBuf, bytes: Vec<u8>) {
        self.shared.lock().pending.insert(path, bytes);
        self.shared.cv.notify_all();
    }

    /// Waits until everything asked for so far is written (or failed).
    pub fn flush(&self) {
        let mut st = self.shared.lock();
        while !st.pending.is_empty() || st.writing {
            st = self.shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.pending.is_empty() {
            if st.stop {
                return;
            }
            st = shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let batch = std::mem::take(&mut st.pending);
        st.writing = true;
        drop(st);
        let results: Vec<(PathBuf, std::io::Result<()>)> = batch
            .into_iter()
            .map(|(path, bytes)| {
                let r = write_whole(&path, &bytes);
                (path, r)
            })
            .collect();
        st = shared.lock();
        for (path, r) in results {
            match r {
                Ok(()) => {
                    st.failed.remove(&path);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if st.failed.get(&path) != Some(&msg) {
                        log::warn!("writing {}: {msg}", path.display());
                        st.failed.insert(path, msg);
                    }
                }
            }
        }
        st.writing = false;
        shared.cv.notify_all();
    }
}

/// Writes `path` whole: the content under a temporary name, renamed over it.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xlb-run-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_latest_content_is_written_and_flush_waits_for_it() {
        let d = dir("latest");
        let f = RunFiles::new().unwrap();
        let (a, b) = (d.join("a.json"), d.join("b.json"));
        for i in 0..100 {
            f.write(a.clone(), format!("a{i}").into_bytes());
        }
        f.write(b.clone(), b"b".to_vec());
        f.flush();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "a99");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "b");
        // No temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "b.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dropping_the_writer_writes_what_is_pending() {
        let d = dir("drop");
        let a = d.join("a.json");
        {
            let f = RunFiles::new().unwrap();
            f.write(a.clone(), b"first".to_vec());
            f.write(a.clone(), b"last".to_vec());
        }
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "last");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_others_and_the_writer_going() {
        let d = dir("fail");
        let f = RunFiles::new().unwrap();
        // A directory that does not exist: the write fails.
        f.write(d.join("missing/a.json"), b"x".to_vec());
        f.write(d.join("b.json"), b"b".to_vec());
        f.flush();
        assert_eq!(std::fs::read_to_string(d.join("b.json")).unwrap(), "b");
        f.write(d.join("c.json"), b"c".to_vec());
        f.flush();
        assert_eq!(std::fs::read_to_string(d.join("c.json")).unwrap(), "c");
        assert!(!d.join("missing").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
