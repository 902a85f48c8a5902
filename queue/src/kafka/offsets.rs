//! Which offsets of each assigned partition are settled.
//!
//! An offset is committed only when it and every offset before it in its
//! partition is settled. The committable position of a partition is its
//! lowest unsettled offset, or one past the highest seen. Tokens carry the
//! assignment they were handed out under: after a revocation, a late settle
//! of an old token moves nothing, since the partition's new owner replays it.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

/// A handed-out miss: where it is in Kafka, and which assignment of its
/// partition it belongs to (a token of an earlier assignment is stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissToken {
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

#[derive(Debug)]
struct PartitionState {
    generation: u64,
    /// Offsets handed out or waiting, not yet settled.
    unsettled: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// The last position committed (or sent to commit).
    committed: Option<i64>,
}

impl PartitionState {
    fn new(generation: u64) -> Self {
        Self { generation, unsettled: BTreeSet::new(), next: None, committed: None }
    }

    fn position(&self) -> Option<i64> {
        self.unsettled.first().copied().or(self.next)
    }
}

/// Which offsets of each assigned partition are settled, so only settled
/// prefixes are committed.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    inner: Mutex<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    partitions: HashMap<i32, PartitionState>,
    generations: u64,
}

impl OffsetTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerInner> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking `partitions` afresh (a new assignment).
    pub fn assign(&self, partitions: &[i32]) {
        let mut t = self.lock();
        for &p in partitions {
            t.generations += 1;
            let generation = t.generations;
            t.partitions.insert(p, PartitionState::new(generation));
        }
    }

    /// Stops tracking `partitions`; returns their settled positions to commit.
    pub fn revoke(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        let mut t = self.lock();
        partitions
            .iter()
            .filter_map(|p| t.partitions.remove(p).and_then(|s| s.position().map(|pos| (*p, pos))))
            .collect()
    }

    /// Records that `offset` was read and is not settled yet. `None` when
    /// the partition is not assigned to this member (a message fetched
    /// before a revocation and delivered after it): the message is not
    /// ours to process, and tracking it would let this member commit a
    /// position in a partition another member now owns.
    pub fn begin(&self, partition: i32, offset: i64) -> Option<MissToken> {
        let mut t = self.lock();
        let s = t.partitions.get_mut(&partition)?;
        s.unsettled.insert(offset);
        s.next = Some(s.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(MissToken { partition, offset, generation: s.generation })
    }

    /// Whether `token` belongs to the current assignment of its partition.
    pub fn is_current(&self, token: &MissToken) -> bool {
        self.lock().partitions.get(&token.partition).is_some_and(|s| s.generation == token.generation)
    }

    /// Marks `token` settled. Stale tokens are ignored: their partition was
    /// revoked, and its new owner replays them.
    pub fn settle(&self, token: &MissToken) {
        if let Some(s) = self.lock().partitions.get_mut(&token.partition)
            && s.generation == token.generation
        {
            s.unsettled.remove(&token.offset);
        }
    }

    /// Positions that moved since the last call, marked as committed.
    pub fn take_commits(&self) -> Vec<(i32, i64)> {
        let mut t = self.lock();
        let mut out = Vec::new();
        for (p, s) in t.partitions.iter_mut() {
            if let Some(pos) = s.position()
                && s.committed != Some(pos)
            {
                s.committed = Some(pos);
                out.push((*p, pos));
            }
        }
        out
    }

    /// Forgets that `positions` were committed (the commit failed).
    pub fn uncommit(&self, positions: &[(i32, i64)]) {
        let mut t = self.lock();
        for (p, pos) in positions {
            if let Some(s) = t.partitions.get_mut(p)
                && s.committed == Some(*pos)
            {
                s.committed = None;
            }
        }
    }

    /// Unsettled misses across all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock().partitions.values().map(|s| s.unsettled.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_settled_prefixes() {
        let t = OffsetTracker::default();
        t.assign(&[0, 1]);
        let a = t.begin(0, 10).expect("assigned");
        let b = t.begin(0, 11).expect("assigned");
        let c = t.begin(0, 12).expect("assigned");
        assert_eq!(t.take_commits(), vec![(0, 10)]);
        t.settle(&b);
        t.settle(&c);
        assert_eq!(t.take_commits(), vec![], "10 is still unsettled");
        t.settle(&a);
        assert_eq!(t.take_commits(), vec![(0, 13)]);
        assert_eq!(t.take_commits(), vec![], "nothing moved");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn stale_tokens_are_ignored_after_revocation() {
        let t = OffsetTracker::default();
        t.assign(&[3]);
        let old = t.begin(3, 5).expect("assigned");
        assert_eq!(t.revoke(&[3]), vec![(3, 5)]);
        t.assign(&[3]);
        let new = t.begin(3, 5).expect("assigned");
        assert!(!t.is_current(&old));
        t.settle(&old);
        assert_eq!(t.take_commits(), vec![(3, 5)], "the old settle does not count");
        t.settle(&new);
        assert_eq!(t.take_commits(), vec![(3, 6)]);
    }

    /// Defect 11.15: `begin()` on a partition this member does not own
    /// started tracking it, so the member committed a position in a
    /// partition another member owns.
    #[test]
    fn begin_on_an_untracked_partition_can_commit_another_members_offset() {
        let t = OffsetTracker::default();
        t.assign(&[0]);
        assert!(t.begin(7, 100).is_none(), "partition 7 is not ours");
        assert_eq!(t.take_commits(), vec![], "nothing of partition 7 is ever committed");
        assert_eq!(t.in_flight(), 0);
    }
}
