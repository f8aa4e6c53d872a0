//! Request coalescing: concurrent calls from many tasks are gathered into one
//! request while earlier requests are in flight, so a busy producer sends a
//! few large requests instead of many small ones (one QUIC stream, one frame
//! and one broker write queue entry per request instead of per call). An idle
//! producer adds no delay: a lone call is sent at once.

use crate::ClientError;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Requests one coalescer keeps in flight; calls made meanwhile wait and
/// travel together in the next request.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 4;
/// Most calls gathered into one request.
pub const CALLS_PER_REQUEST_MAX: usize = 512;
/// Most payload bytes gathered into one request (a single larger call still
/// goes alone), well under the frame limit and the broker's default batch limit.
pub const BYTES_PER_REQUEST_MAX: usize = 4 * 1024 * 1024;

/// Whether a refusal of a coalesced request may be about one of its calls
/// only (then each call is sent alone so only the culprit fails).
pub(crate) fn split_on(e: &ClientError) -> bool {
    use msmq_protocol::ErrorCode;
    // INVALID_ARGUMENT too: one message may be scheduled too far ahead.
    matches!(
        e.code(),
        Some(ErrorCode::MESSAGE_TOO_LARGE)
            | Some(ErrorCode::BATCH_TOO_LARGE)
            | Some(ErrorCode::INVALID_ARGUMENT)
    ) || matches!(
        e,
        ClientError::Protocol(msmq_protocol::FrameError::TooLarge(_))
    )
}

type Slot<I, R> = (I, oneshot::Sender<Result<R, ClientError>>);

pub(crate) struct Coalescer<I, R> {
    tx: mpsc::UnboundedSender<Slot<I, R>>,
}

impl<I: Send + 'static, R: Send + 'static> Coalescer<I, R> {
    /// `send` turns a batch of calls into one request and returns one result
    /// per call, in order.
    /// `weight` is a call's size in bytes, for [`BYTES_PER_REQUEST_MAX`].
    pub(crate) fn new<F, Fut>(weight: fn(&I) -> usize, send: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R, ClientError>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Slot<I, R>>();
        let send = Arc::new(send);
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
            let mut carried: Option<Slot<I, R>> = None;
            loop {
                let first = match carried.take() {
                    Some(slot) => slot,
                    None => match rx.recv().await {
                        Some(slot) => slot,
                        None => break,
                    },
                };
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let mut bytes = weight(&first.0);
                let mut batch = vec![first];
                let mut held = None;
                while batch.len() < CALLS_PER_REQUEST_MAX && bytes < BYTES_PER_REQUEST_MAX {
                    match rx.try_recv() {
                        Ok(slot) if bytes + weight(&slot.0) > BYTES_PER_REQUEST_MAX => {
                            held = Some(slot);
                            break;
                        }
                        Ok(slot) => {
                            bytes += weight(&slot.0);
                            batch.push(slot);
                        }
                        Err(_) => break,
                    }
                }
                carried = held;
                let send = send.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
                    let count = replies.len();
                    let mut results = send(items).await.into_iter();
                    for reply in replies {
                        let result = results.next().unwrap_or_else(|| {
                            Err(ClientError::UnexpectedReply {
                                request: "coalesced request",
                                reply: format!("fewer results than the {count} calls"),
                            })
                        });
                        let _ = reply.send(result);
                    }
                });
            }
        });
        Coalescer { tx }
    }

    pub(crate) async fn call(&self, item: I) -> Result<R, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((item, reply))
            .map_err(|_| ClientError::Stream("the client is shutting down".into()))?;
        rx.await
            .map_err(|_| ClientError::Stream("the request was dropped".into()))?
    }
}
