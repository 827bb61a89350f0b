//! When pre-copy rounds stop: shared by `migfs move --precopy`
//! (`agent::precopy`) and `migfs checkpoint --precopy`
//! (`crate::predump`). Pure: the caller measures, this decides.

/// Knobs of the round loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundPolicy {
    /// Rounds at most (the first copies everything).
    pub max_rounds: u32,
    /// Stop once at most this many bytes are dirty.
    pub small: u64,
    /// Stop when a round leaves at least this percentage of what the
    /// round before left: the writes outpace the copy.
    pub shrink_pct: u64,
}

impl Default for RoundPolicy {
    fn default() -> Self {
        RoundPolicy {
            max_rounds: 8,
            small: 2 << 20,
            shrink_pct: 90,
        }
    }
}

/// What the loop does after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Copy what is dirty once more.
    Again,
    /// Little is dirty: stop.
    Converged,
    /// The dirty set stopped shrinking: stop.
    Stalled,
    /// The round limit: stop.
    MaxRounds,
}

impl Verdict {
    /// A word for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Again => "again",
            Verdict::Converged => "converged",
            Verdict::Stalled => "stalled",
            Verdict::MaxRounds => "max rounds",
        }
    }
}

impl RoundPolicy {
    /// After round `round` (1-based) left `left` bytes dirty; `last` is
    /// what the round before left (`None` after the first round).
    pub fn decide(&self, round: u32, left: u64, last: Option<u64>) -> Verdict {
        if left <= self.small {
            return Verdict::Converged;
        }
        if round >= self.max_rounds {
            return Verdict::MaxRounds;
        }
        match last {
            Some(l) if u128::from(left) * 100 >= u128::from(l) * u128::from(self.shrink_pct) => {
                Verdict::Stalled
            }
            _ => Verdict::Again,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rounds_go_on_while_the_dirty_set_shrinks_and_stop_for_each_reason() {
        let p = RoundPolicy::default();
        // The first round has nothing to compare with.
        assert_eq!(p.decide(1, 900 * MIB, None), Verdict::Again);
        assert_eq!(p.decide(2, 100 * MIB, Some(900 * MIB)), Verdict::Again);
        // Shrinking by less than 10%: writes outpace the copy.
        assert_eq!(p.decide(3, 95 * MIB, Some(100 * MIB)), Verdict::Stalled);
        assert_eq!(p.decide(3, 120 * MIB, Some(100 * MIB)), Verdict::Stalled);
        assert_eq!(p.decide(3, 89 * MIB, Some(100 * MIB)), Verdict::Again);
        // Little left wins over everything else.
        assert_eq!(p.decide(1, 2 * MIB, None), Verdict::Converged);
        assert_eq!(p.decide(9, 0, Some(0)), Verdict::Converged);
        assert_eq!(p.decide(8, 50 * MIB, Some(100 * MIB)), Verdict::MaxRounds);
    }

    #[test]
    fn huge_sizes_do_not_overflow() {
        let p = RoundPolicy::default();
        assert_eq!(p.decide(2, u64::MAX, Some(u64::MAX)), Verdict::Stalled);
        assert_eq!(p.decide(2, u64::MAX / 2, Some(u64::MAX)), Verdict::Again);
    }
}
