//! The provider accounts the daemon calls with: Bright Data (Scraper Studio
//! and the Web Scraper API) and Firecrawl (v1 and v2). An account is what a
//! provider limits and blocks, so each has one gate and one token, shared by
//! the run contexts of its APIs; every context shares the store, the limits
//! and the counters. Built once at start; a reload changes the limits and
//! tokens here, in one place.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{
    find_token, Config, ConfigError, Env, LimitsConfig, Token, BRIGHTDATA_TOKEN_VARS,
    FIRECRAWL_TOKEN_VARS,
};
use crate::emulator::{DEMO_BRIGHTDATA_TOKEN, DEMO_FIRECRAWL_TOKEN};
use crate::limits::ProviderGate;
use crate::notify::Notifier;
use crate::provider::firecrawl::Firecrawl;
use crate::provider::http::Http;
use crate::provider::scraper_studio::ScraperStudio;
use crate::provider::web_scraper::WebScraper;
use crate::provider::Provider;
use crate::run::{Context, Counters, CurrentLimits};
use crate::spec::{ApiVersion, JobSpec, ProviderKind};
use crate::store::Store;

/// Each account's token; `None` where none is configured.
#[derive(Clone, Default)]
pub struct Tokens {
    pub brightdata: Option<Token>,
    pub firecrawl: Option<Token>,
}

impl Tokens {
    /// The emulator's demo tokens.
    pub fn emulator() -> Tokens {
        Tokens {
            brightdata: Some(Token::new(DEMO_BRIGHTDATA_TOKEN)),
            firecrawl: Some(Token::new(DEMO_FIRECRAWL_TOKEN)),
        }
    }

    /// Each token from the environment, the configured file or the systemd
    /// credential (`docs/configuration.md`). A file that cannot be used
    /// (unreadable, or readable by others) is an error.
    pub fn find(config: &Config, env: &dyn Env) -> Result<Tokens, ConfigError> {
        Ok(Tokens {
            brightdata: find_token(
                env,
                BRIGHTDATA_TOKEN_VARS,
                config.providers.brightdata.token_file.as_deref(),
                "brightdata-token",
            )?,
            firecrawl: find_token(
                env,
                FIRECRAWL_TOKEN_VARS,
                config.providers.firecrawl.token_file.as_deref(),
                "firecrawl-token",
            )?,
        })
    }
}

/// One provider account: its gate, and a run context per API it serves.
pub struct Account {
    /// The metric and log label: `brightdata` or `firecrawl`.
    pub name: &'static str,
    pub gate: Arc<ProviderGate>,
    /// Why the account's gate is blocked while it has no token.
    no_token: &'static str,
    has_token: std::sync::atomic::AtomicBool,
    apis: Vec<Arc<Context>>,
}

impl Account {
    /// Gives every API of the account its token; without one, the gate is
    /// blocked with the reason.
    fn set_token(&self, token: Option<Token>) {
        let absent = token.is_none();
        self.has_token
            .store(!absent, std::sync::atomic::Ordering::Relaxed);
        for ctx in &self.apis {
            ctx.provider.set_token(token.clone());
        }
        if absent {
            self.gate.block(self.no_token.into());
        }
    }

    /// Lifts a block (a reload: a refused token may be fixed now), except
    /// the one for having no token at all, which only a token lifts.
    pub fn unblock(&self) {
        if self.has_token.load(std::sync::atomic::Ordering::Relaxed) {
            self.gate.unblock();
        } else {
            self.gate.block(self.no_token.into());
        }
    }
}

/// Both accounts, and what all their contexts share: the limits, the
/// counters and the notifier.
pub struct Accounts {
    pub brightdata: Account,
    pub firecrawl: Account,
    limits: CurrentLimits,
    pub counters: Arc<Counters>,
    pub notify: Arc<Notifier>,
}

/// What every context shares besides its account.
pub struct Common<'a> {
    pub config: &'a Config,
    pub store: &'a Store,
    pub stop: &'a CancellationToken,
    /// `run --once`: a blocked provider parks its runs.
    pub park_on_block: bool,
    pub notify: &'a Arc<Notifier>,
    /// The object store runs are uploaded to, if any.
    pub bucket: Option<Arc<crate::bucket::Target>>,
}

impl Accounts {
    pub fn build(common: Common<'_>, tokens: Tokens) -> Accounts {
        let Common {
            config,
            store,
            stop,
            park_on_block,
            notify,
            bucket,
        } = common;
        let counters = Arc::new(Counters::default());
        let limits = CurrentLimits::new(config.limits.clone());
        let context = |provider: Arc<dyn Provider>, gate: &Arc<ProviderGate>| {
            Arc::new(Context {
                store: store.clone(),
                provider,
                gate: gate.clone(),
                limits: limits.clone(),
                output_dir: config.local_output_dir(),
                bucket: bucket.clone(),
                state_dir: config.state_dir.clone(),
                stop: stop.clone(),
                park_on_block,
                counters: counters.clone(),
                notify: notify.clone(),
            })
        };
        let timeout = config.limits.request_timeout;
        let http = |name, base: &str, gate: &Arc<ProviderGate>| {
            Http::new(name, base, None, gate.clone(), timeout)
        };

        let gate = ProviderGate::new(&config.limits);
        let bd = config.brightdata_url();
        let brightdata = Account {
            name: "brightdata",
            no_token: NO_BRIGHTDATA_TOKEN,
            has_token: Default::default(),
            apis: vec![
                context(
                    Arc::new(ScraperStudio::new(http("scraper_studio", bd, &gate))),
                    &gate,
                ),
                context(
                    Arc::new(WebScraper::new(
                        http("web_scraper", bd, &gate),
                        config.limits.snapshot_batch_size,
                    )),
                    &gate,
                ),
            ],
            gate,
        };

        let gate = ProviderGate::new(&config.limits);
        let fc = config.firecrawl_url();
        let firecrawl = Account {
            name: "firecrawl",
            no_token: NO_FIRECRAWL_TOKEN,
            has_token: Default::default(),
            apis: [ApiVersion::V1, ApiVersion::V2]
                .into_iter()
                .map(|version| {
                    let api = match version {
                        ApiVersion::V1 => "firecrawl_v1",
                        ApiVersion::V2 => "firecrawl_v2",
                    };
                    let client =
                        Firecrawl::new(http("firecrawl", fc, &gate).labelled(api), version);
                    context(Arc::new(client), &gate)
                })
                .collect(),
            gate,
        };

        let accounts = Accounts {
            brightdata,
            firecrawl,
            limits,
            counters,
            notify: notify.clone(),
        };
        accounts.set_tokens(tokens);
        accounts
    }

    /// Both accounts, Bright Data first.
    pub fn each(&self) -> [&Account; 2] {
        [&self.brightdata, &self.firecrawl]
    }

    /// The context that drives runs of `spec`.
    pub fn for_spec(&self, spec: &JobSpec) -> &Arc<Context> {
        let (account, api) = match (spec.provider, spec.api_version) {
            (ProviderKind::ScraperStudio, _) => (&self.brightdata, 0),
            (ProviderKind::WebScraper, _) => (&self.brightdata, 1),
            (ProviderKind::Firecrawl, ApiVersion::V1) => (&self.firecrawl, 0),
            (ProviderKind::Firecrawl, ApiVersion::V2) => (&self.firecrawl, 1),
        };
        &account.apis[api]
    }

    /// Every API's context: four.
    pub fn apis(&self) -> impl Iterator<Item = &Arc<Context>> {
        self.each().into_iter().flat_map(|a| a.apis.iter())
    }

    /// One context per provider kind (Scraper Studio, the Web Scraper API,
    /// Firecrawl): what the admin API reports expiry and blocks by.
    pub fn per_kind(&self) -> Vec<Arc<Context>> {
        let studio = &self.brightdata.apis[0];
        let web_scraper = &self.brightdata.apis[1];
        let firecrawl = &self.firecrawl.apis[1];
        vec![studio.clone(), web_scraper.clone(), firecrawl.clone()]
    }

    /// A reload's limits and tokens (`None`: keep the tokens, as with the
    /// emulator's). Limits that size what exists already
    /// (`requests_per_second`, `snapshot_batch_size`) take a restart.
    pub fn reconfigure(&self, limits: &LimitsConfig, tokens: Option<Tokens>) {
        for account in self.each() {
            account.gate.reconfigure(limits);
        }
        self.limits.set(limits.clone());
        if let Some(tokens) = tokens {
            self.set_tokens(tokens);
        }
    }

    fn set_tokens(&self, tokens: Tokens) {
        self.brightdata.set_token(tokens.brightdata);
        self.firecrawl.set_token(tokens.firecrawl);
    }
}

const NO_BRIGHTDATA_TOKEN: &str =
    "no Bright Data API token: set BRIGHT_DATA_API_TOKEN or providers.brightdata.token_file";
const NO_FIRECRAWL_TOKEN: &str =
    "no Firecrawl API key: set FIRECRAWL_API_KEY or providers.firecrawl.token_file";
