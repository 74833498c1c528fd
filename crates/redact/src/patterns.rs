//! The patterns, sorted and packed into one zeroized buffer, indexed by their first
//! [`MIN_SECRET_LEN`] bytes (their head).
//!
//! Patterns that share a head are neighbours in sorted order, so the index maps a head to a
//! range of patterns. Finding the longest pattern that begins a text costs one index probe and a
//! binary search of that range: a few cache lines, however many patterns there are.

use std::ops::Range;

use zeroize::Zeroizing;

use crate::MIN_SECRET_LEN;

/// One slot of the index: a head, its patterns and the shortest one's length (`end == 0`: empty
/// slot).
#[derive(Clone, Copy, Default)]
struct Slot {
    head: u64,
    start: u32,
    end: u32,
    shortest: u32,
}

pub(crate) struct Patterns {
    /// All patterns, in sorted order, back to back.
    bytes: Zeroizing<Vec<u8>>,
    /// Where each pattern ends in `bytes` (it starts where the previous one ends).
    ends: Vec<usize>,
    /// Open addressing, linear probing; at most half full.
    index: Box<[Slot]>,
    shift: u32,
    max_len: usize,
}

pub(crate) fn head_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(
        bytes[..MIN_SECRET_LEN]
            .try_into()
            .expect("MIN_SECRET_LEN bytes"),
    )
}

fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Patterns {
    /// `sorted`: distinct patterns of at least [`MIN_SECRET_LEN`] bytes, in ascending order.
    /// Fewer than 2^32 of them (a redactor holds a few thousand).
    pub(crate) fn new(sorted: &[Zeroizing<Vec<u8>>]) -> Self {
        let mut bytes = Zeroizing::new(Vec::with_capacity(sorted.iter().map(|p| p.len()).sum()));
        let mut ends = Vec::with_capacity(sorted.len());
        for pattern in sorted {
            debug_assert!(pattern.len() >= MIN_SECRET_LEN);
            bytes.extend_from_slice(pattern);
            ends.push(bytes.len());
        }
        let bits = (sorted.len() * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(1);
        let mut patterns = Self {
            bytes,
            ends,
            index: vec![Slot::default(); 1 << bits].into_boxed_slice(),
            shift: 64 - bits,
            max_len: sorted.iter().map(|p| p.len()).max().unwrap_or(0),
        };
        let mut start = 0;
        while start < sorted.len() {
            let head = head_of(&sorted[start]);
            let end = start + sorted[start..].partition_point(|p| head_of(p) == head);
            let mut at = patterns.home(head);
            while patterns.index[at].end != 0 {
                at = (at + 1) & (patterns.index.len() - 1);
            }
            let to_u32 = |n: usize| u32::try_from(n).expect("fewer than 2^32 patterns");
            let shortest = sorted[start..end].iter().map(|p| p.len()).min();
            patterns.index[at] = Slot {
                head,
                start: to_u32(start),
                end: to_u32(end),
                shortest: to_u32(shortest.expect("a group has patterns")),
            };
            start = end;
        }
        patterns
    }

    fn home(&self, head: u64) -> usize {
        (head.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// The patterns whose head is `head`, and the length of the shortest.
    fn group(&self, head: u64) -> (Range<usize>, usize) {
        let mut at = self.home(head);
        loop {
            let slot = self.index[at];
            if slot.end == 0 {
                return (0..0, 0);
            }
            if slot.head == head {
                return (
                    slot.start as usize..slot.end as usize,
                    slot.shortest as usize,
                );
            }
            at = (at + 1) & (self.index.len() - 1);
        }
    }

    /// The first pattern in `range` that `pred` does not hold for (it holds for a prefix of it).
    fn partition(&self, range: Range<usize>, pred: impl Fn(&[u8]) -> bool) -> usize {
        let (mut low, mut high) = (range.start, range.end);
        while low < high {
            let mid = low + (high - low) / 2;
            if pred(self.get(mid)) {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }

    /// The longest pattern that `text` begins with: its index and length.
    pub(crate) fn longest_at(&self, text: &[u8]) -> Option<(usize, usize)> {
        if text.len() < MIN_SECRET_LEN {
            return None;
        }
        let (group, shortest) = self.group(head_of(text));
        let mut text = &text[..text.len().min(self.max_len)];
        // The largest pattern ≤ `text` is the longest one `text` begins with, if `text` begins
        // with it. If not, with `l` bytes in common, any pattern `text` begins with is a prefix of
        // `text[..l]` (a longer one would sort between the two), so look there.
        while text.len() >= shortest.max(MIN_SECRET_LEN) {
            let after = self.partition(group.clone(), |p| p <= text);
            if after == group.start {
                return None;
            }
            let candidate = self.get(after - 1);
            if text.starts_with(candidate) {
                return Some((after - 1, candidate.len()));
            }
            text = &text[..common_prefix_len(candidate, text)];
        }
        None
    }

    /// Whether `bytes` is a prefix of some pattern.
    pub(crate) fn begins_one(&self, bytes: &[u8]) -> bool {
        let range = if bytes.len() >= MIN_SECRET_LEN {
            self.group(head_of(bytes)).0
        } else {
            0..self.len()
        };
        let at = self.partition(range.clone(), |p| p < bytes);
        at < range.end && self.get(at).starts_with(bytes)
    }
}
