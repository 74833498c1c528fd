//! Streaming redaction of secret values in command output.
//!
//! Guarantees:
//! - Each secret is matched as its raw bytes and as the encodings a command commonly produces:
//!   base64 (standard and URL-safe, at all three byte alignments, with and without padding),
//!   lowercase and uppercase hex, percent-encoding, and JSON/backslash escaping; a multi-line value
//!   is also matched line by line (lines of at least [`MIN_SECRET_LEN`] bytes).
//! - Matches are replaced by `[REDACTED:NAME]` and counted per secret name.
//! - Streaming: a match split across any chunk boundaries is still found. Only the tail of the
//!   buffered output that can still begin a match is held back; everything before it is released.
//! - Output that contains no secret comes out byte for byte.
//! - Values shorter than [`MIN_SECRET_LEN`] bytes are refused: they cannot be redacted safely.
//!
//! Redaction is defence in depth, not the boundary: a command that transforms a secret in a way not
//! listed above (reversing it, printing one character per line, encrypting it) gets it out.
//! The patterns are kept in zeroized buffers; the prefilter keeps only hashed bits of them.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

mod fragments;
mod patterns;
mod prefilter;
pub use fragments::file_fragments;
use patterns::Patterns;
use prefilter::Prefilter;

/// Shortest value that can be redacted.
pub const MIN_SECRET_LEN: usize = 8;

/// Why a redactor could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedactError {
    /// The named secret is shorter than [`MIN_SECRET_LEN`] bytes.
    TooShort(String),
}

impl std::fmt::Display for RedactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooShort(name) => write!(
                f,
                "secret {name} is shorter than {MIN_SECRET_LEN} bytes and cannot be redacted safely"
            ),
        }
    }
}

impl std::error::Error for RedactError {}

/// Matches a fixed set of secrets; cheap to share, one [`Stream`] per output stream.
///
/// A scan asks the prefilter where a pattern may begin and looks up, only there, the longest
/// pattern that begins at that position: the leftmost such match wins.
pub struct Redactor {
    prefilter: Prefilter,
    patterns: Patterns,
    /// For each pattern, the index of its secret.
    owner: Vec<usize>,
    /// `[REDACTED:NAME]` per secret.
    labels: Vec<Vec<u8>>,
    names: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.names)
            .field("patterns", &self.owner.len())
            .finish()
    }
}

/// Counts of replacements per secret name.
pub type Counts = BTreeMap<String, u64>;

impl Redactor {
    /// Builds a redactor for `(name, value)` pairs; several values under one name are one secret.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, RedactError> {
        let mut forms: Vec<(Zeroizing<Vec<u8>>, usize)> = Vec::new();
        let mut labels = Vec::new();
        let mut names = Vec::new();
        for (name, value) in secrets {
            if value.len() < MIN_SECRET_LEN {
                return Err(RedactError::TooShort(name.to_owned()));
            }
            // Values given under one name are one secret (one label, one count).
            let index = match names.iter().position(|n| n == name) {
                Some(index) => index,
                None => {
                    names.push(name.to_owned());
                    labels.push(format!("[REDACTED:{name}]").into_bytes());
                    names.len() - 1
                }
            };
            forms.extend(patterns_of(value).into_iter().map(|form| (form, index)));
        }
        // A pattern shared by several secrets belongs to the first of them.
        let mut sorted = forms;
        sorted.sort_by(|(a, i), (b, j)| a.cmp(b).then(i.cmp(j)));
        sorted.dedup_by(|(later, _), (first, _)| later == first);
        let (sorted, owner): (Vec<_>, Vec<_>) = sorted.into_iter().unzip();
        let patterns = Patterns::new(&sorted);
        Ok(Self {
            prefilter: Prefilter::new(sorted.iter().map(|p| p.as_slice())),
            patterns,
            owner,
            labels,
            names,
        })
    }

    /// The secrets' names, in the order given.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Number of patterns (secrets × encodings).
    pub fn pattern_count(&self) -> usize {
        self.owner.len()
    }

    /// A fresh stream.
    pub fn stream(&self) -> Stream<'_> {
        Stream {
            redactor: self,
            // Never outgrown (see `push_into`), so the held-back bytes are never left behind in a
            // reallocated buffer.
            pending: Zeroizing::new(Vec::with_capacity(2 * self.patterns.max_len())),
            counts: vec![0; self.names.len()],
        }
    }

    /// Redacts a whole buffer at once.
    pub fn redact(&self, input: &[u8]) -> (Vec<u8>, Counts) {
        let mut counts = vec![0; self.names.len()];
        let mut out = Vec::with_capacity(input.len());
        self.scan(input, 0, input.len(), &mut counts, &mut out);
        (out, self.counts(&counts))
    }

    /// Replaces the matches that begin in `buf[cursor..end]`, appending the result from `cursor`
    /// on to `out`. Returns where it stopped: `end`, or the end of a match that goes beyond it.
    fn scan(
        &self,
        buf: &[u8],
        mut cursor: usize,
        end: usize,
        counts: &mut [u64],
        out: &mut Vec<u8>,
    ) -> usize {
        let mut from = cursor;
        while let Some(start) = self.prefilter.next(buf, from, end) {
            let Some((pattern, len)) = self.patterns.longest_at(&buf[start..]) else {
                from = start + 1;
                continue;
            };
            out.extend_from_slice(&buf[cursor..start]);
            let secret = self.owner[pattern];
            out.extend_from_slice(&self.labels[secret]);
            counts[secret] += 1;
            cursor = start + len;
            from = cursor;
        }
        let stop = end.max(cursor);
        out.extend_from_slice(&buf[cursor..stop]);
        stop
    }

    /// Redacts `buf` from `cursor` on up to the tail that can still begin a match, appending the
    /// result to `out`; returns where that tail starts. A match that begins before the tail
    /// cannot grow any longer; one that reaches into it moves the tail on.
    fn release(&self, buf: &[u8], cursor: usize, counts: &mut [u64], out: &mut Vec<u8>) -> usize {
        let mut cursor = cursor;
        loop {
            let end = self.tail_start(buf, cursor);
            cursor = self.scan(buf, cursor, end, counts, out);
            if cursor == end {
                return end;
            }
        }
    }

    fn counts(&self, counts: &[u64]) -> Counts {
        self.names
            .iter()
            .zip(counts)
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| (name.clone(), *n))
            .collect()
    }

    /// Start of the longest suffix of `buf` from `from` on that could still begin a match
    /// (`buf.len()` if none).
    fn tail_start(&self, buf: &[u8], from: usize) -> usize {
        let earliest = buf
            .len()
            .saturating_sub(self.patterns.max_len().saturating_sub(1))
            .max(from);
        (earliest..buf.len())
            .find(|&k| {
                let rest = &buf[k..];
                (rest.len() < MIN_SECRET_LEN || self.prefilter.head_may_match(rest))
                    && self.patterns.begins_one(rest)
            })
            .unwrap_or(buf.len())
    }
}

/// Redaction of one output stream.
pub struct Stream<'r> {
    redactor: &'r Redactor,
    /// The undecided tail, shorter than the longest pattern (it may hold the start of a secret).
    pending: Zeroizing<Vec<u8>>,
    /// Replacements per secret, in the redactor's order.
    counts: Vec<u64>,
}

impl Stream<'_> {
    /// Adds a chunk and returns the output that is now final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pending.len() + chunk.len());
        self.push_into(chunk, &mut out);
        out
    }

    /// Adds a chunk and appends the output that is now final to `out`.
    pub fn push_into(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let redactor = self.redactor;
        let counts = &mut self.counts;
        let max_len = redactor.patterns.max_len();
        // Held back: fewer than `max_len` bytes. Copied: fewer than `max_len` more.
        if chunk.len() < max_len {
            self.pending.extend_from_slice(chunk);
            let released = redactor.release(&self.pending, 0, counts, out);
            self.pending.drain(..released);
            debug_assert!(
                self.pending.capacity() == 2 * max_len,
                "pending was reallocated"
            );
            return;
        }
        // The chunk is at least as long as any pattern: a match that begins in the held-back
        // bytes ends within the first `max_len` bytes of the chunk, and the new tail lies in the
        // chunk. So only those bytes are copied; the rest is read where it is.
        let mut cursor = 0;
        if !self.pending.is_empty() {
            let held = self.pending.len();
            self.pending.extend_from_slice(&chunk[..max_len]);
            cursor = redactor.scan(&self.pending, 0, held, counts, out) - held;
            self.pending.clear();
        }
        let released = redactor.release(chunk, cursor, counts, out);
        self.pending.extend_from_slice(&chunk[released..]);
        debug_assert!(
            self.pending.capacity() == 2 * max_len,
            "pending was reallocated"
        );
    }

    /// Ends the stream: redacts and returns what was held back, with the counts.
    pub fn finish(self) -> (Vec<u8>, Counts) {
        let mut counts = self.counts;
        let mut out = Vec::with_capacity(self.pending.len());
        self.redactor
            .scan(&self.pending, 0, self.pending.len(), &mut counts, &mut out);
        (out, self.redactor.counts(&counts))
    }

    /// Bytes held back so far (they may begin a secret).
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }
}

/// Every byte string `value` is matched as: the value and its encodings and, for a multi-line
/// value, each line of at least [`MIN_SECRET_LEN`] bytes and its encodings, without duplicates.
pub fn patterns_of(value: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut forms = encodings(value);
    if value.contains(&b'\n') {
        for line in value.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() >= MIN_SECRET_LEN {
                for form in encodings(line) {
                    if !forms.contains(&form) {
                        forms.push(form);
                    }
                }
            }
        }
    }
    forms
}

/// The raw value and its common encodings, without duplicates.
fn encodings(value: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut out: Vec<Zeroizing<Vec<u8>>> = vec![Zeroizing::new(value.to_vec())];
    // Forms are built in buffers that never grow (no copy is left behind) and wiped when dropped.
    let mut add = |form: Vec<u8>| {
        let form = Zeroizing::new(form);
        if form.len() >= MIN_SECRET_LEN && !out.contains(&form) {
            out.push(form);
        }
    };
    add(hex(value, b"0123456789abcdef"));
    add(hex(value, b"0123456789ABCDEF"));
    // Whole encodings (the value at the start of what is encoded), padded and not.
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        add(engine.encode(value).into_bytes());
    }
    // The value at any position: the characters that depend on its bytes alone. At alignment `skip`
    // the first `skip` bytes share a base64 group with unknown bytes before them.
    for skip in 0..3 {
        let inner = &value[skip.min(value.len())..];
        let whole = inner.len() / 3 * 3;
        add(STANDARD_NO_PAD.encode(&inner[..whole]).into_bytes());
        add(URL_SAFE_NO_PAD.encode(&inner[..whole]).into_bytes());
    }
    add(percent_encode(value));
    add(json_escape(value));
    out
}

fn hex(value: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 2);
    for &b in value {
        out.extend_from_slice(&hex_byte(b, digits));
    }
    out
}

fn hex_byte(b: u8, digits: &[u8; 16]) -> [u8; 2] {
    [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.push(b'%');
            out.extend_from_slice(&hex_byte(b, b"0123456789ABCDEF"));
        }
    }
    out
}

/// JSON string escaping (also what most languages print for escaped strings).
fn json_escape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 6);
    for &b in value {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&hex_byte(b, b"0123456789abcdef"));
            }
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests;
