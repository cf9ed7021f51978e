//! A TCP proxy in front of the broker whose connections a test can cut, to lose a client's
//! connection the way a network failure does, without access to the broker itself. It can
//! also terminate TLS, to test `amqps://` against a broker that speaks plain AMQP.

use std::sync::{Arc, Mutex, PoisonError};

use lapin::uri::{AMQPScheme, AMQPUri};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_rustls::TlsAcceptor;

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
        Proxy::spawn(broker_url, None).await
    }

    /// A proxy that takes TLS from clients with `acceptor` and forwards plain AMQP; its
    /// [`url`](Proxy::url) is `amqps://`. A failed handshake (say, no client certificate)
    /// just drops the client.
    pub(crate) async fn start_tls(broker_url: &str, acceptor: TlsAcceptor) -> Proxy {
        Proxy::spawn(broker_url, Some(acceptor)).await
    }

    async fn spawn(broker_url: &str, tls: Option<TlsAcceptor>) -> Proxy {
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
        if tls.is_some() {
            uri.scheme = AMQPScheme::AMQPS;
        }
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let registry = Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let tls = tls.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    match tls {
                        None => {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                        Some(acceptor) => {
                            if let Ok(mut client) = acceptor.accept(client).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        }
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
