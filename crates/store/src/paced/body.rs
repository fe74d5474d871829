//! A paced request body: how a chunk put to a remote backend is paced (see the parent
//! module).
//!
//! [`paced`] runs a put with a [`Pace`] in its task (a `tokio` task-local).
//! `crate::http` looks for it when object_store hands it a PUT with a body, and then
//! sends a [`PacedBody`] instead of the plain one: the connection polls that body for
//! bytes, and each poll that finds no admitted bytes left asks for the next grant and
//! waits for it. The asks travel through a channel to the task running [`paced`],
//! which calls the [`Pacer`] there: the connection is polled on a runtime worker, which
//! must never block, while the task awaiting the put is the caller's, which may (see
//! [`crate::Store::put_chunk_paced`]).
//!
//! Each part is counted into the store's counters as the connection takes it. How long
//! a body waited for grants is kept in [`Waits`], so that `crate::http` can leave that
//! time out of the request timeout: at 512 Kbps with four workers sharing the limit, a
//! 4 MiB chunk's request lasts four minutes, nearly all of it spent waiting its turn.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{select, Either};
use http_body::{Body, Frame, SizeHint};
use object_store::client::HttpRequestBody;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Pacer;
use crate::stats::Counters;

/// A body's request for its next part: `remaining` bytes are not sent yet.
struct Ask {
    remaining: u64,
    reply: oneshot::Sender<u64>,
}

/// What the task of a paced put carries: where its bodies ask for grants, and the
/// counters their parts are added to.
#[derive(Clone)]
pub(crate) struct Pace {
    asks: mpsc::UnboundedSender<Ask>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Pace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pace")
    }
}

tokio::task_local! {
    static PACE: Pace;
}

/// The pace of the current task's paced put, if it is running one.
pub(crate) fn current() -> Option<Pace> {
    PACE.try_with(Pace::clone).ok()
}

/// Run `put` with the bodies of its PUT requests paced by `pacer` and counted into
/// `counters`. `pacer` is called here, on the task awaiting this future, never on the
/// connection's.
pub(crate) async fn paced<T>(pacer: &dyn Pacer, counters: Arc<Counters>, put: impl Future<Output = T>) -> T {
    let (asks, mut asked) = mpsc::unbounded_channel::<Ask>();
    let put = pin!(PACE.scope(Pace { asks, counters }, put));
    let serve = pin!(async move {
        // Ends only when every body and the task-local are gone, which happens after
        // `put` has finished and this future is dropped with it.
        while let Some(ask) = asked.recv().await {
            // A body dropped meanwhile no longer listens; nothing to do then.
            let _ = ask.reply.send(super::grant(pacer, ask.remaining));
            // At most one grant per poll, as on the local path (where each part is a
            // file write awaited in between): whoever polls this future sees each
            // grant's effect before the next, and can stop it there.
            tokio::task::yield_now().await;
        }
        std::future::pending::<Infallible>().await
    });
    match select(put, serve).await {
        Either::Left((out, _)) => out,
        Either::Right((never, _)) => match never {},
    }
}

/// The body's paced put went away (cancelled) while the body was still being sent.
#[derive(Debug)]
pub(crate) struct Abandoned;

impl fmt::Display for Abandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the paced upload this request body belongs to was cancelled")
    }
}

impl std::error::Error for Abandoned {}

/// How long a body has waited for grants; shared with the request's timeout.
#[derive(Debug, Default)]
pub(crate) struct Waits(Mutex<WaitState>);

#[derive(Debug, Default)]
struct WaitState {
    /// Finished waits, added up.
    total: Duration,
    /// Start of the wait in progress.
    since: Option<Instant>,
}

impl Waits {
    fn state(&self) -> std::sync::MutexGuard<'_, WaitState> {
        // The state is two plain values, consistent after any panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self) {
        let mut s = self.state();
        s.since.get_or_insert_with(Instant::now);
    }

    fn end(&self) {
        let mut s = self.state();
        if let Some(since) = s.since.take() {
            s.total += since.elapsed();
        }
    }

    /// Time spent waiting for grants by `now`, the wait in progress included.
    pub(crate) fn waited(&self, now: Instant) -> Duration {
        let s = self.state();
        s.total + s.since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// A request body sent as the pacer admits it. Its length is the wrapped body's, so
/// the `Content-Length` object_store set (and signed, on S3) stays true.
pub(crate) struct PacedBody {
    inner: HttpRequestBody,
    /// The part of the wrapped body's current frame not sent yet.
    frame: Bytes,
    /// Bytes not sent yet.
    left: u64,
    /// Bytes admitted and not sent yet.
    admitted: u64,
    /// The ask in flight.
    reply: Option<oneshot::Receiver<u64>>,
    pace: Pace,
    waits: Arc<Waits>,
}

impl PacedBody {
    pub(crate) fn new(inner: HttpRequestBody, pace: Pace, waits: Arc<Waits>) -> PacedBody {
        // usize is at most 64 bits on every target tern builds for.
        let left = u64::try_from(inner.content_length()).unwrap_or(u64::MAX);
        PacedBody { inner, frame: Bytes::new(), left, admitted: 0, reply: None, pace, waits }
    }
}

impl Body for PacedBody {
    type Data = Bytes;
    type Error = Abandoned;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Abandoned>>> {
        let this = self.get_mut();
        // Bounded: each pass either returns or takes the next frame of the wrapped body,
        // which holds finitely many.
        loop {
            if this.frame.is_empty() {
                // object_store's bodies are in memory: always ready, never failing.
                match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            this.frame = data;
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if this.admitted == 0 {
                let reply = match &mut this.reply {
                    Some(reply) => reply,
                    None => {
                        let (reply, wait) = oneshot::channel();
                        let ask = Ask { remaining: this.left.max(1), reply };
                        if this.pace.asks.send(ask).is_err() {
                            return Poll::Ready(Some(Err(Abandoned)));
                        }
                        this.waits.begin();
                        this.reply.insert(wait)
                    }
                };
                let granted = ready!(Pin::new(reply).poll(cx));
                this.reply = None;
                this.waits.end();
                match granted {
                    Ok(granted) => this.admitted = granted.max(1),
                    Err(_) => return Poll::Ready(Some(Err(Abandoned))),
                }
            }
            let len = this.frame.len().min(usize::try_from(this.admitted).unwrap_or(usize::MAX));
            let part = this.frame.split_to(len);
            let wide = u64::try_from(len).unwrap_or(u64::MAX);
            this.admitted -= wide;
            this.left = this.left.saturating_sub(wide);
            this.pace.counters.record_put_bytes(len);
            return Poll::Ready(Some(Ok(Frame::data(part))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

impl Drop for PacedBody {
    fn drop(&mut self) {
        // A body dropped while waiting (the connection failed) waits no more.
        self.waits.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Poll `body` to its end; the parts it yielded.
    async fn drain(mut body: PacedBody) -> Vec<usize> {
        let mut parts = Vec::new();
        // Bounded by the body's length: every frame holds at least one byte.
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            parts.push(frame.unwrap().into_data().unwrap().len());
        }
        assert!(body.is_end_stream());
        parts
    }

    #[tokio::test]
    async fn parts_follow_the_grants_and_are_counted_as_sent() {
        let counters = Arc::new(Counters::default());
        let asked = Mutex::new(Vec::new());
        let pacer = |remaining: u64| {
            asked.lock().unwrap().push(remaining);
            4
        };
        let payload =
            object_store::PutPayload::from_iter([Bytes::from_static(b"abcdef"), Bytes::from_static(b"ghij")]);
        let parts = paced(&pacer, counters.clone(), async {
            let pace = current().expect("the task carries the pace");
            let waits = Arc::new(Waits::default());
            let body = PacedBody::new(HttpRequestBody::from(payload), pace, waits.clone());
            assert_eq!(body.size_hint().exact(), Some(10));
            drain(body).await
        })
        .await;
        // Grants of 4 over frames of 6 and 4: an admitted remainder carries over.
        assert_eq!(parts, [4, 2, 2, 2]);
        assert_eq!(*asked.lock().unwrap(), [10, 6, 2]);
        assert_eq!(counters.snapshot().bytes_put, 10);
        assert!(current().is_none(), "outside a paced put there is no pace");
    }

    #[tokio::test]
    async fn a_body_whose_put_went_away_fails() {
        let counters = Arc::new(Counters::default());
        let (asks, asked) = mpsc::unbounded_channel();
        drop(asked);
        let pace = Pace { asks, counters };
        let mut body = PacedBody::new(Bytes::from_static(b"xyz").into(), pace, Arc::default());
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(matches!(frame, Some(Err(Abandoned))));
    }

    #[tokio::test]
    async fn time_waiting_for_a_grant_is_measured() {
        let (asks, mut asked) = mpsc::unbounded_channel::<Ask>();
        let waits = Arc::new(Waits::default());
        let pace = Pace { asks, counters: Arc::default() };
        let mut body = PacedBody::new(Bytes::from_static(b"data").into(), pace, waits.clone());
        let mut poll = || {
            let waker = futures::task::noop_waker();
            Pin::new(&mut body).poll_frame(&mut Context::from_waker(&waker)).map(|f| f.map(|f| f.is_ok()))
        };
        assert!(poll().is_pending(), "waiting for the grant");
        let later = Instant::now() + Duration::from_secs(5);
        assert!(waits.waited(later) >= Duration::from_secs(5), "the wait in progress counts");
        let ask = asked.try_recv().expect("asked");
        assert_eq!(ask.remaining, 4);
        ask.reply.send(4).unwrap();
        assert_eq!(poll(), Poll::Ready(Some(true)));
        let done = waits.waited(Instant::now());
        assert!(waits.waited(later) == done, "the wait ended with the grant");
    }
}
