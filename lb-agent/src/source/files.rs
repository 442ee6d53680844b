//! `--source file:<PATH>`: one manifest file, or a directory of them read as `kubectl apply
//! -f DIR` does (its `*.yaml`, `*.yml` and `*.json` files, not recursing; hidden files, such
//! as an editor's or a writer's temporary file, are skipped).
//!
//! A file is read again only when its stamp (modification time, size, inode) changed, and
//! of a changed file only the documents that differ are parsed ([`docs`]). With one file
//! every change still reads the whole file through a small buffer, compared with the kept
//! text as it comes, and splices the bytes that differ into it (`FileCache::load`: a
//! change costs ~5-8 ms of CPU at 10,000 Services, 40-50 ms at 100,000); with a directory
//! a change costs the files it touched, so a large cluster kept as a file per namespace or
//! per application gets an endpoint change into the maps in milliseconds at any size.
//!
//! The directory reads as its files concatenated in name order would: an object in two
//! files is an error, and whenever a changed or removed file holds kinds checked across
//! documents (Nodes, ServiceCIDRs, MetalLB pools and advertisements) every file is read
//! again and checked together. A file that fails to read or parse keeps what it said last
//! (the other files' changes still apply) and its error is kept until it is fixed; on the
//! first read (or a read of every file) any error keeps the whole last good state.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{
    error::Error,
    model::incremental::Change,
    source::{
        docs::{FileCache, FileUpdate, Kind, has_global},
        yaml::{self, Objects},
    },
};

/// What tells a changed file: modification time, size, inode (a file replaced by a rename
/// can keep the first two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    ino: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: meta.len(),
            ino: meta.ino(),
        }
    }
}

struct Entry {
    /// Small and unique within the directory (the owner of a key).
    id: u32,
    stamp: Stamp,
    cache: FileCache,
    /// The cache knows this file's objects exactly (false after a read it could only take
    /// whole, e.g. a text with YAML directives): the next change reads every file.
    exact: bool,
}

/// What a poll found.
#[derive(Debug)]
pub struct Polled {
    /// What changed (None: files changed but none could be read; see `errors`).
    pub update: Option<FileUpdate>,
    /// The newest modification time among the changed files (the source event's time).
    pub modified: SystemTime,
    /// Files of a directory that changed but could not be read or parsed this time (each
    /// keeps what it said before).
    pub errors: Vec<Error>,
}

/// See the module docs.
pub struct FileSource {
    path: PathBuf,
    dir: bool,
    /// By file name (the one file: an empty name).
    files: BTreeMap<OsString, Entry>,
    /// Which file holds each object, by a hash of (kind, namespace, name): a directory's
    /// objects must be in one file each. A hash shared by two objects only costs a read of
    /// every file.
    owners: HashMap<u64, u32>,
    next_id: u32,
    /// Files whose last change could not be read, with the error.
    broken: BTreeMap<OsString, String>,
    /// The listing a read of every file failed on: nothing is read again until it changes,
    /// and then every file is.
    failed: Option<Vec<(OsString, Stamp)>>,
}

fn key_hash(k: &(Kind, crate::model::incremental::Key)) -> u64 {
    let mut h = DefaultHasher::new();
    k.hash(&mut h);
    h.finish()
}

/// Whether `name` is a manifest of a directory source.
pub fn is_manifest_name(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

impl FileSource {
    /// A directory when `path` is one now; a file otherwise (it may appear later).
    pub fn new(path: PathBuf) -> Self {
        let dir = path.is_dir();
        FileSource {
            path,
            dir,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            next_id: 0,
            broken: BTreeMap::new(),
            failed: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_dir(&self) -> bool {
        self.dir
    }

    /// The directory to watch for changes and, for one file, the names in it that matter
    /// (the file, and Kubernetes' ConfigMap volume links, `..data` and friends, which are
    /// swapped when a mounted ConfigMap changes).
    pub fn watch_target(&self) -> (PathBuf, Option<OsString>) {
        if self.dir {
            return (self.path.clone(), None);
        }
        let parent = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (parent, self.path.file_name().map(OsString::from))
    }

    /// Errors of directory files that stay broken (their last good content applies).
    pub fn broken(&self) -> impl Iterator<Item = &str> {
        self.broken.values().map(String::as_str)
    }

    /// Forgets every read: the next poll reads everything.
    pub fn forget(&mut self) {
        self.files.clear();
        self.owners.clear();
        self.broken.clear();
        self.failed = None;
    }

    /// Looks at the file(s); None when nothing changed since the last poll. An error of
    /// the file (one file), of the directory itself or of a read of every file keeps the
    /// last good state; the changed stamps are taken as seen all the same (a broken file
    /// is read again when it changes again).
    pub fn poll(&mut self) -> Result<Option<Polled>, Error> {
        if self.dir {
            return self.poll_dir();
        }
        let read_error = |source| Error::SourceRead {
            path: self.path.clone(),
            source,
        };
        let meta = std::fs::metadata(&self.path).map_err(read_error)?;
        let stamp = Stamp::of(&meta);
        if self.files.get(&OsString::new()).map(|e| e.stamp) == Some(stamp) {
            return Ok(None);
        }
        let text = match self.files.get(&OsString::new()) {
            Some(e) => e.cache.load(&self.path),
            None => FileCache::new().load(&self.path),
        }
        .map_err(read_error)?;
        let entry = self.files.entry(OsString::new()).or_insert_with(|| Entry {
            id: 0,
            stamp,
            cache: FileCache::new(),
            exact: true,
        });
        entry.stamp = stamp;
        let update = entry.cache.read_checked(text)?;
        Ok(Some(Polled {
            update: Some(update),
            modified: stamp.modified,
            errors: vec![],
        }))
    }

    /// The directory's manifests and their stamps, in name order.
    fn list(&self) -> Result<Vec<(OsString, Stamp)>, Error> {
        let read_error = |source| Error::SourceRead {
            path: self.path.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let name = entry.file_name();
            if !is_manifest_name(&name) {
                continue;
            }
            // Followed: a ConfigMap volume's files are links into its current data.
            match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_file() => out.push((name, Stamp::of(&m))),
                Ok(_) => {}
                // Gone between the listing and now: as if not listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::SourceRead {
                        path: entry.path(),
                        source: e,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn poll_dir(&mut self) -> Result<Option<Polled>, Error> {
        let listing = self.list()?;
        if let Some(failed) = &self.failed {
            if *failed == listing {
                return Ok(None);
            }
            let modified = newest(&listing);
            return self.read_all(listing, modified);
        }
        let removed: Vec<OsString> = {
            let listed: std::collections::HashSet<&OsString> =
                listing.iter().map(|(n, _)| n).collect();
            self.files
                .keys()
                .filter(|n| !listed.contains(n))
                .cloned()
                .collect()
        };
        let changed: Vec<(OsString, Stamp)> = listing
            .iter()
            .filter(|(n, st)| self.files.get(n).map(|e| e.stamp) != Some(*st))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() && !self.files.is_empty() {
            return Ok(None);
        }
        let modified = newest(&changed);
        if self.files.is_empty() {
            return self.read_all(listing, modified);
        }
        let mut change = Change::default();
        let mut errors = Vec::new();
        // Removed files: their objects go (unless another file now has them, checked below).
        for name in &removed {
            let e = self.files.remove(name).expect("listed above");
            self.broken.remove(name);
            if e.cache.has_global() || !e.exact {
                return self.read_all(listing, modified);
            }
            for k in e.cache.keys() {
                let h = key_hash(k);
                if self.owners.get(&h) == Some(&e.id) {
                    self.owners.remove(&h);
                }
                push_delete(&mut change, k);
            }
        }
        for (name, stamp) in changed {
            let path = self.path.join(&name);
            // The stamp is taken as seen before reading: a file that cannot be read waits
            // for its next change instead of failing (and being logged) at every poll.
            let next_id = self.next_id;
            let entry = self.files.entry(name.clone()).or_insert_with(|| Entry {
                id: next_id,
                stamp,
                cache: FileCache::new(),
                exact: true,
            });
            if entry.id == next_id {
                self.next_id += 1;
            }
            entry.stamp = stamp;
            let text = match entry.cache.load(&path) {
                Ok(t) => t,
                Err(source) => {
                    let e = Error::SourceRead { path, source };
                    self.broken
                        .insert(name.clone(), crate::error::chain_text(&e));
                    errors.push(e);
                    continue;
                }
            };
            if !entry.exact || entry.cache.has_global() {
                return self.read_all(listing, modified);
            }
            let old_keys: Vec<(Kind, crate::model::incremental::Key)> =
                entry.cache.keys().cloned().collect();
            let c = match entry.cache.read_checked(text) {
                Ok(FileUpdate::Change(c)) => c,
                Ok(FileUpdate::Full(objs)) => {
                    if has_global(&objs) || entry.cache.text().is_empty() && !is_empty(&objs) {
                        return self.read_all(listing, modified);
                    }
                    whole_file_change(objs, old_keys)
                }
                Err(source) => {
                    let e = Error::SourceFile { path, source };
                    self.broken
                        .insert(name.clone(), crate::error::chain_text(&e));
                    errors.push(e);
                    continue;
                }
            };
            self.broken.remove(&name);
            let id = entry.id;
            // One file per object: an object another file holds reads everything (which
            // reports the duplicate).
            for k in change_keys(&c) {
                let h = key_hash(&k.0);
                if k.1 {
                    match self.owners.get(&h) {
                        Some(&o) if o != id => return self.read_all(listing, modified),
                        _ => {
                            self.owners.insert(h, id);
                        }
                    }
                } else if self.owners.get(&h) == Some(&id) {
                    self.owners.remove(&h);
                }
            }
            change.merge(c);
        }
        Ok(Some(Polled {
            update: (!change.is_empty() || errors.is_empty()).then_some(FileUpdate::Change(change)),
            modified,
            errors,
        }))
    }

    /// Every file, read afresh (on both cores) and checked together. On an error nothing
    /// of the files is kept: the next change reads every file again.
    fn read_all(
        &mut self,
        listing: Vec<(OsString, Stamp)>,
        modified: SystemTime,
    ) -> Result<Option<Polled>, Error> {
        let r = self.read_all_inner(&listing, modified);
        if r.is_err() {
            self.forget();
            self.failed = Some(listing);
        } else {
            self.failed = None;
        }
        r
    }

    fn read_all_inner(
        &mut self,
        listing: &[(OsString, Stamp)],
        modified: SystemTime,
    ) -> Result<Option<Polled>, Error> {
        let dir = self.path.clone();
        let read_one = |(name, stamp): &(OsString, Stamp)| -> Result<(Entry, Objects), Error> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|source| Error::SourceRead {
                path: path.clone(),
                source,
            })?;
            let mut cache = FileCache::new();
            let objs = match cache.read(text) {
                Ok(FileUpdate::Full(objs)) => objs,
                Ok(FileUpdate::Change(_)) => unreachable!("a first read is whole"),
                Err(source) => return Err(Error::SourceFile { path, source }),
            };
            let exact = !cache.text().is_empty() || is_empty(&objs);
            Ok((
                Entry {
                    id: 0,
                    stamp: *stamp,
                    cache,
                    exact,
                },
                objs,
            ))
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let chunk = listing.len().div_ceil(threads).max(1);
        let results: Vec<Result<(Entry, Objects), Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = listing
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(read_one).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("reader thread"))
                .collect()
        });
        let mut files = BTreeMap::new();
        let mut owners = HashMap::new();
        let mut all = Objects::default();
        let mut checked_together = false;
        for (id, ((name, _), r)) in listing.iter().zip(results).enumerate() {
            let (mut entry, objs) = r?;
            entry.id = id as u32;
            checked_together |= has_global(&objs) || !entry.exact;
            for k in entry.cache.keys() {
                checked_together |= owners.insert(key_hash(k), entry.id).is_some();
            }
            all.services.extend(objs.services);
            all.slices.extend(objs.slices);
            files.insert(name.clone(), entry);
        }
        if checked_together {
            // As one text: the checks across documents (an object twice, pools that
            // overlap) are the YAML reader's.
            let mut text = String::new();
            for e in files.values() {
                text.push_str(e.cache.text());
                text.push_str("\n---\n");
            }
            if text.is_empty() || files.values().any(|e| !e.exact) {
                // A file the cache could not split: read as the files are.
                text.clear();
                for (name, _) in listing {
                    let path = dir.join(name);
                    let t = std::fs::read_to_string(&path)
                        .map_err(|source| Error::SourceRead { path, source })?;
                    text.push_str(&t);
                    text.push_str("\n---\n");
                }
            }
            all = yaml::parse_objects(&text).map_err(|source| Error::SourceFile {
                path: dir.clone(),
                source,
            })?;
        }
        self.next_id = files.len() as u32;
        self.files = files;
        self.owners = owners;
        self.broken.clear();
        Ok(Some(Polled {
            update: Some(FileUpdate::Full(all)),
            modified,
            errors: vec![],
        }))
    }
}

/// The newest modification time of `files` (now, for none: a removal).
fn newest(files: &[(OsString, Stamp)]) -> SystemTime {
    files
        .iter()
        .map(|(_, st)| st.modified)
        .max()
        .unwrap_or_else(SystemTime::now)
}

fn is_empty(o: &Objects) -> bool {
    o.services.is_empty() && o.slices.is_empty() && !has_global(o)
}

fn push_delete(change: &mut Change, k: &(Kind, crate::model::incremental::Key)) {
    match k.0 {
        Kind::Service => change.services.push((k.1.clone(), None)),
        Kind::Slice => change.slices.push((k.1.clone(), None)),
    }
}

/// A file read whole, as a change: everything in it upserted, what it held before and no
/// longer holds deleted.
fn whole_file_change(objs: Objects, old: Vec<(Kind, crate::model::incremental::Key)>) -> Change {
    let mut change = Change::default();
    let mut now = std::collections::HashSet::new();
    crate::source::docs::push_upserts(objs, &mut change, &mut now);
    for k in old.iter().filter(|k| !now.contains(k)) {
        push_delete(&mut change, k);
    }
    change
}

/// The objects a change names, each with whether it is upserted (else deleted).
fn change_keys(c: &Change) -> Vec<((Kind, crate::model::incremental::Key), bool)> {
    c.services
        .iter()
        .map(|(k, s)| ((Kind::Service, k.clone()), s.is_some()))
        .chain(
            c.slices
                .iter()
                .map(|(k, s)| ((Kind::Slice, k.clone()), s.is_some())),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::docs::tests::{State, apply, doc_text, state_of};

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl Dir {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("xlb-files-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }

        /// As tools write: a hidden temporary file renamed into place.
        fn put(&self, name: &str, text: &str) {
            let tmp = self.0.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.0.join(name)).unwrap();
        }

        fn remove(&self, name: &str) {
            std::fs::remove_file(self.0.join(name)).unwrap();
        }
    }

    /// Services `is` with their slices, each endpoint address `addr`.
    fn services(is: &[usize], addr: u32) -> String {
        is.iter().map(|&i| doc_text(i, addr)).collect()
    }

    /// What reading the given files' texts as one file gives.
    fn whole(texts: &[&str]) -> State {
        let mut t = String::new();
        for x in texts {
            t.push_str(x);
            t.push_str("\n---\n");
        }
        state_of(&yaml::parse_objects(&t).unwrap())
    }

    fn poll(src: &mut FileSource, state: &mut State) -> (usize, Vec<String>) {
        let p = src.poll().unwrap().expect("a change");
        let errors = p.errors.iter().map(|e| format!("{e}")).collect();
        let n = p.update.map_or(0, |u| apply(state, u));
        (n, errors)
    }

    /// A directory read change by change equals its files read as one text: a file
    /// changed, added, removed, an object moved between files, an object in two files
    /// (an error, then fixed), a broken file (keeps its last good content while the
    /// others' changes apply), a file with a pool (read together); other names ignored.
    #[test]
    fn a_directory_reads_as_its_files_together() {
        let d = Dir::new("dir");
        let (a, b, c) = (
            services(&[0, 1], 1),
            services(&[2, 3, 4], 1),
            services(&[5], 1),
        );
        d.put("a.yaml", &a);
        d.put("b.yml", &b);
        d.put("c.json.yaml", &c);
        std::fs::write(d.0.join("notes.txt"), "not: [a manifest").unwrap();
        std::fs::write(d.0.join(".hidden.yaml"), "not: [a manifest").unwrap();
        let mut src = FileSource::new(d.0.clone());
        assert!(src.is_dir());
        let mut state = State::new();
        assert_eq!(
            poll(&mut src, &mut state).0,
            usize::MAX,
            "first read is whole"
        );
        assert_eq!(state, whole(&[&a, &b, &c]));
        assert!(src.poll().unwrap().is_none(), "nothing changed");

        // One endpoint of one Service: only its slice.
        let b2 = services(&[2, 3], 1) + &doc_text(4, 9);
        d.put("b.yml", &b2);
        assert_eq!(poll(&mut src, &mut state).0, 1);
        assert_eq!(state, whole(&[&a, &b2, &c]));

        // A new file, a removed one.
        let e = services(&[6, 7], 2);
        d.put("e.yaml", &e);
        d.remove("a.yaml");
        poll(&mut src, &mut state);
        assert_eq!(state, whole(&[&b2, &c, &e]));

        // Service 5 moves from c to e (c emptied first in name order, then e).
        let c2 = String::new();
        let e2 = services(&[5, 6, 7], 2);
        d.put("c.json.yaml", &c2);
        d.put("e.yaml", &e2);
        poll(&mut src, &mut state);
        assert_eq!(state, whole(&[&b2, &c2, &e2]));

        // An object in two files is the whole directory's error; fixing it reads again.
        let before = state.clone();
        let c3 = services(&[6], 3);
        d.put("c.json.yaml", &c3);
        let err = src.poll().unwrap_err();
        assert!(
            matches!(err, Error::SourceFile { .. }) && format!("{err}").contains("s6"),
            "{err}"
        );
        assert_eq!(state, before);
        assert!(
            src.poll().unwrap().is_none(),
            "a failed listing is not read again"
        );
        d.put("c.json.yaml", &services(&[8], 3));
        assert_eq!(poll(&mut src, &mut state).0, usize::MAX);
        let c4 = services(&[8], 3);
        assert_eq!(state, whole(&[&b2, &c4, &e2]));

        // A broken file keeps its content; another file's change in the same poll applies.
        d.put(
            "b.yml",
            "apiVersion: v1\nkind: Service\nmetadata: [broken\n",
        );
        let e3 = services(&[5, 6, 7], 4);
        d.put("e.yaml", &e3);
        let (_, errors) = poll(&mut src, &mut state);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("b.yml"), "{errors:?}");
        assert_eq!(state, whole(&[&b2, &c4, &e3]));
        assert_eq!(src.broken().count(), 1);
        let b3 = services(&[2, 3], 5);
        d.put("b.yml", &b3);
        poll(&mut src, &mut state);
        assert_eq!(state, whole(&[&b3, &c4, &e3]));
        assert_eq!(src.broken().count(), 0);

        // A pool: every file is read and checked together.
        let pool = "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: p, \
                    namespace: metallb-system}\nspec:\n  addresses: [172.18.255.200/29]\n";
        d.put("pool.yaml", pool);
        assert_eq!(poll(&mut src, &mut state).0, usize::MAX);
        assert_eq!(state, whole(&[&b3, &c4, &e3, pool]));
        let c5 = services(&[8], 6);
        d.put("c.json.yaml", &c5);
        assert_eq!(
            poll(&mut src, &mut state).0,
            1,
            "pools elsewhere do not stop a change"
        );
        assert_eq!(state, whole(&[&b3, &c5, &e3, pool]));

        // A new file that cannot be read (not UTF-8) is reported once, not at every poll.
        std::fs::write(d.0.join("latin1.yaml"), b"kind: \xe9\n").unwrap();
        let (_, errors) = poll(&mut src, &mut state);
        assert!(
            errors.len() == 1 && errors[0].contains("latin1.yaml"),
            "{errors:?}"
        );
        assert!(
            src.poll().unwrap().is_none(),
            "an unreadable file was read again"
        );
        assert_eq!(state, whole(&[&b3, &c5, &e3, pool]));
    }

    /// One file: read when its stamp changes, errors returned, the watch target is its
    /// directory and name.
    #[test]
    fn one_file() {
        let d = Dir::new("one");
        d.put("svc.yaml", &services(&[0], 1));
        let mut src = FileSource::new(d.0.join("svc.yaml"));
        assert!(!src.is_dir());
        assert_eq!(
            src.watch_target(),
            (d.0.clone(), Some(OsString::from("svc.yaml")))
        );
        let mut state = State::new();
        poll(&mut src, &mut state);
        assert!(src.poll().unwrap().is_none());
        d.put("svc.yaml", "kind: [");
        assert!(matches!(src.poll(), Err(Error::Parse(_))));
        assert!(
            src.poll().unwrap().is_none(),
            "a broken file waits for its next change"
        );
        d.remove("svc.yaml");
        assert!(matches!(src.poll(), Err(Error::SourceRead { .. })));
    }
}
