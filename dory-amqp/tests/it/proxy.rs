//! A TCP proxy in front of the broker whose connections a test can cut, to lose a publisher's
//! connection the way a network failure does, without access to the broker itself.

use std::sync::{Arc, Mutex, PoisonError};

use lapin::uri::AMQPUri;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Forwards connections to the broker until dropped; [`Proxy::cut`] severs the current ones.
pub(crate) struct Proxy {
    /// The broker URL with the proxy as its host.
    pub(crate) url: String,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port in front of the broker at `broker_url`.
    pub(crate) async fn start(broker_url: &str) -> Proxy {
        let mut uri: AMQPUri = broker_url
            .parse()
            .unwrap_or_else(|e| panic!("test broker URL: {e}"));
        let upstream = format!("{}:{}", uri.authority.host, uri.authority.port);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("proxy bind: {e}"));
        let local = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy address: {e}"));
        uri.authority.host = local.ip().to_string();
        uri.authority.port = local.port();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let registry = Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                registry
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(task.abort_handle());
            }
        });
        Proxy {
            url: uri.to_string(),
            connections,
            accept,
        }
    }

    /// Severs every connection made so far; later ones are forwarded again.
    pub(crate) fn cut(&self) {
        for connection in self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
