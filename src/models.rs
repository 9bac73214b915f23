//! One owner of the model: lazy loading through an ordered fallback chain, size and
//! memory guards, download of URL models, bounded admission and idle unload.
//!
//! Nothing is loaded at start. The first mask request starts one load (in its own task,
//! so a client that goes away does not cancel it); concurrent requests wait for that
//! same load. A failed load is remembered for `MODEL_RETRY_SECS` before it is retried.
//!
//! Speculation (`SPECULATIVE_EMBEDDING`): when a scene is uploaded and a Segment Anything
//! model is already loaded, [`ModelManager::speculate`] runs its encoder on the scene in the
//! background, so that the first box costs only the decoder. It never loads a model, takes
//! an inference place only when one is free at that moment (never queueing behind or ahead
//! of real requests), and does not start for a scene its session has already replaced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::{GrayImage, RgbImage};
use rocket::fairing::AdHoc;
use rocket::tokio::sync::Mutex as AsyncMutex;
use rocket::tokio::task::spawn_blocking;
use serde::Serialize;

use crate::config::AppConfig;
use crate::download::{self, DownloadRequest};
use crate::gate::Busy;
use crate::gate::Gate;
use crate::sysmem::{self, BudgetSource};
use drishya_segment::{
    BoxPrompt, BoxSegmenter, ModelFiles, ModelInfo, ModelKind, SegmentError, SegmentRequest, Segmenter,
};

const MIB: u64 = 1024 * 1024;

/// Why one model of the chain was not used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not found, not a family we serve, or not loadable: what the engine says.
    #[error("{location}: {source}")]
    Model { location: String, source: drishya_segment::LoadError },
    #[error(
        "{location}: {size_mb} MB is over the {max_mb} MB model limit; quantize the model, pick a \
         smaller one, or raise MAX_MODEL_MB if the host has the memory"
    )]
    TooLarge { location: String, size_mb: u64, max_mb: u64 },
    #[error(
        "{location}: needs about {need_mb} MB but only {available_mb} MB is left under {budget}; \
         pick a smaller model or give the process more memory"
    )]
    NotEnoughMemory { location: String, need_mb: u64, available_mb: u64, budget: BudgetSource },
    #[error("{location}: download failed: {source}")]
    Download { location: String, source: download::DownloadError },
    /// A remembered kind check (its message already names the location).
    #[error("{0}")]
    Remembered(String),
}

/// Why a mask request got no mask from the model manager.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("the segmentation service is busy: try again in {retry_after} s")]
    Busy { retry_after: u64 },
    #[error("no segmentation model is available: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Model(#[from] SegmentError),
}

impl From<Busy> for MaskError {
    fn from(busy: Busy) -> Self {
        MaskError::Busy { retry_after: busy.retry_after }
    }
}

/// The model settings, taken from [`AppConfig`].
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub locations: Vec<String>,
    pub checksums: Vec<Option<String>>,
    pub cache_dir: PathBuf,
    pub max_model_mb: u64,
    pub memory_budget_mb: Option<u64>,
    pub concurrency: usize,
    pub queue: usize,
    pub retry_after_failure: Duration,
    pub idle_unload: Option<Duration>,
    pub box_fallback: bool,
    pub download_timeout: Duration,
    /// Embeddings computed at upload (`SPECULATIVE_EMBEDDING`).
    pub speculative: bool,
}

impl ModelSettings {
    pub fn from_config(cfg: &AppConfig) -> Self {
        ModelSettings {
            locations: cfg.model_locations(),
            checksums: cfg.model_checksums(),
            cache_dir: cfg.model_cache_dir.clone(),
            max_model_mb: cfg.max_model_mb,
            memory_budget_mb: cfg.memory_budget_mb,
            concurrency: cfg.inference_concurrency,
            queue: cfg.inference_queue,
            retry_after_failure: Duration::from_secs(cfg.model_retry_secs),
            idle_unload: (cfg.model_idle_unload_secs > 0).then(|| Duration::from_secs(cfg.model_idle_unload_secs)),
            box_fallback: cfg.box_fallback,
            download_timeout: Duration::from_secs(cfg.download_timeout_secs),
            speculative: cfg.speculative_embedding,
        }
    }
}

/// Lifecycle of the model, for `/health` and the UI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadState {
    /// No model configured: the box is the mask.
    None,
    NotLoaded,
    Loading,
    Ready,
    Failed,
    Unloaded,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub location: String,
    pub reason: String,
}

/// What `/health` shows about models.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub state: LoadState,
    pub name: Option<String>,
    pub kind: Option<ModelKind>,
    pub file_size_mb: Option<f64>,
    /// True when masks are the box itself.
    pub fallback_to_box: bool,
    pub configured: Vec<String>,
    pub skipped: Vec<Skipped>,
    pub error: Option<String>,
    pub load_seconds: Option<f64>,
    pub loads: usize,
    pub idle_unload_secs: Option<u64>,
    /// Encoder runs of the loaded model so far (Segment Anything; 0 for other kinds).
    pub encoder_runs: Option<usize>,
    pub speculative: SpeculationCounts,
}

/// What became of the speculative encoder runs started at upload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpeculationCounts {
    pub enabled: bool,
    /// Embeddings computed before their first box.
    pub done: usize,
    /// Started, but the embedding was already there (the same scene uploaded again).
    pub already_cached: usize,
    /// Not started: no inference place was free (real requests come first).
    pub skipped_busy: usize,
    /// Not started: the session had uploaded another scene in the meantime.
    pub stale: usize,
    /// Started and failed (logged; the mask request computes the embedding itself).
    pub failed: usize,
}

/// Whether a mask could be served now, found without loading a model: what `/ready`
/// answers and what `/health`'s `status` follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub state: ReadyState,
    /// The model that would serve masks (redacted location or name).
    pub model: Option<String>,
    /// Why not, or why only the box.
    pub reason: Option<String>,
}

/// Who asks: `/health` (liveness, must stay cheap) or `/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Liveness,
    Readiness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyState {
    /// A model is loaded.
    Loaded,
    /// On disk, within the size and memory guards, of a kind we serve: loads at the
    /// first mask.
    Present,
    /// No model can serve, and masks are the drawn box (configured).
    BoxFallback,
    /// Being loaded (or downloaded) now.
    Loading,
    /// A URL model not downloaded yet: only a load attempt can tell.
    PendingDownload,
    /// No model can serve masks, and there is no box fallback.
    Unavailable,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        matches!(self.state, ReadyState::Loaded | ReadyState::Present | ReadyState::BoxFallback)
    }

    /// Cannot serve masks, as opposed to not having tried yet or loading.
    pub fn broken(&self) -> bool {
        self.state == ReadyState::Unavailable
    }

    fn new(state: ReadyState, model: Option<String>, reason: Option<String>) -> Self {
        Readiness { state, model, reason }
    }
}

/// The graph-kind check of one model file (or SAM folder), kept while the files'
/// sizes and modification times stay the same: reading a 28 MB protobuf for every
/// health probe would make `/health` anything but cheap.
struct KindCheck {
    fingerprint: Vec<(u64, Option<std::time::SystemTime>)>,
    verdict: Result<(), String>,
}

enum Slot {
    Empty,
    Ready(Arc<dyn Segmenter>),
    Failed { at: Instant, reason: String },
}

/// The single owner of the segmentation model.
pub struct ModelManager {
    settings: ModelSettings,
    slot: Arc<AsyncMutex<Slot>>,
    status: Arc<Mutex<ModelStatus>>,
    gate: Gate,
    last_used: Mutex<Instant>,
    loads: Arc<AtomicUsize>,
    kind_checks: Mutex<HashMap<PathBuf, KindCheck>>,
    /// The model in the slot when it is `Ready`, readable without the slot's async lock
    /// (held for the whole of a load): what speculation and the status look at.
    in_use: Arc<Mutex<Option<Arc<dyn Segmenter>>>>,
    scenes: Arc<LatestScenes>,
    speculation: Arc<Counters>,
}

/// Each session's newest uploaded scene, for as long as something may still speculate on
/// it: a speculative run whose scene is no longer its session's newest does not start.
/// An entry lives as long as its [`SceneTicket`], so the map holds only uploads in flight
/// and runs pending; [`LATEST_SCENES_MAX`] bounds it all the same.
#[derive(Default)]
struct LatestScenes {
    newest: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
}

/// Sessions tracked at once by [`LatestScenes`]; beyond it a new upload is not speculated on.
const LATEST_SCENES_MAX: usize = 1024;

/// One uploaded scene of one session, as [`LatestScenes`] knows it (see
/// [`ModelManager::scene_uploaded`]). Dropping it forgets the scene unless a newer one
/// has taken its place.
pub struct SceneTicket {
    owner: String,
    seq: u64,
    scenes: Option<Arc<LatestScenes>>,
}

impl SceneTicket {
    /// Whether this is still its session's newest scene.
    fn is_newest(&self) -> bool {
        let Some(scenes) = &self.scenes else {
            return false;
        };
        scenes.newest.lock().map(|m| m.get(&self.owner) == Some(&self.seq)).unwrap_or(false)
    }
}

impl Drop for SceneTicket {
    fn drop(&mut self) {
        let Some(scenes) = &self.scenes else {
            return;
        };
        if let Ok(mut newest) = scenes.newest.lock() {
            if newest.get(&self.owner) == Some(&self.seq) {
                newest.remove(&self.owner);
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    done: AtomicUsize,
    already_cached: AtomicUsize,
    skipped_busy: AtomicUsize,
    stale: AtomicUsize,
    failed: AtomicUsize,
}

/// What [`ModelManager::speculate`] did with a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speculated {
    /// `SPECULATIVE_EMBEDDING` is off.
    Off,
    /// No Segment Anything model is loaded (speculation never loads one).
    NotLoaded,
    /// No inference place was free right now.
    Busy,
    /// The session has uploaded another scene since.
    Stale,
    /// Not called from within the server's runtime: nothing to run it on.
    NoRuntime,
    /// Running in the background, holding an inference place.
    Started,
}

/// A mask and the model that made it.
pub struct MaskOutcome {
    pub mask: GrayImage,
    pub model: ModelInfo,
}

impl ModelManager {
    pub fn new(settings: ModelSettings) -> Self {
        let none = settings.locations.is_empty();
        let status = ModelStatus {
            state: if none { LoadState::None } else { LoadState::NotLoaded },
            name: none.then(|| "box".to_string()),
            kind: none.then_some(ModelKind::Box),
            file_size_mb: None,
            fallback_to_box: none,
            configured: settings.locations.iter().map(|l| redact(l)).collect(),
            skipped: Vec::new(),
            error: None,
            load_seconds: None,
            loads: 0,
            idle_unload_secs: settings.idle_unload.map(|d| d.as_secs()),
            encoder_runs: None,
            speculative: SpeculationCounts { enabled: settings.speculative, ..SpeculationCounts::default() },
        };
        let boxed: Option<Arc<dyn Segmenter>> = none.then(|| Arc::new(BoxSegmenter::default()) as Arc<dyn Segmenter>);
        let slot = boxed.clone().map_or(Slot::Empty, Slot::Ready);
        ModelManager {
            gate: Gate::new(settings.concurrency, settings.queue),
            settings,
            slot: Arc::new(AsyncMutex::new(slot)),
            status: Arc::new(Mutex::new(status)),
            last_used: Mutex::new(Instant::now()),
            loads: Arc::new(AtomicUsize::new(0)),
            kind_checks: Mutex::new(HashMap::new()),
            in_use: Arc::new(Mutex::new(boxed)),
            scenes: Arc::new(LatestScenes::default()),
            speculation: Arc::new(Counters::default()),
        }
    }

    /// Whether a mask could be served now. Loads nothing. A [`Probe::Readiness`] also
    /// reads the model files' graphs to check their kind (once per file version), and a
    /// chain that starts with a URL model not yet downloaded starts its load in the
    /// background (only a download can tell whether it serves; a readiness probe must
    /// not wait for the first user to find out). A [`Probe::Liveness`] stays cheap: file
    /// checks only, and the kind checks a readiness probe has already made.
    pub async fn readiness(self: &Arc<Self>, probe: Probe) -> Readiness {
        let status = self.status();
        match status.state {
            LoadState::None => {
                return Readiness::new(ReadyState::BoxFallback, None, Some("no model is configured".into()))
            }
            LoadState::Ready if status.fallback_to_box => {
                return Readiness::new(ReadyState::BoxFallback, None, Some(summarise(&status.skipped)));
            }
            LoadState::Ready => return Readiness::new(ReadyState::Loaded, status.name, None),
            LoadState::Loading => return Readiness::new(ReadyState::Loading, None, None),
            LoadState::Failed => return Readiness::new(ReadyState::Unavailable, None, status.error),
            LoadState::NotLoaded | LoadState::Unloaded => {}
        }
        let me = self.clone();
        let verdict = spawn_blocking(move || me.preflight(probe))
            .await
            .unwrap_or_else(|e| Readiness::new(ReadyState::Unavailable, None, Some(format!("check failed: {e}"))));
        if verdict.state == ReadyState::PendingDownload && probe == Probe::Readiness {
            let me = self.clone();
            rocket::tokio::spawn(async move {
                // The outcome lands in the status; a failure is logged by the loader.
                let _ = me.segmenter().await;
            });
            return Readiness::new(ReadyState::Loading, verdict.model, Some("downloading the model".into()));
        }
        verdict
    }

    /// The chain as the loader would walk it, without loading or downloading.
    fn preflight(&self, probe: Probe) -> Readiness {
        let settings = &self.settings;
        let mut skipped = Vec::new();
        for location in &settings.locations {
            let remote = is_url(location);
            let cached = settings.cache_dir.join(cache_name(location));
            if remote && !cached.is_file() {
                return Readiness::new(ReadyState::PendingDownload, Some(redact(location)), None);
            }
            let candidate = if remote {
                let bytes = std::fs::metadata(&cached).map(|m| m.len()).unwrap_or(0);
                // `downloaded: false`: a check must not delete what it finds too large.
                Ok(Candidate { location: redact(location), files: salient_file(cached, bytes), downloaded: false })
            } else {
                locate(settings, location, None)
            };
            let checked = candidate.and_then(|c| {
                check_size(settings, &c)?;
                check_memory(settings, &c)?;
                self.check_kind(&c, probe)?;
                Ok(c)
            });
            match checked {
                Ok(c) => return Readiness::new(ReadyState::Present, Some(c.files.info().name), None),
                Err(e) => skipped.push(Skipped { location: redact(location), reason: e.to_string() }),
            }
        }
        let reason = Some(summarise(&skipped));
        if settings.box_fallback {
            Readiness::new(ReadyState::BoxFallback, None, reason)
        } else {
            Readiness::new(ReadyState::Unavailable, None, reason)
        }
    }

    /// Reads the graph(s) of `candidate` once per version of its files and checks that
    /// they are a kind we serve; a liveness probe only uses a verdict already made.
    fn check_kind(&self, candidate: &Candidate, probe: Probe) -> Result<(), LoadError> {
        let path = &candidate.files.path;
        let fingerprint: Vec<_> = candidate
            .files
            .parts()
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| (m.len(), m.modified().ok())).unwrap_or((0, None)))
            .collect();
        let mut checks = self.kind_checks.lock().unwrap_or_else(|e| e.into_inner());
        let known = checks.get(path).filter(|c| c.fingerprint == fingerprint).map(|c| c.verdict.clone());
        let verdict = match (known, probe) {
            (Some(verdict), _) => verdict,
            (None, Probe::Liveness) => Ok(()),
            (None, Probe::Readiness) => {
                let verdict = candidate.files.check_kind().map_err(|e| candidate.error(e).to_string());
                // The parsed graph held as much as the file's size: hand it back, or
                // an idle server keeps it resident (docs/performance.md §6a).
                drishya_alloc::release_free_memory();
                checks.insert(path.clone(), KindCheck { fingerprint, verdict: verdict.clone() });
                verdict
            }
        };
        verdict.map_err(LoadError::Remembered)
    }

    pub fn status(&self) -> ModelStatus {
        let mut status = self.status.lock().map(|s| s.clone()).unwrap_or_else(|e| e.into_inner().clone());
        status.loads = self.loads.load(Ordering::Relaxed);
        status.encoder_runs = self.encoder_runs();
        let c = &self.speculation;
        status.speculative = SpeculationCounts {
            enabled: self.settings.speculative,
            done: c.done.load(Ordering::Relaxed),
            already_cached: c.already_cached.load(Ordering::Relaxed),
            skipped_busy: c.skipped_busy.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        };
        status
    }

    /// The loaded model, if any; never loads one.
    fn loaded(&self) -> Option<Arc<dyn Segmenter>> {
        self.in_use.lock().ok()?.clone()
    }

    /// Encoder runs of the loaded model so far (`None` when none is loaded).
    pub fn encoder_runs(&self) -> Option<usize> {
        self.loaded().map(|s| s.encoder_runs())
    }

    /// Whether an upload now would be speculated on: the switch is on and a Segment
    /// Anything model is loaded (cheap; lets the upload skip hashing its scene otherwise).
    pub fn speculates(&self) -> bool {
        self.settings.speculative && self.loaded().is_some_and(|s| s.info().kind == ModelKind::Sam)
    }

    /// Records that `owner` (a session) has just stored a new scene: from now on, its
    /// older scenes are not speculated on. Call it once the scene is stored.
    pub fn scene_uploaded(&self, owner: &str) -> SceneTicket {
        let seq = self.scenes.next.fetch_add(1, Ordering::Relaxed);
        let tracked = self.settings.speculative
            && self.scenes.newest.lock().is_ok_and(|mut newest| {
                let room = newest.len() < LATEST_SCENES_MAX || newest.contains_key(owner);
                if room {
                    newest.insert(owner.to_string(), seq);
                }
                room
            });
        SceneTicket { owner: owner.to_string(), seq, scenes: tracked.then(|| self.scenes.clone()) }
    }

    /// Computes, in the background, the embedding of `image` (key `image_key`, as the mask
    /// request will compute it) with the loaded Segment Anything model, if that is worth
    /// doing now: the switch is on, such a model is loaded (never loads one), an inference
    /// place is free right now (never queues) and `scene` is still its session's newest
    /// scene (checked again just before the encoder starts). The place is held while the
    /// encoder runs, so a mask request waits for at most one such run. Failures are
    /// logged, never reported to anyone. Returns at once.
    pub fn speculate(self: &Arc<Self>, scene: SceneTicket, image: RgbImage, image_key: String) -> Speculated {
        if !self.settings.speculative {
            return Speculated::Off;
        }
        let Some(segmenter) = self.loaded().filter(|s| s.info().kind == ModelKind::Sam) else {
            return Speculated::NotLoaded;
        };
        if !scene.is_newest() {
            self.speculation.stale.fetch_add(1, Ordering::Relaxed);
            log::debug!("speculative embedding not started: the session has a newer scene");
            return Speculated::Stale;
        }
        let Ok(runtime) = rocket::tokio::runtime::Handle::try_current() else {
            return Speculated::NoRuntime;
        };
        let Some(pass) = self.gate.try_enter() else {
            self.speculation.skipped_busy.fetch_add(1, Ordering::Relaxed);
            log::debug!("speculative embedding skipped: no inference place is free");
            return Speculated::Busy;
        };
        let counters = self.speculation.clone();
        let work = runtime.spawn_blocking(move || {
            let _pass = pass;
            if !scene.is_newest() {
                return Ok(None);
            }
            let prepared = segmenter.prepare(&image, &image_key);
            drop(image);
            // After an encoder run, as after a mask; a cache hit freed nothing worth a trim.
            if !matches!(prepared, Ok(false)) {
                drishya_alloc::release_free_memory();
            }
            prepared.map(Some)
        });
        runtime.spawn(async move {
            let (counter, outcome) = match work.await {
                Ok(Ok(Some(true))) => (&counters.done, None),
                Ok(Ok(Some(false))) => (&counters.already_cached, None),
                Ok(Ok(None)) => (&counters.stale, None),
                Ok(Err(e)) => (&counters.failed, Some(format!("{e} ({e:?})"))),
                Err(e) => (&counters.failed, Some(format!("task failed: {e}"))),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            match outcome {
                Some(why) => log::warn!("speculative embedding failed (the mask will compute it): {why}"),
                None => log::debug!("speculative embedding finished"),
            }
        });
        Speculated::Started
    }

    /// The inference gate itself (tests hold its place to see what a busy server does).
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Number of model loads started so far.
    pub fn load_count(&self) -> usize {
        self.loads.load(Ordering::Relaxed)
    }

    /// Segments `prompt` on `image`: admission (503 when the queue is full), the model
    /// (loaded on first use), then one of `concurrency` inference slots.
    pub async fn segment(
        &self,
        image: Arc<RgbImage>,
        image_key: String,
        prompt: BoxPrompt,
    ) -> Result<MaskOutcome, MaskError> {
        let admitted = self.gate.admit(self.retry_hint()).inspect_err(|_| crate::observe::gate_refused("inference"))?;
        let segmenter = self.segmenter().await?;
        let _running =
            admitted.run().await.ok_or_else(|| MaskError::Unavailable("the service is shutting down".into()))?;
        let model = segmenter.info().clone();
        let started = Instant::now();
        let mask = spawn_blocking(move || {
            let mask = segmenter.segment(&SegmentRequest { image: &image, image_key: &image_key, prompt });
            drishya_alloc::release_free_memory();
            mask
        })
        .await
        .map_err(|e| SegmentError::Inference(format!("inference task failed: {e}")))??;
        crate::observe::inference_ran(model.kind, started.elapsed());
        if let Ok(mut last) = self.last_used.lock() {
            *last = Instant::now();
        }
        Ok(MaskOutcome { mask, model })
    }

    /// Seconds a client should wait when the queue is full: roughly one queue's worth.
    fn retry_hint(&self) -> u64 {
        let per_run = if self.status().kind == Some(ModelKind::Sam) { 4 } else { 2 };
        (per_run * (self.settings.queue as u64 + 1) / self.settings.concurrency as u64).clamp(1, 60)
    }

    /// The loaded model, loading it (once) when needed.
    async fn segmenter(&self) -> Result<Arc<dyn Segmenter>, MaskError> {
        let mut slot = self.slot.clone().lock_owned().await;
        match &*slot {
            Slot::Ready(segmenter) => return Ok(segmenter.clone()),
            Slot::Failed { at, reason } if at.elapsed() < self.settings.retry_after_failure => {
                return Err(MaskError::Unavailable(reason.clone()));
            }
            _ => {}
        }
        let settings = self.settings.clone();
        let status = self.status.clone();
        let loads = self.loads.clone();
        let in_use = self.in_use.clone();
        // The load runs in its own task holding the slot: if this request goes away,
        // the load still finishes and the waiting requests get its result.
        let task = rocket::tokio::spawn(async move {
            loads.fetch_add(1, Ordering::Relaxed);
            set_state(&status, LoadState::Loading, None);
            let started = Instant::now();
            let chain = spawn_blocking(move || {
                let chain = load_chain(&settings);
                drishya_alloc::release_free_memory();
                chain
            })
            .await;
            let result = match chain {
                Ok(result) => result,
                Err(e) => ChainResult {
                    loaded: None,
                    skipped: vec![Skipped {
                        location: "model loader".into(),
                        reason: format!("loader task failed: {e}"),
                    }],
                    fallback_to_box: false,
                },
            };
            let outcome = settle(&mut slot, result, &status, started);
            if let Ok(mut in_use) = in_use.lock() {
                *in_use = outcome.as_ref().ok().cloned();
            }
            drop(slot);
            outcome
        });
        task.await.map_err(|e| MaskError::Unavailable(format!("model loader failed: {e}")))?
    }

    /// Drops the model if it has been idle for longer than `MODEL_IDLE_UNLOAD_SECS`.
    pub async fn unload_if_idle(&self) -> bool {
        let Some(idle) = self.settings.idle_unload else {
            return false;
        };
        let quiet = self.last_used.lock().map(|t| t.elapsed() >= idle).unwrap_or(false);
        if !quiet || self.settings.locations.is_empty() {
            return false;
        }
        let Ok(mut slot) = self.slot.try_lock() else {
            return false;
        };
        if !matches!(&*slot, Slot::Ready(_)) {
            return false;
        }
        *slot = Slot::Empty;
        if let Ok(mut in_use) = self.in_use.lock() {
            *in_use = None;
        }
        set_state(&self.status, LoadState::Unloaded, None);
        log::info!("model unloaded after {} s idle", idle.as_secs());
        true
    }
}

fn set_state(status: &Mutex<ModelStatus>, state: LoadState, error: Option<String>) {
    if let Ok(mut s) = status.lock() {
        s.state = state;
        s.error = error;
    }
}

/// Puts the chain's result into the slot and the status; returns what the waiting
/// request gets.
fn settle(
    slot: &mut Slot,
    result: ChainResult,
    status: &Mutex<ModelStatus>,
    started: Instant,
) -> Result<Arc<dyn Segmenter>, MaskError> {
    let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
    crate::observe::model_load_settled(result.loaded.is_some(), result.fallback_to_box);
    s.skipped = result.skipped.clone();
    match result.loaded {
        Some(segmenter) => {
            let info = segmenter.info();
            s.state = LoadState::Ready;
            s.error = None;
            s.name = Some(info.name.clone());
            s.kind = Some(info.kind);
            s.file_size_mb = Some(round2(info.file_size_bytes as f64 / MIB as f64));
            s.fallback_to_box = result.fallback_to_box;
            s.load_seconds = Some(round2(started.elapsed().as_secs_f64()));
            log::info!("model ready: {} ({:?}) in {:.2} s", info.name, info.kind, started.elapsed().as_secs_f64());
            *slot = Slot::Ready(segmenter.clone());
            Ok(segmenter)
        }
        None => {
            let reason = summarise(&result.skipped);
            s.state = LoadState::Failed;
            s.error = Some(reason.clone());
            log::error!("no segmentation model could be loaded: {reason}");
            *slot = Slot::Failed { at: Instant::now(), reason: reason.clone() };
            Err(MaskError::Unavailable(reason))
        }
    }
}

fn summarise(skipped: &[Skipped]) -> String {
    if skipped.is_empty() {
        return "no model is configured".into();
    }
    skipped.iter().map(|s| s.reason.clone()).collect::<Vec<_>>().join("; ")
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

struct ChainResult {
    loaded: Option<Arc<dyn Segmenter>>,
    skipped: Vec<Skipped>,
    fallback_to_box: bool,
}

/// Tries each configured model in order; the first that loads wins.
fn load_chain(settings: &ModelSettings) -> ChainResult {
    let mut skipped = Vec::new();
    for (i, location) in settings.locations.iter().enumerate() {
        let checksum = settings.checksums.get(i).cloned().flatten();
        match load_one(settings, location, checksum.as_deref()) {
            Ok(segmenter) => return ChainResult { loaded: Some(segmenter), skipped, fallback_to_box: false },
            Err(e) => {
                log::warn!("model skipped: {e}");
                skipped.push(Skipped { location: redact(location), reason: e.to_string() });
            }
        }
    }
    let fallback = settings.box_fallback.then(|| Arc::new(BoxSegmenter::default()) as Arc<dyn Segmenter>);
    ChainResult { fallback_to_box: fallback.is_some(), loaded: fallback, skipped }
}

/// A model on disk, before loading.
struct Candidate {
    /// As shown to operators (URLs redacted).
    location: String,
    files: ModelFiles,
    downloaded: bool,
}

impl Candidate {
    fn error(&self, source: drishya_segment::LoadError) -> LoadError {
        LoadError::Model { location: self.location.clone(), source }
    }
}

/// A downloaded model: always one `.onnx` file.
fn salient_file(path: PathBuf, bytes: u64) -> ModelFiles {
    ModelFiles { path, kind: ModelKind::Salient, bytes }
}

fn load_one(settings: &ModelSettings, location: &str, checksum: Option<&str>) -> Result<Arc<dyn Segmenter>, LoadError> {
    let candidate = locate(settings, location, checksum)?;
    check_size(settings, &candidate)?;
    check_memory(settings, &candidate)?;
    candidate.files.load().map_err(|e| candidate.error(e))
}

/// A model location that is downloaded rather than read from disk.
fn is_url(location: &str) -> bool {
    location.starts_with("http://") || location.starts_with("https://")
}

/// Finds the model on disk, downloading URL models into the cache first.
fn locate(settings: &ModelSettings, location: &str, checksum: Option<&str>) -> Result<Candidate, LoadError> {
    if is_url(location) {
        return fetch(settings, location, checksum);
    }
    let files = drishya_segment::inspect(Path::new(location))
        .map_err(|source| LoadError::Model { location: location.to_string(), source })?;
    Ok(Candidate { location: location.to_string(), files, downloaded: false })
}

fn fetch(settings: &ModelSettings, url: &str, checksum: Option<&str>) -> Result<Candidate, LoadError> {
    let dest = settings.cache_dir.join(cache_name(url));
    let location = redact(url);
    if !dest.is_file() {
        log::info!("downloading model {location} into {}", settings.cache_dir.display());
        download::download(&DownloadRequest {
            url,
            dest: &dest,
            sha256: checksum,
            max_bytes: settings.max_model_mb * MIB,
            connect_timeout: Duration::from_secs(20),
            read_timeout: settings.download_timeout,
        })
        .map_err(|source| LoadError::Download { location: location.clone(), source })?;
    }
    let bytes = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    Ok(Candidate { location, files: salient_file(dest, bytes), downloaded: true })
}

/// A cache file name derived from the URL (never from its query), unique per URL.
fn cache_name(url: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(url.as_bytes());
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let stem: String = url
        .split(['?', '#'])
        .next()
        .and_then(|u| u.rsplit('/').next())
        .unwrap_or("model")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(60)
        .collect();
    let stem = stem.trim_end_matches(".onnx");
    format!("{}-{short}.onnx", if stem.is_empty() { "model" } else { stem })
}

fn check_size(settings: &ModelSettings, candidate: &Candidate) -> Result<(), LoadError> {
    let bytes = candidate.files.bytes;
    if bytes <= settings.max_model_mb * MIB {
        return Ok(());
    }
    if candidate.downloaded {
        let _ = std::fs::remove_file(&candidate.files.path);
    }
    Err(LoadError::TooLarge {
        location: candidate.location.clone(),
        size_mb: bytes.div_ceil(MIB),
        max_mb: settings.max_model_mb,
    })
}

/// Estimated MiB a model adds to the process: its weights (parsed, then optimised:
/// about twice the file while loading) plus its live activations at peak.
/// Activation figures were measured on U²-Net-p (320x320) and MobileSAM (1024x1024).
pub fn estimate_need_mb(sam: bool, file_bytes: u64) -> u64 {
    let weights = file_bytes.div_ceil(MIB);
    let activations = if sam { 230 } else { 150 };
    weights * 2 + activations
}

fn check_memory(settings: &ModelSettings, candidate: &Candidate) -> Result<(), LoadError> {
    let need_mb = estimate_need_mb(candidate.files.kind == ModelKind::Sam, candidate.files.bytes);
    let (available_mb, source) = sysmem::headroom_mb(settings.memory_budget_mb);
    if need_mb <= available_mb {
        return Ok(());
    }
    Err(LoadError::NotEnoughMemory { location: candidate.location.clone(), need_mb, available_mb, budget: source })
}

/// A location safe to show: URLs lose their userinfo and query (they may hold tokens).
pub fn redact(location: &str) -> String {
    if location.contains("://") {
        download::redact_url(location)
    } else {
        location.to_string()
    }
}

/// Manages the [`ModelManager`]; runs the idle-unload check when configured.
pub fn stage() -> AdHoc {
    AdHoc::on_ignite("Model manager", |rocket| async move {
        let Some(cfg) = rocket.state::<AppConfig>() else {
            return rocket;
        };
        let manager = Arc::new(ModelManager::new(ModelSettings::from_config(cfg)));
        rocket.manage(manager).attach(AdHoc::on_liftoff("Model idle unload", |rocket| {
            Box::pin(async move {
                let Some(manager) = rocket.state::<Arc<ModelManager>>().cloned() else {
                    return;
                };
                if let Some(idle) = manager.settings.idle_unload {
                    let period = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    rocket::tokio::spawn(async move {
                        let mut tick = rocket::tokio::time::interval(period);
                        loop {
                            tick.tick().await;
                            manager.unload_if_idle().await;
                        }
                    });
                }
            })
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_secrets() {
        let shown = redact("https://user:tok@host/a/m.onnx?sig=abc");
        assert!(!shown.contains("tok") && !shown.contains("abc") && shown.contains("host/a/m.onnx"), "{shown}");
        assert_eq!(redact("/models/u2netp.onnx"), "/models/u2netp.onnx");
    }

    #[test]
    fn cache_names_are_safe_and_distinct() {
        let a = cache_name("https://h/x/u2netp.onnx?token=1");
        let b = cache_name("https://h/y/u2netp.onnx");
        assert!(a.starts_with("u2netp-") && a.ends_with(".onnx"));
        assert_ne!(a, b);
        assert!(!cache_name("https://h/../../etc/passwd").contains('/'));
    }
}
