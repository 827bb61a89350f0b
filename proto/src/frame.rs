//! Unary gRPC calls over plain framed TCP: the hot path between nodes.
//!
//! One tonic call over HTTP/2 costs ~250 µs on a 2-core VM, against
//! ~35 µs for a loopback TCP round trip: the time goes to the hand-offs
//! between the caller, tower's buffer, hyper's connection task and the
//! server's per-request task. This module carries the same gRPC request
//! (path, headers, encoded body) and response (headers, body, trailers) in
//! length-prefixed frames on a pool of plain TCP connections, one call at
//! a time per connection, with the caller's task doing the I/O itself.
//!
//! * Client: [`FrameChannel`] is a tower service, so the generated tonic
//!   clients run on it unchanged (`MetaClient::new(FrameChannel::new(..))`)
//!   with their interceptors, codecs and size limits.
//! * Server: [`Incoming::split`] accepts connections on the service's one
//!   listener and tells them apart by their first bytes: HTTP/2 goes to the
//!   tonic server as before (streams, other clients), a connection that
//!   starts with [`MAGIC`] is served by [`serve_conn`], which hands each
//!   request to the same tower service (routing, secret check, handlers).
//!
//! Streaming calls are not carried: a stream's response is collected
//! whole. Use HTTP/2 for them.
//!
//! Frames (all integers little-endian):
//! ```text
//! request  = len:u32 path:str16 headers trailers(empty) body
//! response = len:u32 headers trailers body
//! headers  = count:u16 (name:str16 value:str16)*
//! str16    = len:u16 bytes
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// The first bytes of a framed connection (HTTP/2 starts with `PRI `).
pub const MAGIC: &[u8; 4] = b"MGF1";

/// Largest frame accepted: the largest message plus headers.
const MAX_FRAME: usize = crate::MAX_MESSAGE_BYTES + (1 << 20);

/// How long a new connection may take to show what it speaks.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections kept per channel.
const MAX_IDLE: usize = 64;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ------------------------------------------------------------------ frames

fn put_str(out: &mut BytesMut, s: &[u8]) -> Result<(), Status> {
    let n = u16::try_from(s.len()).map_err(|_| Status::internal("frame string over 64 KiB"))?;
    out.put_u16_le(n);
    out.put_slice(s);
    Ok(())
}

fn put_headers(out: &mut BytesMut, h: &HeaderMap) -> Result<(), Status> {
    let n = u16::try_from(h.len()).map_err(|_| Status::internal("too many headers"))?;
    out.put_u16_le(n);
    for (k, v) in h {
        put_str(out, k.as_str().as_bytes())?;
        put_str(out, v.as_bytes())?;
    }
    Ok(())
}

/// A frame that does not parse.
fn malformed(what: &str) -> Status {
    Status::internal(format!("malformed frame: {what}"))
}

fn get_str(b: &mut Bytes) -> Result<Bytes, Status> {
    if b.remaining() < 2 {
        return Err(malformed("short string length"));
    }
    let n = usize::from(b.get_u16_le());
    if b.remaining() < n {
        return Err(malformed("short string"));
    }
    Ok(b.split_to(n))
}

fn get_headers(b: &mut Bytes) -> Result<HeaderMap, Status> {
    if b.remaining() < 2 {
        return Err(malformed("short header count"));
    }
    let n = b.get_u16_le();
    let mut h = HeaderMap::with_capacity(usize::from(n));
    for _ in 0..n {
        let k = get_str(b)?;
        let v = get_str(b)?;
        let k = HeaderName::from_bytes(&k).map_err(|_| malformed("header name"))?;
        let v = HeaderValue::from_maybe_shared(v).map_err(|_| malformed("header value"))?;
        h.append(k, v);
    }
    Ok(h)
}

/// One request or response: an optional path, headers, trailers, body.
#[derive(Debug, Default, PartialEq)]
struct Msg {
    path: Option<Bytes>,
    headers: HeaderMap,
    trailers: HeaderMap,
    body: Bytes,
}

impl Msg {
    fn encode(&self, prefix: &[u8]) -> Result<BytesMut, Status> {
        let mut out = BytesMut::with_capacity(prefix.len() + 4 + 256 + self.body.len());
        out.put_slice(prefix);
        let at = out.len();
        out.put_u32_le(0);
        if let Some(p) = &self.path {
            put_str(&mut out, p)?;
        }
        put_headers(&mut out, &self.headers)?;
        put_headers(&mut out, &self.trailers)?;
        out.put_slice(&self.body);
        let len = out.len() - at - 4;
        if len > MAX_FRAME {
            return Err(Status::resource_exhausted(format!(
                "frame of {len} bytes is over the {MAX_FRAME}-byte limit"
            )));
        }
        let len = u32::try_from(len).map_err(|_| Status::internal("frame over 4 GiB"))?;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        Ok(out)
    }

    fn decode(mut b: Bytes, with_path: bool) -> Result<Msg, Status> {
        let path = with_path.then(|| get_str(&mut b)).transpose()?;
        let headers = get_headers(&mut b)?;
        let trailers = get_headers(&mut b)?;
        Ok(Msg {
            path,
            headers,
            trailers,
            body: b,
        })
    }
}

/// Reads one frame's payload; `None` at a clean end of stream.
async fn read_frame(s: &mut TcpStream) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut buf = BytesMut::zeroed(len);
    s.read_exact(&mut buf).await?;
    Ok(Some(buf.freeze()))
}

// ------------------------------------------------------------------ bodies

/// A complete body: its data, then its trailers.
#[derive(Debug, Default)]
pub struct Whole {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Whole {
    fn new(data: Bytes, trailers: HeaderMap) -> Whole {
        Whole {
            data: (!data.is_empty()).then_some(data),
            trailers: (!trailers.is_empty()).then_some(trailers),
        }
    }
}

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// Collects a body whole: its data and its trailers.
async fn collect<B>(body: B) -> Result<(Bytes, HeaderMap), Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let c = body
        .collect()
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let trailers = c.trailers().cloned().unwrap_or_default();
    Ok((c.to_bytes(), trailers))
}

// ------------------------------------------------------------------ client

/// A pool of framed connections to one server, usable as a tonic channel.
#[derive(Clone, Debug)]
pub struct FrameChannel {
    inner: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    addr: String,
    connect_timeout: Duration,
    call_timeout: Duration,
    idle: parking_lot::Mutex<Vec<TcpStream>>,
}

impl FrameChannel {
    /// A channel to `addr` (`host:port`, or a URL such as
    /// `http://127.0.0.10:7700`); connects on first use.
    pub fn new(addr: &str, connect_timeout: Duration, call_timeout: Duration) -> FrameChannel {
        let addr = addr
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        FrameChannel {
            inner: Arc::new(Pool {
                addr,
                connect_timeout,
                call_timeout,
                idle: parking_lot::Mutex::new(Vec::new()),
            }),
        }
    }
}

impl Pool {
    async fn connect(&self) -> Result<TcpStream, Status> {
        let s = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| Status::unavailable(format!("connect to {}: timed out", self.addr)))?
            .map_err(|e| Status::unavailable(format!("connect to {}: {e}", self.addr)))?;
        s.set_nodelay(true)
            .map_err(|e| Status::unavailable(format!("{}: {e}", self.addr)))?;
        Ok(s)
    }

    /// Sends `frame` on `s` and reads the answer.
    async fn exchange(s: &mut TcpStream, frame: &[u8]) -> std::io::Result<Option<Bytes>> {
        s.write_all(frame).await?;
        read_frame(s).await
    }

    async fn unary(&self, req: Msg) -> Result<Msg, Status> {
        let reused = self.idle.lock().pop();
        let fresh = reused.is_none();
        let mut s = match reused {
            Some(s) => s,
            None => self.connect().await?,
        };
        let frame = req.encode(if fresh { MAGIC } else { &[] })?;
        let mut reply =
            tokio::time::timeout(self.call_timeout, Pool::exchange(&mut s, &frame)).await;
        if !fresh && matches!(reply, Ok(Ok(None)) | Ok(Err(_))) {
            // An idle connection the server closed (restart, shutdown):
            // the request never reached a handler; once more on a new one.
            s = self.connect().await?;
            let frame = req.encode(MAGIC)?;
            reply = tokio::time::timeout(self.call_timeout, Pool::exchange(&mut s, &frame)).await;
        }
        let payload = match reply {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "{}: no answer within {:?}",
                    self.addr, self.call_timeout
                )));
            }
            Ok(Err(e)) => return Err(Status::unavailable(format!("{}: {e}", self.addr))),
            Ok(Ok(None)) => {
                return Err(Status::unavailable(format!(
                    "{}: connection closed before the answer",
                    self.addr
                )));
            }
            Ok(Ok(Some(p))) => p,
        };
        let msg = Msg::decode(payload, false)?;
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(s);
        }
        Ok(msg)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for FrameChannel {
    type Response = http::Response<Whole>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let pool = Arc::clone(&self.inner);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let (body, _) = collect(body).await.map_err(Box::new)?;
            let req = Msg {
                path: Some(Bytes::copy_from_slice(parts.uri.path().as_bytes())),
                headers: parts.headers,
                trailers: HeaderMap::new(),
                body,
            };
            // A failure of the transport travels as a status-only answer:
            // tonic passes its code through (an error it would wrap as
            // `Unknown`).
            let reply = pool.unary(req).await.unwrap_or_else(|st| status_only(&st));
            let mut resp = http::Response::new(Whole::new(reply.body, reply.trailers));
            *resp.headers_mut() = reply.headers;
            Ok(resp)
        })
    }
}

// ------------------------------------------------------------------ server

/// Serves framed calls on `s` (its [`MAGIC`] not yet read) with `svc`
/// until the peer closes, an I/O error, or `stop` turns true between calls.
pub async fn serve_conn<S, B>(mut s: TcpStream, mut svc: S, mut stop: watch::Receiver<bool>)
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut magic = [0u8; 4];
    if s.read_exact(&mut magic).await.is_err() || &magic != MAGIC {
        return;
    }
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut s) => f,
            () = stopped(&mut stop) => return,
        };
        let payload = match frame {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "framed connection ended");
                return;
            }
        };
        let reply = match Msg::decode(payload, true) {
            Ok(req) => answer(&mut svc, req).await,
            Err(st) => status_only(&st),
        };
        let out = match reply.encode(&[]) {
            Ok(o) => o,
            Err(st) => match status_only(&st).encode(&[]) {
                Ok(o) => o,
                Err(_) => return,
            },
        };
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// A response that carries only a status ("trailers-only" in gRPC).
fn status_only(st: &Status) -> Msg {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Err(e) = st.add_header(&mut headers) {
        tracing::warn!(error = %e, "status does not fit in headers");
    }
    Msg {
        headers,
        ..Msg::default()
    }
}

async fn answer<S, B>(svc: &mut S, req: Msg) -> Msg
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let path = req.path.unwrap_or_default();
    let uri = match http::Uri::from_maybe_shared(path) {
        Ok(u) => u,
        Err(_) => return status_only(&malformed("request path")),
    };
    let mut r = http::Request::new(tonic::body::Body::new(Whole::new(
        req.body,
        HeaderMap::new(),
    )));
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = uri;
    *r.version_mut() = http::Version::HTTP_2;
    *r.headers_mut() = req.headers;
    if let Err(e) = std::future::poll_fn(|cx| svc.poll_ready(cx)).await {
        return status_only(&Status::from_error(e.into()));
    }
    let resp = match svc.call(r).await {
        Ok(resp) => resp,
        Err(e) => return status_only(&Status::from_error(e.into())),
    };
    let (parts, body) = resp.into_parts();
    match collect(body).await {
        Ok((body, trailers)) => Msg {
            path: None,
            headers: parts.headers,
            trailers,
            body,
        },
        Err(st) => status_only(&st),
    }
}

/// The connections a listener accepts, split by protocol.
pub struct Incoming;

impl Incoming {
    /// Accepts on `listener` until `stop` turns true; framed connections
    /// are served with clones of `svc`, the others (HTTP/2) come out of
    /// the returned stream for the tonic server. TCP_NODELAY is set on
    /// every connection.
    pub fn split<S, B>(
        listener: TcpListener,
        svc: S,
        mut stop: watch::Receiver<bool>,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TcpStream>>
    where
        S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (http2, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (s, peer) = tokio::select! {
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => {
                            // EMFILE and the like: keep serving the connections we have.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = stopped(&mut stop) => return,
                };
                let _ = s.set_nodelay(true);
                let (svc, stop, http2) = (svc.clone(), stop.clone(), http2.clone());
                tokio::spawn(async move {
                    match sniff(&s).await {
                        Some(true) => serve_conn(s, svc, stop).await,
                        Some(false) => {
                            let _ = http2.send(Ok(s)).await;
                        }
                        None => tracing::debug!(%peer, "connection closed before it said anything"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// Returns when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Whether `s` starts with [`MAGIC`]; `None` if it closes or stays silent.
async fn sniff(s: &TcpStream) -> Option<bool> {
    let look = async {
        let mut head = [0u8; 4];
        loop {
            let n = s.peek(&mut head).await.ok()?;
            if n == 0 {
                return None;
            }
            if n == head.len() || head[..n] != MAGIC[..n] {
                return Some(head[..n] == MAGIC[..]);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(SNIFF_TIMEOUT, look).await.ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert("migfs-secret", HeaderValue::from_static("abc"));
        headers.append("x", HeaderValue::from_static("1"));
        headers.append("x", HeaderValue::from_static("2"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let m = Msg {
            path: Some(Bytes::from_static(b"/a.B/C")),
            headers,
            trailers,
            body: Bytes::from_static(b"\0\0\0\0\x03abc"),
        };
        let enc = m.encode(MAGIC).unwrap().freeze();
        assert_eq!(&enc[..4], MAGIC);
        let len = u32::from_le_bytes(enc[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, enc.len() - 8);
        assert_eq!(Msg::decode(enc.slice(8..), true).unwrap(), m);
    }

    #[test]
    fn truncated_frames_are_refused() {
        let m = Msg {
            path: Some(Bytes::from_static(b"/p")),
            ..Msg::default()
        };
        let enc = m.encode(&[]).unwrap().freeze();
        for cut in 4..enc.len() - 1 {
            assert!(
                Msg::decode(enc.slice(4..cut), true).is_err(),
                "cut at {cut}"
            );
        }
    }
}
