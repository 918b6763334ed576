//! One module per `meshd` subcommand. A subcommand is a variant of
//! [`crate::cli::Cmd`], its arguments turned into a validated config in
//! [`crate::cli`], and a `run` function here.

pub mod check;
pub mod cleanup;
pub mod completions;
pub mod drain;
pub mod explain;
pub mod run;
pub mod status;
