//! The outage proxy.

use super::TestDb;

/// A TCP proxy in front of a real service, for outages that touch no other test: during
/// [`Proxy::outage`] it refuses connections and cuts the open ones, then serves again on the
/// same port. (Stopping the shared PostgreSQL or LocalStack would break parallel tests, and
/// LocalStack keeps no state across a restart.)
pub struct Proxy {
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, mut up_rx) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            let mut listener = Some(listener);
            let mut connections = tokio::task::JoinSet::new();
            loop {
                if *up_rx.borrow() {
                    let l = match &listener {
                        Some(l) => l,
                        None => {
                            listener =
                                tokio::net::TcpListener::bind(("127.0.0.1", port)).await.ok();
                            continue;
                        }
                    };
                    tokio::select! {
                        accepted = l.accept() => if let Ok((mut client, _)) = accepted {
                            connections.spawn(async move {
                                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                }
                            });
                        },
                        changed = up_rx.changed() => if changed.is_err() { return },
                    }
                } else {
                    // Down: no listener (connections are refused) and no open connection.
                    listener = None;
                    connections.abort_all();
                    if up_rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
        Self { port, up, task }
    }

    /// A proxy in front of the test database, and the database URL that goes through it.
    pub async fn for_database(db: &TestDb) -> (Self, String) {
        let target = socket_of(&db.url);
        let proxy = Self::start(target).await;
        let url = db.url.replacen(&target.port().to_string(), &proxy.port.to_string(), 1);
        (proxy, url)
    }

    /// Refuses and cuts every connection for `duration`, then serves again.
    pub async fn outage(&self, duration: std::time::Duration) {
        self.up.send(false).unwrap();
        tokio::time::sleep(duration).await;
        self.up.send(true).unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `host:port` of a URL's authority (`scheme://[user@]host:port/...`), resolved.
pub fn socket_of(url: &str) -> std::net::SocketAddr {
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    std::net::ToSocketAddrs::to_socket_addrs(host_port).unwrap().next().unwrap()
}
