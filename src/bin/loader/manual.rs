//! `loader completions` and `loader man`: the completion scripts, the man page and the Markdown
//! reference (docs/cli.md) are all generated from the clap definition, so none can drift from
//! the flags. `tests/it/docs.rs` fails when docs/cli.md differs from `loader man --format
//! markdown`.

use std::fmt::Write as _;
use std::io::Write as _;

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, ManFormat};

/// Prints the completion script for `shell`. Generated into memory first: clap_complete
/// panics on a write error (a closed pipe), where this returns it.
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "loader", &mut script);
    std::io::stdout().lock().write_all(&script)?;
    Ok(())
}

/// Prints the manual in `format`, or writes every page into `out_dir`.
pub fn man(format: ManFormat, out_dir: Option<&Path>) -> Result<()> {
    let command = Cli::command();
    if let Some(dir) = out_dir {
        clap_mangen::generate_to(command, dir)
            .with_context(|| format!("writing the man pages into {}", dir.display()))?;
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match format {
        ManFormat::Roff => clap_mangen::Man::new(command).render(&mut out)?,
        ManFormat::Markdown => {
            let mut command = command;
            command.build();
            out.write_all(markdown(&command).as_bytes())?;
        }
    }
    Ok(())
}

/// The command-line reference: the global options, then every subcommand (nested ones too)
/// with a table of its arguments.
fn markdown(root: &clap::Command) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# loader command line\n\n\
         Generated from the clap definition by `loader man --format markdown`; do not edit \
         (`tests/it/docs.rs` fails when this file is stale, and `LOADER_BLESS=1` rewrites it). \
         A flag with a variable below can also be set by it, and a `.env` file in the \
         working directory is read first. `loader <command> --help` shows the same.\n"
    );
    let _ = writeln!(out, "{}\n", one_line(root.get_about()));
    let _ = writeln!(out, "## Global options\n\nAccepted by every command.\n");
    arguments_table(&mut out, root.get_arguments().filter(|a| a.is_global_set() && documented(a)));
    for sub in root.get_subcommands() {
        subcommand(&mut out, "loader", sub);
    }
    out
}

fn subcommand(out: &mut String, parent: &str, command: &clap::Command) {
    if command.is_hide_set() || command.get_name() == "help" {
        return;
    }
    let path = format!("{parent} {}", command.get_name());
    let _ = writeln!(out, "## `{path}`\n");
    let about = command.get_long_about().or(command.get_about());
    let _ = writeln!(out, "{}\n", one_line(about));
    let own: Vec<&clap::Arg> =
        command.get_arguments().filter(|a| !a.is_global_set() && documented(a)).collect();
    if !own.is_empty() {
        arguments_table(out, own.into_iter());
    }
    for sub in command.get_subcommands() {
        subcommand(out, &path, sub);
    }
}

fn arguments_table<'a>(out: &mut String, arguments: impl Iterator<Item = &'a clap::Arg>) {
    let _ =
        writeln!(out, "| argument | environment | default | meaning |\n| --- | --- | --- | --- |");
    for arg in arguments {
        let env = arg.get_env().map_or(String::new(), |e| format!("`{}`", e.to_string_lossy()));
        let defaults: Vec<String> =
            arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        let default = if defaults.is_empty() || !takes_value(arg) {
            String::new()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let mut meaning = one_line(arg.get_help());
        let values: Vec<String> =
            arg.get_possible_values().iter().map(|v| format!("`{}`", v.get_name())).collect();
        if !values.is_empty() && takes_value(arg) {
            let _ = write!(meaning, " (one of {})", values.join(", "));
        }
        if arg.is_required_set() {
            meaning.push_str(" (required)");
        }
        let _ = writeln!(
            out,
            "| `{}` | {env} | {default} | {} |",
            usage(arg),
            meaning.replace('|', "\\|")
        );
    }
    let _ = writeln!(out);
}

/// Arguments the reference lists: not hidden, and not `--help` or `--version`.
fn documented(arg: &clap::Arg) -> bool {
    use clap::ArgAction::{Help, HelpLong, HelpShort, Version};
    !arg.is_hide_set() && !matches!(arg.get_action(), Help | HelpShort | HelpLong | Version)
}

/// `--name VALUE`, `--flag`, or `VALUE` for a positional argument.
fn usage(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map_or_else(|| arg.get_id().as_str().to_uppercase(), ToString::to_string);
    match arg.get_long() {
        Some(long) if takes_value(arg) => format!("--{long} {value}"),
        Some(long) => format!("--{long}"),
        None => value,
    }
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_num_args().is_none_or(|n| n.takes_values())
        && !matches!(arg.get_action(), clap::ArgAction::SetTrue | clap::ArgAction::SetFalse)
}

/// Help text on one line (a table cell), or nothing.
fn one_line(text: Option<&clap::builder::StyledStr>) -> String {
    text.map(|t| t.to_string().split_whitespace().collect::<Vec<_>>().join(" ")).unwrap_or_default()
}
