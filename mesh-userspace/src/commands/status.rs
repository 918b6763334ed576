//! `meshd status`: the running meshd's `/status`, or the pinned maps',
//! as tables or JSON (see [`crate::status`]).

use anyhow::anyhow;

use crate::cli::StatusArgs;
use crate::daemon::Failed;
use crate::dataplane::pin::PIN_DIR;

pub fn run(a: &StatusArgs) -> Result<(), Failed> {
    let v = match super::drain::get(a.admin_addr, "/status") {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .map(|mut v| {
                v["from"] = format!("the running meshd at {}", a.admin_addr).into();
                v
            })
            .map_err(|e| anyhow!("/status on {}: {e}", a.admin_addr))?,
        Ok((code, body)) => {
            return Err(Failed::Node(anyhow!(
                "meshd at {} answers {code}: {}",
                a.admin_addr,
                body.trim()
            )));
        }
        Err(e) => {
            let root = a.bpffs.join(PIN_DIR);
            if !root.join("maps").is_dir() {
                return Err(Failed::Node(anyhow!(
                    "no meshd answers on {} ({e:#}) and nothing is pinned under {}",
                    a.admin_addr,
                    root.display()
                )));
            }
            crate::status::of_pins(&root)?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", crate::status::render(&v));
    }
    Ok(())
}
