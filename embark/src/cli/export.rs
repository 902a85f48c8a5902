//! `embark export`: a model's keys and vectors in the formats trainers load
//! directly.
//!
//! - `vectors.npy`: float32, shape `(rows, dim)`, C order (`np.load`);
//! - `keys.jsonl`: row i's key as a JSON string on line i (keys may hold
//!   newlines or commas; `[json.loads(l) for l in open(...)]`);
//! - `embeddings.parquet`: columns `key` (string) and `vector`
//!   (list<float>), zstd-compressed (`pandas.read_parquet`, pyarrow,
//!   polars, Spark).
//!
//! The store is paged through in its own order. Rows go to `.partial`
//! files behind a checkpoint (rows written, the store's scan cursor, the
//! keys file's length) saved after each page, so an interrupted export
//! truncates the partial files to the checkpoint and carries on. The
//! `.npy` header is written with room to spare and filled in at the end;
//! Parquet is written last, from the finished `.npy` and keys.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use clap::Args;
use embark_store::{EmbeddingStore, ScanCursor};
use parquet::{
    basic::{Compression, ZstdLevel},
    data_type::{ByteArray, ByteArrayType, FloatType},
    file::{properties::WriterProperties, writer::SerializedFileWriter},
    schema::parser::parse_message_type,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Checkpoint, EXIT_INTERRUPTED, Progress, StoreLocation, saved_cursor, scanned_version};

/// Bytes reserved for the `.npy` header: magic, version, length and the
/// dict, padded with spaces to a multiple of 64 as NumPy requires.
pub(crate) const NPY_HEADER_BYTES: usize = 128;

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    #[arg(long)]
    model: String,
    /// The model version (default: the current one, as `embark promote`
    /// recorded it, else the catalogue's).
    #[arg(long, default_value = "")]
    version: String,
    /// Directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    location: StoreLocation,
    /// Rows read from the store per page (and per checkpoint).
    #[arg(long, default_value_t = 4096)]
    page: usize,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = 16_384)]
    row_group: usize,
    /// Skip the Parquet file.
    #[arg(long)]
    no_parquet: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExportCheckpoint {
    /// The model version's namespace (`name@version`): a resume after a
    /// promote must not carry on into another version's rows.
    model: String,
    dim: usize,
    rows: u64,
    keys_bytes: u64,
    /// Hex of the store's scan cursor; `None` at the start.
    cursor: Option<String>,
    /// The scan is over; what remains is renaming and Parquet.
    scanned: bool,
}

/// The `.npy` v1.0 header for a float32 C-order matrix, `NPY_HEADER_BYTES` long.
pub(crate) fn npy_header(rows: u64, dim: usize) -> Vec<u8> {
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    let pad = NPY_HEADER_BYTES - 10 - dict.len() - 1;
    dict.push_str(&" ".repeat(pad));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&((dict.len()) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    debug_assert_eq!(out.len(), NPY_HEADER_BYTES);
    out
}

pub(crate) async fn run(args: ExportArgs) -> anyhow::Result<i32> {
    let store = args.location.open().await?;
    export(&*store, &args, embark_ops::shutdown::on_signal()).await
}

/// The export, from `store`, until done or until `stop`.
async fn export(store: &dyn EmbeddingStore, args: &ExportArgs, stop: CancellationToken) -> anyhow::Result<i32> {
    let (dim, namespace) = scanned_version(&args.location.catalog, store, &args.model, &args.version).await?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = |name: &str| args.out.join(name);
    let (npy_partial, keys_partial) = (out("vectors.npy.partial"), out("keys.jsonl.partial"));
    let checkpoint = Checkpoint::new(out(".export-checkpoint.json"));
    let mut state = match checkpoint.load::<ExportCheckpoint>()? {
        Some(c) if c.model != namespace || c.dim != dim => anyhow::bail!(
            "{} holds an unfinished export of model {:?}; use another --out or delete it",
            args.out.display(),
            c.model
        ),
        Some(c) => {
            tracing::info!(rows = c.rows, "resuming the export");
            c
        }
        None => {
            ExportCheckpoint { model: namespace.clone(), dim, rows: 0, keys_bytes: 0, cursor: None, scanned: false }
        }
    };

    let started = Instant::now();
    if !state.scanned {
        // Back to exactly what the checkpoint covers.
        let mut npy = OpenOptions::new().create(true).write(true).truncate(false).open(&npy_partial)?;
        npy.set_len(NPY_HEADER_BYTES as u64 + state.rows * dim as u64 * 4)?;
        npy.seek(SeekFrom::End(0))?;
        let mut keys = OpenOptions::new().create(true).write(true).truncate(false).open(&keys_partial)?;
        keys.set_len(state.keys_bytes)?;
        keys.seek(SeekFrom::End(0))?;
        let (mut npy, mut keys) = (BufWriter::new(npy), BufWriter::new(keys));
        let mut bar = Progress::new(None, "export");
        bar.set_position(state.rows);
        loop {
            if stop.is_cancelled() {
                bar.finish();
                println!(
                    "export of {} interrupted after {} rows; run the same command again to carry on",
                    args.model, state.rows
                );
                return Ok(EXIT_INTERRUPTED);
            }
            let cursor = saved_cursor(state.cursor.as_deref())?;
            let page = store.scan(&namespace, cursor, args.page.max(1)).await.context("reading the store")?;
            let mut row = Vec::with_capacity(dim * 4);
            for (key, vector) in &page.rows {
                if vector.len() != dim {
                    tracing::warn!(key, dim = vector.len(), "skipping a vector of another dimension");
                    continue;
                }
                row.clear();
                embark_proto::extend_le_f32(&mut row, vector);
                npy.write_all(&row)?;
                let line = serde_json::to_string(key)? + "\n";
                keys.write_all(line.as_bytes())?;
                state.keys_bytes += line.len() as u64;
                state.rows += 1;
            }
            // Data first, durably; then the checkpoint that points past it.
            npy.flush()?;
            npy.get_ref().sync_data()?;
            keys.flush()?;
            keys.get_ref().sync_data()?;
            state.cursor = page.next.as_ref().map(ScanCursor::to_hex);
            state.scanned = page.next.is_none();
            checkpoint.save(&state)?;
            bar.set_position(state.rows);
            if state.scanned {
                break;
            }
        }
        bar.finish();
    }
    // The shape is known now (idempotent, so also right after a crash here).
    if npy_partial.exists() {
        let mut npy = OpenOptions::new().write(true).open(&npy_partial)?;
        npy.write_all(&npy_header(state.rows, dim))?;
        npy.sync_all()?;
    }
    std::fs::rename(&npy_partial, out("vectors.npy"))
        .or_else(|e| if out("vectors.npy").exists() { Ok(()) } else { Err(e) })?;
    std::fs::rename(&keys_partial, out("keys.jsonl"))
        .or_else(|e| if out("keys.jsonl").exists() { Ok(()) } else { Err(e) })?;
    if !args.no_parquet {
        let (dir, rows, group) = (args.out.clone(), state.rows, args.row_group.max(1));
        tokio::task::spawn_blocking(move || write_parquet(&dir, dim, rows, group)).await??;
    }
    checkpoint.remove()?;
    println!(
        "exported {} vectors of {} (dim {dim}) to {} in {:.1} s: vectors.npy, keys.jsonl{}",
        state.rows,
        args.model,
        args.out.display(),
        started.elapsed().as_secs_f64(),
        if args.no_parquet { "" } else { ", embeddings.parquet" }
    );
    Ok(0)
}

/// `embeddings.parquet` from the finished `vectors.npy` and `keys.jsonl`,
/// one row group at a time (memory: one group).
fn write_parquet(dir: &Path, dim: usize, rows: u64, group: usize) -> anyhow::Result<()> {
    let schema = Arc::new(parse_message_type(
        "message embeddings {
            required binary key (STRING);
            required group vector (LIST) {
                repeated group list {
                    required float element;
                }
            }
        }",
    )?);
    let props =
        Arc::new(WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?)).build());
    let tmp = dir.join("embeddings.parquet.partial");
    let mut writer = SerializedFileWriter::new(File::create(&tmp)?, schema, props)?;
    let mut npy = BufReader::new(File::open(dir.join("vectors.npy"))?);
    npy.seek(SeekFrom::Start(NPY_HEADER_BYTES as u64))?;
    let mut keys = BufReader::new(File::open(dir.join("keys.jsonl"))?).lines();
    let mut left = rows as usize;
    let mut raw = vec![0u8; group * dim * 4];
    while left > 0 {
        let n = left.min(group);
        let mut names = Vec::with_capacity(n);
        for _ in 0..n {
            let line = keys.next().context("keys.jsonl is shorter than vectors.npy")??;
            names.push(ByteArray::from(serde_json::from_str::<String>(&line)?.into_bytes()));
        }
        npy.read_exact(&mut raw[..n * dim * 4])?;
        let values = embark_proto::f32_from_le(&raw[..n * dim * 4]).unwrap_or_default();
        // A list column: every value defined (level 1); repetition 0 opens
        // a row's list, 1 continues it.
        let defs = vec![1i16; values.len()];
        let reps: Vec<i16> = (0..values.len()).map(|i| i16::from(i % dim != 0)).collect();
        let mut rg = writer.next_row_group()?;
        let mut col = rg.next_column()?.context("key column")?;
        col.typed::<ByteArrayType>().write_batch(&names, None, None)?;
        col.close()?;
        let mut col = rg.next_column()?.context("vector column")?;
        col.typed::<FloatType>().write_batch(&values, Some(&defs), Some(&reps))?;
        col.close()?;
        rg.close()?;
        left -= n;
    }
    writer.close()?;
    std::fs::rename(&tmp, dir.join("embeddings.parquet"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_npy_header_is_what_numpy_expects() {
        let h = npy_header(123_456, 1280);
        assert_eq!(h.len(), NPY_HEADER_BYTES);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, NPY_HEADER_BYTES - 10);
        let dict = std::str::from_utf8(&h[10..]).expect("ascii");
        assert!(dict.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (123456, 1280), }"));
        assert!(dict.ends_with('\n'));
        assert_eq!(npy_header(u64::MAX / 4096, 4096).len(), NPY_HEADER_BYTES, "room for any shape");
    }
}

#[cfg(test)]
mod resume_tests {
    use std::sync::atomic::AtomicUsize;

    use clap::Parser;
    use embark_store::embedded::EmbeddedStore;

    use super::*;
    use crate::cli::testing::{StopAfterScans, append_junk, current_rows};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        export: ExportArgs,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_export_resumes_past_a_torn_write_and_round_trips() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let store = EmbeddedStore::open(&tmp.path().join("embark.redb"))?;
        let rows: Vec<(String, Vec<f32>)> = (0..1000)
            .map(|i| (format!("key \"{i:04}\"\nline two"), (0..384).map(|j| (i * 384 + j) as f32).collect()))
            .collect();
        store.put_vectors(&current_rows("minilm-l6-v2"), rows.clone()).await?;
        let out = tmp.path().join("export");
        let args = Cli::try_parse_from([
            "embark",
            "--model",
            "minilm-l6-v2",
            "--out",
            out.to_str().unwrap_or("."),
            "--page",
            "100",
            "--row-group",
            "128",
        ])?
        .export;

        // Interrupted while reading the third page: three pages are kept.
        let stop = CancellationToken::new();
        let interrupted = StopAfterScans { inner: store.clone(), left: AtomicUsize::new(3), stop: stop.clone() };
        assert_eq!(export(&interrupted, &args, stop).await?, EXIT_INTERRUPTED);
        let saved: ExportCheckpoint = Checkpoint::new(out.join(".export-checkpoint.json")).load()?.expect("checkpoint");
        assert_eq!(saved.rows, 300);
        assert!(!out.join("vectors.npy").exists());
        append_junk(&out.join("vectors.npy.partial"));
        append_junk(&out.join("keys.jsonl.partial"));

        assert_eq!(export(&store, &args, CancellationToken::new()).await?, 0);
        let bytes = std::fs::read(out.join("vectors.npy"))?;
        assert_eq!(&bytes[..NPY_HEADER_BYTES], npy_header(1000, 384).as_slice());
        assert_eq!(bytes.len(), NPY_HEADER_BYTES + 1000 * 384 * 4, "the torn bytes were cut off");
        let floats = embark_proto::f32_from_le(&bytes[NPY_HEADER_BYTES..]).expect("whole floats");
        let keys: Vec<String> = std::fs::read_to_string(out.join("keys.jsonl"))?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(keys.len(), 1000);
        for (i, (key, vector)) in rows.iter().enumerate() {
            assert_eq!(&keys[i], key, "keys with quotes and newlines survive, in store order");
            assert_eq!(&floats[i * 384..(i + 1) * 384], vector.as_slice(), "row {i}");
        }
        assert!(out.join("embeddings.parquet").exists());
        assert!(!out.join(".export-checkpoint.json").exists() && !out.join("vectors.npy.partial").exists());
        Ok(())
    }
}
