//! What runs in a task host: TCP and UDP servers speaking a line protocol
//! that names the task in every answer, and `Conn`, a client connection
//! speaking it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, bail};

use super::shell::in_netns;

/// The port every task serves TCP on.
pub const TCP_TARGET: u16 = 8080;
/// The port every task serves UDP on.
pub const UDP_TARGET: u16 = 5353;

/// A client connection speaking the task servers' line protocol.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Wraps a connected stream, with 3 s read and write timeouts so that a
    /// lost answer fails the request instead of hanging the test.
    pub fn new(stream: TcpStream) -> Result<Conn> {
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_write_timeout(Some(Duration::from_secs(3)))?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// Sends a line, returns the answer line ("task<i> <line>").
    pub fn ask(&mut self, line: &str) -> Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer)?;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(answer.trim_end().to_string())
    }

    /// The address this connection is connected to.
    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    /// The local address of this connection (the client's side).
    pub fn local(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// The task that answers on this connection.
    pub fn task(&mut self) -> Result<String> {
        Ok(self
            .ask("who")?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

/// A task host's servers: TCP echo with a name prefix (one thread per
/// connection, lines until the client closes) and UDP likewise.
pub struct TaskServer {
    pub name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl TaskServer {
    /// Starts both servers in namespace `ns`; every answer starts with `name`.
    pub fn start(ns: &str, name: &str) -> Result<TaskServer> {
        let tcp = in_netns(ns, || TcpListener::bind(("0.0.0.0", TCP_TARGET)))??;
        let udp = in_netns(ns, || UdpSocket::bind(("0.0.0.0", UDP_TARGET)))??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let mut threads = Vec::new();
        {
            let (stop, name, conns) = (stop.clone(), name.to_string(), conns.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            if let Ok(c) = s.try_clone() {
                                conns.lock().unwrap().push(c);
                            }
                            let name = name.clone();
                            std::thread::spawn(move || serve_tcp(s, &name));
                        }
                        // Nothing to accept: poll the stop flag again.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        {
            let (stop, name) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let a = answer(&name, &String::from_utf8_lossy(&buf[..n]), from);
                        let _ = udp.send_to(a.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(TaskServer {
            name: name.to_string(),
            stop,
            threads,
            conns,
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TaskServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The line protocol: "peer" is answered with the address the task sees
/// the client at, "big N" with N bytes of 'x'; anything else is echoed.
/// Every answer starts with the task's name.
pub fn answer(name: &str, line: &str, peer: SocketAddr) -> String {
    if line == "peer" {
        return format!("{name} {peer}");
    }
    if let Some(n) = line
        .strip_prefix("big ")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return format!("{name} {}", "x".repeat(n.min(1 << 20)));
    }
    format!("{name} {line}")
}

fn serve_tcp(s: TcpStream, name: &str) {
    let Ok(read) = s.try_clone() else { return };
    let Ok(peer) = s.peer_addr() else { return };
    let mut w = s;
    for line in BufReader::new(read).lines() {
        let Ok(line) = line else { return };
        if w.write_all(format!("{}\n", answer(name, &line, peer)).as_bytes())
            .is_err()
        {
            return;
        }
    }
}
