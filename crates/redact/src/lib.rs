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
//! Pattern copies held by the matcher are not zeroized.

use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

/// Shortest value that can be redacted.
pub const MIN_SECRET_LEN: usize = 8;

/// Why a redactor could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedactError {
    /// The named secret is shorter than [`MIN_SECRET_LEN`] bytes.
    TooShort(String),
    /// The matcher could not be built (too many or too long patterns).
    Build(String),
}

impl std::fmt::Display for RedactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooShort(name) => write!(
                f,
                "secret {name} is shorter than {MIN_SECRET_LEN} bytes and cannot be redacted safely"
            ),
            Self::Build(reason) => write!(f, "cannot build the redactor: {reason}"),
        }
    }
}

impl std::error::Error for RedactError {}

/// Matches a fixed set of secrets; cheap to share, one [`Stream`] per output stream.
pub struct Redactor {
    matcher: Option<AhoCorasick>,
    /// For each pattern, the index of its secret.
    owner: Vec<usize>,
    /// `[REDACTED:NAME]` per secret.
    labels: Vec<Vec<u8>>,
    names: Vec<String>,
    /// All patterns, sorted, for "can this still begin a match" checks.
    sorted: Vec<Zeroizing<Vec<u8>>>,
    max_len: usize,
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
    /// Builds a redactor for `(name, value)` pairs.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, RedactError> {
        let mut patterns: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut owner = Vec::new();
        let mut labels = Vec::new();
        let mut names = Vec::new();
        for (index, (name, value)) in secrets.into_iter().enumerate() {
            if value.len() < MIN_SECRET_LEN {
                return Err(RedactError::TooShort(name.to_owned()));
            }
            names.push(name.to_owned());
            labels.push(format!("[REDACTED:{name}]").into_bytes());
            let mut forms = encodings(value);
            if value.contains(&b'\n') {
                for line in value.split(|b| *b == b'\n') {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.len() >= MIN_SECRET_LEN {
                        forms.extend(encodings(line));
                    }
                }
            }
            for form in forms {
                if !patterns.iter().any(|p| **p == *form) {
                    patterns.push(form);
                    owner.push(index);
                }
            }
        }
        let max_len = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        let matcher = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::LeftmostLongest)
                    // A full DFA: more memory (fine for a few thousand patterns), fastest scans.
                    .kind(Some(AhoCorasickKind::DFA))
                    .build(patterns.iter().map(|p| p.as_slice()))
                    .map_err(|e| RedactError::Build(e.to_string()))?,
            )
        };
        let mut sorted = patterns;
        sorted.sort_by(|a, b| a.as_slice().cmp(b.as_slice()));
        Ok(Self {
            matcher,
            owner,
            labels,
            names,
            sorted,
            max_len,
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
            pending: Vec::new(),
            counts: Counts::new(),
        }
    }

    /// Redacts a whole buffer at once.
    pub fn redact(&self, input: &[u8]) -> (Vec<u8>, Counts) {
        let mut stream = self.stream();
        let mut out = stream.push(input);
        let (rest, counts) = stream.finish();
        out.extend_from_slice(&rest);
        (out, counts)
    }

    /// Whether `bytes` is a prefix of some pattern.
    fn begins_a_pattern(&self, bytes: &[u8]) -> bool {
        let at = self.sorted.partition_point(|p| p.as_slice() < bytes);
        self.sorted.get(at).is_some_and(|p| p.starts_with(bytes))
    }

    /// Start of the longest suffix of `buf` that could still begin a match (`buf.len()` if none).
    fn tail_start(&self, buf: &[u8]) -> usize {
        let earliest = buf.len().saturating_sub(self.max_len.saturating_sub(1));
        (earliest..buf.len())
            .find(|&k| self.begins_a_pattern(&buf[k..]))
            .unwrap_or(buf.len())
    }
}

/// Redaction of one output stream.
pub struct Stream<'r> {
    redactor: &'r Redactor,
    pending: Vec<u8>,
    counts: Counts,
}

impl Stream<'_> {
    /// Adds a chunk and returns the output that is now final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let Some(matcher) = &self.redactor.matcher else {
            return std::mem::take(&mut self.pending);
        };
        let mut out = Vec::with_capacity(self.pending.len());
        let mut cursor = 0;
        loop {
            let rest = &self.pending[cursor..];
            let tail = cursor + self.redactor.tail_start(rest);
            match matcher.find(rest) {
                // A match that starts before the undecided tail cannot grow any longer.
                Some(m) if cursor + m.start() < tail => {
                    out.extend_from_slice(&rest[..m.start()]);
                    self.replace(m.pattern().as_usize(), &mut out);
                    cursor += m.end();
                }
                _ => {
                    out.extend_from_slice(&self.pending[cursor..tail]);
                    cursor = tail;
                    break;
                }
            }
        }
        self.pending.drain(..cursor);
        out
    }

    /// Ends the stream: redacts and returns what was held back, with the counts.
    pub fn finish(mut self) -> (Vec<u8>, Counts) {
        let mut out = Vec::with_capacity(self.pending.len());
        if let Some(matcher) = &self.redactor.matcher {
            let pending = std::mem::take(&mut self.pending);
            let mut cursor = 0;
            for m in matcher.find_iter(&pending) {
                out.extend_from_slice(&pending[cursor..m.start()]);
                self.replace(m.pattern().as_usize(), &mut out);
                cursor = m.end();
            }
            out.extend_from_slice(&pending[cursor..]);
        } else {
            out.append(&mut self.pending);
        }
        (out, self.counts)
    }

    /// Bytes held back so far (they may begin a secret).
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }

    fn replace(&mut self, pattern: usize, out: &mut Vec<u8>) {
        let secret = self.redactor.owner[pattern];
        out.extend_from_slice(&self.redactor.labels[secret]);
        *self
            .counts
            .entry(self.redactor.names[secret].clone())
            .or_default() += 1;
    }
}

/// The raw value and its common encodings, without duplicates.
fn encodings(value: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut out: Vec<Zeroizing<Vec<u8>>> = vec![Zeroizing::new(value.to_vec())];
    let mut add = |form: Vec<u8>| {
        if form.len() >= MIN_SECRET_LEN && !out.iter().any(|p| **p == form) {
            out.push(Zeroizing::new(form));
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
    value
        .iter()
        .flat_map(|b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]])
        .collect()
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.push(b'%');
            out.extend_from_slice(&hex(&[b], b"0123456789ABCDEF"));
        }
    }
    out
}

/// JSON string escaping (also what most languages print for escaped strings).
fn json_escape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 8);
    for &b in value {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests;
