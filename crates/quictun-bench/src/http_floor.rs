//! The HTTP floor: what the relay and the agent cost as plain HTTP proxies, with no tunnel
//! between them. Two reverse proxies stand in their places, chained over plain TCP:
//!
//! load generator → proxy (as the relay) → proxy (as the agent) → upstream
//!
//! Each proxy is hyper's HTTP/1 server in front of hyper-util's pooled client, the libraries the
//! relay's ingress and the agent's upstream client use, with `TCP_NODELAY` on every socket, and
//! does nothing else: no routing, no headers added, no TLS. Its rows (transport `direct`, variants
//! `http …`) use the same load, the same upstream and the same CPU measure (both processes) as
//! the tunnel's `small` and `large` rows: a tunnel cannot cost less per request than this chain
//! unless it stops doing HTTP at one of its ends.
//!
//! What stopping would save is measured too: the same chain with the agent's place a TCP splice
//! (each connection copied byte for byte to a fresh upstream connection, as a tunnel that does not
//! speak HTTP to the upstream would; variants `http+splice …`), and with both places splices
//! (no HTTP anywhere, as rathole forwards TCP; variants `splice …`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, InvalidUri, PathAndQuery, Scheme};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::BenchOptions;
use crate::procs::{Mode, Proc, Stack, free_port, tcp_ready, wait_until};
use crate::report::Row;
use crate::workloads::{RowSpec, small_requests_to, transfer};

/// What one place of the chain (the relay's or the agent's) does with the connections it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hop {
    /// A hyper reverse proxy ([`serve_proxy`]).
    Http,
    /// A TCP splice ([`serve_splice`]).
    Splice,
}

/// One chain the floor measures: its label (the rows' variant prefix), what stands in the relay's
/// place and in the agent's, and what its rows' note says.
struct Chain {
    label: &'static str,
    relay: Hop,
    agent: Hop,
    note: &'static str,
}

/// The chains, most HTTP first: the tunnel's own shape, then an agent that only copies bytes, then
/// no HTTP at all.
const CHAINS: [Chain; 3] = [
    Chain {
        label: "http",
        relay: Hop::Http,
        agent: Hop::Http,
        note: "two hyper reverse proxies chained over plain TCP in place of relay and agent; CPU of both",
    },
    Chain {
        label: "http+splice",
        relay: Hop::Http,
        agent: Hop::Splice,
        note: "a hyper reverse proxy as the relay, a TCP splice as the agent (no HTTP at the agent); CPU of both",
    },
    Chain {
        label: "splice",
        relay: Hop::Splice,
        agent: Hop::Splice,
        note: "two TCP splices in place of relay and agent (no HTTP at either); CPU of both",
    },
];

/// A proxy's answer: the upstream's response, or an empty 502 when the upstream failed.
type ProxyBody = Either<Incoming, Empty<Bytes>>;

/// Serves HTTP/1 on `listener`, forwarding every request to `upstream` over pooled keep-alive
/// connections, until the process is stopped (`quictun bench-proxy`). Fails only when `upstream`
/// does not make a URI authority.
pub async fn serve_proxy(listener: TcpListener, upstream: SocketAddr) -> Result<(), InvalidUri> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    let authority: Authority = upstream.to_string().parse()?;
    serve_each(listener, "bench proxy", move |stream| {
        let (client, authority) = (client.clone(), authority.clone());
        let service = hyper::service::service_fn(move |request| forward(client.clone(), authority.clone(), request));
        async move {
            let served =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            if let Err(err) = served {
                tracing::debug!(%err, "bench proxy: connection ended");
            }
        }
    })
    .await
}

/// Accepts connections on `listener` (named `what` in logs) and serves each with `serve` on a task
/// of its own, until the process is stopped.
async fn serve_each<F, Fut>(listener: TcpListener, what: &'static str, mut serve: F) -> !
where
    F: FnMut(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            (stream, _) = quictun_core::accept_tcp(&listener, what) => {
                connections.spawn(serve(stream));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Sends `request` on to `authority` and answers with its response (502 when that fails).
async fn forward(
    client: Client<HttpConnector, Incoming>,
    authority: Authority,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Ok(uri) = Uri::builder().scheme(Scheme::HTTP).authority(authority).path_and_query(path).build() else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    *request.uri_mut() = uri;
    Ok(match client.request(request).await {
        Ok(response) => response.map(Either::Left),
        Err(err) => {
            tracing::debug!(%err, "bench proxy: upstream request failed");
            status(StatusCode::BAD_GATEWAY)
        }
    })
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = code;
    response
}

/// Bytes a splice reads at once in each direction: the tunnel's own chunk size (tokio's default of
/// 8 KiB made the splice's bulk rows count syscalls).
const SPLICE_BUFFER: usize = 64 * 1024;

/// Copies every connection accepted on `listener` byte for byte to a fresh connection to
/// `upstream` (`TCP_NODELAY` on both), until the process is stopped (`quictun bench-proxy
/// --splice`). A connection whose upstream cannot be reached is closed.
pub async fn serve_splice(listener: TcpListener, upstream: SocketAddr) -> ! {
    serve_each(listener, "bench splice", move |mut client| async move {
        let spliced = async {
            let mut server = TcpStream::connect(upstream).await?;
            server.set_nodelay(true)?;
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, SPLICE_BUFFER, SPLICE_BUFFER).await
        };
        if let Err(err) = spliced.await {
            tracing::debug!(%err, "bench splice: connection ended");
        }
    })
    .await
}

/// The HTTP floor's rows, for each chain: 1 KiB GETs at the small workload's concurrencies, then
/// the large workload's download and upload.
pub async fn floor(opts: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for chain in &CHAINS {
        rows.extend(chain_rows(opts, chain).await?);
    }
    Ok(rows)
}

/// One chain's rows, on a stack of its own.
async fn chain_rows(opts: &BenchOptions, chain: &Chain) -> anyhow::Result<Vec<Row>> {
    let Chain { label, relay, agent, note } = *chain;
    let mut stack = Stack::start(&opts.exe, Mode::Direct, 0).await?;
    let upstream = stack.target;
    let second = start_hop(opts, &stack, agent, "proxy-agent", upstream).await?;
    let first = start_hop(opts, &stack, relay, "proxy-relay", second.1).await?;
    stack.target = first.1;
    stack.relay = Some(first.0);
    stack.agent = Some(second.0);
    let mut rows = Vec::new();
    for &concurrency in &opts.concurrency {
        let row = RowSpec {
            target: stack.target,
            workload: "floor",
            variant: format!("{label} c={concurrency}"),
            note: note.into(),
        };
        rows.push(small_requests_to(opts, &mut stack, concurrency, row).await?);
    }
    for direction in ["download", "upload"] {
        let progress = format!("floor {label} {direction} {} MiB", opts.large_bytes >> 20);
        let done = transfer(&stack, direction, opts.large_bytes, progress).await?;
        rows.push(Row {
            workload: "floor".into(),
            transport: Mode::Direct.name().into(),
            variant: format!("{label} {direction}"),
            mb_per_sec: Some(done.mb_per_sec(opts.large_bytes)),
            requests: 1,
            note: format!("{note}; {}", done.cpu_note()),
            ..Row::default()
        });
    }
    stack.check_alive()?;
    Ok(rows)
}

/// Starts one hop (`quictun bench-proxy`, with `--splice` for [`Hop::Splice`]) in front of
/// `upstream`; returns it and its address once it accepts connections.
async fn start_hop(
    opts: &BenchOptions,
    stack: &Stack,
    hop: Hop,
    name: &str,
    upstream: SocketAddr,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port(false)?));
    let mut args =
        vec!["bench-proxy".to_owned(), "--listen".into(), addr.to_string(), "--upstream".into(), upstream.to_string()];
    if hop == Hop::Splice {
        args.push("--splice".into());
    }
    let proc = Proc::spawn(&opts.exe, &args, &stack.log_path(name), name)?;
    wait_until(name, Duration::from_secs(20), async || tcp_ready(addr).await).await?;
    Ok((proc, addr))
}
