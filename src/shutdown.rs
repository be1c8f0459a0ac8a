//! The one owner of "has shutdown begun" for an ingest run: the writer begins it when the
//! caller's shutdown future resolves; receivers wait on it, and retries stop once it has begun.
//! (mini-redis's `Shutdown`: one small type, no second flag beside it.)

use std::sync::Arc;

use tokio::sync::watch;

/// Cheap to clone: every clone sees the same state.
#[derive(Clone)]
pub struct Shutdown {
    begun: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { begun: Arc::new(watch::Sender::new(false)) }
    }
}

impl Shutdown {
    /// Begins shutdown (idempotent).
    pub fn begin(&self) {
        self.begun.send_replace(true);
    }

    /// True once [`Shutdown::begin`] has been called.
    pub fn has_begun(&self) -> bool {
        *self.begun.borrow()
    }

    /// Resolves when shutdown begins (at once if it already has), owning what it waits on: for
    /// work that stops on a future (`Ingestor::ingest`, `pipeline::once`).
    pub fn begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut listener = self.listen();
        async move { listener.begun().await }
    }

    /// A listener that resolves [`Listener::begun`] when shutdown begins.
    pub fn listen(&self) -> Listener {
        Listener { begun: self.begun.subscribe() }
    }
}

/// Waits for shutdown to begin (one per task).
pub struct Listener {
    begun: watch::Receiver<bool>,
}

impl Listener {
    /// True once shutdown has begun.
    pub fn has_begun(&self) -> bool {
        *self.begun.borrow()
    }

    /// Resolves when shutdown begins (at once if it already has).
    pub async fn begun(&mut self) {
        // An error means the sender is gone: nobody can begin it any more, so wait forever.
        if self.begun.wait_for(|begun| *begun).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_sees_shutdown_begin_once() {
        let shutdown = Shutdown::default();
        let mut early = shutdown.listen();
        assert!(!shutdown.has_begun() && !early.has_begun());
        let waiting = tokio::spawn(async move { early.begun().await });
        shutdown.clone().begin();
        waiting.await.unwrap();
        let mut late = shutdown.listen();
        late.begun().await;
        assert!(shutdown.has_begun() && late.has_begun());
    }
}
