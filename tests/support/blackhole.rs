//! A TCP relay whose connections can be made to go silent (`Blackhole::silence`): they stay
//! open but no byte passes either way, as when the peer, or a NAT or load balancer between,
//! vanishes without a FIN or RST. Connections made after that pass bytes again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use super::AbortOnDrop;

pub struct Blackhole {
    pub port: u16,
    /// Connections made before this epoch are silent.
    epoch: Arc<AtomicUsize>,
    _tasks: Arc<Mutex<Vec<AbortOnDrop>>>,
}

impl Blackhole {
    /// A relay on 127.0.0.1:0 to `target_port` on 127.0.0.1.
    pub async fn start(target_port: u16) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let epoch = Arc::new(AtomicUsize::new(0));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (current, held) = (Arc::clone(&epoch), Arc::clone(&tasks));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (from, to) in [(cr, sw), (sr, cw)] {
                    let current = Arc::clone(&current);
                    let live = move || current.load(Ordering::SeqCst) == born;
                    let task = tokio::spawn(pipe(from, to, live));
                    held.lock().unwrap().push(AbortOnDrop(task));
                }
            }
        });
        tasks.lock().unwrap().push(AbortOnDrop(accept));
        Blackhole {
            port,
            epoch,
            _tasks: tasks,
        }
    }

    /// Every connection open now goes silent, for good.
    pub fn silence(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while `live()`; then swallows what comes and holds both open.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, live: impl Fn() -> bool) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if live() && to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if live() {
        let _ = to.shutdown().await;
        return;
    }
    std::future::pending::<()>().await;
}
