//! meshd: the mesh node daemon. Parses the command line into a validated
//! configuration, then runs the subcommand (see `mesh_userspace::commands`).

use clap::Parser;
use mesh_userspace::cli::{Cli, Cmd, LogFormat};
use mesh_userspace::commands;
use mesh_userspace::config::{ConfigError, EX_USAGE};
use mesh_userspace::daemon::Failed;

fn main() {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One JSON object per line, fields as keys, for log pipelines.
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    let r = match cli.cmd {
        Cmd::Status(a) => commands::status::run(&a),
        Cmd::Explain(a) => commands::explain::run(&a),
        Cmd::Completions(a) => {
            commands::completions::run(a.shell);
            Ok(())
        }
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
    let fail = |e: &anyhow::Error, code: i32| -> ! {
        // In JSON, the last word is a log line like the others.
        if cli.log_format == LogFormat::Json {
            tracing::error!(exit_status = code, "meshd: error: {e:#}");
        } else {
            eprintln!("meshd: error: {e:#}");
        }
        std::process::exit(code)
    };
    match r {
        Ok(()) => {}
        Err(Failed::Config(ConfigError(e))) => fail(&e, EX_USAGE),
        Err(Failed::Node(e)) => fail(&e, 1),
    }
}
