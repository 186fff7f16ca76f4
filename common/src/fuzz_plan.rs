//! How the fuzz harnesses (in this crate's and the server's tests) choose
//! their random seeds, so every run can be repeated: CI runs a fixed list
//! of seeds; a longer local run (`BACKY_FUZZ_SECS`) starts from a random
//! seed it prints; `BACKY_FUZZ_SEED=N` repeats a run from seed N.

use std::time::Duration;

/// Rounds of the fixed seed list a run without `BACKY_FUZZ_SECS` does.
pub const FIXED_ROUNDS: u64 = 8;

/// One run's plan: seeds `first`, `first + 1`, ... one per round, for
/// `rounds` rounds, or until `budget` is spent when `rounds` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuzzPlan {
    pub first: u64,
    pub rounds: Option<u64>,
    pub budget: Duration,
}

impl FuzzPlan {
    /// The plan the environment asks for.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let secs = var("BACKY_FUZZ_SECS").and_then(|s| s.parse::<f64>().ok());
        let seed = var("BACKY_FUZZ_SEED").and_then(|s| s.parse::<u64>().ok());
        Self::new(secs, seed, random_seed)
    }

    fn new(secs: Option<f64>, seed: Option<u64>, random: impl FnOnce() -> u64) -> Self {
        match secs {
            None => FuzzPlan {
                first: seed.unwrap_or(0),
                rounds: Some(FIXED_ROUNDS),
                budget: Duration::ZERO,
            },
            Some(secs) => FuzzPlan {
                first: seed.unwrap_or_else(random),
                rounds: None,
                budget: Duration::from_secs_f64(secs.max(0.0)),
            },
        }
    }

    /// Whether round `round` (from 0) runs, `elapsed` into the run.
    pub fn runs(&self, round: u64, elapsed: Duration) -> bool {
        match self.rounds {
            Some(n) => round < n,
            None => round == 0 || elapsed < self.budget,
        }
    }

    /// The 32-byte RNG seed of round `round`.
    pub fn seed_bytes(&self, round: u64) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&self.first.wrapping_add(round).to_le_bytes());
        bytes
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_runs_a_fixed_list_and_local_runs_are_repeatable() {
        let ci = FuzzPlan::new(None, None, || unreachable!());
        assert_eq!((ci.first, ci.rounds), (0, Some(FIXED_ROUNDS)));
        assert!(
            ci.runs(FIXED_ROUNDS - 1, Duration::from_secs(999)) && !ci.runs(FIXED_ROUNDS, Duration::ZERO)
        );
        let local = FuzzPlan::new(Some(60.0), None, || 42);
        assert_eq!((local.first, local.rounds), (42, None));
        assert!(local.runs(5, Duration::from_secs(59)) && !local.runs(5, Duration::from_secs(61)));
        let again = FuzzPlan::new(Some(60.0), Some(42), || 7);
        assert_eq!(again.seed_bytes(3), local.seed_bytes(3));
        assert_ne!(local.seed_bytes(3), local.seed_bytes(4));
    }
}
