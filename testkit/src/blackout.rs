//! A TCP relay that can black out the server behind it: the worker's control database refusing
//! connections at the worst moment (a restart, a failover, a network partition), on cue.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::TestError;

/// Relays 127.0.0.1:`port` to `upstream`. [`Blackout::cut`] closes every relayed connection and
/// stops listening (connections are refused, as by a server that is down); [`Blackout::restore`]
/// listens again on the same port.
pub struct Blackout {
    pub port: u16,
    down: watch::Sender<bool>,
}

impl Blackout {
    pub async fn start(upstream: SocketAddr) -> Result<Self, TestError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (down, state) = watch::channel(false);
        tokio::spawn(serve(listener, port, upstream, state));
        Ok(Self { port, down })
    }

    /// Drops every connection and refuses new ones until [`Blackout::restore`].
    pub fn cut(&self) {
        self.down.send_replace(true);
    }

    pub fn restore(&self) {
        self.down.send_replace(false);
    }

    /// `url` (a postgres:// URL) pointed at the relay instead of its server.
    pub fn relayed_url(&self, url: &str) -> Result<String, TestError> {
        let mut u = url::Url::parse(url)?;
        u.set_host(Some("127.0.0.1"))?;
        u.set_port(Some(self.port))
            .map_err(|_| "the URL takes no port")?;
        Ok(u.to_string())
    }
}

impl Drop for Blackout {
    fn drop(&mut self) {
        // Relayed connections close; the serving task ends with the sender.
        self.down.send_replace(true);
    }
}

async fn serve(
    mut listener: TcpListener,
    port: u16,
    upstream: SocketAddr,
    mut state: watch::Receiver<bool>,
) {
    loop {
        let relays = state.clone();
        let accepted = tokio::select! {
            accepted = listener.accept() => Some(accepted),
            changed = state.wait_for(|d| *d) => {
                if changed.is_err() {
                    return;
                }
                None
            }
        };
        match accepted {
            Some(Ok((client, _))) => {
                tokio::spawn(relay(client, upstream, relays));
            }
            Some(Err(_)) => {}
            None => {
                // Down: no listener at all, so connecting is refused.
                drop(listener);
                if state.wait_for(|d| !*d).await.is_err() {
                    return;
                }
                listener = loop {
                    match TcpListener::bind(("127.0.0.1", port)).await {
                        Ok(l) => break l,
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                    }
                };
            }
        }
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, mut down: watch::Receiver<bool>) {
    if *down.borrow() {
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = down.wait_for(|d| *d) => {}
    }
}
