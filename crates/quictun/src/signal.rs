//! Waiting for Ctrl-C or SIGTERM, and SIGHUP (reload).

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The signals are caught from the moment this is called
/// (not from the first poll), so that a SIGTERM sent right after the banner (a quick service stop)
/// still drains instead of killing the process.
pub fn shutdown() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let (term, interrupt) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = term.recv() => {}
                }
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(%err, "cannot listen for SIGTERM or SIGINT; waiting for Ctrl-C only");
                let _ctrl_c = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// SIGHUP deliveries (the relay reloads its configuration on each); never fires where SIGHUP
/// cannot be caught.
pub struct Hangups(Option<tokio::signal::unix::Signal>);

/// Starts listening for SIGHUP.
pub fn hangups() -> Hangups {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Hangups(Some(signal)),
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGHUP; the configuration is still reloaded when its file changes");
            Hangups(None)
        }
    }
}

impl Hangups {
    /// The next SIGHUP.
    pub async fn recv(&mut self) {
        match self.0.as_mut() {
            Some(signal) => {
                if signal.recv().await.is_none() {
                    self.0 = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}
