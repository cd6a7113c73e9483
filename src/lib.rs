//! # harvestd: durable batch ingestion from Bright Data and Firecrawl
//!
//! Users drop job files into a directory; harvestd splits their inputs into
//! chunks, triggers one collection per chunk, remembers every remote id in
//! sled, polls until each dataset is ready, and writes it to CSV / JSON /
//! NDJSON / Parquet long before the provider deletes it. The user-facing reference is
//! `docs/` (README.md lists it); this is the map of the code.
//!
//! ## Data flow
//!
//! ```text
//! job file ─> spec ─> plan ─> trigger ─> poll ─> download ─> part file ─> final files
//!   intake ──┘  │        └───────── store (sled): every step persisted ─────────┘
//!  watcher      │                  limits (in-flight, pacing, rate, 429 brake)
//!               └─ daemon supervises one run task per run
//! ```
//!
//! ## Modules
//!
//! | module | role |
//! |---|---|
//! | [`cli`] | subcommands; each returns an exit code. `main.rs` only calls it (and sets jemalloc as the allocator) |
//! | [`durable`] | small files replaced whole and durably (temp, fsync, rename, directory fsync): generation, run copies, admin token, dedup keys |
//! | [`exit`] | the exit codes of every command, one list |
//! | [`logging`] | text on a TTY, flat JSON lines (span fields included) otherwise |
//! | [`config`] | daemon configuration: file → environment → flags; tokens that never print |
//! | [`spec`] | job files → checked [`spec::JobSpec`] or every problem with file, line, field; input readers (1 MiB per line or record); [`spec::confine`] opens only files inside the jobs directory |
//! | [`jsonstream`] | splits a JSON array arriving in pieces (input files, downloads) |
//! | [`plan`] | run ids, chunk names, chunking (pure) |
//! | [`chunk`] | the chunk state machine: states carry their data (a download's page-by-page progress inside `Ready`); `next` is pure and table-tested, the only way a chunk's state changes |
//! | [`store`] | durable state: typed, versioned records in sled (its only user; the records and their coding in `store::records`), an index of open chunks, learned build times; chunk inputs, run copies and dedup keys in files beside it (`store::files`); the generation counter and state-dir guard; `--recover` |
//! | [`intake`] | which files are jobs; a cheap stamp per job each scan, [`intake::Watch`] holding a job until it has settled and its run in progress has ended, then [`intake::settle`] on a thread of its own: content identity, checks, the plan (hashed as it is read) |
//! | [`watcher`] | when to rescan the jobs directory (notify + timer) |
//! | [`limits`] | per-key in-flight, trigger pacing and expected build time; per-provider rate (short bursts, a backlog let out in groups, never over the limit in any second; first come first served), 429 brake, blocks; backoff and poll intervals |
//! | [`provider`] | one trait, three APIs: [`provider::scraper_studio`], [`provider::web_scraper`], [`provider::firecrawl`]; [`provider::http`] is the shared driver |
//! | [`run`] | drives a run's chunks trigger → poll → download, persisting before acting: [`run::drive_run`] schedules a run's chunks (building collections wait in a per-run queue, a task only per step, polls due within 50 ms started together); one chunk's task is a loop over its persisted state, its steps in `trigger`, `poll` and `download`; `finish` writes the final files, manifest, `_SUCCESS`, `latest`; `upload` sends a finished run from staging to the object store in order, resumed from the run's record after a restart |
//! | [`clock`] | the one clock: instants as ms since the epoch ([`clock::UnixMs`]), waits between them that never underflow, RFC 3339 and day formatting |
//! | [`sink`] | atomic files (big ones in 1 MiB blocks by a writer thread, `O_DIRECT` or drop-behind), part files and their CSV columns, CSV flattening, final files, `data.parquet` (schema learned in a first pass, then Arrow record batches), manifest |
//! | [`bucket`] | the object store an `output_dir` URL names (S3 and compatibles, GCS, Azure through `object_store`): the client from `[storage]` and the standard credentials; one staged file sent whole or in 8 MiB parts, its sha256 checked against the manifest's before the object is made |
//! | [`daemon`] | the supervisor: lock, resume, scan and intake tasks, spawn, schedules, drain |
//! | [`accounts`] | the two provider accounts, each with one gate and token shared by its APIs' run contexts (Bright Data: Scraper Studio, Web Scraper API; Firecrawl: v1, v2); the limits, counters and notifier every context shares; a reload's limits and tokens applied in one place |
//! | [`admin`] | loopback admin API: health, readiness, jobs, metrics, rerun, retry, cancel; header timeout, connection cap, accept backoff; [`admin::View`] keeps the figures it answers from; [`admin::api`] types its answers, which the CLI reads back with the same types |
//! | [`notify`] | events told to webhooks and commands at least once: an outbox in the store, a sender with backoff for 24 h |
//! | [`progress`] | live bars for `run --once` on a terminal, periodic progress lines elsewhere |
//! | [`schedule`] | `every` / `cron` due times (Vixie cron rules, aliases, a job's time zone across daylight saving, through jiff), catch-up and overlap rules (pure) |
//! | [`signals`] | SIGTERM/SIGINT/SIGHUP as events |
//! | [`systemd`] | the notify protocol: READY, STATUS, WATCHDOG, STOPPING |
//! | [`failpoint`] | named crash and error points at the durable boundaries (`--features failpoints`) |
//! | [`emulator`] | the built-in fake of the three APIs, independent of the clients |
//!
//! ## Invariants
//!
//! - Dependencies point one way: daemon → accounts → run → provider /
//!   store / sink / limits → chunk, spec, clock; nothing below `run`
//!   imports it; admin reads its view and the accounts and sends commands
//!   to the daemon, which alone starts, retries and cancels runs. `chunk`,
//!   `schedule`, `plan` and `spec` do no IO besides reading the job and
//!   inputs files. `provider` never imports `store`.
//! - The admin API never walks the store per request: `/v1/jobs` and
//!   `/metrics` answer from [`admin::View`], which the store's
//!   [`store::Observer`] hook keeps up to date on every record written (a
//!   run from before start-up is read once, when first needed).
//! - The emulator shares no request or response code with the clients.
//! - Before a trigger the intent is flushed; the remote id is flushed right
//!   after. A chunk found in `triggering` is in doubt and is settled at the
//!   provider before any new trigger.
//! - A paged download (Web Scraper API parts, Firecrawl pages) saves each
//!   page as a durable file before the chunk record stores the next cursor,
//!   so a restart resumes at the next page and never fetches a saved one.
//! - A chunk is `downloaded` only after its part file is durable; final files
//!   are written only from part files, atomically; `_SUCCESS` comes last.
//! - With an object store, a run is recorded finished with its upload to
//!   do by the flush that ends it; each object sent, and a multipart
//!   upload's id before its first part, is recorded, so a restart sends
//!   only the rest and aborts what a crash left. The run-end event is
//!   raised when the upload is done; staging goes once `latest` is written.
//! - Whatever a provider sends is bounded (docs/limits.md): a call's
//!   whole answer by `request_timeout` and a size, a download by
//!   `max_dataset_bytes` and progress, a row by `max_row_bytes` (an
//!   unreadable row becomes a `malformed_row` record, never a retry), a
//!   pause by `retry_after_cap`; remote ids go out only as one
//!   percent-encoded path segment; arithmetic on provider values is
//!   checked or saturating. Polls and downloads are given up at shutdown.
//! - A chunk held up records why as its `last_error` in the store.
//! - Time is read from [`clock`] only; a wait between two instants comes from
//!   [`clock::between`] (or `until`/`since`), never a bare subtraction, so
//!   a skewed clock or a time in the past waits zero.
//! - Expiry is judged on the provider's clock (the `Date` header of its
//!   latest answer, kept by [`provider::http::Http`]), the clock it deletes by.
//! - A store older than the state last flushed, or damaged, is never used
//!   silently: a generation counter kept in sled and in a file beside it
//!   (written by every flush that holds a trigger's intent, before the
//!   trigger, never ahead of sled) is compared at open; `run --recover` starts
//!   from what is left, every chunk without a remote id in doubt. The
//!   state directory and its lock are checked (device, inode) before every
//!   flush and every 2 s: removed or replaced, the daemon stops.
//! - Crash safety is proven, not assumed: every durable boundary has a named
//!   [`failpoint`], and `tests/crash_safety.rs` kills the process at each.
//! - Nothing is read through a path a job file names unless it resolves
//!   inside the jobs directory ([`spec::confine`]); what is planned is what
//!   was hashed; runs of one job never overlap.
//! - Blocking file work runs on the blocking pool; no lock is held across
//!   an `.await`.
//! - What costs memory per chunk is kept as data, not tasks: a run holds
//!   chunks that wait for a place or a trigger slot as indexes and those
//!   waiting for a poll as index and remote id (the record stays in the
//!   store); a task reads its record when it starts a step, and a poll
//!   only when the answer changes something. Resume reads only the open
//!   index's chunks.
// The map above is for the engineers who change the code: it links the
// crate's own modules, which are pub(crate) unless a test or benchmark
// needs them. Read it with `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod accounts;
pub(crate) mod admin;
pub(crate) mod bucket;
pub mod chunk;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod daemon;
pub(crate) mod durable;
pub mod emulator;
pub(crate) mod exit;
pub mod failpoint;
pub mod intake;
pub mod jsonstream;
pub mod limits;
pub(crate) mod logging;
pub mod notify;
pub(crate) mod plan;
pub(crate) mod progress;
pub mod provider;
pub(crate) mod run;
pub(crate) mod schedule;
pub(crate) mod signals;
pub mod sink;
pub mod spec;
pub mod store;
pub(crate) mod systemd;
pub(crate) mod watcher;
