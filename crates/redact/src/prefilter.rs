//! Where a pattern may begin, found without looking patterns up at every byte.
//!
//! Every pattern is at least [`MIN_SECRET_LEN`] (8) bytes long. Of any [`STRIDE`] (5) consecutive
//! positions from a pattern's start, exactly one is a multiple of [`STRIDE`], and the [`GRAM`]
//! (4) bytes there lie inside the pattern's first 8 bytes. So the scan reads one 4-byte gram every
//! 5 bytes and looks it up in a table of the patterns' grams at offsets 0 to 4; only where that
//! hits does it check the 8 bytes at each start the hit allows against a set of the patterns'
//! first 8 bytes. Both are hashed: they can answer "maybe" for text that begins no pattern (the
//! exact lookup then decides), never "no" for text that does.

use std::ops::Range;

use crate::MIN_SECRET_LEN;
use crate::patterns::head_of;

/// Bytes per gram.
const GRAM: usize = 4;
/// Distance between the grams read from the text.
const STRIDE: usize = MIN_SECRET_LEN - GRAM + 1;

pub(crate) struct Prefilter {
    /// Per hashed gram: bit `j` is set if some pattern has that gram at offset `j` (< [`STRIDE`]).
    grams: Box<[u8]>,
    /// The patterns' hashed first [`MIN_SECRET_LEN`] bytes, one bit each.
    heads: Box<[u64]>,
    head_shift: u32,
}

fn gram_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + GRAM].try_into().expect("GRAM bytes"))
}

/// Multiplicative hashing; bits 32 and up of the product depend on every bit of the gram. A
/// fixed shift and a mask keep the scan free of variable shifts.
fn gram_slot(gram: u32, mask: usize) -> usize {
    (u64::from(gram).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask
}

/// The top bits of the product depend on every bit of the head.
fn head_bit(head: u64, shift: u32) -> usize {
    (head.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift) as usize
}

/// log2 of a power of two of about `per_key` × `keys`, between 2^`min` and 2^`max`.
fn table_bits(keys: usize, per_key: usize, min: u32, max: u32) -> u32 {
    keys.saturating_mul(per_key)
        .next_power_of_two()
        .trailing_zeros()
        .clamp(min, max)
}

impl Prefilter {
    /// Tables for `patterns`, each at least [`MIN_SECRET_LEN`] bytes long: about 16 slots per
    /// gram (1 KiB to 1 MiB) and 32 bits per head (512 B to 256 KiB).
    pub(crate) fn new<'p>(patterns: impl ExactSizeIterator<Item = &'p [u8]>) -> Self {
        let gram_bits = table_bits(patterns.len() * STRIDE, 8, 10, 20);
        let head_bits = table_bits(patterns.len(), 32, 12, 21);
        let mut grams = vec![0u8; 1 << gram_bits].into_boxed_slice();
        let mut heads = vec![0u64; (1 << head_bits) / 64].into_boxed_slice();
        let head_shift = 64 - head_bits;
        for pattern in patterns {
            debug_assert!(pattern.len() >= MIN_SECRET_LEN);
            for offset in 0..STRIDE {
                grams[gram_slot(gram_at(pattern, offset), grams.len() - 1)] |= 1 << offset;
            }
            let bit = head_bit(head_of(pattern), head_shift);
            heads[bit / 64] |= 1 << (bit % 64);
        }
        Self {
            grams,
            heads,
            head_shift,
        }
    }

    /// Whether a pattern may begin with `bytes` (which has at least [`MIN_SECRET_LEN`] bytes).
    pub(crate) fn head_may_match(&self, bytes: &[u8]) -> bool {
        let bit = head_bit(head_of(bytes), self.head_shift);
        self.heads[bit / 64] & (1 << (bit % 64)) != 0
    }

    /// The first position in `from..limit` where a pattern may begin in `buf`. None means that no
    /// pattern begins there.
    pub(crate) fn next(&self, buf: &[u8], from: usize, limit: usize) -> Option<usize> {
        // A pattern needs MIN_SECRET_LEN bytes from its start.
        let end = limit.min((buf.len() + 1).checked_sub(MIN_SECRET_LEN)?);
        if from >= end {
            return None;
        }
        // The gram at grid point `p` can belong to a pattern that begins at `p - 4 ..= p`. The
        // grid points needed run from the first at or after `from` to the last before `end + 4`,
        // whose gram ends at or before `buf.len()`.
        let first = from.next_multiple_of(STRIDE);
        let last = first + (end + STRIDE - 2 - first) / STRIDE * STRIDE;
        // Grams at 0, STRIDE, 2 × STRIDE… of `rest`, the last one at its end.
        let mut rest = &buf[first..last + GRAM];
        let mut p = first;
        let grams = &*self.grams;
        let mask = grams.len() - 1;
        let offsets = |rest: &[u8], at: usize| grams[gram_slot(gram_at(rest, at), mask)];
        // Four grid points per step, one branch when none of them hits (the common case).
        const BLOCK: usize = 4 * STRIDE;
        while rest.len() >= BLOCK - STRIDE + GRAM {
            let hits = [
                offsets(rest, 0),
                offsets(rest, STRIDE),
                offsets(rest, 2 * STRIDE),
                offsets(rest, 3 * STRIDE),
            ];
            if hits[0] | hits[1] | hits[2] | hits[3] != 0 {
                for (i, hit) in hits.into_iter().enumerate() {
                    if hit != 0
                        && let Some(start) = self.start_at(buf, p + i * STRIDE, hit, from..end)
                    {
                        return Some(start);
                    }
                }
            }
            rest = &rest[BLOCK.min(rest.len())..];
            p += BLOCK;
        }
        while rest.len() >= GRAM {
            let hit = offsets(rest, 0);
            if hit != 0
                && let Some(start) = self.start_at(buf, p, hit, from..end)
            {
                return Some(start);
            }
            rest = &rest[STRIDE.min(rest.len())..];
            p += STRIDE;
        }
        None
    }

    /// The first start in `range` that grid point `p`, whose gram patterns have at `offsets`,
    /// allows and whose first bytes may begin a pattern.
    #[cold]
    fn start_at(&self, buf: &[u8], p: usize, offsets: u8, range: Range<usize>) -> Option<usize> {
        // Highest offset first: starts in increasing order.
        (0..STRIDE)
            .rev()
            .filter(|offset| offsets & (1 << offset) != 0)
            .filter_map(|offset| p.checked_sub(offset))
            .find(|start| range.contains(start) && self.head_may_match(&buf[*start..]))
    }
}
