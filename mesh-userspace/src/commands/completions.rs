//! `meshd completions SHELL`: the shell completion script, from the
//! command line's own definition (so it never lags behind it).

use clap::CommandFactory;

use crate::cli::Cli;

pub fn run(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "meshd", &mut std::io::stdout());
}
