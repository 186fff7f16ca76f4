//! Counting each connection's requests in flight, for the idle timeout
//! and per-identity cap of [`crate::listener`]: a tower layer on the gRPC
//! server that finds the request's connection by its peer address and
//! holds an [`InFlight`] guard until the response body is dropped, so a
//! stream (push, restore, an agent's) keeps its connection busy for its
//! whole life. HTTP/2 pings are not requests and keep nothing busy.

use crate::listener::{Connections, InFlight};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::transport::server::TcpConnectInfo;

/// The layer: `Server::builder().layer(CountInFlight::new(..))`.
#[derive(Clone)]
pub struct CountInFlight {
    connections: Arc<Connections>,
}

impl CountInFlight {
    pub fn new(connections: Arc<Connections>) -> Self {
        CountInFlight { connections }
    }
}

impl<S> tower_layer::Layer<S> for CountInFlight {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            connections: self.connections.clone(),
        }
    }
}

/// The service under [`CountInFlight`].
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    connections: Arc<Connections>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower_service::Service<Request<B>> for Counted<S>
where
    S: tower_service::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<Guarded<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|info| info.remote_addr)
            .and_then(|peer| self.connections.begin(peer));
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Guarded {
                body: Box::pin(body),
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request in flight until dropped.
pub struct Guarded<R> {
    body: Pin<Box<R>>,
    _guard: Option<InFlight>,
}

impl<R: Body> Body for Guarded<R> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
