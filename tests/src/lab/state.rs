//! meshd's state file (README.md, "The state file") as the lab writes it:
//! nodes, services with their published ports, and tasks with their node.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};

use super::task::{TCP_TARGET, UDP_TARGET};

/// The lab's service "web" publishes the tasks' TCP port here...
pub const WEB_TCP: u16 = 30080;
/// ...and their UDP port here.
pub const WEB_UDP: u16 = 30053;

/// A published port: protocol ("tcp" or "udp"), published, target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: String,
    pub published: u16,
    pub target: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateTask {
    pub service: String,
    pub node: String,
    pub addr: Ipv4Addr,
}

/// A state file, built up and rendered as TOML.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateFile {
    pub nodes: Vec<(String, Ipv4Addr)>,
    pub services: Vec<Service>,
    pub tasks: Vec<StateTask>,
}

impl StateFile {
    pub fn new() -> StateFile {
        StateFile::default()
    }

    pub fn node(mut self, name: &str, addr: Ipv4Addr) -> StateFile {
        self.nodes.push((name.to_string(), addr));
        self
    }

    /// A service with `(protocol, published, target)` ports.
    pub fn service(mut self, name: &str, ports: &[(&str, u16, u16)]) -> StateFile {
        self.services.push(Service {
            name: name.to_string(),
            ports: ports
                .iter()
                .map(|&(protocol, published, target)| Port {
                    protocol: protocol.to_string(),
                    published,
                    target,
                })
                .collect(),
        });
        self
    }

    /// The lab's service: "web", tcp WEB_TCP -> TCP_TARGET and udp
    /// WEB_UDP -> UDP_TARGET, which the task servers answer on.
    pub fn web(self) -> StateFile {
        self.service(
            "web",
            &[("tcp", WEB_TCP, TCP_TARGET), ("udp", WEB_UDP, UDP_TARGET)],
        )
    }

    pub fn task(mut self, service: &str, node: &str, addr: Ipv4Addr) -> StateFile {
        self.tasks.push(StateTask {
            service: service.to_string(),
            node: node.to_string(),
            addr,
        });
        self
    }

    /// The TOML text. Each port is one line (`{ protocol = "tcp",
    /// published = 30080, target = 8080 }`), so tests can break a file
    /// with a plain text replacement.
    pub fn render(&self) -> String {
        let mut s = String::from("# written by the mesh test lab\n");
        for (name, addr) in &self.nodes {
            let _ = write!(s, "[[nodes]]\nname = \"{name}\"\naddr = \"{addr}\"\n\n");
        }
        for (k, svc) in self.services.iter().enumerate() {
            if k > 0 {
                s.push('\n');
            }
            let ports: Vec<String> = svc
                .ports
                .iter()
                .map(|p| {
                    format!(
                        "{{ protocol = \"{}\", published = {}, target = {} }}",
                        p.protocol, p.published, p.target
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "[[services]]\nname = \"{}\"\nports = [ {} ]",
                svc.name,
                ports.join(",\n          ")
            );
        }
        for t in &self.tasks {
            let _ = write!(
                s,
                "\n[[tasks]]\nservice = \"{}\"\nnode = \"{}\"\naddr = \"{}\"\n",
                t.service, t.node, t.addr
            );
        }
        s
    }
}

/// Replaces a state file atomically (meshd never reads half of it).
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_format_meshd_reads() {
        let n1 = Ipv4Addr::new(198, 18, 128, 1);
        let t = Ipv4Addr::new(198, 18, 129, 2);
        let text = StateFile::new()
            .node("n1", n1)
            .web()
            .task("web", "n1", t)
            .render();
        assert_eq!(
            text,
            "# written by the mesh test lab\n[[nodes]]\nname = \"n1\"\naddr = \"198.18.128.1\"\n\n\
             [[services]]\nname = \"web\"\n\
             ports = [ { protocol = \"tcp\", published = 30080, target = 8080 },\n          \
             { protocol = \"udp\", published = 30053, target = 5353 } ]\n\
             \n[[tasks]]\nservice = \"web\"\nnode = \"n1\"\naddr = \"198.18.129.2\"\n"
        );
    }
}
