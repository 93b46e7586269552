//! Sets of replication ids as ranges: the body of id-set chunks and dequeue events.
//!
//! Wire form: a sequence of `(first: u64, last: u64)` pairs, big-endian, `first <= last`,
//! ascending and not touching (`last + 1 < next first`).

use super::CHUNK_RANGES_MAX;

/// Ascending, disjoint, non-touching ranges of ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdRanges(Vec<(u64, u64)>);

/// Why a ranges body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangesError {
    /// Not a multiple of 16 bytes.
    #[error("ranges body of {0} bytes is not a whole number of 16-byte pairs")]
    Length(usize),
    /// A pair is reversed, or pairs are out of order or touching.
    #[error("ranges are not ascending and disjoint at pair {0}")]
    Order(usize),
}

impl IdRanges {
    /// No ids.
    pub fn new() -> IdRanges {
        IdRanges(Vec::new())
    }

    /// The ranges.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of ids.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// Adds `id`, which must be above every id already in (ids given in ascending order).
    /// Returns false (and adds nothing) if it is not.
    pub fn push(&mut self, id: u64) -> bool {
        match self.0.last_mut() {
            Some((_, last)) if id <= *last => false,
            Some((_, last)) if id == *last + 1 => {
                *last = id;
                true
            }
            _ => {
                self.0.push((id, id));
                true
            }
        }
    }

    /// A set from ranges that are already ascending and disjoint (a slice of another set).
    pub fn from_ranges(ranges: &[(u64, u64)]) -> IdRanges {
        IdRanges(ranges.to_vec())
    }

    /// Ranges from ascending ids.
    pub fn from_sorted(ids: impl IntoIterator<Item = u64>) -> IdRanges {
        let mut r = IdRanges::new();
        for id in ids {
            r.push(id);
        }
        r
    }

    /// Appends parsed ranges that continue this set (the next chunk of an id set).
    pub fn extend_from_wire(&mut self, body: &[u8]) -> Result<(), RangesError> {
        if !body.len().is_multiple_of(16) {
            return Err(RangesError::Length(body.len()));
        }
        for (i, pair) in body.chunks_exact(16).enumerate() {
            let a = u64::from_be_bytes(pair[..8].try_into().expect("8 bytes"));
            let b = u64::from_be_bytes(pair[8..].try_into().expect("8 bytes"));
            let after_last = self
                .0
                .last()
                .is_none_or(|&(_, l)| l < u64::MAX && a > l + 1);
            if a > b || !after_last {
                return Err(RangesError::Order(i));
            }
            self.0.push((a, b));
        }
        Ok(())
    }

    /// Parses one ranges body.
    pub fn from_wire(body: &[u8]) -> Result<IdRanges, RangesError> {
        let mut r = IdRanges::new();
        r.extend_from_wire(body)?;
        Ok(r)
    }

    /// The wire form, in chunks of at most [`CHUNK_RANGES_MAX`] pairs (at least one chunk,
    /// empty when there are no ids).
    pub fn to_wire_chunks(&self) -> Vec<Vec<u8>> {
        if self.0.is_empty() {
            return vec![Vec::new()];
        }
        self.0
            .chunks(CHUNK_RANGES_MAX)
            .map(|c| {
                let mut body = Vec::with_capacity(c.len() * 16);
                for (a, b) in c {
                    body.extend_from_slice(&a.to_be_bytes());
                    body.extend_from_slice(&b.to_be_bytes());
                }
                body
            })
            .collect()
    }

    /// True if `id` is in the set.
    pub fn contains(&self, id: u64) -> bool {
        let i = self.0.partition_point(|&(_, last)| last < id);
        self.0.get(i).is_some_and(|&(first, _)| first <= id)
    }

    /// Every id, ascending.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|&(a, b)| a..=b)
    }

    /// The ids in this set that are not in `present` (ascending ids), as ranges.
    pub fn minus_sorted(&self, present: &[u64]) -> IdRanges {
        let mut out = IdRanges::new();
        let mut p = 0;
        for &(a, b) in &self.0 {
            let mut next = a;
            while p < present.len() && present[p] < a {
                p += 1;
            }
            while p < present.len() && present[p] <= b {
                if present[p] > next {
                    out.0.push((next, present[p] - 1));
                }
                next = present[p] + 1;
                p += 1;
            }
            if next <= b {
                out.0.push((next, b));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascending_ids_merge_into_ranges() {
        let r = IdRanges::from_sorted([1, 2, 3, 7, 9, 10]);
        assert_eq!(r.ranges(), [(1, 3), (7, 7), (9, 10)]);
        assert_eq!(r.count(), 6);
        assert!(r.contains(2) && r.contains(9) && !r.contains(8) && !r.contains(11));
    }

    #[test]
    fn wire_form_round_trips_in_bounded_chunks() {
        let r = IdRanges::from_sorted((0..10_000u64).map(|i| i * 2 + 1));
        let chunks = r.to_wire_chunks();
        assert_eq!(chunks.len(), 10_000usize.div_ceil(CHUNK_RANGES_MAX));
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_RANGES_MAX * 16));
        let mut back = IdRanges::new();
        for c in &chunks {
            back.extend_from_wire(c).unwrap();
        }
        assert_eq!(back, r);
        assert_eq!(IdRanges::new().to_wire_chunks(), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn malformed_ranges_are_refused() {
        assert_eq!(IdRanges::from_wire(&[0; 15]), Err(RangesError::Length(15)));
        let pair = |a: u64, b: u64| [a.to_be_bytes(), b.to_be_bytes()].concat();
        assert_eq!(IdRanges::from_wire(&pair(5, 4)), Err(RangesError::Order(0)));
        let touching = [pair(1, 2), pair(3, 4)].concat();
        assert_eq!(IdRanges::from_wire(&touching), Err(RangesError::Order(1)));
        let backwards = [pair(5, 6), pair(1, 2)].concat();
        assert_eq!(IdRanges::from_wire(&backwards), Err(RangesError::Order(1)));
        let mut r = IdRanges::from_wire(&pair(1, 2)).unwrap();
        assert_eq!(r.extend_from_wire(&pair(2, 9)), Err(RangesError::Order(0)));
    }

    #[test]
    fn difference_with_present_ids() {
        let r = IdRanges::from_sorted([1, 2, 3, 4, 5, 8, 9]);
        assert_eq!(
            r.minus_sorted(&[2, 3, 9, 20]).ranges(),
            [(1, 1), (4, 5), (8, 8)]
        );
        assert_eq!(r.minus_sorted(&[]), r);
        assert!(r.minus_sorted(&[1, 2, 3, 4, 5, 8, 9]).is_empty());
    }
}
