//! A real gRPC server (tonic) to put behind an agent, and a tonic client that reaches it through
//! the relay: unary calls (with an error status on request), a server stream that can end in an
//! error after its messages (so the status travels in trailers after data), and a bidirectional
//! chat answered message by message.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::Stream;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// The one message type of the echo service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    /// Text to echo (or `"fail"` to get an error).
    #[prost(string, tag = "1")]
    pub text: String,
    /// How many messages a stream sends.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// Filler, to make large messages.
    #[prost(bytes = "vec", tag = "3")]
    pub blob: Vec<u8>,
}

type Codec = tonic_prost::ProstCodec<Msg, Msg>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;
type Answer<T> = Pin<Box<dyn std::future::Future<Output = Result<Response<T>, Status>> + Send>>;

/// `/test.Echo/Unary` path.
pub const UNARY: &str = "/test.Echo/Unary";
/// `/test.Echo/Countdown` path.
pub const COUNTDOWN: &str = "/test.Echo/Countdown";
/// `/test.Echo/Chat` path.
pub const CHAT: &str = "/test.Echo/Chat";

struct Unary;

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = Answer<Msg>;

    fn call(&mut self, request: Request<Msg>) -> Self::Future {
        let msg = request.into_inner();
        Box::pin(async move {
            if msg.text == "fail" {
                return Err(Status::not_found("no such thing"));
            }
            Ok(Response::new(Msg { text: msg.text.to_uppercase(), ..msg }))
        })
    }
}

/// Sends `count` messages, then ends with `Aborted` when the text is `"fail"`.
struct Countdown;

impl tonic::server::ServerStreamingService<Msg> for Countdown {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = Answer<MsgStream>;

    fn call(&mut self, request: Request<Msg>) -> Self::Future {
        let msg = request.into_inner();
        let fail = msg.text == "fail";
        let items = (0..msg.count).map(move |i| Ok(Msg { text: format!("{i}"), count: i, blob: vec![] }));
        let tail = fail.then(|| Err(Status::aborted("gave up after the messages")));
        let stream: MsgStream = Box::pin(futures_util::stream::iter(items.chain(tail)));
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

/// Answers each message as it arrives, upper-cased.
struct Chat;

impl tonic::server::StreamingService<Msg> for Chat {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = Answer<MsgStream>;

    fn call(&mut self, request: Request<Streaming<Msg>>) -> Self::Future {
        use futures_util::StreamExt;
        let stream: MsgStream =
            Box::pin(request.into_inner().map(|msg| msg.map(|m| Msg { text: m.text.to_uppercase(), ..m })));
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

async fn route(req: http::Request<Incoming>) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(Codec::default());
    Ok(match req.uri().path() {
        UNARY => grpc.unary(Unary, req).await,
        COUNTDOWN => grpc.server_streaming(Countdown, req).await,
        CHAT => grpc.streaming(Chat, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    })
}

/// A tonic echo server speaking HTTP/2 without TLS (as gRPC servers behind a proxy do).
pub struct EchoServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl EchoServer {
    /// Listens on 127.0.0.1:0.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(route));
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.cancelled() => {}
                    }
                });
            }
        });
        Self { addr, stop }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A tonic client whose requests carry `:authority` `host` and reach `addr` (the relay's
/// ingress), over plain TCP (h2c) or over TLS with ALPN `h2` when `tls` is given.
pub struct EchoClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl EchoClient {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, host: &str, tls: Option<std::sync::Arc<rustls::ClientConfig>>) -> Self {
        let sni = host.to_owned();
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let (tls, sni) = (tls.clone(), sni.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let io: Box<dyn Io> = match tls {
                    None => Box::new(tcp),
                    Some(tls) => {
                        // The host the calls are for, as a browser or grpc client names it.
                        let name = rustls::pki_types::ServerName::try_from(sni).unwrap();
                        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
                        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN did not pick h2");
                        Box::new(stream)
                    }
                };
                Ok::<_, std::io::Error>(TokioIo::new(io))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}"))
            .unwrap()
            .connect_with_connector(connector)
            .await
            .unwrap();
        let grpc =
            tonic::client::Grpc::new(channel).max_decoding_message_size(8 << 20).max_encoding_message_size(8 << 20);
        Self { grpc }
    }

    /// One unary call.
    pub async fn unary(&mut self, msg: Msg) -> Result<Msg, Status> {
        self.grpc.ready().await.unwrap();
        let response = self.grpc.unary(Request::new(msg), PathAndQuery::from_static(UNARY), Codec::default()).await?;
        Ok(response.into_inner())
    }

    /// A server-streaming call: the messages received, then how the stream ended.
    pub async fn countdown(&mut self, msg: Msg) -> (Vec<Msg>, Result<(), Status>) {
        self.grpc.ready().await.unwrap();
        let path = PathAndQuery::from_static(COUNTDOWN);
        let mut stream = match self.grpc.server_streaming(Request::new(msg), path, Codec::default()).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (vec![], Err(status)),
        };
        let mut got = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(msg)) => got.push(msg),
                Ok(None) => return (got, Ok(())),
                Err(status) => return (got, Err(status)),
            }
        }
    }

    /// Opens a chat: send with the returned sender, read answers from the stream.
    pub async fn chat(&mut self) -> (tokio::sync::mpsc::Sender<Msg>, Streaming<Msg>) {
        self.grpc.ready().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let outgoing = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let path = PathAndQuery::from_static(CHAT);
        let response = self.grpc.streaming(Request::new(outgoing), path, Codec::default()).await.unwrap();
        (tx, response.into_inner())
    }
}

/// A byte stream, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}
