//! The file source, one YAML document at a time: a changed file is split into its
//! documents, and a `kind: List` document (as `kubectl get -o yaml` writes, items as a
//! block sequence at the left margin) into its items; each is compared with the previous
//! read (by position, then by content hash, bytes confirmed), and only those that differ
//! are parsed (an item with the list's other lines around it, so it reads as a list of
//! one). A one-line change of a
//! 100,000-Service manifest parses one document instead of all of them, and hands the
//! translation the Services and EndpointSlices that document added, changed or lost.
//!
//! The result is what [`yaml::parse_objects`] of the whole text gives, checks included:
//! whenever a document fails to parse, two documents hold the same object, or a changed
//! document holds kinds checked across documents (Nodes, ServiceCIDRs, address pools and
//! advertisements) or a nameless object, the whole text is parsed as before
//! ([`FileUpdate::Full`], or its error, which names the right document).
use std::{
    borrow::Cow,
    collections::HashMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    ops::Range,
    path::Path,
};

use crate::{
    model::incremental::{Change, Key},
    source::yaml::{self, Objects, ParseError},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Service,
    Slice,
}

/// A unit of parsing: the text around (a list's lines before and after its items; empty
/// for a plain document), and the document or item itself. Parsed as the three
/// concatenated.
type Unit = [Range<usize>; 3];

/// A unit's text, `get` giving the text of a range.
fn joined<'a>(u: &Unit, get: impl Fn(Range<usize>) -> Cow<'a, str>) -> Cow<'a, str> {
    if u[0].is_empty() && u[2].is_empty() {
        get(u[1].clone())
    } else {
        Cow::Owned(u.iter().map(|r| get(r.clone())).collect())
    }
}

/// A unit's hash, `get` giving the text of a range (equal texts hash equal, however they
/// are held).
fn hashed<'a>(u: &Unit, get: impl Fn(Range<usize>) -> Cow<'a, str>) -> u64 {
    let mut h = DefaultHasher::new();
    for r in u {
        get(r.clone()).hash(&mut h);
    }
    h.finish()
}

fn unit_text<'a>(text: &'a str, u: &Unit) -> Cow<'a, str> {
    joined(u, |r| Cow::Borrowed(&text[r]))
}

/// [`unit_text`] of a unit of a new text (`old`: the kept text it may be spliced into).
fn new_unit_text<'a>(new: &'a New, old: &'a str, u: &Unit) -> Cow<'a, str> {
    joined(u, |r| new.get(old, r))
}

/// Unit `ua` of the kept text `old` reads as unit `ub` of `new`.
fn unit_eq(old: &str, ua: &Unit, new: &New, ub: &Unit) -> bool {
    ua.iter()
        .zip(ub)
        .all(|(ra, rb)| ra.len() == rb.len() && old[ra.clone()] == *new.get(old, rb.clone()))
}

/// Hash of a unit of `new`, as [`unit_hash`] of the same unit of a whole text.
fn new_unit_hash(new: &New, old: &str, u: &Unit) -> u64 {
    hashed(u, |r| new.get(old, r))
}

fn unit_hash(text: &str, u: &Unit) -> u64 {
    hashed(u, |r| Cow::Borrowed(&text[r]))
}

/// A file's new text: whole, or as the kept text with one stretch replaced
/// (`old[..at] + mid + old[old_end..]`): what [`FileCache::load`] reads, so that a change
/// costs no second copy of a large file, only the bytes that differ.
#[derive(Debug)]
enum New {
    Whole(String),
    Splice {
        at: usize,
        old_end: usize,
        mid: String,
    },
}

impl New {
    fn len(&self, old: &str) -> usize {
        match self {
            New::Whole(s) => s.len(),
            New::Splice { at, old_end, mid } => old.len() - (old_end - at) + mid.len(),
        }
    }

    /// `new[r]` (`old`: the kept text a splice is of); borrowed unless `r` spans the
    /// splice's edges. `r` is cut at character boundaries of the new text.
    fn get<'a>(&'a self, old: &'a str, r: Range<usize>) -> Cow<'a, str> {
        let (at, old_end, mid) = match self {
            New::Whole(s) => return Cow::Borrowed(&s[r]),
            New::Splice { at, old_end, mid } => (*at, *old_end, mid.as_str()),
        };
        let mid_end = at + mid.len();
        // (start in the new text, end, the text there)
        let pieces = [
            (0, at, &old[..at]),
            (at, mid_end, mid),
            (mid_end, usize::MAX, &old[old_end..]),
        ];
        let mut parts = pieces.iter().filter_map(|&(s, e, t)| {
            let (a, b) = (r.start.max(s), r.end.min(e));
            (a < b).then(|| &t[a - s..b - s])
        });
        let first = parts.next().unwrap_or("");
        match parts.next() {
            None => Cow::Borrowed(first),
            Some(second) => {
                let mut out = String::with_capacity(r.len());
                out.push_str(first);
                out.push_str(second);
                parts.for_each(|p| out.push_str(p));
                Cow::Owned(out)
            }
        }
    }

    fn into_string(self, old: &str) -> String {
        match self {
            New::Whole(s) => s,
            New::Splice { at, old_end, mid } => {
                let mut s = String::with_capacity(old.len() - (old_end - at) + mid.len());
                s.push_str(&old[..at]);
                s.push_str(&mid);
                s.push_str(&old[old_end..]);
                s
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Doc {
    range: Unit,
    hash: u64,
    keys: Vec<(Kind, Key)>,
}

/// How the units outside a change move: the text after the change by `delta` bytes,
/// including a list's closing lines that frame the units before it (see
/// [`FileCache::resplit`]).
#[derive(Debug, Clone, Copy)]
struct Moved {
    /// Where the change ended in the old text.
    old_end: usize,
    delta: isize,
}

impl Moved {
    fn shift(&self, r: &Range<usize>) -> Range<usize> {
        let m = |x: usize| (x as isize + self.delta) as usize;
        m(r.start)..m(r.end)
    }

    /// `r` where it is now: moved if it lies after the change (an empty range at 0 is a
    /// plain document's absent frame).
    fn keep(&self, r: &Range<usize>) -> Range<usize> {
        if r.start >= self.old_end && !(r.is_empty() && r.start == 0) {
            self.shift(r)
        } else {
            r.clone()
        }
    }

    /// A unit before the change, where it is now.
    fn before(&self, u: &Unit) -> Unit {
        [u[0].clone(), u[1].clone(), self.keep(&u[2])]
    }

    /// A unit after the change, where it is now.
    fn after(&self, u: &Unit) -> Unit {
        [self.keep(&u[0]), self.shift(&u[1]), self.keep(&u[2])]
    }
}

/// The units of a changed text as the kept ones with a stretch replaced: the old units
/// `first..end` became `mid`, the others stayed (moved as `moved` says).
#[derive(Debug)]
struct Resplit {
    first: usize,
    end: usize,
    mid: Vec<Unit>,
    moved: Moved,
}

/// What a read found.
#[derive(Debug)]
pub enum FileUpdate {
    /// Everything, parsed whole (first read, or a change the documents cannot tell).
    Full(Objects),
    /// Only these objects changed (possibly none: the documents are the same).
    Change(Change),
}

/// See the module docs.
#[derive(Default)]
pub struct FileCache {
    text: String,
    docs: Vec<Doc>,
    /// Documents holding each object: more than one is an error of the whole text.
    holders: HashMap<(Kind, Key), u32>,
    /// Some document holds kinds checked across documents, or a nameless object.
    has_global: Vec<bool>,
}

/// The units of `text`: its documents (each starts at a `---` line, the first one at the
/// start of the text), a list document's items instead of the document. None when the text
/// has directives or end markers (`%`, `...`): such text is parsed whole.
fn split(text: &str) -> Option<Vec<Unit>> {
    let mut starts = vec![0];
    for (at, bare) in lines(text) {
        // Most lines of a manifest are indented: one byte decides.
        match bare.as_bytes().first() {
            Some(b'%') => return None,
            Some(b'.') if bare == "..." || bare.starts_with("... ") => return None,
            Some(b'-') if at > 0 && is_doc_marker(bare) => starts.push(at),
            _ => {}
        }
    }
    let mut docs: Vec<Range<usize>> = starts.windows(2).map(|w| w[0]..w[1]).collect();
    docs.push(*starts.last().expect("one start")..text.len());
    let mut out = Vec::with_capacity(docs.len());
    for d in docs {
        list_items(text, d.clone(), &mut out)
            .unwrap_or_else(|| out.push([d.start..d.start, d, 0..0]));
    }
    Some(out)
}

/// How much of a new text is the old one's: the lengths of their common prefix and, after
/// it, common suffix.
#[derive(Debug, Clone, Copy)]
struct Same {
    prefix: usize,
    suffix: usize,
}

impl Same {
    fn of(old: &[u8], new: &[u8]) -> Self {
        let prefix = common_prefix(old, new);
        Self {
            prefix,
            suffix: common_suffix(&old[prefix..], &new[prefix..]),
        }
    }
}

/// A file's text, checked by [`FileCache::check`] or read by [`FileCache::load`].
#[derive(Debug)]
pub struct Checked {
    new: New,
    same: Same,
    /// Length of the text it was compared with.
    old_len: usize,
}

/// Length of the common prefix of `a` and `b` (compared a block at a time).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Length of the common suffix of `a` and `b`.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let (la, lb) = (a.len(), b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[la - i - BLOCK..la - i] == b[lb - i - BLOCK..lb - i] {
        i += BLOCK;
    }
    while i < n && a[la - i - 1] == b[lb - i - 1] {
        i += 1;
    }
    i
}

/// What [`FileCache::load`] reads and compares at a time: small enough to stay in the
/// CPU's cache between the copy and the comparison.
const CHUNK: usize = 256 * 1024;

/// Fills `buf` from the file's byte `off`; false when the file ends first.
fn fill(f: &std::fs::File, buf: &mut [u8], off: usize) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt as _;
    match f.read_exact_at(buf, off as u64) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// How a file's bytes compare with the kept text over a stretch.
enum Scan {
    /// They first differ at this offset.
    Differs(usize),
    /// Equal throughout (or not looked at further: asked to stop).
    Same,
    /// The file ended first (it is being changed).
    Ended,
}

/// Compares the file's bytes `from..to` with `old[from..to]`, a chunk at a time.
fn scan_prefix(
    file: &std::fs::File,
    old: &[u8],
    from: usize,
    to: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Scan> {
    let mut buf = vec![0u8; CHUNK.min(to - from).max(1)];
    let mut at = from;
    while at < to {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Scan::Same);
        }
        let want = CHUNK.min(to - at);
        if !fill(file, &mut buf[..want], at)? {
            return Ok(Scan::Ended);
        }
        let c = common_prefix(&old[at..at + want], &buf[..want]);
        if c < want {
            return Ok(Scan::Differs(at + c));
        }
        at += want;
    }
    Ok(Scan::Same)
}

/// Length of the common prefix of the file and `old`, up to `lim` (None: the file ended
/// first). A large file is compared in two halves on two threads (the second stops when
/// the first finds a difference): the comparison is most of a one-line change's cost with
/// 100,000 Services in one file, and it is bound by one core's copy and compare speed,
/// not by the memory.
fn file_prefix(file: &std::fs::File, old: &[u8], lim: usize) -> std::io::Result<Option<usize>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    const TWO_THREADS_FROM: usize = 4 << 20;
    let whole = |r: Scan| match r {
        Scan::Differs(p) => Some(p),
        Scan::Same => Some(lim),
        Scan::Ended => None,
    };
    let never = AtomicBool::new(false);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if lim < TWO_THREADS_FROM || cores < 2 {
        return Ok(whole(scan_prefix(file, old, 0, lim, &never)?));
    }
    let half = lim / 2;
    let stop = AtomicBool::new(false);
    let (a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| scan_prefix(file, old, half, lim, &stop));
        let a = scan_prefix(file, old, 0, half, &never);
        if !matches!(a, Ok(Scan::Same)) {
            stop.store(true, Ordering::Relaxed);
        }
        (a, b.join().expect("prefix scan thread"))
    });
    Ok(match a? {
        Scan::Differs(p) => Some(p),
        Scan::Ended => None,
        Scan::Same => whole(b?),
    })
}

/// A line that starts a YAML document.
fn is_doc_marker(bare: &str) -> bool {
    bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t")
}

/// (offset, line without its line break) of every line of `text`.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut at = 0;
    text.split_inclusive('\n').map(move |line| {
        let start = at;
        at += line.len();
        (start, line.trim_end_matches(['\n', '\r']))
    })
}

/// The items of a document whose `items:` key (at the left margin) holds a block sequence
/// at the left margin, each as a unit with the document's other lines around it; None
/// (nothing pushed) for any other document.
fn list_items(text: &str, doc: Range<usize>, out: &mut Vec<Unit>) -> Option<()> {
    let body = &text[doc.clone()];
    let mut items_key = None;
    let mut item_starts = Vec::new();
    let mut list_end = None;
    for (off, bare) in lines(body) {
        let at = doc.start + off;
        let first = bare.as_bytes().first().copied();
        if matches!(first, None | Some(b' ' | b'\t' | b'#')) {
            continue;
        }
        match (items_key, list_end) {
            (None, _) if bare == "items:" => items_key = Some(at + bare.len()),
            (Some(_), None) if bare == "-" || bare.starts_with("- ") => item_starts.push(at),
            // The first other line at the margin ends the sequence.
            (Some(_), None) => {
                if item_starts.is_empty() {
                    return None;
                }
                list_end = Some(at);
            }
            _ => {}
        }
    }
    let key_end = items_key?;
    // Lines between `items:` and the first item other than blanks/comments would belong
    // to no item: not split.
    let first = *item_starts.first()?;
    if text[key_end..first]
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    {
        return None;
    }
    let end = list_end.unwrap_or(doc.end);
    let (prefix, suffix) = (doc.start..first, end..doc.end);
    for (i, &s) in item_starts.iter().enumerate() {
        let e = item_starts.get(i + 1).copied().unwrap_or(end);
        out.push([prefix.clone(), s..e, suffix.clone()]);
    }
    Some(())
}

fn svc_key(s: &k8s_openapi::api::core::v1::Service) -> Key {
    let (ns, n) = crate::model::translate::service_key(s);
    (ns.to_string(), n.to_string())
}

/// The Services and EndpointSlices of `objs` as upserts of `change`, their keys added to
/// `upserted`.
pub(crate) fn push_upserts(
    objs: Objects,
    change: &mut Change,
    upserted: &mut std::collections::HashSet<(Kind, Key)>,
) {
    for s in objs.services {
        let key = svc_key(&s);
        upserted.insert((Kind::Service, key.clone()));
        change.services.push((key, Some(s)));
    }
    for s in objs.slices {
        let key = (
            s.namespace.clone().unwrap_or_default(),
            s.name.clone().unwrap_or_default(),
        );
        upserted.insert((Kind::Slice, key.clone()));
        change.slices.push((key, Some(s)));
    }
}

/// `objs` holds kinds checked across documents (Nodes, ServiceCIDRs, MetalLB pools and
/// advertisements).
pub(crate) fn has_global(objs: &Objects) -> bool {
    !objs.nodes.is_empty()
        || !objs.service_cidrs.is_empty()
        || !objs.ip_pools.is_empty()
        || !objs.l2_adverts.is_empty()
}

/// Keys of what one document parsed into; None if it holds kinds checked across
/// documents or a nameless slice.
fn keys_of(objs: &Objects) -> Option<Vec<(Kind, Key)>> {
    if has_global(objs) {
        return None;
    }
    let mut keys: Vec<(Kind, Key)> = objs
        .services
        .iter()
        .map(|s| (Kind::Service, svc_key(s)))
        .collect();
    for s in &objs.slices {
        let name = s.name.clone().filter(|n| !n.is_empty())?;
        let ns = s.namespace.clone().unwrap_or_default();
        keys.push((Kind::Slice, (ns, name)));
    }
    Some(keys)
}

/// Parses units (`text_of` gives a unit's text), on both cores when there are many (the
/// first read of a large file).
fn parse_all<'a>(
    ranges: &[Unit],
    text_of: impl Fn(&Unit) -> Cow<'a, str> + Sync,
) -> Vec<Result<Objects, ParseError>> {
    let parse = |rs: &[Unit]| -> Vec<Result<Objects, ParseError>> {
        rs.iter()
            .map(|r| yaml::parse_objects(&text_of(r)))
            .collect()
    };
    if ranges.len() < 64 {
        return parse(ranges);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let chunk = ranges.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .chunks(chunk)
            .map(|rs| s.spawn(move || parse(rs)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("parser thread"))
            .collect()
    })
}

impl FileCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text of the last good read.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The Services and EndpointSlices of the last good read.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &(Kind, Key)> {
        self.docs.iter().flat_map(|d| &d.keys)
    }

    /// The last good read holds kinds checked across documents (or a nameless object).
    pub(crate) fn has_global(&self) -> bool {
        self.has_global.iter().any(|g| *g)
    }

    /// Forgets the previous read: the next one parses everything.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Reads `text` (the file's whole content). On error nothing is remembered of it: the
    /// next read compares with the last good one (after a duplicate object, it parses
    /// everything).
    pub fn read(&mut self, text: String) -> Result<FileUpdate, ParseError> {
        self.read_with(New::Whole(text), None)
    }

    /// A file's content as text for [`FileCache::read_checked`]: checked as UTF-8 only
    /// where it differs from the last good read's text (the rest is that text byte for
    /// byte, whole characters, checked when it was read; checking all of it was a tenth of
    /// a change's CPU with 10,000 Services in one file). The error is `read_to_string`'s
    /// (`InvalidData`) when it is not UTF-8.
    pub fn check(&self, bytes: Vec<u8>) -> std::io::Result<Checked> {
        let old = self.text.as_bytes();
        let same = Same::of(old, &bytes);
        let (head, from) = self.unchanged(same);
        let tail = old.len() - from;
        // head <= prefix <= len - suffix <= len - tail: the two do not overlap.
        if std::str::from_utf8(&bytes[head..bytes.len() - tail]).is_err() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            ));
        }
        // SAFETY: bytes[..head] is old[..head] and bytes[len - tail..] is old[from..], both
        // whole characters of a `String` (cut at its char boundaries); the bytes between
        // were checked just now; UTF-8 pieces joined are UTF-8.
        let text = unsafe { String::from_utf8_unchecked(bytes) };
        Ok(Checked {
            new: New::Whole(text),
            same,
            old_len: old.len(),
        })
    }

    /// [`FileCache::read`] of text from [`FileCache::check`] (whose comparison with the
    /// last read it reuses).
    pub fn read_checked(&mut self, checked: Checked) -> Result<FileUpdate, ParseError> {
        // Checked against another read than the last one: compared again. (A splice is
        // only ever read right after the load that made it, by the same cache.)
        let same = (checked.old_len == self.text.len()).then_some(checked.same);
        assert!(
            same.is_some() || matches!(checked.new, New::Whole(_)),
            "a spliced read taken by another read than the one it was loaded against"
        );
        self.read_with(checked.new, same)
    }

    /// The file at `path`, read against the last good read's text for
    /// [`FileCache::read_checked`]: the common prefix and suffix are compared a chunk at a
    /// time as they are read (into one small buffer), and only the bytes between them are
    /// kept (and checked as UTF-8), to be spliced into the kept text. A one-line change of
    /// a 17 MB file copies 17 MB through a cache-sized buffer instead of into a second
    /// 17 MB text compared afterwards. A file that is not regular, or whose length changes
    /// while it is read, is read whole.
    pub fn load(&self, path: &Path) -> std::io::Result<Checked> {
        use std::{io::Read as _, os::unix::fs::FileExt as _};
        let file = std::fs::File::open(path)?;
        let whole = |mut f: &std::fs::File| {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            self.check(bytes)
        };
        let meta = file.metadata()?;
        let old = self.text.as_bytes();
        if old.is_empty() || !meta.is_file() {
            return whole(&file);
        }
        let len = usize::try_from(meta.len()).map_err(std::io::Error::other)?;
        let Some(prefix) = file_prefix(&file, old, old.len().min(len))? else {
            return whole(&file);
        };
        let mut buf = vec![0u8; CHUNK.min(len.max(1))];
        // After the prefix, as `Same::of` compares.
        let room = (old.len() - prefix).min(len - prefix);
        let mut suffix = 0;
        while suffix < room {
            let want = CHUNK.min(room - suffix);
            if !fill(&file, &mut buf[..want], len - suffix - want)? {
                return whole(&file);
            }
            let o = old.len() - suffix;
            let c = common_suffix(&old[o - want..o], &buf[..want]);
            suffix += c;
            if c < want {
                break;
            }
        }
        drop(buf);
        // The stretch between the unchanged bytes is read and checked.
        let (head, from) = self.unchanged(Same { prefix, suffix });
        let tail = old.len() - from;
        let mut mid = vec![0u8; len - tail - head];
        // The file must still end where its length said (a writer appending in place).
        if !fill(&file, &mut mid, head)? || file.read_at(&mut [0u8; 1], len as u64)? != 0 {
            return whole(&file);
        }
        let mid = String::from_utf8(mid).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            )
        })?;
        Ok(Checked {
            new: New::Splice {
                at: head,
                old_end: from,
                mid,
            },
            same: Same { prefix, suffix },
            old_len: old.len(),
        })
    }

    /// The bytes a new text shares with the kept one (`same`), cut at character
    /// boundaries of the kept text: `old[..head]` at the start, `old[from..]` at the end.
    fn unchanged(&self, same: Same) -> (usize, usize) {
        let mut head = same.prefix;
        while !self.text.is_char_boundary(head) {
            head -= 1;
        }
        let mut from = self.text.len() - same.suffix;
        while !self.text.is_char_boundary(from) {
            from += 1;
        }
        (head, from)
    }

    fn read_with(&mut self, new: New, same: Option<Same>) -> Result<FileUpdate, ParseError> {
        // The old units first..end became `mid`; those before and after stay, moved as
        // `moved` says (None: every unit is in `mid`).
        let (new, first, end, mid, moved) = match self.resplit(&new, same) {
            Some(r) => {
                // The shortcut must split as the whole scan does (checked in tests).
                debug_assert_eq!(
                    Some(self.units_with(&r.mid, r.first, r.end, Some(r.moved))),
                    split(&new.get(&self.text, 0..new.len(&self.text)))
                );
                (new, r.first, r.end, r.mid, Some(r.moved))
            }
            None => {
                let text = new.into_string(&self.text);
                let Some(ranges) = split(&text) else {
                    let objs = yaml::parse_objects(&text)?;
                    self.clear();
                    return Ok(FileUpdate::Full(objs));
                };
                (New::Whole(text), 0, self.docs.len(), ranges, None)
            }
        };
        if self.docs.is_empty() && self.text.is_empty() {
            let text = new.into_string(&self.text);
            return self.read_whole(text, mid);
        }
        // Match the new units with the old ones they replace: same position first, then
        // same content (a moved document).
        let old_n = end - first;
        let mut matched_old = vec![false; old_n];
        let mut reuse: Vec<Option<usize>> = vec![None; mid.len()];
        let mut by_hash: Option<HashMap<u64, Vec<usize>>> = None;
        let mut hashes: Vec<u64> = vec![0; mid.len()];
        for (k, r) in mid.iter().enumerate() {
            if k < old_n
                && !matched_old[k]
                && unit_eq(&self.text, &self.docs[first + k].range, &new, r)
            {
                matched_old[k] = true;
                reuse[k] = Some(first + k);
                hashes[k] = self.docs[first + k].hash;
                continue;
            }
            let h = new_unit_hash(&new, &self.text, r);
            hashes[k] = h;
            let index = by_hash.get_or_insert_with(|| {
                let mut m: HashMap<u64, Vec<usize>> = HashMap::new();
                for (j, d) in self.docs[first..end].iter().enumerate() {
                    if !matched_old[j] {
                        m.entry(d.hash).or_default().push(j);
                    }
                }
                m
            });
            if let Some(j) = index.get(&h).into_iter().flatten().copied().find(|&j| {
                !matched_old[j] && unit_eq(&self.text, &self.docs[first + j].range, &new, r)
            }) {
                matched_old[j] = true;
                reuse[k] = Some(first + j);
            }
        }
        let gone: Vec<usize> = (0..old_n)
            .filter(|&j| !matched_old[j])
            .map(|j| first + j)
            .collect();
        let fresh: Vec<usize> = (0..mid.len()).filter(|&k| reuse[k].is_none()).collect();
        if gone.iter().any(|&j| self.has_global[j]) {
            return self.reread(new, &mid, first, end, moved, false);
        }
        let fresh_ranges: Vec<Unit> = fresh.iter().map(|&k| mid[k].clone()).collect();
        let mut parsed = Vec::with_capacity(fresh.len());
        for r in parse_all(&fresh_ranges, |u| new_unit_text(&new, &self.text, u)) {
            match r {
                Ok(objs) => parsed.push(objs),
                // The whole text names the document (its number) as a full read would.
                Err(_) => return self.reread(new, &mid, first, end, moved, false),
            }
        }
        let mut fresh_keys = Vec::with_capacity(parsed.len());
        for objs in &parsed {
            match keys_of(objs) {
                Some(k) => fresh_keys.push(k),
                None => return self.reread(new, &mid, first, end, moved, false),
            }
        }
        // Holders after the change; a key in two documents is the whole text's error.
        // Updated in place: on a duplicate the whole text is read again, which rebuilds
        // them (and on its error the cache starts afresh).
        for &j in &gone {
            for k in &self.docs[j].keys {
                if let Some(n) = self.holders.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        self.holders.remove(k);
                    }
                }
            }
        }
        for keys in &fresh_keys {
            for k in keys {
                let n = self.holders.entry(k.clone()).or_default();
                *n += 1;
                if *n > 1 {
                    return self.reread(new, &mid, first, end, moved, true);
                }
            }
        }
        let mut change = Change::default();
        let mut upserted: std::collections::HashSet<(Kind, Key)> = Default::default();
        for objs in parsed {
            push_upserts(objs, &mut change, &mut upserted);
        }
        for &j in &gone {
            for k in &self.docs[j].keys {
                if !upserted.contains(k) {
                    match k.0 {
                        Kind::Service => change.services.push((k.1.clone(), None)),
                        Kind::Slice => change.slices.push((k.1.clone(), None)),
                    }
                }
            }
        }
        // Commit: the new units in place of the old ones they replace, the units around
        // them moved where they now are (in place: with 100,000 Services in one file a
        // change rebuilt 200,000 units, ~10 ms).
        let mut fresh_keys = fresh_keys.into_iter();
        let mut docs = Vec::with_capacity(mid.len());
        let mut has_global = Vec::with_capacity(mid.len());
        for (k, r) in mid.into_iter().enumerate() {
            let (keys, global) = match reuse[k] {
                Some(j) => (std::mem::take(&mut self.docs[j].keys), self.has_global[j]),
                None => (fresh_keys.next().expect("one per fresh document"), false),
            };
            docs.push(Doc {
                range: r,
                hash: hashes[k],
                keys,
            });
            has_global.push(global);
        }
        if let Some(m) = moved.filter(|m| m.delta != 0) {
            for d in &mut self.docs[..first] {
                d.range = m.before(&d.range);
            }
            for d in &mut self.docs[end..] {
                d.range = m.after(&d.range);
            }
        }
        self.docs.splice(first..end, docs);
        self.has_global.splice(first..end, has_global);
        match new {
            New::Whole(text) => self.text = text,
            // In place: the bytes after the stretch move, nothing else is copied.
            New::Splice { at, old_end, mid } => self.text.replace_range(at..old_end, &mid),
        }
        Ok(FileUpdate::Change(change))
    }

    /// [`Self::read_whole`] of the new text (units as [`Self::units_with`] gives them),
    /// after forgetting the last read when `forget` (its holders were left half-updated).
    fn reread(
        &mut self,
        new: New,
        mid: &[Unit],
        first: usize,
        end: usize,
        moved: Option<Moved>,
        forget: bool,
    ) -> Result<FileUpdate, ParseError> {
        // Made whole before the kept text goes.
        let ranges = self.units_with(mid, first, end, moved);
        let text = new.into_string(&self.text);
        if forget {
            self.clear();
        }
        self.read_whole(text, ranges)
    }

    /// Every unit of the new text: the kept ones before `first` and from `end` on (moved
    /// by `moved`), `mid` between (None: `mid` is all of them).
    fn units_with(
        &self,
        mid: &[Unit],
        first: usize,
        end: usize,
        moved: Option<Moved>,
    ) -> Vec<Unit> {
        let Some(m) = moved else {
            return mid.to_vec();
        };
        let mut out = Vec::with_capacity(self.docs.len() - (end - first) + mid.len());
        out.extend(self.docs[..first].iter().map(|d| m.before(&d.range)));
        out.extend_from_slice(mid);
        out.extend(self.docs[end..].iter().map(|d| m.after(&d.range)));
        out
    }

    /// The units of `new` from the last read's (see [`Resplit`]), re-splitting only the
    /// bytes that differ (after the common prefix, before the common suffix: two memory
    /// comparisons instead of a scan of every line). None when the change is not within
    /// whole plain documents or whole items of one list (then `split` does it all).
    fn resplit(&self, new: &New, same: Option<Same>) -> Option<Resplit> {
        let a = self.text.as_bytes();
        let new_len = new.len(&self.text);
        let units = &self.docs;
        if units.is_empty() {
            return None;
        }
        let Same {
            prefix: p,
            suffix: s,
        } = same.unwrap_or_else(|| match new {
            New::Whole(b) => Same::of(a, b.as_bytes()),
            // A splice's edges bound what changed (not always tightly: that only costs
            // more units re-read).
            New::Splice { at, old_end, .. } => Same {
                prefix: *at,
                suffix: a.len() - old_end,
            },
        });
        let (old_end, new_end) = (a.len() - s, new_len - s);
        let delta = new_end as isize - old_end as isize;
        // Changed: old[p..old_end] became new[p..new_end]. The units whose bodies it
        // reaches (a boundary included: an insertion between two units joins the earlier).
        let first = units
            .iter()
            .position(|u| u.range[1].end >= p && !u.range[1].is_empty())?;
        let last = units
            .iter()
            .rposition(|u| u.range[1].start <= old_end && !u.range[1].is_empty())?
            .max(first);
        let (fu, lu) = (&units[first].range, &units[last].range);
        let frame_of = |u: &Unit| (u[0].clone(), u[2].clone());
        if frame_of(fu) != frame_of(lu) || fu[1].start > p || lu[1].end < old_end {
            return None;
        }
        // The frame (a list's lines around its items) must be outside the change.
        let (prefix, suffix) = frame_of(fu);
        let in_list = !prefix.is_empty() || !suffix.is_empty();
        if in_list && (prefix.end > p || (suffix.start < old_end && !suffix.is_empty())) {
            return None;
        }
        let moved = Moved { old_end, delta };
        let (m0, m1) = (fu[1].start, moved.shift(&lu[1]).end);
        if m1 < m0 || m1 > new_len {
            return None;
        }
        // The new middle, split as the old one was: items at "- " lines, or documents at
        // "---" lines; anything else at the margin (a new key, a list starting) gives up.
        let mut starts = vec![m0];
        let middle = new.get(&self.text, m0..m1);
        for (off, bare) in lines(&middle) {
            let at = m0 + off;
            match bare.as_bytes().first() {
                None | Some(b' ' | b'\t' | b'#') => {}
                Some(_) if in_list && off > 0 && (bare == "-" || bare.starts_with("- ")) => {
                    starts.push(at)
                }
                Some(_) if in_list && off == 0 => {}
                Some(b'%') | Some(b'.') if bare.starts_with('%') || bare.starts_with("...") => {
                    return None;
                }
                Some(b'-') if !in_list && off > 0 && is_doc_marker(bare) => starts.push(at),
                _ if in_list => return None,
                _ if bare == "items:" => return None,
                _ => {}
            }
        }
        // As `split` writes it: a list's (possibly empty) closing lines where they now are.
        let new_suffix = if in_list { moved.shift(&suffix) } else { 0..0 };
        let mut mid: Vec<Unit> = Vec::with_capacity(starts.len());
        for (k, &st) in starts.iter().enumerate() {
            let en = starts.get(k + 1).copied().unwrap_or(m1);
            if st == en {
                continue;
            }
            if in_list {
                mid.push([prefix.clone(), st..en, new_suffix.clone()]);
            } else {
                mid.push([st..st, st..en, 0..0]);
            }
        }
        // A unit after the change lies in the common suffix, except its frame's prefix
        // (before the change, unmoved).
        if units[last + 1..].iter().any(|u| u.range[1].start < old_end) {
            return None;
        }
        Some(Resplit {
            first,
            end: last + 1,
            mid,
            moved,
        })
    }

    /// Parses every document (in parallel); the result is `parse_objects(text)`'s.
    fn read_whole(&mut self, text: String, ranges: Vec<Unit>) -> Result<FileUpdate, ParseError> {
        let results = parse_all(&ranges, |u| unit_text(&text, u));
        let mut per_doc = Vec::with_capacity(results.len());
        let mut cross_checked = false;
        for r in results {
            match r {
                Ok(o) => per_doc.push(o),
                Err(_) => {
                    // The error as the whole text reports it (document number included);
                    // should the whole parse where a document alone did not, it is
                    // taken as it is and the next read starts afresh.
                    let objs = yaml::parse_objects(&text)?;
                    self.clear();
                    return Ok(FileUpdate::Full(objs));
                }
            }
        }
        let mut docs = Vec::with_capacity(ranges.len());
        let mut has_global = Vec::with_capacity(ranges.len());
        let mut holders: HashMap<(Kind, Key), u32> = HashMap::new();
        let mut dup = false;
        {
            for (r, objs) in ranges.iter().zip(&per_doc) {
                let (keys, global) = match keys_of(objs) {
                    Some(k) => (k, false),
                    None => {
                        // Kept as holders all the same (duplicates across documents).
                        let mut k: Vec<(Kind, Key)> = objs
                            .services
                            .iter()
                            .map(|s| (Kind::Service, svc_key(s)))
                            .collect();
                        k.extend(objs.slices.iter().filter_map(|s| {
                            let name = s.name.clone().filter(|n| !n.is_empty())?;
                            Some((Kind::Slice, (s.namespace.clone().unwrap_or_default(), name)))
                        }));
                        (k, true)
                    }
                };
                for k in &keys {
                    let n = holders.entry(k.clone()).or_default();
                    *n += 1;
                    dup |= *n > 1;
                }
                cross_checked |= global;
                docs.push(Doc {
                    range: r.clone(),
                    hash: unit_hash(&text, r),
                    keys,
                });
                has_global.push(global);
            }
        }
        let objs = match () {
            // Checks across documents (duplicates, pool overlaps) are the whole parse's.
            () if dup || cross_checked => yaml::parse_objects(&text)?,
            () => {
                let mut out = Objects::default();
                for o in per_doc {
                    out.services.extend(o.services);
                    out.slices.extend(o.slices);
                }
                out
            }
        };
        self.docs = docs;
        self.has_global = has_global;
        self.holders = holders;
        self.text = text;
        Ok(FileUpdate::Full(objs))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn doc(i: usize, addr: u32, list: bool) -> String {
        let d = doc_text(i, addr);
        if !list {
            return d;
        }
        // As list items: each document's lines indented under a `- `.
        d.split("---\n")
            .filter(|o| !o.is_empty())
            .map(|o| {
                let mut item = String::new();
                for (k, line) in o.lines().enumerate() {
                    item += if k == 0 { "- " } else { "  " };
                    item += line;
                    item += "\n";
                }
                item
            })
            .collect()
    }

    /// `check` and `load` accept exactly what a whole UTF-8 check accepts, though they
    /// check only the changed bytes, and `load`'s splice is the file's text: random edits (of single bytes, so that characters get cut) of a
    /// text with multi-byte characters at every place.
    #[test]
    fn check_agrees_with_a_whole_utf8_check() {
        // Other kinds are skipped: the text only has to be YAML.
        let base: String = (0..8)
            .map(|i| {
                format!(
                    "---\nkind: ConfigMap\nmetadata: {{name: c{i}}}\ndata: {{k: \"caf\u{e9}-\
                     \u{65e5}\u{672c} \u{1f600}\u{e8}\"}}\n"
                )
            })
            .collect();
        let mut cache = FileCache::new();
        cache.read(base.clone()).unwrap();
        let file = std::env::temp_dir().join(format!("xlb-docs-utf8-{}", std::process::id()));
        let mut seed = 0x9e37_79b9u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..20_000 {
            let mut bytes = base.clone().into_bytes();
            for _ in 0..1 + next() % 3 {
                let at = next() as usize % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, next() as u8),
                }
            }
            let whole = String::from_utf8(bytes.clone());
            // And read from a file against the kept text (checked where it differs).
            std::fs::write(&file, &bytes).unwrap();
            let loaded = cache.load(&file);
            match (cache.check(bytes), whole) {
                (Ok(c), Ok(w)) => {
                    assert_eq!(c.new.into_string(&cache.text), w);
                    let l = loaded.expect("a valid file loads");
                    assert!(matches!(l.new, New::Splice { .. }));
                    assert_eq!(l.new.into_string(&cache.text), w);
                    valid += 1;
                }
                (Err(e), Err(_)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
                    assert_eq!(
                        loaded.expect_err("invalid UTF-8 loads").kind(),
                        std::io::ErrorKind::InvalidData
                    );
                    invalid += 1;
                }
                (c, w) => panic!("check {c:?}, whole {w:?}"),
            }
        }
        std::fs::remove_file(&file).unwrap();
        // Both outcomes were exercised.
        assert!(
            valid > 1000 && invalid > 1000,
            "{valid} valid, {invalid} invalid"
        );
        // Read through check, the text reads as it does directly.
        let edited = base.replacen("caf\u{e9}", "caf\u{e8}", 1);
        let checked = cache.check(edited.clone().into_bytes()).unwrap();
        let mut direct = FileCache::new();
        direct.read(base.clone()).unwrap();
        let (a, b) = (cache.read_checked(checked), direct.read(edited));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    /// `file_prefix` (two threads above 4 MiB) finds what `common_prefix` of the whole
    /// texts finds, wherever the first difference is, and with files shorter, longer or
    /// equal.
    #[test]
    fn file_prefix_agrees_with_a_whole_comparison() {
        let mut seed = 0x2545_f491u32;
        let old: Vec<u8> = (0..(6 << 20) + 12_345)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        let path = std::env::temp_dir().join(format!("xlb-docs-prefix-{}", std::process::id()));
        let n = old.len();
        let mut cases: Vec<Vec<u8>> =
            vec![old.clone(), old[..n - 1].to_vec(), old[..n / 3].to_vec()];
        for at in [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            n / 2 - 1,
            n / 2,
            n / 2 + 1,
            5 << 20,
            n - 1,
        ] {
            let mut b = old.clone();
            b[at] ^= 0x5a;
            cases.push(b);
        }
        let mut longer = old.clone();
        longer.extend_from_slice(b"more");
        cases.push(longer);
        for (k, new) in cases.iter().enumerate() {
            std::fs::write(&path, new).unwrap();
            let f = std::fs::File::open(&path).unwrap();
            let lim = n.min(new.len());
            assert_eq!(
                file_prefix(&f, &old, lim).unwrap(),
                Some(common_prefix(&old, new)),
                "case {k}"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }

    pub(crate) fn doc_text(i: usize, addr: u32) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: dev}}\nspec:\n  \
             clusterIP: 10.96.0.{}\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: \
             discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-a\n  namespace: \
             dev\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: \
             [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.244.0.{addr}]}}]\n",
            i + 1
        )
    }

    pub(crate) type State = BTreeMap<String, String>;

    /// Objects as "kind ns/name" -> their serialization.
    pub(crate) fn state_of(objs: &Objects) -> State {
        let mut m = State::new();
        for s in &objs.services {
            let k = svc_key(s);
            m.insert(
                format!("svc {}/{}", k.0, k.1),
                serde_json::to_string(s).unwrap(),
            );
        }
        for s in &objs.slices {
            m.insert(
                format!(
                    "slice {}/{}",
                    s.namespace.clone().unwrap_or_default(),
                    s.name.clone().unwrap_or_default()
                ),
                serde_json::to_string(s).unwrap(),
            );
        }
        m
    }

    pub(crate) fn apply(state: &mut State, u: FileUpdate) -> usize {
        match u {
            FileUpdate::Full(objs) => {
                *state = state_of(&objs);
                usize::MAX
            }
            FileUpdate::Change(c) => {
                let n = c.len();
                for ((ns, name), s) in c.services {
                    let k = format!("svc {ns}/{name}");
                    match s {
                        Some(s) => state.insert(k, serde_json::to_string(&s).unwrap()),
                        None => state.remove(&k),
                    };
                }
                for ((ns, name), s) in c.slices {
                    let k = format!("slice {ns}/{name}");
                    match s {
                        Some(s) => state.insert(k, serde_json::to_string(&s).unwrap()),
                        None => state.remove(&k),
                    };
                }
                n
            }
        }
    }

    /// Edits of a multi-document file (one document changed, documents added, removed,
    /// moved, a duplicate, broken YAML): reading them one after another through the cache
    /// gives what parsing each text whole gives, errors included, and a one-document edit
    /// hands over only that document's objects.
    #[test]
    fn documents_read_as_the_whole_text() {
        for (list, closing) in [(false, false), (true, true), (true, false)] {
            for from_file in [false, true] {
                read_as_whole(list, closing, from_file);
            }
        }
    }

    /// `list`: the objects as items of one `kind: List` (`closing`: kubectl's shape, with
    /// lines after the items; else the items end the file). `from_file`: each text is
    /// written to a file and read with `load` (spliced into the kept text).
    fn read_as_whole(list: bool, closing: bool, from_file: bool) {
        // (Service number, endpoint address); None: broken YAML.
        let mut docs: Vec<Option<(usize, u32)>> = (0..40).map(|i| Some((i, 1))).collect();
        let render = |d: &[Option<(usize, u32)>]| -> String {
            let body: String = d
                .iter()
                .map(|d| match d {
                    Some((i, a)) => doc(*i, *a, list),
                    None if list => "- kind: [\n".into(),
                    None => "---\nkind: [\n".into(),
                })
                .collect();
            match (list, closing) {
                // kubectl's shape: items first, the list's kind after them.
                (true, true) => format!(
                    "apiVersion: v1\nitems:\n{body}kind: List\nmetadata:\n  resourceVersion: \"\"\n"
                ),
                (true, false) => format!("apiVersion: v1\nkind: List\nitems:\n{body}"),
                _ => body,
            }
        };
        let mut cache = FileCache::new();
        let mut state = State::new();
        let mut seed = 0x1234_5678u32;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as usize % n
        };
        let text = render(&docs);
        assert_eq!(
            apply(&mut state, cache.read(text.clone()).unwrap()),
            usize::MAX
        );
        assert_eq!(state, state_of(&yaml::parse_objects(&text).unwrap()));
        // After an error, the next read may parse everything.
        let mut after_error = false;
        for step in 0..200 {
            let mut next = docs.clone();
            let kind = rnd(6);
            match kind {
                0 | 1 => {
                    let i = rnd(next.len());
                    if let Some(d) = &mut next[i] {
                        d.1 = 2 + rnd(200) as u32;
                    }
                }
                2 => {
                    let i = rnd(next.len());
                    next.remove(i);
                }
                3 => {
                    let i = rnd(next.len() + 1);
                    next.insert(i, Some((100 + rnd(20), 7)));
                }
                4 => {
                    let (i, j) = (rnd(next.len()), rnd(next.len()));
                    next.swap(i, j);
                }
                _ if rnd(2) == 0 => {
                    let i = rnd(next.len());
                    next.push(next[i]);
                }
                _ => next.push(None),
            }
            let text = render(&next);
            let whole = yaml::parse_objects(&text);
            let got = if from_file {
                let file = std::env::temp_dir()
                    .join(format!("xlb-docs-{}-{list}-{closing}", std::process::id()));
                std::fs::write(&file, &text).unwrap();
                let loaded = cache.load(&file).unwrap();
                std::fs::remove_file(&file).unwrap();
                cache.read_checked(loaded)
            } else {
                cache.read(text)
            };
            match (got, whole) {
                (Ok(u), Ok(objs)) => {
                    let n = apply(&mut state, u);
                    assert_eq!(state, state_of(&objs), "list {list}/{closing} step {step}");
                    if kind < 2 && !std::mem::take(&mut after_error) {
                        // One document: a Service and its slice at most.
                        assert!(n <= 2, "list {list} step {step}: {n} objects handed over");
                    }
                    docs = next;
                }
                (Err(e), Err(w)) => {
                    assert_eq!(e, w, "step {step}");
                    after_error = true;
                }
                (got, want) => panic!("step {step}: {got:?} vs {:?}", want.map(|_| ())),
            }
        }
    }

    #[test]
    fn splits_at_document_markers_only() {
        let t = "a: 1\n---\nb: 2\n--- !x\nc: 3\n---x: 4\n";
        let r = split(t).unwrap();
        let parts: Vec<String> = r.iter().map(|r| unit_text(t, r).into_owned()).collect();
        assert_eq!(parts, ["a: 1\n", "---\nb: 2\n", "--- !x\nc: 3\n---x: 4\n"]);
        // A list's items, each framed by the list's other lines.
        let t = "---\napiVersion: v1\nitems:\n- a: 1\n  b: [\n   2]\n# c\n- d: 3\nkind: List\n";
        let parts: Vec<String> = split(t)
            .unwrap()
            .iter()
            .map(|r| unit_text(t, r).into_owned())
            .collect();
        assert_eq!(
            parts,
            [
                "---\napiVersion: v1\nitems:\n- a: 1\n  b: [\n   2]\n# c\nkind: List\n",
                "---\napiVersion: v1\nitems:\n- d: 3\nkind: List\n",
            ]
        );
        assert!(split("%YAML 1.2\n---\na: 1\n").is_none());
        assert!(split("a: 1\n...\n").is_none());
    }
}

#[cfg(test)]
mod bench {
    use std::fmt::Write;
    use std::time::Instant;

    use super::*;

    /// `n` Services x `e` endpoints as `kubectl get svc,endpointslices -A -o yaml` prints
    /// them (the benchmark's manifest shape).
    fn manifest(n: u32, e: u32) -> String {
        let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for i in 0..n {
            let ip = std::net::Ipv4Addr::from(0x0a60_0000 + i);
            let _ = write!(
                y,
                "- apiVersion: v1\n  kind: Service\n  metadata: {{name: svc-{i:06}, namespace: \
                 bench}}\n  spec:\n    type: ClusterIP\n    clusterIP: {ip}\n    ports:\n    - \
                 {{name: p, port: 80, protocol: TCP, targetPort: 8080}}\n- apiVersion: \
                 discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: \
                 svc-{i:06}-x1\n    namespace: bench\n    labels: {{kubernetes.io/service-name: \
                 svc-{i:06}}}\n  addressType: IPv4\n  ports:\n  - {{name: p, port: 8080, \
                 protocol: TCP}}\n  endpoints:\n"
            );
            for k in 0..e {
                let ep = std::net::Ipv4Addr::from(0x0af4_0000 + i * e + k);
                let _ = writeln!(
                    y,
                    "  - addresses: [\"{ep}\"]\n    nodeName: node-{k}\n    conditions: \
                     {{ready: true, serving: true, terminating: false}}"
                );
            }
        }
        y
    }

    /// What reading a manifest of `XLB_BENCH_SERVICES` (10,000) Services x 10 endpoints
    /// from nothing, and translating it, costs: `cargo test --release -p lb-agent --lib
    /// bench_first_read -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_first_read() {
        let n: u32 = std::env::var("XLB_BENCH_SERVICES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let text = manifest(n, 10);
        for _ in 0..3 {
            let t = Instant::now();
            let mut cache = FileCache::new();
            let u = cache.read(text.clone()).unwrap();
            let FileUpdate::Full(objs) = u else {
                panic!("first read is full")
            };
            assert_eq!(objs.services.len(), n as usize);
            eprintln!(
                "{n} services x 10 ({} MB): read {:?}",
                text.len() / 1_000_000,
                t.elapsed()
            );
            // And translated from nothing, as the agent's first full pass does.
            let mut tr = crate::model::incremental::Translator::new();
            tr.replace(objs);
            let node = crate::model::translate::NodeContext {
                node_name: "n1".into(),
                node_addrs: vec![std::net::Ipv4Addr::new(172, 18, 0, 2)],
                snat_ports: 61000..=65535,
                ..Default::default()
            };
            let t = Instant::now();
            let d = tr.full(&node);
            assert_eq!(d.ports.len(), n as usize);
            eprintln!("  translated (Translator::full) in {:?}", t.elapsed());
        }
        // One endpoint of the last slice gone, and back, alternately.
        let cut = text.rfind("  - addresses").unwrap();
        let fewer = text[..cut].to_string();
        let mut cache = FileCache::new();
        cache.read(text.clone()).unwrap();
        let mut ms = Vec::new();
        for k in 0..20 {
            let t = Instant::now();
            let next = if k % 2 == 0 { &fewer } else { &text };
            let u = cache.read(next.clone()).unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            let FileUpdate::Change(c) = u else {
                panic!("one change is read as one")
            };
            assert_eq!((c.services.len(), c.slices.len()), (0, 1));
        }
        ms.sort_by(f64::total_cmp);
        eprintln!(
            "one endpoint change: median {:.2} ms, max {:.2} ms",
            ms[10], ms[19]
        );
        // The same through a file, as the file source reads it: `load` (read against the
        // kept text, spliced) and `read_checked`, each timed.
        let file = std::env::temp_dir().join(format!("xlb-bench-read-{}", std::process::id()));
        let (mut load_ms, mut read_ms) = (Vec::new(), Vec::new());
        for k in 0..20 {
            std::fs::write(&file, if k % 2 == 0 { &fewer } else { &text }).unwrap();
            let t = Instant::now();
            let checked = cache.load(&file).unwrap();
            load_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let u = cache.read_checked(checked).unwrap();
            read_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(matches!(u, FileUpdate::Change(c) if c.slices.len() == 1));
        }
        std::fs::remove_file(&file).unwrap();
        load_ms.sort_by(f64::total_cmp);
        read_ms.sort_by(f64::total_cmp);
        eprintln!(
            "the same from a file: load median {:.2} ms (max {:.2}), read_checked median {:.2} \
             ms (max {:.2})",
            load_ms[10], load_ms[19], read_ms[10], read_ms[19]
        );
    }
}
