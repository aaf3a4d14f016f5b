//! The process-wide budget for bytes held as whole messages (the built-in echo answers whole
//! messages), so many clients with large half-sent messages cannot make wsgate hold
//! `sessions × max_message_size`. A message that would go over the budget ends its session
//! with close 1013 (Try Again Later).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes that may be held as whole messages by all sessions together.
#[derive(Debug)]
pub(crate) struct MessageBudget {
    limit: u64,
    used: AtomicU64,
}

impl MessageBudget {
    pub(crate) fn new(limit: u64) -> Arc<MessageBudget> {
        Arc::new(MessageBudget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// An empty reservation that grows as a message does.
    pub(crate) fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes held now, by all sessions.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }
}

/// One session's share of the budget; given back when dropped or released.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<MessageBudget>,
    bytes: u64,
}

impl Reservation {
    /// Takes `bytes` more; false (and nothing taken) when the budget has no room.
    pub(crate) fn grow(&mut self, bytes: u64) -> bool {
        if self.budget.try_take(bytes) {
            self.bytes += bytes;
            true
        } else {
            false
        }
    }

    /// Gives everything held back (the message was answered).
    pub(crate) fn release(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_limit_and_give_back_on_drop() {
        let budget = MessageBudget::new(100);
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        assert!(a.grow(60));
        assert!(!b.grow(41), "over the limit");
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        a.release();
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
