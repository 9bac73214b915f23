//! Bounded admission for heavy work: at most `running` jobs at once and `queue` more
//! waiting; beyond that the caller is told "busy" at once (503 + Retry-After) instead
//! of queueing without bound. Memory on a 512 MB host is the reason: every admitted
//! job may hold a decoded image.
//!
//! [`Gate`] is the mechanism; [`ImageJobs`] (decode, composite, encode) and [`UploadSlot`]
//! (bodies being received) are the two gates the routes pass.

use std::sync::Arc;

use std::path::Path;

use rocket::fairing::AdHoc;
use rocket::fs::TempFile;
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome, Request};
use rocket::tokio::sync::{OwnedSemaphorePermit, Semaphore};
use rocket::tokio::task::spawn_blocking;

use crate::config::AppConfig;
use crate::storage;

/// The gate is full: come back in `retry_after` seconds.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the server is busy: try again in {retry_after} s")]
pub struct Busy {
    pub retry_after: u64,
}

pub struct Gate {
    admission: Arc<Semaphore>,
    running: Arc<Semaphore>,
    /// The two sizes, for [`Gate::occupancy`] (a semaphore does not say its own).
    places: usize,
    running_places: usize,
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
            places: running.max(1) + queue,
            running_places: running.max(1),
        }
    }

    /// Jobs holding a running place now, and jobs admitted without one (queued, or paused
    /// while they wait on another gate): the metrics' queue depths.
    pub fn occupancy(&self) -> (usize, usize) {
        let running = self.running_places.saturating_sub(self.running.available_permits());
        let admitted = self.places.saturating_sub(self.admission.available_permits());
        (running, admitted.saturating_sub(running))
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

    /// A running place if one is free right now, without queueing: for optional work
    /// that must never wait behind, nor delay, the requests that queue here.
    pub fn try_enter(&self) -> Option<Pass> {
        self.admit(0).ok()?.try_run().ok()
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

// The two gates of the routes: image jobs, and the bodies of uploads being received.

/// Seconds a client is told to wait when the image queue is full.
const IMAGE_RETRY_SECS: u64 = 2;

/// The gate for heavy image work (decode, composite, PNG encode): each admitted job
/// may hold a few decoded images, so their number is what bounds memory.
pub struct ImageJobs(Gate);

impl ImageJobs {
    /// The gate itself (tests fill it to check what a full queue does).
    pub fn gate(&self) -> &Gate {
        &self.0
    }

    pub(crate) fn admit(&self) -> Result<Admitted, Busy> {
        self.0.admit(IMAGE_RETRY_SECS).inspect_err(|_| crate::observe::gate_refused("image"))
    }

    pub(crate) async fn run(admitted: Admitted) -> Result<ImageJob, Busy> {
        admitted.run().await.map(ImageJob::new).ok_or(Busy { retry_after: IMAGE_RETRY_SECS })
    }

    /// Waits for a place for a job on `upload`, then lets the next upload in. While the
    /// job waits in the queue, the upload's file is flushed and dropped from the page
    /// cache, which the container's memory cgroup counts: 64 queued 4 MB uploads would
    /// otherwise all be charged to it (docs/performance.md §2 item 5).
    pub(crate) async fn enter_with(&self, upload: &TempFile<'_>, slot: UploadSlot) -> Result<ImageJob, Busy> {
        let busy = Busy { retry_after: IMAGE_RETRY_SECS };
        match self.admit()?.try_run() {
            Ok(pass) => Ok(ImageJob::new(pass)),
            Err(queued) => {
                if let Some(path) = upload.path().map(Path::to_path_buf) {
                    // Best effort: a failure only leaves the pages cached.
                    let _ = spawn_blocking(move || storage::uncache(&path)).await;
                }
                drop(slot);
                queued.run().await.map(ImageJob::new).ok_or(busy)
            }
        }
    }
}

/// A running image job: its [`Pass`], and the timer that gives its running time to the
/// metrics when the job ends or pauses.
pub struct ImageJob {
    pass: Pass,
    _timer: crate::observe::ImageJobTimer,
}

impl ImageJob {
    fn new(pass: Pass) -> Self {
        ImageJob { pass, _timer: crate::observe::ImageJobTimer::start() }
    }

    /// As [`Pass::pause`]; the stretch run so far is recorded.
    pub fn pause(self) -> Admitted {
        self.pass.pause()
    }
}

/// Uploads whose bodies are read at the same time. A request guard, so it is taken
/// before Rocket reads the body (data guards come last): the bodies of the others wait
/// in their sockets instead of the page cache.
const UPLOADS_AT_ONCE: usize = 4;

struct UploadGate(Gate);

/// A place to receive an upload's body (see `UPLOADS_AT_ONCE`).
pub struct UploadSlot(#[allow(dead_code)] Pass);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for UploadSlot {
    type Error = Busy;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Busy> {
        let Some(gate) = request.rocket().state::<UploadGate>() else {
            return Outcome::Error((Status::InternalServerError, Busy { retry_after: IMAGE_RETRY_SECS }));
        };
        match gate.0.enter(IMAGE_RETRY_SECS).await {
            Ok(pass) => Outcome::Success(UploadSlot(pass)),
            Err(busy) => {
                crate::observe::gate_refused("upload");
                // For the catcher: the 503 carries Retry-After like every other "busy".
                request.local_cache(|| Some(busy));
                Outcome::Error((Status::ServiceUnavailable, busy))
            }
        }
    }
}

/// The upload gate of `rocket` (for the metrics' queue depths).
pub fn uploads(rocket: &rocket::Rocket<rocket::Orbit>) -> Option<&Gate> {
    rocket.state::<UploadGate>().map(|gate| &gate.0)
}

/// Manages the image-job gate from `IMAGE_CONCURRENCY` / `IMAGE_QUEUE`.
pub fn stage() -> AdHoc {
    AdHoc::on_ignite("Image job gate", |rocket| async move {
        let Some((running, queue)) = rocket.state::<AppConfig>().map(|c| (c.image_concurrency, c.image_queue)) else {
            return rocket;
        };
        rocket.manage(ImageJobs(Gate::new(running, queue))).manage(UploadGate(Gate::new(UPLOADS_AT_ONCE, queue)))
    })
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
    async fn try_enter_takes_only_a_free_running_place_and_never_queues() {
        let gate = Gate::new(1, 4);
        let held = gate.try_enter().expect("the running place is free");
        assert!(gate.try_enter().is_none(), "the running place is taken");
        assert_eq!(gate.free_places(), 4, "a refused try_enter holds no queue place");
        let mut waiting = Box::pin(gate.admit(3).unwrap().run());
        // Polled once, the queued job waits in line for the running place.
        std::future::poll_fn(|cx| {
            assert!(std::future::Future::poll(waiting.as_mut(), cx).is_pending(), "the running place is taken");
            std::task::Poll::Ready(())
        })
        .await;
        drop(held);
        assert!(gate.try_enter().is_none(), "a freed place goes to the job waiting for it");
        let _running = waiting.await.expect("the queued job runs");
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
