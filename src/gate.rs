//! Bounded admission for heavy work: at most `running` jobs at once and `queue` more
//! waiting; beyond that the caller is told "busy" at once (503 + Retry-After) instead
//! of queueing without bound. Memory on a 512 MB host is the reason: every admitted
//! job may hold a decoded image.

use std::sync::Arc;

use rocket::tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The gate is full: come back in `retry_after` seconds.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the server is busy: try again in {retry_after} s")]
pub struct Busy {
    pub retry_after: u64,
}

pub struct Gate {
    admission: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

/// Admitted (holding a queue place), not yet running.
pub struct Admitted {
    admission: OwnedSemaphorePermit,
    running: Arc<Semaphore>,
}

/// Running: dropping it frees both places.
pub struct Pass {
    admission: OwnedSemaphorePermit,
    _running: OwnedSemaphorePermit,
    running: Arc<Semaphore>,
}

impl Gate {
    pub fn new(running: usize, queue: usize) -> Self {
        Gate {
            admission: Arc::new(Semaphore::new(running.max(1) + queue)),
            running: Arc::new(Semaphore::new(running.max(1))),
        }
    }

    /// Takes a queue place, or says how long to wait.
    pub fn admit(&self, retry_after: u64) -> Result<Admitted, Busy> {
        let admission = self.admission.clone().try_acquire_owned().map_err(|_| Busy { retry_after })?;
        Ok(Admitted { admission, running: self.running.clone() })
    }

    /// Queue places free now (running or waiting), for `/health`-style figures and tests.
    pub fn free_places(&self) -> usize {
        self.admission.available_permits()
    }

    /// `admit` then wait for a running place.
    pub async fn enter(&self, retry_after: u64) -> Result<Pass, Busy> {
        self.admit(retry_after)?.run().await.ok_or(Busy { retry_after })
    }
}

impl Admitted {
    /// A running place if one is free now, else `self` back (to wait with `run`).
    pub fn try_run(self) -> Result<Pass, Admitted> {
        match self.running.clone().try_acquire_owned() {
            Ok(permit) => Ok(Pass { admission: self.admission, _running: permit, running: self.running }),
            Err(_) => Err(self),
        }
    }

    /// Waits for a running place (`None` only if the gate was closed).
    pub async fn run(self) -> Option<Pass> {
        let permit = self.running.clone().acquire_owned().await.ok()?;
        Some(Pass { admission: self.admission, _running: permit, running: self.running })
    }
}

impl Pass {
    /// Frees the running place but keeps the queue place: for a job that waits on
    /// something else (inference) and must then run again without being refused.
    pub fn pause(self) -> Admitted {
        Admitted { admission: self.admission, running: self.running }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rocket::async_test]
    async fn admits_running_plus_queue_then_refuses() {
        let gate = Gate::new(1, 1);
        let first = gate.enter(3).await.unwrap();
        let queued = gate.admit(3).unwrap();
        assert_eq!(gate.admit(3).err().map(|b| b.retry_after), Some(3));
        let queued = queued.try_run().err().expect("the running place is taken");
        drop(first);
        let _second = queued.run().await.unwrap();
        assert!(gate.admit(3).is_ok(), "a place is free again");
    }

    #[rocket::async_test]
    async fn a_paused_pass_keeps_its_queue_place_and_runs_again() {
        let gate = Gate::new(1, 0);
        let paused = gate.enter(3).await.unwrap().pause();
        assert!(gate.admit(3).is_err(), "the paused job still holds the only place");
        let other = gate.running.clone().try_acquire_owned();
        assert!(other.is_ok(), "its running place is free while paused");
        drop(other);
        let _again = paused.run().await.expect("runs again without being refused");
    }
}
