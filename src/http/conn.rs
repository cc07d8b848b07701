//! The public listener's connections: actix-http's HTTP/1 service over a TCP stream that
//! gives every request head a deadline, not only the first.
//!
//! actix-http's `client_request_timeout` covers the first request of a connection only
//! ("head timer only applies to first request on connection", h1 dispatcher); its
//! keep-alive timer stops at the first byte of the next request. So a client that completes
//! one request and then drips the next head a byte at a time holds its connection forever,
//! and enough of them hold every connection the node has (`http.max_connections`). Behind
//! nginx or an ALB that is their problem; on its own listener it is ours.
//! [`HeadDeadline`] watches the bytes read: from the first byte after a response until the
//! end of the head (`\r\n\r\n`) a client has `http.client_request_timeout_ms`, else the read
//! fails with `TimedOut` and the dispatcher drops the connection. Bodies are bounded by the
//! handlers' own limits (`read_json`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the connection is between two requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing of the next request read yet (a new connection, or a response was written).
    Idle,
    /// Part of a head read; `matched` bytes of `\r\n\r\n` seen at its end so far.
    Head { matched: u8 },
    /// The head is complete: the body and the handler's work are not timed here.
    Past,
}

/// A stream whose request heads must arrive within `limit` of their first byte.
pub struct HeadDeadline<T> {
    io: T,
    limit: Duration,
    phase: Phase,
    /// Re-armed at the first byte of each head; allocated once per connection.
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<T> HeadDeadline<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        HeadDeadline { io, limit, phase: Phase::Idle, timer: Box::pin(tokio::time::sleep(limit)) }
    }

    /// Advances the head matcher over bytes just read.
    fn saw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let matched = match self.phase {
                Phase::Past => return,
                Phase::Idle => {
                    self.timer.as_mut().reset(tokio::time::Instant::now() + self.limit);
                    0
                }
                Phase::Head { matched } => matched,
            };
            // `\r\n\r\n`: positions 0 and 2 want `\r`, 1 and 3 want `\n`.
            let want = if matched % 2 == 0 { b'\r' } else { b'\n' };
            let matched = if b == want {
                matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if matched == 4 {
                self.phase = Phase::Past;
                return;
            }
            self.phase = Phase::Head { matched };
        }
    }

    /// True once the head under way has run out of time (registers the waker otherwise).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        matches!(self.phase, Phase::Head { .. }) && self.timer.as_mut().poll(cx).is_ready()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.expired(cx) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request head not complete in time")));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[before..]);
                // A timer started by these bytes must be polled once to register its waker.
                if this.expired(cx) {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request head not complete in time")));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) && this.phase == Phase::Past {
            // A response is going out: the next byte read starts the next head's clock.
            this.phase = Phase::Idle;
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread")]
    async fn a_second_head_dripped_past_the_limit_fails_the_read() {
        let (client, server) = tokio::io::duplex(1024);
        let mut server = HeadDeadline::new(server, Duration::from_millis(200));
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let n = server.read(&mut buf).await.unwrap();
        assert!(n > 0);
        server.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        let _ = cr.read(&mut buf).await.unwrap();
        // The next head, one byte and then nothing: the read must fail once the limit passes.
        cw.write_all(b"G").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
        let started = tokio::time::Instant::now();
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_head_in_time_and_an_idle_connection_are_left_alone() {
        let (client, server) = tokio::io::duplex(1024);
        let mut server = HeadDeadline::new(server, Duration::from_millis(100));
        let (_cr, mut cw) = tokio::io::split(client);
        // Split across reads, with `\r` at a boundary, within the limit.
        cw.write_all(b"GET / HTTP/1.1\r\nHost: x\r").await.unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(server.read(&mut buf).await.unwrap(), 24);
        cw.write_all(b"\n\r\nbody").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 7);
        // The head is complete: waiting past the limit (the handler at work, a slow body)
        // is not timed here.
        tokio::time::sleep(Duration::from_millis(250)).await;
        cw.write_all(b"more").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 4);
    }
}
