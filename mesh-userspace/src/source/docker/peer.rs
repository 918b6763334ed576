//! The view stream: meshd on managers serves its [`SwarmView`] to meshd on
//! workers, read-only, over mutual TLS with the swarm's PKI ([`super::tls`]).
//!
//! Protocol: the server writes JSON lines and reads nothing. On connect and
//! whenever its view changes it writes `{"view": {...}}`; otherwise
//! `{"alive": true}` every [`HEARTBEAT`]. When its own read of the swarm
//! fails (the manager lost quorum, its dockerd is gone) it writes
//! `{"unavailable": "why"}` and closes, so that workers go to another
//! manager. A worker follows one manager at a time, in the order its
//! dockerd lists them (`Swarm.RemoteManagers`), and moves to the next when
//! the stream fails or stays silent for [`SILENCE`]. Swarm stays the only
//! source of truth: each manager serves what its own dockerd reads from
//! the swarm's store; there is nothing to agree on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::tls::SwarmPki;
use super::view::SwarmView;

/// How often a server says it is alive when nothing changed.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a worker waits for a line before it gives a manager up.
pub const SILENCE: Duration = Duration::from_secs(7);
/// Connecting and the TLS handshake, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams a manager serves at once (one per worker, and some room).
const MAX_STREAMS: usize = 1024;
/// The longest line a worker takes.
const MAX_LINE: usize = 64 << 20;

/// One line of the stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Message {
    View(SwarmView),
    Alive(bool),
    Unavailable(String),
}

/// What a manager serves: its latest view, or why it has none now.
pub type Served = Result<Arc<SwarmView>, Arc<str>>;

/// Serves `views` to every client that proves it is a node of this swarm,
/// until the process exits.
pub async fn serve(listener: TcpListener, pki: SwarmPki, views: watch::Receiver<Served>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("view stream: accept failed ({e}); backing off");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (pki, views) = (pki.clone(), views.clone());
        tokio::spawn(async move {
            if let Err(e) = stream_to(sock, &pki, views).await {
                debug!(%peer, "view stream ended: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn stream_to(
    sock: TcpStream,
    pki: &SwarmPki,
    mut views: watch::Receiver<Served>,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config()?);
    let mut tls = tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(sock))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    loop {
        let current = views.borrow_and_update().clone();
        let msg = match current {
            Ok(v) => Message::View((*v).clone()),
            Err(why) => Message::Unavailable(why.to_string()),
        };
        let stop = matches!(msg, Message::Unavailable(_));
        write(&mut tls, &msg).await?;
        if stop {
            tls.shutdown().await.ok();
            return Ok(());
        }
        // Heartbeats until the view changes.
        loop {
            tokio::select! {
                r = views.changed() => { r.context("the source stopped")?; break; }
                _ = tokio::time::sleep(HEARTBEAT) => write(&mut tls, &Message::Alive(true)).await?,
            }
        }
    }
}

async fn write<W: AsyncWriteExt + Unpin>(w: &mut W, m: &Message) -> Result<()> {
    let mut line = serde_json::to_vec(m)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}

/// What a worker knows from managers.
#[derive(Clone, Debug, Default)]
pub struct Followed {
    /// The last view a manager sent (kept when managers are lost).
    pub view: Option<Arc<SwarmView>>,
    /// A manager vouches for it now.
    pub live: bool,
    /// The manager it came from.
    pub from: Option<SocketAddr>,
}

/// Where the worker looks for managers: their view stream addresses, and
/// its certificates.
#[derive(Clone, Debug)]
pub struct Managers {
    pub addrs: Vec<SocketAddr>,
    pub pki: SwarmPki,
}

/// Follows managers' view streams, one at a time, failing over, until
/// the process exits. `managers` says where they are (it changes as the
/// swarm does); `out` gets every view and every loss.
pub async fn follow(mut managers: watch::Receiver<Option<Managers>>, out: watch::Sender<Followed>) {
    let mut start = 0usize;
    let mut backoff = Duration::from_millis(250);
    let mut said: Option<String> = None;
    loop {
        let Some(m) = managers.borrow_and_update().clone() else {
            if managers.changed().await.is_err() {
                return;
            }
            continue;
        };
        if m.addrs.is_empty() {
            say(
                &mut said,
                "no manager is known (Swarm.RemoteManagers is empty)".into(),
            );
        }
        let mut any = false;
        for k in 0..m.addrs.len() {
            let i = (start + k) % m.addrs.len();
            let addr = m.addrs[i];
            let mut served = false;
            let e = follow_one(addr, &m.pki, &out, &mut said, &mut served).await;
            say(&mut said, format!("manager {addr}: {e:#}"));
            // Not live now, whatever happened; the last view stays.
            out.send_if_modified(|f| std::mem::replace(&mut f.live, false));
            if served {
                // It served for a while: start the next round with the
                // next manager, at once.
                start = i + 1;
                any = true;
                backoff = Duration::from_millis(250);
                break;
            }
        }
        if !any {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = managers.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Logs a failure once until another one (or a success) comes.
fn say(said: &mut Option<String>, what: String) {
    if said.as_deref() != Some(what.as_str()) {
        warn!("managers' view: {what}; keeping the last view");
        *said = Some(what);
    }
}

/// Follows one manager until its stream fails (why); `served` says
/// whether it sent a view first.
async fn follow_one(
    addr: SocketAddr,
    pki: &SwarmPki,
    out: &watch::Sender<Followed>,
    said: &mut Option<String>,
    served: &mut bool,
) -> anyhow::Error {
    match stream_from(addr, pki, out, said, served).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn stream_from(
    addr: SocketAddr,
    pki: &SwarmPki,
    out: &watch::Sender<Followed>,
    said: &mut Option<String>,
    served: &mut bool,
) -> Result<std::convert::Infallible> {
    let connector = tokio_rustls::TlsConnector::from(pki.client_config()?);
    let sock = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .context("connect")?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        connector.connect(SwarmPki::manager_name(), sock),
    )
    .await
    .context("TLS handshake timed out")?
    .context("TLS handshake")?;
    let mut lines = BufReader::new(tls);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(SILENCE, lines.read_until(b'\n', &mut line))
            .await
            .with_context(|| format!("silent for {SILENCE:?}"))??;
        if n == 0 {
            bail!("closed the stream");
        }
        if line.len() > MAX_LINE {
            bail!("a line of {} bytes", line.len());
        }
        match serde_json::from_slice::<Message>(&line).context("an unreadable line")? {
            Message::View(v) => {
                *served = true;
                if out.borrow().from != Some(addr) || !out.borrow().live {
                    info!(manager = %addr, "following the managers' view");
                    *said = None;
                }
                out.send_replace(Followed {
                    view: Some(Arc::new(v)),
                    live: true,
                    from: Some(addr),
                });
            }
            Message::Alive(_) => {}
            Message::Unavailable(why) => bail!("cannot read the swarm now: {why}"),
        }
    }
}
