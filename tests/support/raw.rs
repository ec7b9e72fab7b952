//! Requests written byte for byte (the forms a library client would not send), and an HTTP/2
//! client with prior knowledge (h2c) that can set any header and its own flow-control windows.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What came back on a raw connection, read until the server closed it.
#[derive(Debug)]
pub struct RawReply {
    /// The status code of the first response (0 when none arrived).
    pub status: u16,
    /// Everything the server sent, lossily as text.
    pub text: String,
}

impl RawReply {
    /// The body of a `Content-Length` response.
    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, body)| body)
    }
}

/// Writes `request` as is and reads until the server closes (under 10 s).
pub async fn raw_request(addr: SocketAddr, request: &str) -> RawReply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the server did not close the connection within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    RawReply { status, text }
}

/// [`raw_request`] over TLS, naming `sni` as the server (the relay is verified by `tls`).
pub async fn raw_request_tls(addr: SocketAddr, sni: &str, tls: rustls::ClientConfig, request: &str) -> RawReply {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // A TLS server may close without close_notify: what arrived is the answer.
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    RawReply { status, text }
}

/// `GET target` on a fresh connection with `Connection: close` and the given header lines.
pub async fn raw_get(addr: SocketAddr, target: &str, headers: &[&str]) -> RawReply {
    let mut request = format!("GET {target} HTTP/1.1\r\nconnection: close\r\n");
    for line in headers {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    raw_request(addr, &request).await
}

/// Checks, with requests written byte for byte to `addr` for `files.test` (whose route serves
/// only `/public`, from an upstream that answers with the target it received), that paths are
/// made canonical before routing: a dot-segment cannot climb out of `/public` (the request is
/// for `/secret`: 404), one hidden behind an encoded separator, a backslash or a `;` is refused
/// (400), and the upstream receives the canonical path the route matched.
pub async fn assert_paths_are_canonical(addr: SocketAddr) {
    let host = "host: files.test";
    for target in ["/public/../secret", "/public/%2e%2e/secret", "/public/.%2E/secret", "/public//../secret"] {
        let reply = raw_get(addr, target, &[host]).await;
        assert_eq!(reply.status, 404, "{target}: {}", reply.text);
        assert!(reply.body().contains("/secret"), "{target}: {}", reply.text);
    }
    for target in ["/public/..%2fsecret", "/public/..%5Csecret", "/public/..\\secret", "/public/..;/secret", "/.."] {
        let reply = raw_get(addr, target, &[host]).await;
        assert_eq!(reply.status, 400, "{target}: {}", reply.text);
    }
    let reply = raw_get(addr, "/public/a/./b/../c?x=../y", &[host]).await;
    assert_eq!((reply.status, reply.body()), (200, "/public/a/c?x=../y"), "{}", reply.text);
    let reply = raw_get(addr, "/public/%7Euser/group%2fproject", &[host]).await;
    assert_eq!((reply.status, reply.body()), (200, "/public/~user/group%2Fproject"), "{}", reply.text);
}

/// A client that sends `GET target` for `host` and then never reads: its receive buffer is 4 KiB,
/// so the server's writes stop at once. Holds the connection open while alive.
pub async fn non_reading_get(addr: SocketAddr, host: &str, target: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A client that uploads to `POST target` for `host` as fast as the server takes it, with a
/// `Content-Length` it never reaches, until the returned task is aborted.
pub async fn endless_upload(addr: SocketAddr, host: &str, target: &str) -> tokio::task::JoinHandle<()> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 1000000000\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        let chunk = vec![b'u'; 64 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
    })
}

/// An HTTP/2 client connection with prior knowledge.
pub struct H2c {
    client: h2::client::SendRequest<Bytes>,
}

/// An HTTP/2 answer.
#[derive(Debug)]
pub struct H2Reply {
    pub status: u16,
    pub body: String,
}

impl H2c {
    /// Connects with the default settings.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with(addr, h2::client::Builder::new()).await
    }

    /// Connects with the given settings (for example an initial window of 0).
    pub async fn connect_with(addr: SocketAddr, builder: h2::client::Builder) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = builder.handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Self { client }
    }

    /// Sends `method uri` (absolute: it gives `:authority`) with `headers`; returns the response
    /// head's future and body stream without reading.
    pub async fn start(&mut self, method: &str, uri: &str, headers: &[(&str, &str)]) -> h2::client::ResponseFuture {
        let mut request = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let client = self.client.clone().ready().await.unwrap();
        self.client = client;
        let (response, _) = self.client.send_request(request.body(()).unwrap(), true).unwrap();
        response
    }

    /// Sends a request and reads the whole answer (under 10 s).
    pub async fn request(&mut self, method: &str, uri: &str, headers: &[(&str, &str)]) -> H2Reply {
        let response = self.start(method, uri, headers).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            let response = response.await.unwrap();
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            H2Reply { status, body: String::from_utf8_lossy(&bytes).into_owned() }
        })
        .await
        .expect("h2c request timed out")
    }
}
