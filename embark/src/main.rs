//! `embark`: the cache front, or the whole system in one process.
//!
//! - `embark up`: front + fill loop + in-process Retina, on the embedded
//!   store by default (no external service); with `--store cql://` the
//!   vectors are in CQL and the miss queue stays in `--data-dir`.
//! - `embark serve`: the front alone; misses go to Kafka for `kfc`
//!   (`--kafka-brokers`), or wait in the durable queue.
//! - `embark migrate`: creates the CQL schema.
//! - `embark backfill | export | dedup`: batch tools ([`cli`]).
//! - `embark reembed | promote | retire | adopt`: model versions
//!   ([`cli::versions`]).
//! - `embark get | similar | invalidate | models`: a client of a running
//!   server ([`cli::client`]).
//!
//! The flags and the wiring of `up` and `serve` are in `embark::app`.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use embark::app::{self, FillArgs, FrontArgs, Mode};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "EmbArk: an embedding cache for online ranking")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; boxing the flag structs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process: front, fill loop and Retina, on the
    /// embedded store in --data-dir by default (with --store cql://, vectors
    /// in CQL and the miss queue in --data-dir).
    Up {
        #[command(flatten)]
        front: FrontArgs,
        #[command(flatten)]
        fill: FillArgs,
    },
    /// The front alone. With --kafka-brokers its misses go to Kafka for
    /// `kfc`; otherwise they wait in the durable queue for an `embark up` on
    /// the same --data-dir.
    Serve {
        #[command(flatten)]
        front: FrontArgs,
    },
    /// Create the CQL keyspace and table (safe to run again).
    Migrate {
        #[command(flatten)]
        store: embark_store::args::StoreArgs,
    },
    /// Embed every key of a file (or stdin) that is not stored yet; resumable.
    Backfill(cli::backfill::BackfillArgs),
    /// Embed every key stored under a model's current version with another
    /// version, beside it (shadow fill); resumable.
    Reembed(cli::versions::ReembedArgs),
    /// Make a model version current for every replica (refused below a
    /// coverage threshold unless --force).
    Promote(cli::versions::PromoteArgs),
    /// Remove every stored row of a model version that is not current.
    Retire(cli::versions::RetireArgs),
    /// Copy the rows a release before versions wrote under the bare model
    /// name into a version's rows (no network run); resumable.
    Adopt(cli::versions::AdoptArgs),
    /// Write a model's keys and vectors as .npy + keys.jsonl and Parquet; resumable.
    Export(cli::export::ExportArgs),
    /// Write the near-duplicate pairs of a model's keys as CSV; resumable.
    Dedup(cli::dedup::DedupArgs),
    /// Ask a running server for the vectors of keys (table or --json).
    Get(cli::client::GetArgs),
    /// Ask a running server for the stored keys nearest a key or a vector.
    Similar(cli::client::SimilarArgs),
    /// Make a running server forget keys' vectors and queue them again
    /// (needs an admin token where tokens are on).
    Invalidate(cli::client::InvalidateArgs),
    /// List the models a running server serves.
    Models(cli::client::ModelsArgs),
    /// Write a development CA, server and client certificates, and bearer
    /// tokens with their principals file (keeps what is there).
    DevCerts(cli::dev_certs::DevCertsArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Up { front, fill } => app::run(front, Mode::Up(Box::new(fill))).await,
            Command::Serve { front } => app::run(front, Mode::Serve).await,
            Command::Migrate { store } => {
                embark_ops::telemetry::init(false);
                let cfg =
                    store.cql()?.context("`embark migrate` is for --store cql://...; the embedded store needs none")?;
                embark_store::cql::CqlStore::migrate(&cfg).await?;
                println!("keyspace {} and table {}.embeddings are in place", cfg.keyspace, cfg.keyspace);
                Ok(())
            }
            Command::Backfill(args) => tool(cli::backfill::run(args)).await,
            Command::Reembed(args) => tool(cli::versions::reembed(args)).await,
            Command::Promote(args) => tool(cli::versions::promote(args)).await,
            Command::Retire(args) => tool(cli::versions::retire(args)).await,
            Command::Adopt(args) => tool(cli::versions::adopt(args)).await,
            Command::Export(args) => tool(cli::export::run(args)).await,
            Command::Dedup(args) => tool(cli::dedup::run(args)).await,
            Command::Get(args) => tool(cli::client::get(args)).await,
            Command::Similar(args) => tool(cli::client::similar(args)).await,
            Command::Invalidate(args) => tool(cli::client::invalidate(args)).await,
            Command::Models(args) => tool(cli::client::models(args)).await,
            Command::DevCerts(args) => cli::dev_certs::run(args),
        }
    })
}

/// Runs a batch tool; an interrupted one exits 130 after its summary.
async fn tool(run: impl std::future::Future<Output = anyhow::Result<i32>>) -> anyhow::Result<()> {
    embark_ops::telemetry::init(false);
    let code = run.await?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command line's definition (unique argument names,
    /// valid `requires`) only when that subcommand is parsed: check every
    /// subcommand here, so a clash fails the tests rather than a user.
    #[test]
    fn every_subcommand_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
