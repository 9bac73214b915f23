//! A value being made on another thread: the first `get` waits for it, later ones find it.
//!
//! A cold SAM model is ready to run its fused front (mbconv.rs: weights read straight from
//! the ONNX file) long before tract has planned the rest: planning the encoder's tail and
//! the decoder takes about as long as the front takes to run, and the tail runs much longer
//! still before the decoder is wanted (docs/performance.md §3 item 11). So the plans are
//! made in the background while the first image goes through the front, and the first mask
//! does not wait for them.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, OnceLock, PoisonError};

use tract_onnx::prelude::TractResult;

/// Why a deferred value is not there (the planning error, as text: it is kept and
/// returned to every later caller).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct NotMade(pub String);

pub struct Deferred<T> {
    value: OnceLock<Result<T, NotMade>>,
    pending: Mutex<Option<Receiver<TractResult<T>>>>,
}

/// The making side: [`Promise::fulfil`] once; dropping it unfulfilled is an error for the
/// waiting side, not a hang.
pub struct Promise<T>(SyncSender<TractResult<T>>);

/// A value to be made, and the promise to make it.
pub fn deferred<T>() -> (Promise<T>, Deferred<T>) {
    let (tx, rx) = mpsc::sync_channel(1);
    (Promise(tx), Deferred { value: OnceLock::new(), pending: Mutex::new(Some(rx)) })
}

impl<T> Promise<T> {
    pub fn fulfil(self, value: TractResult<T>) {
        // The deferred side may be gone already (the model was dropped): nothing to do.
        let _ = self.0.send(value);
    }
}

impl<T> Deferred<T> {
    /// A value that is already there.
    pub fn ready(value: T) -> Self {
        Deferred { value: OnceLock::from(Ok(value)), pending: Mutex::new(None) }
    }

    /// The value, waiting for it if it is still being made.
    pub fn get(&self) -> Result<&T, NotMade> {
        if self.value.get().is_none() {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if self.value.get().is_none() {
                let made = match pending.take() {
                    Some(rx) => match rx.recv() {
                        Ok(made) => made.map_err(|e| NotMade(format!("{e:#}"))),
                        Err(_) => Err(NotMade("it stopped before it was finished".into())),
                    },
                    None => Err(NotMade("it was never started".into())),
                };
                let _ = self.value.set(made);
            }
        }
        match self.value.get() {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(e.clone()),
            None => Err(NotMade("it was never started".into())),
        }
    }

    /// The error, if making the value has failed (does not wait).
    pub fn failed(&self) -> Option<&NotMade> {
        self.value.get().and_then(|v| v.as_ref().err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_hir::internal::format_err;

    #[test]
    fn waits_for_the_value_and_keeps_it() {
        let (promise, value) = deferred::<u32>();
        let maker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            promise.fulfil(Ok(7));
        });
        assert_eq!(value.get().ok(), Some(&7));
        assert_eq!(value.get().ok(), Some(&7));
        assert!(value.failed().is_none());
        maker.join().expect("maker thread");
        assert_eq!(Deferred::ready(3).get().ok(), Some(&3));
    }

    #[test]
    fn an_error_or_a_dropped_promise_is_reported_to_every_caller() {
        let (promise, value) = deferred::<u32>();
        promise.fulfil(Err(format_err!("unsupported op")));
        assert_eq!(value.get().err().map(|e| e.0), Some("unsupported op".to_string()));
        assert_eq!(value.failed().map(|e| e.0.clone()), Some("unsupported op".to_string()));
        let (promise, value) = deferred::<u32>();
        std::thread::spawn(move || drop(promise)).join().expect("thread");
        assert!(value.get().is_err(), "a dropped promise must not hang or succeed");
    }
}
