//! The delaying proxy (see `main.rs`); also compiled into the integration tests.

use std::time::{Duration, Instant};

use anyhow::Result;

/// A TCP proxy that adds `round_trip` to every request/response exchange (half on the way
/// there, half on the way back), so an emulator behind it answers like a remote service. Chunks
/// keep their order and are not serialised behind each other's delays (each leaves half a
/// round trip after it arrived), so calls in flight overlap as they would on a real network.
/// Runs until `shutdown` resolves.
pub async fn delay_proxy(
    listener: tokio::net::TcpListener,
    target: std::net::SocketAddr,
    round_trip: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let latency = round_trip / 2;
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (client, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut shutdown => return Ok(()),
        };
        connections.spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                delay_line(client_read, server_write, latency),
                delay_line(server_read, client_write, latency)
            );
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Copies `from` to `to`, each chunk `latency` after it was read.
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chunks, mut pending) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || chunks.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((read_at, chunk)) = pending.recv().await {
            tokio::time::sleep_until((read_at + latency).into()).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn the_proxy_delays_each_way_and_keeps_calls_overlapping() {
        // An echo server behind a proxy adding 100 ms per round trip: two calls on two
        // connections at once take about 100 ms, not 200.
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                });
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        tokio::spawn(delay_proxy(
            listener,
            target,
            Duration::from_millis(100),
            std::future::pending(),
        ));
        let call = || async move {
            let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        };
        let started = Instant::now();
        tokio::join!(call(), call());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100), "a round trip gains 100 ms: {took:?}");
        assert!(took < Duration::from_millis(200), "the two calls overlap: {took:?}");
    }
}
