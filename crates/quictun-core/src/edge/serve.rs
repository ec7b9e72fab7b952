//! What every HTTP listener here (the ingress, the egress listener, the admin endpoint, the gRPC
//! listener) does with a connection it serves, written once: drive it until it ends, and when
//! told to stop, end it with a drain (requests in flight finish, an idle keep-alive connection
//! closes at once, HTTP/2 sends GOAWAY); and the plain-text answers they give themselves.

use std::future::Future;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use hyper_util::server::graceful::GracefulConnection;
use tracing::debug;

/// Serves `conn` until it ends or `stop` resolves; then drains it. A connection error is logged
/// (at debug: a client that goes away is no news) naming the listener `what`.
pub async fn serve_with_drain<C>(conn: C, stop: impl Future<Output = ()>, what: &'static str)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        debug!(%err, listener = what, "connection ended with an error");
    }
}

/// A plain-text answer a listener gives itself (an error, a refusal): `message` and a line
/// break, as UTF-8 text; a 503 also says when to retry. `body` makes the listener's body type
/// from the bytes.
pub fn plain_text<B>(status: StatusCode, message: &str, body: impl FnOnce(Bytes) -> B) -> Response<B> {
    let mut response = Response::new(body(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_text_answer_says_its_type_and_when_to_retry() {
        let busy = plain_text(StatusCode::SERVICE_UNAVAILABLE, "busy", |b| b);
        assert_eq!(busy.body().as_ref(), b"busy\n");
        assert_eq!(busy.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
        let missing = plain_text(StatusCode::NOT_FOUND, "no route", |b| b);
        assert!(missing.headers().get(header::RETRY_AFTER).is_none());
    }
}
