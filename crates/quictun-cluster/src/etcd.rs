//! The etcd v3 calls the session directory needs, over gRPC (etcd's own API, `etcdserverpb`):
//! `KV.Range`, `KV.Put`, `KV.DeleteRange`, `Lease.LeaseGrant`, `Lease.LeaseRevoke`,
//! `Lease.LeaseKeepAlive` and `Watch.Watch`. The messages are written out with prost's derive,
//! with the field numbers of etcd's `rpc.proto` and `kv.proto`; only the fields used are declared
//! (prost skips the others).
//!
//! Every call has a deadline. The client keeps one HTTP/2 connection to one endpoint at a time;
//! a call that fails drops it, and the next call tries the next endpoint.

use std::sync::Mutex;
use std::time::Duration;

use http::uri::PathAndQuery;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint is not a URL (`http://host:port`) or `host:port`.
    #[error("etcd endpoint {0:?} is not host:port or http://host:port")]
    BadEndpoint(String),
    /// No endpoint could be reached.
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    /// A call failed.
    #[error("etcd {call}: {message}")]
    Call {
        /// The call (`KV/Put`, …).
        call: &'static str,
        /// What the server or the connection said.
        message: String,
    },
    /// A call took longer than its deadline.
    #[error("etcd {0}: no answer in time")]
    Timeout(&'static str),
    /// The lease is gone (it expired, or etcd lost it): its keys are deleted.
    #[error("the etcd lease expired")]
    LeaseExpired,
    /// A watch was cancelled by the server (for example, its revision was compacted).
    #[error("the etcd watch was cancelled: {0}")]
    WatchCancelled(String),
}

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// The store's revision when the request was applied.
    #[prost(int64, tag = "3")]
    pub revision: i64,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The revision of its last change.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// The value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// The lease it is attached to (0: none).
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    kvs: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
    #[prost(int64, tag = "3")]
    lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeleteRangeResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    deleted: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    ttl: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantResponse {
    #[prost(int64, tag = "2")]
    id: i64,
    #[prost(int64, tag = "3")]
    ttl: i64,
    #[prost(string, tag = "4")]
    error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRevokeRequest {
    #[prost(int64, tag = "1")]
    id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRevokeResponse {}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseKeepAliveRequest {
    #[prost(int64, tag = "1")]
    id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseKeepAliveResponse {
    #[prost(int64, tag = "2")]
    id: i64,
    #[prost(int64, tag = "3")]
    ttl: i64,
}

/// `WatchRequest`, whose `request_union` oneof is only ever a create request here (a oneof
/// member is encoded as the field alone).
#[derive(Clone, PartialEq, prost::Message)]
struct WatchRequest {
    #[prost(message, optional, tag = "1")]
    create_request: Option<WatchCreateRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchCreateRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    range_end: Vec<u8>,
    #[prost(int64, tag = "3")]
    start_revision: i64,
    #[prost(bool, tag = "4")]
    progress_notify: bool,
}

/// `WatchResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    /// The header (its revision is the watch's progress).
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// True on the answer to the create request.
    #[prost(bool, tag = "3")]
    pub created: bool,
    /// True when the server ended the watch.
    #[prost(bool, tag = "4")]
    pub canceled: bool,
    /// Set when the start revision was compacted.
    #[prost(int64, tag = "5")]
    pub compact_revision: i64,
    /// Why the server ended the watch.
    #[prost(string, tag = "6")]
    pub cancel_reason: String,
    /// The changes.
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

/// `mvccpb.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// 0: put, 1: delete (an expired lease's keys are deletes).
    #[prost(int32, tag = "1")]
    pub kind: i32,
    /// The key (and, for a put, its new value).
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

/// An event's kind: a delete.
pub const DELETE: i32 = 1;

/// The end of the range of every key starting with `prefix` (its last byte plus one).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// A client of one etcd cluster.
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<Endpoint>,
    timeout: Duration,
    /// The connection in use, and which endpoint it is to.
    connection: Mutex<Option<(usize, Channel)>>,
    /// The endpoint the next connection tries first.
    next: Mutex<usize>,
}

impl Etcd {
    /// A client of the cluster at `endpoints` (`host:port` or `http://host:port`); every call
    /// has `timeout`. Nothing is dialed yet.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self, EtcdError> {
        let endpoints = endpoints
            .iter()
            .map(|text| {
                let url = if text.contains("://") { text.clone() } else { format!("http://{text}") };
                Endpoint::from_shared(url)
                    .map(|e| {
                        e.connect_timeout(timeout)
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(5))
                            .keep_alive_timeout(timeout)
                    })
                    .map_err(|_| EtcdError::BadEndpoint(text.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::BadEndpoint(String::new()));
        }
        Ok(Self { endpoints, timeout, connection: Mutex::new(None), next: Mutex::new(0) })
    }

    /// The connection, dialed (trying each endpoint in turn) when there is none.
    async fn channel(&self) -> Result<Channel, EtcdError> {
        if let Some((_, channel)) = &*self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            return Ok(channel.clone());
        }
        let first = *self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut errors = Vec::new();
        for i in 0..self.endpoints.len() {
            let index = (first + i) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            match tokio::time::timeout(self.timeout, endpoint.connect()).await {
                Ok(Ok(channel)) => {
                    *self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some((index, channel.clone()));
                    return Ok(channel);
                }
                Ok(Err(err)) => errors.push(format!("{}: {err}", endpoint.uri())),
                Err(_) => errors.push(format!("{}: no answer in time", endpoint.uri())),
            }
        }
        Err(EtcdError::Unreachable(errors.join("; ")))
    }

    /// Forgets the connection after a failure: the next call dials the next endpoint.
    fn failed(&self) {
        if let Some((index, _)) = self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            *self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = index + 1;
        }
    }

    async fn unary<Req, Resp>(&self, call: &'static str, path: &'static str, request: Req) -> Result<Resp, EtcdError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let channel = self.channel().await?;
        let mut grpc = Grpc::new(channel);
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let answer = tokio::time::timeout(self.timeout, async {
            grpc.ready().await.map_err(|err| err.to_string())?;
            grpc.unary(tonic::Request::new(request), PathAndQuery::from_static(path), codec)
                .await
                .map_err(|status| status.message().to_owned())
        })
        .await;
        self.outcome(call, answer).map(tonic::Response::into_inner)
    }

    /// A call's result under its deadline: the answer, or the error (after which the connection
    /// is dropped, so that the next call tries the next endpoint).
    fn outcome<T>(
        &self,
        call: &'static str,
        answer: Result<Result<T, String>, tokio::time::error::Elapsed>,
    ) -> Result<T, EtcdError> {
        let error = match answer {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(message)) => EtcdError::Call { call, message },
            Err(_) => EtcdError::Timeout(call),
        };
        self.failed();
        Err(error)
    }

    /// Puts `key` = `value`, attached to `lease` (0: none); returns the store's revision.
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let request = PutRequest { key: key.to_vec(), value: value.to_vec(), lease };
        let response: PutResponse = self.unary("KV/Put", "/etcdserverpb.KV/Put", request).await?;
        Ok(response.header.map_or(0, |h| h.revision))
    }

    /// Deletes `key`; true when it was there.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, EtcdError> {
        let request = DeleteRangeRequest { key: key.to_vec() };
        let response: DeleteRangeResponse =
            self.unary("KV/DeleteRange", "/etcdserverpb.KV/DeleteRange", request).await?;
        Ok(response.deleted > 0)
    }

    /// Every key under `prefix`, and the store's revision they were read at.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let request = RangeRequest { key: prefix.to_vec(), range_end: prefix_end(prefix) };
        let response: RangeResponse = self.unary("KV/Range", "/etcdserverpb.KV/Range", request).await?;
        Ok((response.kvs, response.header.map_or(0, |h| h.revision)))
    }

    /// A lease of `ttl`; returns its id and the TTL the server granted.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let response: LeaseGrantResponse =
            self.unary("Lease/LeaseGrant", "/etcdserverpb.Lease/LeaseGrant", LeaseGrantRequest { ttl }).await?;
        if !response.error.is_empty() {
            return Err(EtcdError::Call { call: "Lease/LeaseGrant", message: response.error });
        }
        Ok((response.id, Duration::from_secs(u64::try_from(response.ttl).unwrap_or(0))))
    }

    /// Revokes lease `id`: its keys are deleted now.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let _: LeaseRevokeResponse =
            self.unary("Lease/LeaseRevoke", "/etcdserverpb.Lease/LeaseRevoke", LeaseRevokeRequest { id }).await?;
        Ok(())
    }

    /// Opens a bidirectional stream: `first` is sent at once, more through the returned sender.
    async fn stream<Req, Resp>(
        &self,
        call: &'static str,
        path: &'static str,
        first: Req,
    ) -> Result<(mpsc::Sender<Req>, tonic::Streaming<Resp>), EtcdError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let channel = self.channel().await?;
        let mut grpc = Grpc::new(channel);
        let (sender, receiver) = mpsc::channel(1);
        sender.try_send(first).map_err(|_| EtcdError::Call { call, message: "could not queue".into() })?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let opened = tokio::time::timeout(self.timeout, async {
            grpc.ready().await.map_err(|err| err.to_string())?;
            let request = tonic::Request::new(ReceiverStream::new(receiver));
            grpc.streaming(request, PathAndQuery::from_static(path), codec).await.map_err(|s| s.message().to_owned())
        })
        .await;
        Ok((sender, self.outcome(call, opened)?.into_inner()))
    }

    /// A keep-alive stream for lease `id`.
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive, EtcdError> {
        let call = "Lease/LeaseKeepAlive";
        let (sender, answers) =
            self.stream(call, "/etcdserverpb.Lease/LeaseKeepAlive", LeaseKeepAliveRequest { id }).await?;
        let mut keep_alive = KeepAlive { id, sender, answers, timeout: self.timeout, first: true };
        keep_alive.beat().await?;
        Ok(keep_alive)
    }

    /// Watches every key under `prefix` from `revision` on; the watch is created when this
    /// returns.
    pub async fn watch_prefix(&self, prefix: &[u8], revision: i64) -> Result<Watch, EtcdError> {
        let create = WatchCreateRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            start_revision: revision,
            progress_notify: true,
        };
        let call = "Watch/Watch";
        let request = WatchRequest { create_request: Some(create) };
        let (sender, events) = self.stream(call, "/etcdserverpb.Watch/Watch", request).await?;
        let mut watch = Watch { _sender: sender, events };
        let created =
            tokio::time::timeout(self.timeout, watch.next()).await.map_err(|_| EtcdError::Timeout(call))??;
        if !created.created {
            return Err(EtcdError::Call { call, message: "the first answer did not create the watch".into() });
        }
        Ok(watch)
    }
}

/// A lease's keep-alive stream.
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    sender: mpsc::Sender<LeaseKeepAliveRequest>,
    answers: tonic::Streaming<LeaseKeepAliveResponse>,
    timeout: Duration,
    /// The first request went with the stream.
    first: bool,
}

impl KeepAlive {
    /// Renews the lease; returns the TTL it has again. A lease etcd no longer knows is
    /// [`EtcdError::LeaseExpired`].
    pub async fn beat(&mut self) -> Result<Duration, EtcdError> {
        let call = "Lease/LeaseKeepAlive";
        let closed = || EtcdError::Call { call, message: "the stream closed".into() };
        if !std::mem::take(&mut self.first) {
            self.sender.send(LeaseKeepAliveRequest { id: self.id }).await.map_err(|_| closed())?;
        }
        let answer = tokio::time::timeout(self.timeout, self.answers.message())
            .await
            .map_err(|_| EtcdError::Timeout(call))?
            .map_err(|status| EtcdError::Call { call, message: status.message().to_owned() })?
            .ok_or_else(closed)?;
        if answer.ttl <= 0 {
            return Err(EtcdError::LeaseExpired);
        }
        Ok(Duration::from_secs(u64::try_from(answer.ttl).unwrap_or(0)))
    }
}

/// A watch's event stream.
#[derive(Debug)]
pub struct Watch {
    /// Kept open: closing it would end the watch.
    _sender: mpsc::Sender<WatchRequest>,
    events: tonic::Streaming<WatchResponse>,
}

impl Watch {
    /// The next answer (events, or progress); a cancelled watch is an error.
    pub async fn next(&mut self) -> Result<WatchResponse, EtcdError> {
        let call = "Watch/Watch";
        let answer = self
            .events
            .message()
            .await
            .map_err(|status| EtcdError::Call { call, message: status.message().to_owned() })?
            .ok_or_else(|| EtcdError::Call { call, message: "the stream closed".into() })?;
        if answer.canceled {
            let reason = if answer.compact_revision > 0 {
                format!("revision compacted to {}", answer.compact_revision)
            } else {
                answer.cancel_reason
            };
            return Err(EtcdError::WatchCancelled(reason));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_prefix_range_ends_after_the_last_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/quictun/"), b"/quictun0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    /// The field numbers are etcd's: a put request encodes as `rpc.proto` says (key 1, value 2,
    /// lease 3), and a watch event decodes from etcd's layout.
    #[test]
    fn messages_use_etcds_field_numbers() {
        let put = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 5 };
        assert_eq!(put.encode_to_vec(), [0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 5]);
        // Event { type: DELETE (1), kv: { key: "k" (1), mod_revision: 7 (3) } }
        let event = Event::decode(&[0x08, 1, 0x12, 5, 0x0a, 1, b'k', 0x18, 7][..]).unwrap();
        assert_eq!(event.kind, DELETE);
        let kv = event.kv.unwrap();
        assert_eq!((kv.key.as_slice(), kv.mod_revision), (&b"k"[..], 7));
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(Etcd::new(&["127.0.0.1:2379".into(), "http://10.0.0.1:2379".into()], Duration::from_secs(1)).is_ok());
        assert!(Etcd::new(&[], Duration::from_secs(1)).is_err());
        assert!(Etcd::new(&["http://bad host".into()], Duration::from_secs(1)).is_err());
    }
}
