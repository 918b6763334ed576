//! meshd: the mesh node daemon. Parses the command line into a validated
//! configuration, then runs the subcommand (see `mesh_userspace::commands`).

use clap::Parser;
use mesh_userspace::cli::{Cli, Cmd};
use mesh_userspace::commands;
use mesh_userspace::config::{ConfigError, EX_USAGE};
use mesh_userspace::daemon::Failed;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let r = match Cli::parse().cmd {
        Cmd::Check(a) => a
            .config()
            .and_then(commands::check::run)
            .map_err(Failed::Config),
        Cmd::Run(a) => a
            .config()
            .map_err(Failed::Config)
            .and_then(commands::run::run),
        Cmd::Drain(a) => a
            .config()
            .map_err(Failed::Config)
            .and_then(commands::drain::run),
        Cmd::Undrain(a) => a
            .config()
            .map_err(Failed::Config)
            .and_then(commands::drain::run),
        Cmd::Cleanup(a) => a
            .config()
            .map_err(Failed::Config)
            .and_then(commands::cleanup::run),
    };
    match r {
        Ok(()) => {}
        Err(Failed::Config(ConfigError(e))) => {
            eprintln!("meshd: error: {e:#}");
            std::process::exit(EX_USAGE);
        }
        Err(Failed::Node(e)) => {
            eprintln!("meshd: error: {e:#}");
            std::process::exit(1);
        }
    }
}
