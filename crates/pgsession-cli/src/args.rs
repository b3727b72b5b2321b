//! The command line: every subcommand and flag, each flag also read from an
//! environment variable, and the one step that turns the raw store flags into
//! a [`pgsession::ConfigBuilder`].
//!
//! The store flags are not written out by hand: [`StoreArgs`] makes one flag
//! per entry of the library's list of settings ([`pgsession::config::SETTINGS`]),
//! with its variable, default and help from there (`PGSESSION_POOL_SIZE`
//! becomes `--pool-size`, `DATABASE_URL` becomes `--database-url`), so a
//! setting added to the library is at once a flag and a variable here, and
//! both go through the library's own parser ([`ConfigBuilder::set`]). A
//! command-line flag wins over its variable; a default is only shown, and
//! left to the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use pgsession::config::SETTINGS;
use pgsession::ConfigBuilder;

use crate::UsageError;

/// Resilient PostgreSQL-backed HTTP sessions: a reference server, migrations,
/// pruning and diagnostics.
///
/// Every flag can also be given as an environment variable (shown in
/// brackets); a flag on the command line wins. Logs go to stderr, filtered
/// by RUST_LOG (default `info`).
#[derive(Debug, Parser)]
#[command(name = "pgsession", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PGSESSION_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the reference web server (login, logout, a counter, health,
    /// metrics, dashboard).
    ///
    /// Without DATABASE_URL it starts its own PostgreSQL from the installed
    /// binaries, with its data under --data-dir; without those binaries it
    /// keeps sessions in memory, and they end with the process.
    Serve(ServeArgs),
    /// Create the session table and its index when they are missing.
    Migrate(MigrateArgs),
    /// Delete expired sessions now (the server also does this in the
    /// background every prune interval).
    Prune(PruneArgs),
    /// Check a database connection step by step, and say what to change.
    ///
    /// The steps: URL, DNS, TCP, TLS and certificate, login, version, first
    /// query, table and index, sessions, and the settings in force on a
    /// connection of the session pool. Each is printed with its time and a
    /// verdict, and a failure with its likely cause and the setting to
    /// change. Exits with 1 when a step fails. Changes nothing.
    Doctor(DoctorArgs),
    /// List, replay or discard dead letters: journaled writes that could not
    /// be written back.
    ///
    /// A write accepted while the database was away is journaled on disk
    /// and written back when it returns, but only if the session's row is
    /// still what that write was based on. A write that met a newer one
    /// (another instance or a Node service changed the session), a session
    /// logged out meanwhile, a taken id, or a refusal by the database is
    /// left out, and kept as a dead letter in `dead-letters.jsonl` of the
    /// journal directory (PGSESSION_JOURNAL_DIR). This command shows them
    /// (never a whole session id: ids are secrets), writes chosen ones to
    /// the table as they stand, or deletes them.
    Journal(JournalArgs),
}

/// `pgsession journal`.
#[derive(Debug, Args)]
pub(crate) struct JournalArgs {
    /// What to do with the dead letters.
    #[command(subcommand)]
    pub(crate) action: JournalAction,
}

/// The `pgsession journal` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum JournalAction {
    /// Show the dead letters and the journal files. Needs no database.
    ///
    /// Each dead letter is shown with its number, when it was set aside,
    /// its kind (changed, destroyed, id_taken, duplicate, failed), the
    /// operation (save, touch, destroy), the first characters of its
    /// session id, the size of its document, whether its expiry has passed,
    /// its table and the reason. Then each journal file in the directory,
    /// with its live entries and whether a running store holds it.
    List(JournalListArgs),
    /// Write dead letters to the session table as they stand. Needs
    /// DATABASE_URL.
    ///
    /// Each letter is applied whatever the row holds now: a save replaces
    /// the session (or brings back one that was logged out), a touch moves
    /// its expiry, a destroy deletes it. Letters that landed are removed
    /// from the file; those that failed stay, and the command exits with 1.
    Replay(JournalPickArgs),
    /// Delete dead letters from the file without applying them.
    Discard(JournalPickArgs),
}

/// `pgsession journal list`.
#[derive(Debug, Args)]
pub(crate) struct JournalListArgs {
    /// The session store (for the journal directory and the table).
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// `pgsession journal replay|discard`: which dead letters.
#[derive(Debug, Args)]
pub(crate) struct JournalPickArgs {
    /// Numbers of dead letters, as `pgsession journal list` shows them
    /// (1 is the oldest).
    #[arg(
        value_name = "N",
        required_unless_present = "all",
        conflicts_with = "all",
        value_parser = parse_letter_number
    )]
    pub(crate) numbers: Vec<usize>,

    /// Every dead letter in the file.
    #[arg(long)]
    pub(crate) all: bool,

    /// The session store (the journal directory; the database and table
    /// for `replay`).
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether the session cookie carries the `Secure` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CookieSecureArg {
    /// Always (the library's default): browsers send the cookie over HTTPS only.
    #[value(name = "true", alias = "always")]
    Always,
    /// Never: for plain HTTP.
    #[value(name = "false", alias = "never")]
    Never,
    /// When the request came over HTTPS (`X-Forwarded-Proto: https`).
    Auto,
}

/// `pgsession serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "PGSESSION_LISTEN",
        default_value = "127.0.0.1:3000",
        value_name = "ADDR"
    )]
    pub(crate) listen: String,

    /// Cookie signing secrets, comma-separated: the first signs, all verify.
    /// Default: a secret made at the first start and kept in
    /// `<data-dir>/secret` (mode 0600), so that sessions survive a restart
    /// (with the in-memory store, a new one at each start).
    #[arg(
        long,
        env = "PGSESSION_SECRET",
        hide_env_values = true,
        value_name = "LIST"
    )]
    pub(crate) secret: Option<String>,

    /// Whether the cookie is marked `Secure`. The library's default is
    /// `true`; the server's is `auto`, because it is usually tried over plain
    /// HTTP on loopback, where a Secure cookie would never come back.
    #[arg(long, env = "PGSESSION_COOKIE_SECURE", value_enum, default_value_t = CookieSecureArg::Auto)]
    pub(crate) cookie_secure: CookieSecureArg,

    /// Renew the session's expiry on every request (express-session's
    /// `rolling`); the row itself is written at most once per touch step.
    #[arg(long, env = "PGSESSION_ROLLING", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub(crate) rolling: bool,

    /// Cookie lifetime (sets `Expires`); unset for a browser-session cookie
    /// whose row lives `PGSESSION_LIFETIME`.
    #[arg(long, env = "PGSESSION_MAX_AGE", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) max_age: Option<Duration>,

    /// An unchanged session's expiry is written only when it would move by
    /// more than this, so that a page view is not a write.
    #[arg(long, env = "PGSESSION_TOUCH_STEP", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) touch_step: Duration,

    /// How long requests in flight may take to finish after SIGTERM or
    /// SIGINT (500ms, 10s, 1m, ...).
    #[arg(long, env = "PGSESSION_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) shutdown_grace: Duration,

    /// Where the embedded PostgreSQL keeps its data when DATABASE_URL is not
    /// set, and the signing secret made when PGSESSION_SECRET is not set.
    #[arg(
        long,
        env = "PGSESSION_DATA_DIR",
        default_value = ".pgsession",
        value_name = "DIR"
    )]
    pub(crate) data_dir: PathBuf,

    /// The session store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// `pgsession migrate`.
#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The session store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// `pgsession prune`.
#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
    /// The session store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// `pgsession doctor`.
#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Print the report as JSON (the same steps, hosts and verdicts) for a
    /// script; the exit status is the same.
    #[arg(long)]
    pub(crate) json: bool,
    /// The session store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// The store settings as given, not yet checked: one optional value per
/// library setting, with where it came from.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreArgs {
    values: Vec<StoreValue>,
}

/// One store setting given on the command line or in the environment.
#[derive(Debug, Clone)]
struct StoreValue {
    /// The library's name for it, e.g. `pool_size`.
    setting: &'static str,
    /// Where it came from, for error messages: `--pool-size` or
    /// `PGSESSION_POOL_SIZE`.
    origin: String,
    value: String,
}

impl StoreArgs {
    /// Builds from explicit `(setting, value)` pairs, as if given as flags
    /// (for tests).
    #[cfg(test)]
    pub(crate) fn from_pairs(pairs: &[(&'static str, &str)]) -> StoreArgs {
        StoreArgs {
            values: pairs
                .iter()
                .map(|(setting, value)| StoreValue {
                    setting,
                    origin: format!("--{}", setting.replace('_', "-")),
                    value: (*value).to_owned(),
                })
                .collect(),
        }
    }

    /// The journal directory (`journal_dir`) and the table
    /// (`schema.table`, unquoted, as dead letters name it) these settings
    /// give, for a command that needs no database: a placeholder URL stands
    /// in when none was given.
    pub(crate) fn journal_dir_and_table(&self) -> Result<(PathBuf, String), anyhow::Error> {
        let mut builder = self.builder()?;
        if self.database_url().is_none() {
            builder = builder
                .set("url", "postgres://localhost/unused")
                .map_err(|e| UsageError::new(e.to_string()))?;
        }
        let config = builder.build()?;
        let table = format!("{}.{}", config.schema().as_str(), config.table().as_str());
        Ok((config.journal_dir().to_owned(), table))
    }

    /// The database URL, when one was given.
    pub(crate) fn database_url(&self) -> Option<&str> {
        self.values
            .iter()
            .find(|v| v.setting == "url")
            .map(|v| v.value.as_str())
    }

    /// The one step from raw flags to a configuration: every value given
    /// goes through [`ConfigBuilder::set`]. A refused value is a
    /// [`UsageError`] naming the flag or variable it came from.
    pub(crate) fn builder(&self) -> Result<ConfigBuilder, UsageError> {
        let mut builder = pgsession::Config::builder();
        for v in &self.values {
            builder = builder
                .set(v.setting, &v.value)
                .map_err(|e| UsageError::new(format!("{e} (from {})", v.origin)))?;
        }
        Ok(builder)
    }
}

impl FromArgMatches for StoreArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = StoreArgs::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for setting in SETTINGS {
            let origin = match matches.value_source(setting.name) {
                Some(ValueSource::EnvVariable) => setting.env.to_owned(),
                Some(ValueSource::CommandLine) => format!("--{}", setting.flag()),
                // The default is shown in --help; the library applies it.
                _ => continue,
            };
            let Some(value) = matches.get_one::<String>(setting.name) else {
                continue;
            };
            // An empty variable counts as unset, as in the library.
            if value.trim().is_empty() {
                continue;
            }
            self.values.retain(|v| v.setting != setting.name);
            self.values.push(StoreValue {
                setting: setting.name,
                origin,
                value: value.clone(),
            });
        }
        Ok(())
    }
}

impl Args for StoreArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        SETTINGS.iter().fold(cmd, |cmd, setting| {
            let arg = clap::Arg::new(setting.name)
                .long(setting.flag())
                .env(setting.env)
                .hide_env_values(setting.secret)
                .value_name(setting.value_name)
                .help(setting.summary().trim_end_matches('.').to_owned())
                .long_help(setting.description())
                .help_heading("Store")
                .action(clap::ArgAction::Set);
            cmd.arg(match setting.default {
                Some(default) => arg.default_value(default),
                None => arg,
            })
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `1d` or a bare number of seconds,
/// with the library's own parser.
pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    pgsession::config::parse_duration("duration", value).map_err(|_| {
        format!(
            "expected a duration such as 500ms, 10s, 1m, got {:?}",
            value.trim()
        )
    })
}

/// A dead letter's number, as `pgsession journal list` shows it: 1 or more.
fn parse_letter_number(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "expected a dead letter number (1, 2, ... as `pgsession journal list` shows them), \
             got {:?}",
            value.trim()
        )),
    }
}

/// Parses a command line; `--help`, `--version` and usage errors come back
/// as the `clap::Error` to print.
pub(crate) fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    Cli::try_parse_from(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_library_setting_has_a_flag_a_variable_and_help() {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").expect("serve");
        for (env, setting) in pgsession::config::ENV_SETTINGS {
            let arg = serve
                .get_arguments()
                .find(|a| a.get_id() == *setting)
                .unwrap_or_else(|| panic!("no flag for {setting}"));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(*env));
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(help.len() > 20, "{setting}: {help:?}");
        }
        let pool_size = serve.get_arguments().find(|a| a.get_id() == "pool_size");
        let pool_size = pool_size.expect("--pool-size");
        assert_eq!(pool_size.get_long(), Some("pool-size"));
        assert_eq!(pool_size.get_default_values(), ["5"]);
        let url = serve.get_arguments().find(|a| a.get_id() == "url");
        assert_eq!(url.expect("url").get_long(), Some("database-url"));
    }

    #[test]
    fn defaults_are_shown_but_left_to_the_library() {
        let cli = parse_from(["pgsession", "migrate"]).unwrap();
        let Command::Migrate(args) = cli.command else {
            panic!("migrate")
        };
        // Only what the environment of the test process sets, if anything.
        for v in &args.store.values {
            assert!(
                SETTINGS
                    .iter()
                    .any(|s| s.name == v.setting && std::env::var_os(s.env).is_some()),
                "{} taken from its default",
                v.setting
            );
        }
    }

    #[test]
    fn flags_reach_the_configuration() {
        let cli = parse_from([
            "pgsession",
            "migrate",
            "--database-url",
            "postgres://u@db/app",
            "--pool-size",
            "7",
            "--table",
            "sessions",
            "--idle-timeout",
            "1m",
        ])
        .unwrap();
        let Command::Migrate(args) = cli.command else {
            panic!("migrate")
        };
        assert_eq!(args.store.database_url(), Some("postgres://u@db/app"));
        let config = args.store.builder().unwrap().build().unwrap();
        assert_eq!(config.pool_size(), 7);
        assert_eq!(config.table().as_str(), "sessions");
        assert_eq!(config.idle_timeout(), Duration::from_secs(60));
    }

    #[test]
    fn a_bad_value_names_its_flag() {
        let args = StoreArgs::from_pairs(&[("pool_size", "many")]);
        let err = args.builder().unwrap_err().to_string();
        assert!(
            err.contains("pool_size") && err.contains("--pool-size"),
            "{err}"
        );
    }

    #[test]
    fn serve_defaults() {
        let cli = parse_from(["pgsession", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        // The test process may have these set; only check what the
        // environment cannot change here.
        if std::env::var_os("PGSESSION_LISTEN").is_none() {
            assert_eq!(args.listen, "127.0.0.1:3000");
        }
        if std::env::var_os("PGSESSION_SHUTDOWN_GRACE").is_none() {
            assert_eq!(args.shutdown_grace, Duration::from_secs(10));
        }
        if std::env::var_os("PGSESSION_COOKIE_SECURE").is_none() {
            assert_eq!(args.cookie_secure, CookieSecureArg::Auto);
        }
    }

    #[test]
    fn cookie_secure_values() {
        for (value, expected) in [
            ("true", CookieSecureArg::Always),
            ("always", CookieSecureArg::Always),
            ("false", CookieSecureArg::Never),
            ("never", CookieSecureArg::Never),
            ("auto", CookieSecureArg::Auto),
        ] {
            let cli = parse_from(["pgsession", "serve", "--cookie-secure", value]).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!("serve")
            };
            assert_eq!(args.cookie_secure, expected, "{value}");
        }
        assert!(parse_from(["pgsession", "serve", "--cookie-secure", "maybe"]).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "s", "-1s", "soon", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
