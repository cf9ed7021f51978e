//! The bridge between a Python processor and the Rust runtime.
//!
//! The Python `run()` coroutine runs on the asyncio loop of the main thread; the runtime (HTTP
//! endpoints, checkpoints, leases, publishing) runs on a tokio runtime beside it. One runtime
//! *step* is the stretch of user code from one `await ctx.…` to the next: each `ctx` call
//! sends a [`Request`] and parks the coroutine on an asyncio future; the step performs the
//! request and returns; the runtime may then checkpoint or freeze (a safe point: the user
//! code is parked, so the state is whole); the next step resolves the future and the
//! coroutine runs on to its next `ctx` call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dory_connect::Backends;
use dory_core::{Error, InputMessage, InstanceEnv};
use dory_runtime::{Context, Processor, Runtime, Settings, StepError, sigterm};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::{Notify, mpsc};

use crate::errors::{InvalidError, to_py};
use crate::state::{Live, PyState};

/// What the Python side asks of the runtime.
enum Request {
    Publish {
        payload: Vec<u8>,
        routing_key: Option<String>,
        reply: Py<PyAny>,
    },
    Checkpoint {
        reply: Py<PyAny>,
    },
    Next {
        reply: Py<PyAny>,
    },
    Sleep {
        until: tokio::time::Instant,
        reply: Py<PyAny>,
    },
    /// `run()` returned: no request follows.
    Finished,
}

/// What a request's future resolves to.
enum Answer {
    Nothing,
    Sequence(u64),
    Message(InputMessage),
}

/// What the two sides share.
struct Bridge {
    /// The asyncio loop running the processor, and `dory.context._resolve(future, value,
    /// error)`, called on it to settle a future from this side.
    event_loop: Py<PyAny>,
    resolve: Py<PyAny>,
    /// The last published sequence, for `ctx.sequence`.
    sequence: AtomicU64,
    /// `run()` returned: shut down.
    finished: Notify,
}

impl Bridge {
    /// Settles `future` on the asyncio loop (a future cancelled meanwhile is left alone).
    fn settle(&self, future: &Py<PyAny>, answer: Result<Answer, Error>) {
        Python::attach(|py| {
            let outcome = match answer {
                Ok(Answer::Nothing) => Ok(py.None()),
                Ok(Answer::Sequence(sequence)) => Ok(sequence
                    .into_pyobject(py)
                    .map_or_else(|never| match never {}, |s| s.into_any().unbind())),
                Ok(Answer::Message(message)) => message_tuple(py, message),
                Err(error) => Err(to_py(error)),
            };
            self.resolve(py, future, outcome);
        });
    }

    /// Settles `future` with `outcome`: a value, or an exception to raise.
    fn resolve(&self, py: Python<'_>, future: &Py<PyAny>, outcome: PyResult<Py<PyAny>>) {
        let (value, error) = match outcome {
            Ok(value) => (value, py.None()),
            Err(error) => (py.None(), error.into_value(py).into_any()),
        };
        let scheduled = self.event_loop.call_method1(
            py,
            "call_soon_threadsafe",
            (
                self.resolve.clone_ref(py),
                future.clone_ref(py),
                value,
                error,
            ),
        );
        if let Err(e) = scheduled {
            // The loop is closed: the process is ending and nobody waits for the answer.
            tracing::debug!(target: "dory::python", "cannot answer the processor: {e}");
        }
    }
}

/// `(payload, routing_key, redelivered, producer, sequence)`; Python wraps it in a `Message`.
fn message_tuple(py: Python<'_>, message: InputMessage) -> PyResult<Py<PyAny>> {
    let (producer, sequence) = match message.origin {
        Some(origin) => (Some(origin.producer), Some(origin.sequence)),
        None => (None, None),
    };
    let tuple = (
        PyBytes::new(py, &message.payload),
        message.routing_key,
        message.redelivered,
        producer,
        sequence,
    );
    Ok(tuple.into_pyobject(py)?.into_any().unbind())
}

/// How long a publish refused for a while (lease not renewed, broker away) waits before it
/// is tried again in the middle of a message, where no safe point may come between.
const MID_MESSAGE_RETRY: Duration = Duration::from_millis(250);

/// What performing a request came to.
enum Performed {
    /// Answered; `after_safe_point`: give the answer only after the safe point that follows
    /// (a checkpoint request, so that the checkpoint is taken before `run()` goes on).
    Answered { after_safe_point: bool },
    /// Not done yet (no message came, a safe point is wanted, the broker is away): kept
    /// pending and performed again after a safe point.
    Again(Option<StepError>),
}

/// The Rust processor that runs a Python one.
///
/// A safe point falls while `run()` is parked on a `ctx` call that has *not* been performed
/// yet: the snapshot holds the state as it is at that `await`, with the output sequence and
/// input position of everything performed before it, and a restored instance starts `run()`
/// again from the top with that state. Between taking an input message and asking for the
/// next one there is no safe point at all: that message's publishes are performed as they
/// come, so a snapshot never holds a message in the input position without all of its
/// effect on the state and the output.
struct PyProcessor {
    bridge: Arc<Bridge>,
    live: Arc<Live>,
    requests: mpsc::UnboundedReceiver<Request>,
    /// Resolved at the first step: the state is in place and `run()` may start.
    started: Option<Py<PyAny>>,
    /// The answer to the request performed last, not yet given.
    answer: Option<(Py<PyAny>, Result<Answer, Error>)>,
    /// The request `run()` is parked on, not performed yet.
    pending: Option<Request>,
    /// `run()` holds an input message and has not asked for the next one.
    in_message: bool,
    finished: bool,
}

#[async_trait]
impl Processor for PyProcessor {
    type State = PyState;

    async fn step(&mut self, state: &mut PyState, ctx: &mut Context) -> Result<(), StepError> {
        if !matches!(state, PyState::Live(_)) {
            if let PyState::Stored(bytes) = &*state {
                // A state that cannot be read or migrated is never run from: the step fails,
                // the runtime logs it and tries again, and nothing is published.
                // Decoding a large state takes a while under the GIL: the other tasks of this
                // worker (the resume's HTTP answer among them) move to another thread meanwhile.
                tokio::task::block_in_place(|| self.live.apply(bytes))
                    .map_err(|e| py_message(&e))?;
            }
            *state = PyState::Live(Arc::clone(&self.live));
        }
        self.bridge
            .sequence
            .store(ctx.sequence().0, Ordering::Relaxed);
        self.live.resumed();
        loop {
            if let Some(request) = self.pending.take() {
                match self.perform(request, ctx).await {
                    Performed::Again(None) => return Ok(()),
                    Performed::Again(Some(error)) => return Err(error),
                    Performed::Answered {
                        after_safe_point: true,
                    } => return Ok(()),
                    Performed::Answered {
                        after_safe_point: false,
                    } => {}
                }
            }
            if let Some(started) = self.started.take() {
                self.bridge.settle(&started, Ok(Answer::Nothing));
            } else if let Some((future, answer)) = self.answer.take() {
                self.bridge.settle(&future, answer);
            }
            if self.finished {
                ctx.safe_point_wanted().await;
                return Ok(());
            }
            // User code runs until it sends the next request: no safe point before that.
            let request = match self.requests.recv().await {
                Some(Request::Finished) | None => {
                    // `run()` is over (returned, or the Python side went away): the safe
                    // point after this step saves, and the instance stops.
                    self.finished = true;
                    self.bridge.finished.notify_one();
                    return Ok(());
                }
                Some(request) => request,
            };
            let next_message = matches!(request, Request::Next { .. });
            let mid_message = self.in_message && !next_message;
            if next_message {
                self.in_message = false;
            }
            self.pending = Some(request);
            if !mid_message {
                // The safe point before the request is performed.
                return Ok(());
            }
        }
    }
}

impl PyProcessor {
    async fn perform(&mut self, request: Request, ctx: &mut Context) -> Performed {
        let answered = Performed::Answered {
            after_safe_point: false,
        };
        match request {
            Request::Publish {
                payload,
                routing_key,
                reply,
            } => loop {
                match ctx.publish(routing_key.clone(), payload.clone()).await {
                    Ok(()) => {
                        let sequence = ctx.sequence().0;
                        self.bridge.sequence.store(sequence, Ordering::Relaxed);
                        self.answer = Some((reply, Ok(Answer::Sequence(sequence))));
                        return answered;
                    }
                    Err(e @ Error::Fenced(_)) => return Performed::Again(Some(Box::new(e))),
                    // Not published, and it must be, with the same sequence, while `run()`
                    // waits: in the middle of a message right here, else after a safe point.
                    Err(Error::Unavailable(why)) if self.in_message => {
                        tracing::warn!(target: "dory::python", "cannot publish yet, trying again: {why}");
                        tokio::time::sleep(MID_MESSAGE_RETRY).await;
                    }
                    Err(e @ Error::Unavailable(_)) => {
                        self.pending = Some(Request::Publish {
                            payload,
                            routing_key,
                            reply,
                        });
                        return Performed::Again(Some(Box::new(e)));
                    }
                    Err(e) => {
                        self.answer = Some((reply, Err(e)));
                        return answered;
                    }
                }
            },
            Request::Checkpoint { reply } => {
                if self.in_message {
                    ctx.checkpoint();
                    // Taken at the next safe point, when the message is done.
                    self.answer = Some((reply, Ok(Answer::Nothing)));
                    return answered;
                }
                match self.live.check() {
                    Ok(()) => {
                        ctx.checkpoint();
                        self.answer = Some((reply, Ok(Answer::Nothing)));
                        Performed::Answered {
                            after_safe_point: true,
                        }
                    }
                    Err(e) => {
                        Python::attach(|py| self.bridge.resolve(py, &reply, Err(e)));
                        answered
                    }
                }
            }
            Request::Next { reply } => match ctx.next_message().await {
                Ok(Some(message)) => {
                    self.in_message = true;
                    self.answer = Some((reply, Ok(Answer::Message(message))));
                    answered
                }
                // A safe point (or a checkpoint) is wanted first; `run()` goes on waiting.
                Ok(None) => {
                    self.pending = Some(Request::Next { reply });
                    Performed::Again(None)
                }
                Err(e @ Error::Invalid(_)) => {
                    self.answer = Some((reply, Err(e)));
                    answered
                }
                Err(e) => {
                    self.pending = Some(Request::Next { reply });
                    Performed::Again(Some(Box::new(e)))
                }
            },
            // Never kept pending: the step that receives it stops asking for requests.
            Request::Finished => answered,
            Request::Sleep { until, reply } => {
                if self.in_message {
                    tokio::time::sleep_until(until).await;
                    self.answer = Some((reply, Ok(Answer::Nothing)));
                    return answered;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {
                        self.answer = Some((reply, Ok(Answer::Nothing)));
                        answered
                    }
                    () = ctx.safe_point_wanted() => {
                        self.pending = Some(Request::Sleep { until, reply });
                        Performed::Again(None)
                    }
                }
            }
        }
    }
}

fn py_message(error: &PyErr) -> StepError {
    Python::attach(|py| error.value(py).to_string()).into()
}

/// The tokio runtime of the process: built on first use, shut down by [`Host::shutdown`].
static RUNTIME: Mutex<Option<tokio::runtime::Runtime>> = Mutex::new(None);

/// A handle to the process's tokio runtime, building it if need be.
fn tokio_runtime() -> PyResult<tokio::runtime::Handle> {
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(runtime) = slot.as_ref() {
        return Ok(runtime.handle().clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dory-runtime")
        .enable_all()
        .build()
        .map_err(|e| InvalidError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    let handle = runtime.handle().clone();
    *slot = Some(runtime);
    Ok(handle)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), once per process.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// A running instance of a Python processor, seen from Python.
///
/// Made by `dory.run` (through `Host.start`); processor authors use `dory.Context`.
#[pyclass(module = "dory._dory", frozen)]
pub(crate) struct Host {
    requests: mpsc::UnboundedSender<Request>,
    bridge: Arc<Bridge>,
    processor_id: String,
    epoch: u64,
    config: String,
}

#[pymethods]
impl Host {
    /// Reads the instance environment, then connects the backends and serves the endpoints
    /// in the background: `bound` resolves with the endpoint address, `started` when `run()`
    /// may start (the state is restored or loaded), `exited` with `(code, description)` when
    /// the instance has stopped (or with the error that kept it from starting).
    #[staticmethod]
    fn start(
        py: Python<'_>,
        processor: Py<PyAny>,
        event_loop: Py<PyAny>,
        resolve: Py<PyAny>,
        bound: Py<PyAny>,
        started: Py<PyAny>,
        exited: Py<PyAny>,
    ) -> PyResult<Host> {
        init_logging();
        let env = InstanceEnv::from_process_env().map_err(to_py)?;
        let runtime = tokio_runtime()?;
        let (requests, receiver) = mpsc::unbounded_channel();
        let bridge = Arc::new(Bridge {
            event_loop,
            resolve,
            sequence: AtomicU64::new(0),
            finished: Notify::new(),
        });
        let host = Host {
            requests,
            bridge: Arc::clone(&bridge),
            processor_id: env.processor.to_string(),
            epoch: env.epoch.0,
            config: env.config.to_string(),
        };
        let processor = PyProcessor {
            bridge: Arc::clone(&bridge),
            live: Live::new(processor),
            requests: receiver,
            started: Some(started),
            answer: None,
            pending: None,
            in_message: false,
            finished: false,
        };
        // Installed before anything else, so a SIGTERM while connecting is not lost.
        let shutdown = {
            let _entered = runtime.enter();
            sigterm().map_err(|e| InvalidError::new_err(e.to_string()))?
        };
        py.detach(|| {
            runtime.spawn(serve(env, processor, bridge, shutdown, bound, exited));
        });
        Ok(host)
    }

    /// Sends `payload` to the output; `future` resolves with its sequence.
    #[pyo3(signature = (payload, routing_key, future))]
    fn publish(
        &self,
        payload: Vec<u8>,
        routing_key: Option<String>,
        future: Py<PyAny>,
    ) -> PyResult<()> {
        self.send(Request::Publish {
            payload,
            routing_key,
            reply: future,
        })
    }

    /// Asks for a checkpoint; `future` resolves once it is taken (raising `StateError` when
    /// the state cannot be encoded).
    fn checkpoint(&self, future: Py<PyAny>) -> PyResult<()> {
        self.send(Request::Checkpoint { reply: future })
    }

    /// Asks for the next input message; `future` resolves with its parts.
    fn next_message(&self, future: Py<PyAny>) -> PyResult<()> {
        self.send(Request::Next { reply: future })
    }

    /// Sleeps `seconds` at a safe point: a freeze need not wait for it.
    fn sleep(&self, seconds: f64, future: Py<PyAny>) -> PyResult<()> {
        let duration = Duration::try_from_secs_f64(seconds)
            .map_err(|e| InvalidError::new_err(format!("cannot sleep {seconds} s: {e}")))?;
        let until = tokio::time::Instant::now() + duration;
        self.send(Request::Sleep {
            until,
            reply: future,
        })
    }

    /// `run()` is over: the instance saves and stops.
    fn finish(&self) {
        // Through the channel, so that the step waiting for `run()`'s next request ends; the
        // notification covers a step that is not waiting (a freeze in progress, say).
        let _ = self.requests.send(Request::Finished);
        self.bridge.finished.notify_one();
    }

    /// Stops the runtime's threads (waiting up to five seconds for them), so that none of
    /// them touches Python while the interpreter shuts down. Called by `dory.run` once the
    /// instance has exited; a later `Host.start` builds a new runtime.
    #[staticmethod]
    fn shutdown(py: Python<'_>) {
        let runtime = RUNTIME
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            py.detach(|| runtime.shutdown_timeout(Duration::from_secs(5)));
        }
    }

    /// The processor's id.
    #[getter]
    fn processor_id(&self) -> &str {
        &self.processor_id
    }

    /// This instance's epoch.
    #[getter]
    fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence of the last message published (0 before the first).
    #[getter]
    fn sequence(&self) -> u64 {
        self.bridge.sequence.load(Ordering::Relaxed)
    }

    /// `DORY_CONFIG` as JSON text (`null` when unset).
    #[getter]
    fn config_json(&self) -> &str {
        &self.config
    }
}

impl Host {
    fn send(&self, request: Request) -> PyResult<()> {
        self.requests.send(request).map_err(|_| {
            crate::errors::UnavailableError::new_err("the instance has stopped: no more requests")
        })
    }
}

/// Connects the backends, serves the instance and reports how it ended.
async fn serve(
    env: InstanceEnv,
    processor: PyProcessor,
    bridge: Arc<Bridge>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Py<PyAny>,
    exited: Py<PyAny>,
) {
    let result = async {
        let backends = Backends::connect(&env).await.map_err(Error::from)?;
        let publisher = backends.dyn_publisher();
        let input = backends.dyn_input();
        let store = backends.store.clone();
        let runtime = Runtime::bind(env, processor, store, publisher, input, Settings::default())
            .await
            .map_err(runtime_to_core)?;
        let address = runtime.local_addr().to_string();
        Python::attach(|py| {
            let address = address.into_pyobject(py).map(|a| a.into_any().unbind());
            bridge.resolve(py, &bound, address.map_err(PyErr::from));
        });
        let finished = Arc::clone(&bridge);
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                () = finished.finished.notified() => {}
            }
        };
        let exit = runtime.run_until(stop).await.map_err(runtime_to_core)?;
        // Unreleased input goes back to the queue now, not when the broker notices.
        if let Err(e) = backends.close().await {
            tracing::warn!(target: "dory::python", "cannot close the backends cleanly: {e}");
        }
        Ok::<_, Error>((exit.code(), exit.to_string()))
    }
    .await;
    Python::attach(|py| {
        let outcome = match result {
            Ok(ending) => ending.into_pyobject(py).map(|t| t.into_any().unbind()),
            Err(e) => Err(to_py(e)),
        };
        bridge.resolve(
            py,
            &bound,
            Err(crate::errors::DoryError::new_err("the instance stopped")),
        );
        bridge.resolve(py, &exited, outcome);
    });
}

fn runtime_to_core(error: dory_runtime::RuntimeError) -> Error {
    match error {
        dory_runtime::RuntimeError::Core(e) => e,
        other => Error::invalid(other.to_string()),
    }
}
