//! The HTTP client of the remote backends (Azure Blob, S3): object_store builds, signs
//! and retries the requests; tern's own reqwest client sends them, so that the body of
//! a paced chunk put can be paced ([`crate::paced::body`]). object_store cannot take a
//! streamed body nor hand out its own client, hence this [`Connector`].
//!
//! Every request is forwarded as object_store's own reqwest client would send it:
//! method, URI, headers, body; the response comes back whole, and transport errors are
//! classified into [`HttpErrorKind`]s the same way, so that object_store's retries
//! behave as before. The one difference: a PUT with a body, sent while its task runs a
//! paced put, gets a [`PacedBody`], and its request timeout leaves out the time the
//! body waited for the pacer (a request may wait minutes for its turn at a low limit).
//!
//! The client is built from the [`ClientOptions`] object_store hands the connector,
//! read through [`ClientOptions::get_config_value`]: `allow_http`,
//! `allow_invalid_certificates`, `connect_timeout`, `timeout`, `user_agent`,
//! `proxy_url`, `proxy_excludes`, `proxy_ca_certificate`, `pool_idle_timeout`,
//! `pool_max_idle_per_host`, `http1_only`, `http2_only`, and the `http2_keep_alive_*`
//! and `http2_max_frame_size` keys. Not honoured, because `ClientOptions` does not show
//! them: default headers and root certificates added in code (tern adds none), and
//! `randomize_addresses` (DNS answers are used in the resolver's order).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::{ClientConfigKey, ClientOptions};
use tokio::time::{Instant, Sleep};

use crate::paced::body::{self as paced, PacedBody, Waits};

/// Sent when `user_agent` is not configured.
const USER_AGENT: &str = concat!("tern-store/", env!("CARGO_PKG_VERSION"));

/// Makes the [`HttpClient`] of an Azure or S3 backend.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Connector;

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let (client, timeout) = build_client(options)
            .map_err(|e| object_store::Error::Generic { store: "HTTP client", source: e.into() })?;
        Ok(HttpClient::new(Service { client, timeout }))
    }
}

/// A reqwest client and the request timeout, which is applied per request (the client
/// has none) so that paced requests can be timed differently.
#[derive(Debug)]
struct Service {
    client: reqwest::Client,
    timeout: Option<Duration>,
}

impl HttpService for Service {
    // The signature `#[async_trait]` gives the trait's method.
    fn call<'s, 'f>(
        &'s self,
        req: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'f>>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(self.send(req))
    }
}

impl Service {
    async fn send(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        let url = reqwest::Url::parse(&parts.uri.to_string())
            .map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
        // object_store sends object bytes only in PUT bodies (Put Blob, PutObject, parts).
        let pace = if parts.method == http::Method::PUT && body.content_length() > 0 {
            paced::current()
        } else {
            None
        };
        let mut request = reqwest::Request::new(parts.method, url);
        *request.headers_mut() = parts.headers;
        let Some(pace) = pace else {
            *request.body_mut() = Some(plain_body(body));
            *request.timeout_mut() = self.timeout;
            let response = self.client.execute(request).await.map_err(transport_error)?;
            return Ok(into_response(response, None));
        };
        let waits = Arc::new(Waits::default());
        *request.body_mut() = Some(reqwest::Body::wrap(PacedBody::new(body, pace, waits.clone())));
        let Some(timeout) = self.timeout else {
            let response = self.client.execute(request).await.map_err(transport_error)?;
            return Ok(into_response(response, None));
        };
        let deadline = Deadline { start: Instant::now(), timeout, waits };
        let response = deadline.run(self.client.execute(request)).await?;
        // The body is sent: the deadline moves no more, and bounds the response body.
        let rest = Box::pin(tokio::time::sleep_until(deadline.at(Instant::now())));
        Ok(into_response(response, Some((rest, timeout))))
    }
}

/// object_store's body as reqwest takes it: bytes as they are, a payload of several
/// pieces as a body of known length.
fn plain_body(body: HttpRequestBody) -> reqwest::Body {
    match body.as_bytes() {
        Some(bytes) => reqwest::Body::from(bytes.clone()),
        None => reqwest::Body::wrap(body),
    }
}

/// The request timeout of a paced request: `timeout` after the start, plus however long
/// its body has waited for grants so far.
struct Deadline {
    start: Instant,
    timeout: Duration,
    waits: Arc<Waits>,
}

impl Deadline {
    fn at(&self, now: Instant) -> Instant {
        self.start + self.timeout + self.waits.waited(now)
    }

    /// `request`, unless the deadline passes first.
    async fn run(
        &self,
        request: impl Future<Output = Result<reqwest::Response, reqwest::Error>>,
    ) -> Result<reqwest::Response, HttpError> {
        let mut request = std::pin::pin!(request);
        let mut sleep = std::pin::pin!(tokio::time::sleep_until(self.at(Instant::now())));
        // Bounded: each pass ends the request or waits until a deadline that is later
        // than the last one (a body waits for grants only finitely often).
        loop {
            tokio::select! {
                response = &mut request => return response.map_err(transport_error),
                () = &mut sleep => {
                    let now = Instant::now();
                    let at = self.at(now);
                    if at <= now {
                        return Err(timed_out(self.timeout));
                    }
                    sleep.as_mut().reset(at);
                }
            }
        }
    }
}

fn timed_out(timeout: Duration) -> HttpError {
    HttpError::new(
        HttpErrorKind::Timeout,
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "request timed out after {} (time spent waiting for the bandwidth limit not counted)",
                humantime::format_duration(timeout)
            ),
        ),
    )
}

fn into_response(response: reqwest::Response, deadline: Option<(Pin<Box<Sleep>>, Duration)>) -> HttpResponse {
    let response: http::Response<reqwest::Body> = response.into();
    let (parts, inner) = response.into_parts();
    HttpResponse::from_parts(parts, HttpResponseBody::new(ResponseBody { inner, deadline }))
}

/// A response body with reqwest's errors classified, and for a paced request the rest
/// of its deadline (reqwest's own timeout covers the others).
struct ResponseBody {
    inner: reqwest::Body,
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        if let Some((sleep, timeout)) = &mut this.deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(timed_out(*timeout))));
            }
        }
        Pin::new(&mut this.inner).poll_frame(cx).map(|frame| frame.map(|f| f.map_err(transport_error)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Classify a transport error as object_store does for its own client, so that its
/// retry rules (connect and request errors always; timeouts and interruptions only for
/// idempotent requests; nothing else) apply unchanged.
fn transport_error(e: reqwest::Error) -> HttpError {
    let mut kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_decode() {
        HttpErrorKind::Decode
    } else {
        HttpErrorKind::Unknown
    };
    let mut source = e.source();
    // Bounded by the length of the error's source chain.
    while kind == HttpErrorKind::Unknown {
        let Some(cause) = source else { break };
        if let Some(h) = cause.downcast_ref::<hyper::Error>() {
            if h.is_closed() || h.is_incomplete_message() || h.is_body_write_aborted() {
                kind = HttpErrorKind::Request;
            } else if h.is_timeout() {
                kind = HttpErrorKind::Timeout;
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as Io;
            match io.kind() {
                Io::TimedOut => kind = HttpErrorKind::Timeout,
                Io::ConnectionAborted | Io::ConnectionReset | Io::BrokenPipe | Io::UnexpectedEof => {
                    kind = HttpErrorKind::Interrupted
                }
                _ => {}
            }
        }
        source = cause.source();
    }
    // The URL is left out: object_store adds it where it is not sensitive.
    HttpError::new(kind, e.without_url())
}

/// The reqwest client `options` describe, and the request timeout.
fn build_client(options: &ClientOptions) -> Result<(reqwest::Client, Option<Duration>), String> {
    let get = |key: ClientConfigKey| options.get_config_value(&key);
    let duration = |key: ClientConfigKey| -> Result<Option<Duration>, String> {
        get(key)
            .map(|v| {
                humantime::parse_duration(&v)
                    .map_err(|e| format!("{}: {v:?} is not a duration: {e}", key.as_ref()))
            })
            .transpose()
    };
    let flag = |key: ClientConfigKey| -> Result<bool, String> {
        match get(key).map(|v| v.to_ascii_lowercase()) {
            None => Ok(false),
            Some(v) => match v.as_str() {
                "1" | "true" | "on" | "yes" | "y" => Ok(true),
                "0" | "false" | "off" | "no" | "n" => Ok(false),
                _ => Err(format!("{}: {v:?} is not true or false", key.as_ref())),
            },
        }
    };
    let number = |key: ClientConfigKey| -> Result<Option<u64>, String> {
        get(key)
            .map(|v| v.parse().map_err(|e| format!("{}: {v:?} is not a number: {e}", key.as_ref())))
            .transpose()
    };

    let mut builder = reqwest::ClientBuilder::new()
        .user_agent(get(ClientConfigKey::UserAgent).unwrap_or_else(|| USER_AGENT.to_string()))
        // Compression would change Content-Length, which object_store reads as the size.
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .no_deflate()
        .https_only(!flag(ClientConfigKey::AllowHttp)?);
    if let Some(proxy) = get(ClientConfigKey::ProxyUrl) {
        let mut proxy = reqwest::Proxy::all(&proxy).map_err(|e| format!("proxy_url {proxy:?}: {e}"))?;
        if let Some(pem) = get(ClientConfigKey::ProxyCaCertificate) {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| format!("proxy_ca_certificate: not a PEM certificate: {e}"))?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some(excludes) = get(ClientConfigKey::ProxyExcludes) {
            proxy = proxy.no_proxy(reqwest::NoProxy::from_string(&excludes));
        }
        builder = builder.proxy(proxy);
    }
    if let Some(t) = duration(ClientConfigKey::ConnectTimeout)? {
        builder = builder.connect_timeout(t);
    }
    if let Some(t) = duration(ClientConfigKey::PoolIdleTimeout)? {
        builder = builder.pool_idle_timeout(t);
    }
    if let Some(n) = number(ClientConfigKey::PoolMaxIdlePerHost)? {
        builder = builder.pool_max_idle_per_host(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(t) = duration(ClientConfigKey::Http2KeepAliveInterval)? {
        builder = builder.http2_keep_alive_interval(t);
    }
    if let Some(t) = duration(ClientConfigKey::Http2KeepAliveTimeout)? {
        builder = builder.http2_keep_alive_timeout(t);
    }
    if flag(ClientConfigKey::Http2KeepAliveWhileIdle)? {
        builder = builder.http2_keep_alive_while_idle(true);
    }
    if let Some(n) = number(ClientConfigKey::Http2MaxFrameSize)? {
        let n = u32::try_from(n).map_err(|_| format!("http2_max_frame_size: {n} is too large"))?;
        builder = builder.http2_max_frame_size(Some(n));
    }
    if flag(ClientConfigKey::Http1Only)? {
        builder = builder.http1_only();
    }
    if flag(ClientConfigKey::Http2Only)? {
        builder = builder.http2_prior_knowledge();
    }
    if flag(ClientConfigKey::AllowInvalidCertificates)? {
        builder = builder.danger_accept_invalid_certs(true);
    }
    let client = builder.build().map_err(|e| format!("building the HTTP client: {e}"))?;
    Ok((client, duration(ClientConfigKey::Timeout)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(ClientConfigKey, &str)]) -> ClientOptions {
        pairs.iter().fold(ClientOptions::new(), |o, (k, v)| o.with_config(*k, *v))
    }

    #[test]
    fn client_options_are_read() {
        let (_, timeout) = build_client(&options(&[
            (ClientConfigKey::Timeout, "2m 5s"),
            (ClientConfigKey::ConnectTimeout, "3s"),
            (ClientConfigKey::AllowHttp, "yes"),
            (ClientConfigKey::ProxyUrl, "http://proxy.invalid:3128"),
            (ClientConfigKey::ProxyExcludes, "localhost,127.0.0.1"),
            (ClientConfigKey::Http1Only, "true"),
        ]))
        .unwrap();
        assert_eq!(timeout, Some(Duration::from_secs(125)));
        // object_store's defaults: a 30 s timeout unless configured otherwise.
        assert_eq!(build_client(&ClientOptions::new()).unwrap().1, Some(Duration::from_secs(30)));
    }

    #[test]
    fn bad_client_options_name_the_key() {
        let e = build_client(&options(&[(ClientConfigKey::Timeout, "soon")])).unwrap_err();
        assert!(e.contains("timeout") && e.contains("soon"), "{e}");
        let e = build_client(&options(&[(ClientConfigKey::AllowHttp, "maybe")])).unwrap_err();
        assert!(e.contains("allow_http") && e.contains("maybe"), "{e}");
        let e = build_client(&options(&[(ClientConfigKey::ProxyUrl, "::")])).unwrap_err();
        assert!(e.contains("proxy_url"), "{e}");
    }
}
