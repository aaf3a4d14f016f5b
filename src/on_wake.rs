//! Polling a future only when it was woken: for the parts of a session that share its one
//! task (the bridge's two pumps and its timers, the proxy splice's two directions and its
//! timers), so a message that wakes the task through one socket polls only the part waiting
//! on that socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// A future polled only when its own waker fired (or on its first poll).
///
/// `join!`/`select!` poll every branch whenever the task wakes, which is for every message.
/// A branch with nothing new (the timers' sleep and drain token, the pump of the other
/// side) still re-registers its wakers, and the drain token takes a lock for it. Behind this
/// gate a branch is polled only when one of its own wakers fired.
pub(crate) struct OnWake<F> {
    inner: Pin<Box<F>>,
    gate: WakeGate,
}

/// The gate of [`OnWake`], for a future that polls parts of itself by hand (the proxy
/// splice's two directions): a waker for one part, and whether it fired since that part was
/// last polled.
pub(crate) struct WakeGate {
    gate: Arc<Gate>,
    waker: Waker,
    /// The task's waker as last handed to the gate: the gate's lock is taken only when the
    /// task's waker is another one (first poll, or the future moved to another task).
    seen: Option<Waker>,
}

struct Gate {
    woken: AtomicBool,
    /// The task's waker, woken in turn.
    task: Mutex<Option<Waker>>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap_or_else(|e| e.into_inner()) {
            task.wake_by_ref();
        }
    }
}

impl Default for WakeGate {
    /// A gate that lets the first poll through.
    fn default() -> Self {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        WakeGate {
            waker: Waker::from(gate.clone()),
            gate,
            seen: None,
        }
    }
}

impl WakeGate {
    /// Takes note of the task's waker (from `cx`) and says whether the part is to be polled
    /// now: its waker fired since the last time this said yes (or this is the first time).
    /// Poll it with [`WakeGate::waker`], not the task's.
    pub(crate) fn open(&mut self, cx: &Context<'_>) -> bool {
        if !self.seen.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *self.gate.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.clone());
            self.seen = Some(task);
        }
        // Looked at first with a plain load: most wakes of a session's task are for another
        // part, and a locked swap on every look costs more than the look. Cleared before the
        // part is polled: a wake during that poll makes the next count.
        self.gate.woken.load(Ordering::Acquire) && self.gate.woken.swap(false, Ordering::AcqRel)
    }

    /// Lets the next [`WakeGate::open`] through as if the part's waker had fired: for a part
    /// that returned before it had looked at everything it waits on.
    pub(crate) fn reopen(&self) {
        self.gate.woken.store(true, Ordering::Release);
    }

    /// The part's own waker.
    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }
}

impl<F: Future> OnWake<F> {
    pub(crate) fn new(inner: F) -> Self {
        OnWake {
            inner: Box::pin(inner),
            gate: WakeGate::default(),
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this.gate.open(cx) {
            return Poll::Pending;
        }
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(this.gate.waker()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls and keeps the last waker it was given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A waker that counts its wakes (the task's).
    struct Task(AtomicUsize);
    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_only_after_its_own_wake() {
        let (polls, waker) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(None)));
        let mut gated = Box::pin(OnWake::new(Probe {
            polls: polls.clone(),
            waker: waker.clone(),
        }));
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        // The first poll reaches it; the task waking for other reasons does not.
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Its own wake wakes the task and lets the next poll through, once.
        waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        for _ in 0..3 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    /// The task's waker is kept without a lock while it stays the same; when the future is
    /// polled by another task, that task's waker is the one its wakes go to.
    #[test]
    fn wakes_go_to_the_task_that_polled_last() {
        let (polls, waker) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(None)));
        let mut gated = Box::pin(OnWake::new(Probe {
            polls: polls.clone(),
            waker: waker.clone(),
        }));
        let (first, second) = (
            Arc::new(Task(AtomicUsize::new(0))),
            Arc::new(Task(AtomicUsize::new(0))),
        );
        let first_waker = Waker::from(first.clone());
        assert!(gated
            .as_mut()
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        let second_waker = Waker::from(second.clone());
        assert!(gated
            .as_mut()
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0, "the old task was woken");
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the new task was not woken"
        );
        assert!(gated
            .as_mut()
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
