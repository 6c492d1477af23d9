//! Caps the warnings one device logs for what its guest (or a failing host
//! disk at the guest's request rate) does, so a guest cannot fill the host's
//! log: the first few go out as warnings, later ones at debug level.

use log::Level;

/// Warnings a device logs before it falls silent (debug only).
const WARNINGS: u32 = 16;

pub struct LogBudget {
    left: u32,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget { left: WARNINGS }
    }
}

impl LogBudget {
    /// The level for the next guest-triggered problem: `Warn` while the budget
    /// lasts, `Debug` after. Use as `log::log!(budget.level(), ...)`.
    pub fn level(&mut self) -> Level {
        if self.left == 0 {
            return Level::Debug;
        }
        self.left -= 1;
        if self.left == 0 {
            log::warn!("more such warnings from this device are logged at debug level only");
        }
        Level::Warn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_a_few_times_then_debug() {
        let mut budget = LogBudget::default();
        let levels: Vec<Level> = (0..WARNINGS + 3).map(|_| budget.level()).collect();
        assert!(levels[..WARNINGS as usize]
            .iter()
            .all(|l| *l == Level::Warn));
        assert!(levels[WARNINGS as usize..]
            .iter()
            .all(|l| *l == Level::Debug));
    }
}
