//! A TCP proxy between the gateway and the engine that can cut, reset or blackhole
//! the link, and refuse new connections, on command.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Keep every socket open but forward nothing: a half-open link.
    Blackhole,
    /// Accept new connections and close them at once.
    Refuse,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to make every live link close; `reset` asks for an RST instead of a FIN.
    cut: watch::Sender<(u64, bool)>,
    /// Reads from the upstream forwarded to the gateway, over all links.
    forwarded: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (cut, cut_rx) = watch::channel((0u64, false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let chunks = Arc::clone(&forwarded);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *mode_rx.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(link(
                    client,
                    server,
                    mode_rx.clone(),
                    cut_rx.clone(),
                    Arc::clone(&chunks),
                ));
            }
        });
        Proxy {
            addr,
            mode,
            cut,
            forwarded,
            task,
        }
    }

    /// Reads from the upstream forwarded to the gateway so far, over all links.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every live link with a FIN (`reset = false`) or an RST.
    pub fn cut_all(&self, reset: bool) {
        self.cut.send_modify(|(n, r)| {
            *n += 1;
            *r = reset;
        });
    }
}

async fn link(
    client: TcpStream,
    server: TcpStream,
    mut mode: watch::Receiver<Mode>,
    mut cut: watch::Receiver<(u64, bool)>,
    forwarded: Arc<AtomicU64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut a = vec![0u8; 64 * 1024];
    let mut b = vec![0u8; 64 * 1024];
    cut.mark_unchanged();
    loop {
        if *mode.borrow() == Mode::Blackhole {
            // Hold both sockets, move nothing, until cut.
            tokio::select! {
                _ = cut.changed() => break,
                _ = mode.changed() => continue,
            }
        }
        tokio::select! {
            _ = cut.changed() => break,
            _ = mode.changed() => continue,
            r = cr.read(&mut a) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => if sw.write_all(&a[..n]).await.is_err() { break },
            },
            r = sr.read(&mut b) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if cw.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                    forwarded.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
    }
    let reset = cut.borrow().1;
    let client = cr.reunite(cw).ok();
    let server = sr.reunite(sw).ok();
    for s in [client, server].into_iter().flatten() {
        if reset {
            let _ = s.set_zero_linger();
        }
        drop(s);
    }
}
