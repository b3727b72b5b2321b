//! Owns [`FaultProxy`]: a TCP proxy on `127.0.0.1` between a client and a PostgreSQL server
//! that tests can make slow, silent, refusing or resetting, at any moment.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpListener, TcpStream,
    },
    sync::watch,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{Result, TestkitError};

/// The faults in force; every connection watches it, so changes apply at once.
#[derive(Debug, Clone)]
struct Faults {
    upstream: SocketAddr,
    connect_delay: Duration,
    to_server: Duration,
    to_client: Duration,
    blackhole: bool,
    refuse: bool,
    /// Bumped by `reset_all`; connections accepted before the bump close abruptly.
    resets: u64,
}

#[derive(Debug)]
struct Shared {
    faults: watch::Sender<Faults>,
    open: AtomicUsize,
    total: AtomicUsize,
}

/// A TCP proxy listening on `127.0.0.1` that forwards to an upstream server and injects faults
/// on demand. The controls take `&self`, are cheap, and apply immediately to new and (except
/// for the connect delay and refusal, which concern connecting) existing connections.
///
/// Dropping the proxy stops listening and resets every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(TestkitError::io("binding the fault proxy"))?;
        let addr = listener
            .local_addr()
            .map_err(TestkitError::io("reading the fault proxy's address"))?;
        let shared = Arc::new(Shared {
            faults: watch::Sender::new(Faults {
                upstream,
                connect_delay: Duration::ZERO,
                to_server: Duration::ZERO,
                to_client: Duration::ZERO,
                blackhole: false,
                refuse: false,
                resets: 0,
            }),
            open: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown.clone()));
        Ok(Self {
            addr,
            shared,
            shutdown,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`, through the proxy.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@{}/{database}", self.addr)
    }

    /// Where connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.faults.borrow().upstream
    }

    /// Forwards new connections to `upstream`; open ones stay where they are.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.modify(|f| f.upstream = upstream);
    }

    /// New connections are accepted but not forwarded until `delay` after they were accepted,
    /// like a database waking from suspension. Changing it (or [`heal`](Self::heal)) also
    /// applies to connections still waiting.
    pub fn delay_connect(&self, delay: Duration) {
        self.modify(|f| f.connect_delay = delay);
    }

    /// Delays every chunk of data by `latency`, in both directions.
    pub fn latency(&self, latency: Duration) {
        self.modify(|f| (f.to_server, f.to_client) = (latency, latency));
    }

    /// Delays every chunk from the client to the server by `latency`.
    pub fn latency_to_server(&self, latency: Duration) {
        self.modify(|f| f.to_server = latency);
    }

    /// Delays every chunk from the server to the client by `latency`.
    pub fn latency_to_client(&self, latency: Duration) {
        self.modify(|f| f.to_client = latency);
    }

    /// While on, sockets stay open but nothing is forwarded either way. Data sent meanwhile is
    /// held back (as TCP would retransmit it) and flows once the blackhole is off.
    pub fn blackhole(&self, on: bool) {
        self.modify(|f| f.blackhole = on);
    }

    /// While on, new connections are reset right after being accepted, so connecting fails fast.
    pub fn refuse(&self, on: bool) {
        self.modify(|f| f.refuse = on);
    }

    /// Closes every open connection abruptly (TCP RST to both sides).
    pub fn reset_all(&self) {
        self.modify(|f| f.resets += 1);
    }

    /// Back to normal: no connect delay, latency, blackhole or refusal.
    pub fn heal(&self) {
        self.modify(|f| {
            f.connect_delay = Duration::ZERO;
            f.to_server = Duration::ZERO;
            f.to_client = Duration::ZERO;
            f.blackhole = false;
            f.refuse = false;
        });
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the proxy started, refused ones included.
    pub fn total_connections(&self) -> usize {
        self.shared.total.load(Ordering::SeqCst)
    }

    fn modify(&self, change: impl FnOnce(&mut Faults)) {
        self.shared.faults.send_modify(change);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let client = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(error) => {
                    tracing::debug!(%error, "fault proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        shared.total.fetch_add(1, Ordering::SeqCst);
        let (refuse, resets) = {
            let faults = shared.faults.borrow();
            (faults.refuse, faults.resets)
        };
        if refuse {
            abort(&client);
            continue;
        }
        let _ = client.set_nodelay(true);
        let open = OpenConnection::new(shared.clone());
        tokio::spawn(serve(client, open, resets, shutdown.clone()));
    }
}

/// Counts a connection as open while alive.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs one proxied connection until either side closes, a reset, or the proxy's drop.
async fn serve(
    mut client: TcpStream,
    open: OpenConnection,
    resets: u64,
    shutdown: CancellationToken,
) {
    let shared = &open.0;
    let mut reset = shared.faults.subscribe();
    let mut server = None;
    let clean = tokio::select! {
        biased;
        () = shutdown.cancelled() => false,
        () = async { let _ = reset.wait_for(|f| f.resets != resets).await; } => false,
        forwarded = forward(&mut client, &mut server, shared) => match forwarded {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%error, "fault proxy: connection failed");
                false
            }
        },
    };
    if !clean {
        abort(&client);
        if let Some(server) = &server {
            abort(server);
        }
    }
}

/// Connects upstream once the connect delay has passed, then copies both ways until both
/// sides have closed.
async fn forward(
    client: &mut TcpStream,
    server: &mut Option<TcpStream>,
    shared: &Shared,
) -> io::Result<()> {
    let accepted = Instant::now();
    let mut faults = shared.faults.subscribe();
    loop {
        let delay = faults.borrow_and_update().connect_delay;
        tokio::select! {
            () = tokio::time::sleep_until(accepted + delay) => break,
            changed = faults.changed() => changed.map_err(|_| closed())?,
        }
    }
    pass(&mut faults).await?;
    let upstream = faults.borrow().upstream;
    let server = server.insert(TcpStream::connect(upstream).await?);
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::try_join!(
        pump(client_read, server_write, shared.faults.subscribe(), |f| f
            .to_server),
        pump(server_read, client_write, shared.faults.subscribe(), |f| f
            .to_client),
    )?;
    Ok(())
}

/// Copies one direction chunk by chunk, honouring latency and blackhole; passes EOF on.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut faults: watch::Receiver<Faults>,
    latency: fn(&Faults) -> Duration,
) -> io::Result<()> {
    let mut buf = vec![0; 16 * 1024];
    loop {
        pass(&mut faults).await?;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let delay = latency(&faults.borrow());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        pass(&mut faults).await?;
        to.write_all(&buf[..n]).await?;
    }
}

/// Waits while the blackhole is on.
async fn pass(faults: &mut watch::Receiver<Faults>) -> io::Result<()> {
    faults
        .wait_for(|f| !f.blackhole)
        .await
        .map(drop)
        .map_err(|_| closed())
}

fn closed() -> io::Error {
    io::Error::other("fault proxy dropped")
}

/// Makes closing `stream` send a TCP RST instead of a FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
