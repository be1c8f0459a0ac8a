//! The command line (clap): every option also reads an environment variable (and `.env`,
//! loaded first), and resolves into the library's settings; only the binary knows clap.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loader::bench::StagingMethod;
use loader::config::Settings;
use loader::ingest::{Flow, Mode};
use loader::logging::LogFormat;
use loader::transform;

/// Moves user-login events from SQS into PostgreSQL: stage raw first, mask PII in SQL.
#[derive(Debug, Parser)]
#[command(name = "loader", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Connection settings shared by every subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// PostgreSQL URL (sslmode and sslrootcert are honoured), e.g. postgres://user@host/db
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// SQS queue name or queue URL
    #[arg(long, env = "SQS_QUEUE", global = true, default_value = "login-queue")]
    pub queue: String,

    /// Custom SQS endpoint, e.g. http://127.0.0.1:4566 for LocalStack
    #[arg(long, env = "AWS_ENDPOINT_URL", global = true)]
    pub endpoint_url: Option<String>,

    /// AWS region (default: the AWS configuration's, else us-east-1)
    #[arg(long, env = "AWS_REGION", global = true)]
    pub region: Option<String>,

    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464
    #[arg(long, env = "LOADER_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// With --metrics-addr, `ingest` and `run` read the queue's and its DLQ's counts every
    /// SECONDS (two or three GetQueueAttributes calls each time)
    #[arg(long, env = "LOADER_QUEUE_METRICS_INTERVAL", global = true, default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_metrics_interval: u64,

    /// Owner work (migrate; a rebuild's or rotation's start, swap and drop of the old tables)
    /// ends a session of another role whose login has held it up this long, with that session
    /// or others: cancelled, then terminated (needs pg_signal_backend; docs/security.md)
    #[arg(long, env = "LOADER_EVICT_AFTER", global = true,
          default_value_t = humantime::Duration::from(loader::evict::DEFAULT_AFTER))]
    pub evict_after: humantime::Duration,

    /// Log format: pretty (default on a terminal) or json (default otherwise)
    #[arg(long, env = "LOADER_LOG_FORMAT", global = true,
          value_parser = named::<LogFormat>(LogFormat::NAMES))]
    pub log_format: Option<LogFormat>,
}

impl GlobalArgs {
    /// The settings the library takes, resolved from these arguments.
    pub fn settings(&self) -> Settings {
        Settings::new(
            self.database_url.as_deref(),
            &self.queue,
            self.endpoint_url.as_deref(),
            self.region.as_deref(),
        )
    }
}

/// A positive, finite number of seconds (fractions allowed), parsed where it is typed and
/// shown as seconds in `--help`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub Duration);

impl std::str::FromStr for Seconds {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Seconds(Duration::from_secs_f64(s))),
            _ => Err(format!("{text:?} is not a positive number of seconds")),
        }
    }
}

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

/// The `--wait-seconds` help, with the defaults the library takes.
fn wait_seconds_help(drain: &str, follow: &str) -> String {
    format!(
        "Long-poll wait per receive, in seconds (0-20). Default: {} {drain}, {} {follow}",
        Mode::Drain.default_wait_seconds(),
        Mode::Follow.default_wait_seconds(),
    )
}

/// A parser for a library enum that implements `FromStr`, offering `names` in help and
/// completions (the library itself knows nothing of clap).
fn named<T>(names: [&'static str; 2]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names).map(|s| s.parse::<T>().expect("a listed name"))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the schema, roles and SQL functions (idempotent)
    Migrate,
    /// Stage SQS messages into loader.raw_logins, then delete them from the queue
    Ingest(IngestArgs),
    /// Publish messages to the queue (creating it when missing)
    Send(SendArgs),
    /// Turn staged rows into public.user_logins (masked) or loader.login_rejects, in SQL
    Transform(TransformArgs),
    /// Masking keys: list, rotate, install
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Ingest and transform together until SIGINT/SIGTERM (or, with --once, until the queue is
    /// empty)
    Run(RunArgs),
    /// Counts at every stage and the invariants; exit 3 when one breaks
    Reconcile(ReconcileArgs),
    /// A short health summary: queue depth, pending rows, last run, active key, retention
    Status(StatusArgs),
    /// Retention: purge raw bodies staged more than N days ago (with an outcome), end masked rows
    /// created more than M months ago
    Purge(PurgeArgs),
    /// Erase every trace of some user ids (a data subject's request), recorded without them
    Forget(ForgetArgs),
    /// The raw ip and device id of some messages, recorded in loader.pii_access_log (a login
    /// granted loader_pii_reader, or the owner)
    Reveal(RevealArgs),
    /// The dead-letter queue: list it with the reason for each message, move it back
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Is this deployment set up right? One line per problem, with its fix; exit 0 when none
    Doctor(DoctorArgs),
    /// The SQL side on pg_cron: transform, purge, masked data's retention and history pruning as
    /// database jobs
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Benchmarks behind scripts/bench-ingest.sh: the queue's ceiling, staging alone
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a shell completion script, e.g. `loader completions bash > ~/.local/share/bash-completion/completions/loader`
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the manual: the man page loader(1), or the Markdown of docs/cli.md; with --out-dir,
    /// write loader.1 and a page per subcommand (loader-ingest.1, ...)
    Man {
        /// roff (for man) or markdown
        #[arg(long, value_enum, default_value_t = ManFormat::Roff, conflicts_with = "out_dir")]
        format: ManFormat,
        /// Write every page into this directory, e.g. ~/.local/share/man/man1
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// What `loader man` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ManFormat {
    Roff,
    Markdown,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// One JSON array of findings instead of lines
    #[arg(long)]
    pub json: bool,
    /// The Lambda function's timeout in seconds, when the Lambda handler consumes the queue
    /// (its visibility timeout must be at least six times it)
    #[arg(long, env = "LOADER_LAMBDA_TIMEOUT")]
    pub lambda_timeout: Option<u64>,
    /// Also check the receive permission with one ReceiveMessage, which counts a receive of the
    /// message at the head of the queue (one step nearer its dead-letter queue)
    #[arg(long, env = "LOADER_DOCTOR_PROBE_RECEIVE")]
    pub probe_receive: bool,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Install (or replace) loader's pg_cron jobs in this database, run as the current role
    Install {
        /// pg_cron schedule of `call loader.transform()`: cron syntax, or `N seconds` on
        /// pg_cron 1.5 and later
        #[arg(long, default_value = "* * * * *")]
        transform_every: String,
        /// Also purge, daily, the bodies staged more than this many days ago
        #[arg(long, env = "LOADER_RETENTION_DAYS")]
        purge_older_than_days: Option<u32>,
        /// Also end, daily, the masked rows whose create_date is more than this many months old
        #[arg(long, env = "LOADER_MASKED_RETENTION_MONTHS",
              value_parser = clap::value_parser!(u32).range(1..=1200))]
        masked_older_than_months: Option<u32>,
        /// pg_cron schedule of the purge and of the masked rows' expiry
        #[arg(long, default_value = "30 3 * * *")]
        purge_at: String,
        /// Days of pg_cron run history (cron.job_run_details) to keep
        #[arg(long, default_value_t = 7)]
        keep_history_days: u32,
    },
    /// loader's pg_cron jobs and how their last run went
    List {
        /// JSON instead of lines
        #[arg(long)]
        json: bool,
    },
    /// Remove loader's pg_cron jobs
    Remove,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The DLQ's messages by id, sent time and receive count, with the reason PostgreSQL
    /// refused each (never bodies). Receives them and makes them visible again at once: each
    /// listing adds one to their receive counts in the DLQ
    List {
        #[command(flatten)]
        dlq: DlqArgs,
        /// One JSON array instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Move every DLQ message back to the queue (SQS StartMessageMoveTask), once the cause of
    /// the refusals is fixed, and wait until SQS has moved them
    Redrive {
        #[command(flatten)]
        dlq: DlqArgs,
        /// Start the move and exit; `loader dlq redrive` again shows how far it got
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Args)]
pub struct DlqArgs {
    /// The dead-letter queue (default: the one the queue's redrive policy names)
    #[arg(long, env = "LOADER_DLQ")]
    pub dlq: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Receive and delete the whole queue with no database work (the emulator's ceiling)
    Ceiling {
        /// ReceiveMessage loops in flight at once (as `ingest --receivers`)
        #[arg(long, default_value_t = 4)]
        receivers: u16,
        /// Long-poll wait; the drain ends at the first empty receive (as `ingest --wait-seconds`)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=20))]
        wait_seconds: i32,
    },
    /// Stage synthetic messages straight into loader.raw_logins (no queue)
    Staging {
        /// How many rows
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        /// Rows per staging statement (as `ingest --flush-messages`)
        #[arg(long, default_value_t = 500)]
        flush_messages: usize,
        /// How rows reach Postgres: unnest (what ingest does) or copy (for comparison)
        #[arg(long, default_value = "unnest",
              value_parser = named::<StagingMethod>(StagingMethod::NAMES))]
        method: StagingMethod,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub flow: FlowArgs,

    /// Drain the queue, transform, and exit
    #[arg(long, env = "LOADER_ONCE")]
    pub once: bool,

    #[arg(long, env = "LOADER_WAIT_SECONDS", value_parser = clap::value_parser!(i32).range(0..=20),
          help = wait_seconds_help("with --once", "else"))]
    pub wait_seconds: Option<i32>,

    /// Also transform every this many seconds (rows staged by other ingest processes)
    #[arg(long, env = "LOADER_TRANSFORM_INTERVAL",
          default_value_t = Seconds(transform::DEFAULT_INTERVAL))]
    pub transform_interval: Seconds,

    #[command(flatten)]
    pub transform: TransformPlanArgs,
}

/// How the transform runs (`transform` and `run`).
#[derive(Debug, Args)]
pub struct TransformPlanArgs {
    /// Rows per committed transform batch
    #[arg(long, env = "LOADER_TRANSFORM_BATCH", default_value_t = transform::DEFAULT_BATCH,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub batch_size: i32,

    /// Database sessions transforming side by side. Default: this machine's cores (2 to 8),
    /// which is the database's when it runs here; else give the database's vCPUs
    #[arg(long, env = "LOADER_TRANSFORM_WORKERS",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: Option<u16>,
}

impl TransformPlanArgs {
    pub fn plan(&self) -> transform::Plan {
        transform::Plan {
            batch_size: self.batch_size,
            workers: self.workers.map_or_else(transform::Plan::default_workers, usize::from),
        }
    }
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("periods").required(true).multiple(true)
    .args(["older_than_days", "masked_older_than_months"]))]
pub struct PurgeArgs {
    /// Purge bodies staged on UTC days that ended more than this many days ago, whole days at
    /// a time (0: every body with an outcome, now)
    #[arg(long, env = "LOADER_RETENTION_DAYS")]
    pub older_than_days: Option<u32>,

    /// End the masked rows (public.user_logins) whose create_date is more than this many months
    /// old, with their staged bodies
    #[arg(long, env = "LOADER_MASKED_RETENTION_MONTHS",
          value_parser = clap::value_parser!(i32).range(1..=1200))]
    pub masked_older_than_months: Option<i32>,

    /// Bodies (or masked rows) per committed batch: the most one transaction holds
    #[arg(long, env = "LOADER_PURGE_BATCH", default_value_t = loader::retention::DEFAULT_BATCH,
          value_parser = clap::value_parser!(i32).range(1..=1_000_000))]
    pub batch_size: i32,

    /// Count the bodies that would be purged (and the pending rows kept) and the masked rows
    /// that would end, and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("users").required(true).multiple(true).args(["user_id", "from_file"]))]
pub struct ForgetArgs {
    /// A user id to erase (repeat for several)
    #[arg(long = "user-id", value_name = "ID")]
    pub user_id: Vec<String>,

    /// A file of user ids to erase, one per line
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,

    /// The request's reference (its ticket), kept in loader.erasures
    #[arg(long, required_unless_present = "dry_run")]
    pub reference: Option<String>,

    /// Count what would be erased, per table, and change nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Messages erased per committed batch
    #[arg(long, env = "LOADER_FORGET_BATCH", default_value_t = loader::forget::DEFAULT_BATCH,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub batch_size: i32,

    /// Skip the VACUUM afterwards (old row versions then keep the erased values until
    /// autovacuum gets to them)
    #[arg(long)]
    pub no_vacuum: bool,
}

#[derive(Debug, Args)]
pub struct RevealArgs {
    /// A message id (repeat for several)
    #[arg(long = "message-id", value_name = "ID", required = true)]
    pub message_id: Vec<String>,

    /// Why these values must be seen (kept in loader.pii_access_log)
    #[arg(long)]
    pub purpose: String,

    /// JSON instead of the table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object instead of lines
    #[arg(long, env = "LOADER_STATUS_JSON")]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Print the report as JSON instead of a table
    #[arg(long, env = "LOADER_RECONCILE_JSON")]
    pub json: bool,

    /// Check the database only; do not read queue depths
    #[arg(long, env = "LOADER_RECONCILE_SKIP_QUEUE")]
    pub skip_queue: bool,

    /// Rows staged less than this many seconds before the last drained transform may still be
    /// pending (their ingest transaction may have committed after it)
    #[arg(long, env = "LOADER_RECONCILE_GRACE", default_value_t = 60.0)]
    pub grace_seconds: f64,

    /// Check only the rows of the last DURATION (e.g. 24h, 7d, 90m): messages staged, outcomes
    /// written and runs started in it; bounded time on any table size. Default: everything
    #[arg(long, env = "LOADER_RECONCILE_SINCE", value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct TransformArgs {
    /// Recompute every outcome from raw_logins with the active key, online: new copies filled
    /// by --workers sessions while the transform goes on, then one short swap (resumable)
    #[arg(long, conflicts_with = "watch")]
    pub rebuild: bool,

    /// Repeat the transform every --interval until SIGINT/SIGTERM
    #[arg(long, env = "LOADER_TRANSFORM_WATCH")]
    pub watch: bool,

    /// Seconds between transforms with --watch
    #[arg(long, env = "LOADER_TRANSFORM_INTERVAL",
          default_value_t = Seconds(transform::DEFAULT_INTERVAL))]
    pub interval: Seconds,

    #[command(flatten)]
    pub plan: TransformPlanArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Show key ids, dates and which is active (never the key bytes)
    List,
    /// Make a new random key active and re-mask every row whose body is still kept (the rest
    /// keep their key): online, in new copies of the tables swapped in at once (resumable:
    /// run it again after a kill)
    Rotate(TransformPlanArgs),
    /// Make a given key active and re-mask every row whose body is still kept, so two
    /// environments produce joinable masks. The key (64 hex characters) is read from LOADER_MASK_KEY, else from stdin; never
    /// from the command line.
    Install(TransformPlanArgs),
}

/// How ingest overlaps receiving and staging (`ingest` and `run`).
#[derive(Debug, Args)]
pub struct FlowArgs {
    #[arg(long, env = "LOADER_RECEIVERS",
          value_parser = clap::value_parser!(u16).range(1..=256),
          help = format!("ReceiveMessage calls in flight, fixed. Default: adaptive, from {} up to \
                          --max-receivers (grows while polls come back full, shrinks when they \
                          come back empty)", Flow::DEFAULT.receivers))]
    pub receivers: Option<u16>,

    /// The most ReceiveMessage calls in flight when adaptive
    #[arg(long, env = "LOADER_MAX_RECEIVERS", default_value_t = Flow::DEFAULT.max_receivers as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_receivers: u16,

    /// Stage once this many messages are buffered...
    #[arg(long, env = "LOADER_FLUSH_MESSAGES", default_value_t = Flow::DEFAULT.flush_messages as u32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub flush_messages: u32,

    /// ...or this many milliseconds after the first of them arrived
    #[arg(long, env = "LOADER_LINGER_MS", default_value_t = Flow::DEFAULT.linger.as_millis() as u64)]
    pub linger_ms: u64,

    /// MiB of message bodies held received and not yet staged, at most (receives wait for
    /// room; a flush also closes at an eighth of it). At least 20: a batch of ten 1 MiB
    /// messages, twice
    #[arg(long, env = "LOADER_MEMORY_BUDGET_MB",
          default_value_t = (loader::ingest::DEFAULT_MEMORY_BUDGET >> 20) as u32,
          value_parser = clap::value_parser!(u32).range(((loader::ingest::MIN_MEMORY_BUDGET >> 20) as i64)..))]
    pub memory_budget_mb: u32,
}

impl FlowArgs {
    pub fn flow(&self) -> Flow {
        Flow {
            receivers: self.receivers.map_or(Flow::DEFAULT.receivers, usize::from),
            adaptive: self.receivers.is_none(),
            max_receivers: usize::from(self.max_receivers),
            flush_messages: self.flush_messages as usize,
            linger: std::time::Duration::from_millis(self.linger_ms),
            memory_budget: (self.memory_budget_mb as usize) << 20,
        }
    }
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub flow: FlowArgs,

    /// Keep polling until SIGINT/SIGTERM instead of exiting when the queue is empty
    #[arg(long, env = "LOADER_FOLLOW")]
    pub follow: bool,

    #[arg(long, env = "LOADER_WAIT_SECONDS", value_parser = clap::value_parser!(i32).range(0..=20),
          help = format!("{}; a drain stops after one empty poll",
                         wait_seconds_help("when draining", "with --follow")))]
    pub wait_seconds: Option<i32>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["file", "generate"]))]
pub struct SendArgs {
    /// A JSON array file: each element becomes one message body (compact JSON)
    pub file: Option<PathBuf>,

    /// Send N synthetic login events instead of a file
    #[arg(long, value_name = "N")]
    pub generate: Option<u64>,

    /// Seed for --generate, so a run can be reproduced
    #[arg(long, env = "LOADER_SEED", default_value_t = 1)]
    pub seed: u64,
}
