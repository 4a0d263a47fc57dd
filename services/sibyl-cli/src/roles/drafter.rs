//! `sibyl drafter`: one drafter kind served over gRPC.

use super::{bind, runtime, spawn_metrics, text_loader, LoadArgs, TelemetryArgs};
use crate::security::{ClientTlsArgs, ServerTlsArgs, TokenArgs};
use crate::shutdown::DrainArgs;
use crate::suffix::{SuffixState, SuffixStateArgs};
use anyhow::bail;
use clap::Args;
use sibyl_drafter::{DraftService, MakeDrafter, Peers, ShareInbox};
use sibyl_lm::LmDrafter;
use sibyl_ngram::NgramDrafter;
use sibyl_proto::client::ServiceAddress;
use sibyl_proto::server::Listener;
use sibyl_retrieval::{Datastore, RetrievalConfig, RetrievalDrafter, SuffixIndex};
use sibyl_setup::args::{
    drafter_kind, DraftKind, LmArgs, ModelArgs, NgramArgs, RetrievalArgs, NEEDS_DATASTORE,
};
use sibyl_setup::tokenizer_id;
use sibyl_spec::{Drafter, Proposal};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Args)]
pub struct DrafterArgs {
    /// Which drafter to host.
    #[arg(long, env = "SIBYL_DRAFTER_KIND", value_parser = drafter_kind())]
    pub kind: DraftKind,

    /// Address of the `sibyl.v1.Drafter` gRPC service.
    #[arg(long, env = "SIBYL_GRPC_ADDR", default_value = "0.0.0.0:50061")]
    pub grpc_addr: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint (HTTP).
    #[arg(long, env = "SIBYL_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// The verifier's model: sessions whose tokenizer differs from this file's are refused.
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub ngram: NgramArgs,

    #[command(flatten)]
    pub retrieval: RetrievalArgs,

    #[command(flatten)]
    pub suffix: SuffixStateArgs,

    /// With --kind suffix: the replicas of this drafter, as http://HOST:PORT (https://
    /// with --tls-ca): a name that resolves to all of them (a headless Service), or a list
    /// (repeat the flag, or separate with commas); this drafter among them is skipped.
    /// Every generation that finishes here is sent to each, and theirs come here, so every
    /// replica drafts from what all of them have seen.
    #[arg(long, env = "SIBYL_SUFFIX_PEERS", value_delimiter = ',')]
    pub suffix_peers: Vec<ServiceAddress>,

    #[command(flatten)]
    pub tls_ca: ClientTlsArgs,

    #[command(flatten)]
    pub lm: LmArgs,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub internal: TokenArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

fn ngram_drafter(ngram: &NgramArgs) -> anyhow::Result<MakeDrafter> {
    let config = ngram.config();
    Ok(Arc::new(move || {
        Box::new(NgramDrafter::new(config.clone()))
    }))
}

/// A drafter that proposes nothing: what a session would get before its role has loaded
/// (sessions only start after, so none does).
struct NoDrafts(&'static str);

impl Drafter for NoDrafts {
    fn kind(&self) -> &str {
        self.0
    }

    fn propose(&mut self, _: &[u32], _: usize) -> Vec<Proposal> {
        Vec::new()
    }
}

/// A drafter role's service and loader: the loader reads the tokenizer of `model` and, for
/// the retrieval drafter, opens the datastores and checks them against it; for the LM
/// drafter, loads its model and checks its tokenizer. Doing that with the model, not at
/// start, makes a missing or bad file NOT_SERVING and retried like a missing model file.
pub(super) fn drafter_role(
    kind: DraftKind,
    ngram: &NgramArgs,
    retrieval: &RetrievalArgs,
    suffix: &SuffixStateArgs,
    lm: &LmArgs,
    model: ModelArgs,
) -> anyhow::Result<(
    DraftService,
    impl FnMut() -> anyhow::Result<u64> + Send + 'static,
    Option<SuffixState>,
)> {
    let suffix = (kind == DraftKind::Suffix)
        .then(|| SuffixState::new(Arc::new(SuffixIndex::new(retrieval.suffix())), suffix));
    let datastores: Arc<OnceLock<Vec<Arc<Datastore>>>> = Arc::default();
    let lm_model: Arc<OnceLock<Arc<sibyl_engine::Model>>> = Arc::default();
    let lm_config = lm.config()?;
    let make = match kind {
        DraftKind::None => bail!("`none` is not a drafter"),
        DraftKind::Ngram => ngram_drafter(ngram)?,
        DraftKind::Lm => {
            let loaded = lm_model.clone();
            let make: MakeDrafter = Arc::new(move || match loaded.get() {
                Some(model) => Box::new(LmDrafter::new(model.clone(), lm_config.clone())),
                None => Box::new(NoDrafts("lm")),
            });
            make
        }
        DraftKind::Retrieval => {
            if retrieval.datastores.is_empty() {
                bail!(NEEDS_DATASTORE);
            }
            let stores = datastores.clone();
            let make: MakeDrafter = Arc::new(move || {
                // Sessions start once loading has succeeded, so the stores are there.
                let stores = stores.get().cloned().unwrap_or_default();
                Box::new(RetrievalDrafter::new(stores, RetrievalConfig::default()))
            });
            make
        }
        DraftKind::Suffix => {
            // Every session of this role adds to one index when it ends.
            let state = suffix.clone().expect("made for the suffix kind");
            let make: MakeDrafter = Arc::new(move || state.drafter());
            make
        }
    };
    let mut load = text_loader(model);
    let (retrieval, lm) = (retrieval.clone(), lm.clone());
    let state = suffix.clone();
    let loader = move || -> anyhow::Result<u64> {
        let text = load()?;
        let tokenizer = tokenizer_id(&text.tokenizer, text.config.vocab_size);
        if let Some(state) = &state {
            state.loaded(tokenizer);
        }
        if kind == DraftKind::Retrieval && datastores.get().is_none() {
            let _ = datastores.set(retrieval.open(tokenizer)?);
        }
        if kind == DraftKind::Lm && lm_model.get().is_none() {
            let _ = lm_model.set(lm.load(&text.tokenizer)?);
        }
        Ok(tokenizer.fingerprint)
    };
    Ok((DraftService::new(make), loader, suffix))
}

pub fn run_drafter(args: DrafterArgs) -> anyhow::Result<()> {
    if !args.suffix_peers.is_empty() && args.kind != DraftKind::Suffix {
        bail!(
            "--suffix-peers is for --kind suffix: only the suffix drafter keeps an index to share"
        );
    }
    let (service, load, suffix) = drafter_role(
        args.kind,
        &args.ngram,
        &args.retrieval,
        &args.suffix,
        &args.lm,
        args.model,
    )?;
    let token = args.internal.token()?;
    let peer_tls = args.tls_ca.load(args.suffix_peers.iter())?;
    let origin = rand::random::<u64>();
    let mut service = service.requiring(token.clone());
    if let Some(state) = &suffix {
        let (index, held) = (state.index.clone(), state.index.clone());
        service = service.accepting_shared(ShareInbox {
            origin,
            accept: Arc::new(move |document| index.add_shared(document)),
            held: Arc::new(move || held.held()),
        });
    }
    let tls = args.tls.load()?;
    let (runtime, telemetry) = runtime("drafter", &args.telemetry)?;
    let result = runtime.block_on(async move {
        let tcp = bind(args.grpc_addr, "drafter").await?;
        spawn_metrics(args.metrics_addr).await?;
        let addr = tcp.local_addr()?;
        tracing::info!(%addr, kind = ?args.kind, tls = tls.is_some(), "drafter listening");
        if let Some(state) = &suffix {
            state.spawn_upkeep();
            if !args.suffix_peers.is_empty() {
                let names: Vec<String> = args.suffix_peers.iter().map(|p| p.to_string()).collect();
                tracing::info!(peers = %names.join(","), "sharing finished generations with peers");
                let peers = Peers {
                    services: args.suffix_peers.clone(),
                    tls: peer_tls,
                    token,
                    origin,
                };
                state.index.on_add(service.share_with(peers.clone()));
                state.spawn_catch_up(service.clone(), peers);
            }
        }
        let listener = Listener { tcp, tls };
        let stop = args.drain.on_signal();
        let serve = sibyl_drafter::serve(
            listener,
            service,
            load,
            args.load.on_error(),
            stop.stopped(),
        );
        let served = args.drain.bounded(&stop, serve).await;
        if let Some(state) = suffix {
            let _ = tokio::task::spawn_blocking(move || state.save()).await;
        }
        served?;
        Ok(())
    });
    drop(telemetry);
    result
}
