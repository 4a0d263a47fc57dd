//! `sibyl serve`: every role in one process, wired over loopback gRPC.

use super::drafter::drafter_role;
use super::gateway::GatewayLimitArgs;
use super::verifier::VerifierArgs;
use super::{bind, gateway_text_loader, runtime, served_name, TelemetryArgs};
use crate::shutdown::{shutdown_signal, DrainArgs, DRAIN_GRACE};
use crate::suffix::SuffixStateArgs;
use anyhow::Context;
use clap::Args;
use sibyl_proto::auth::InternalToken;
use sibyl_proto::server::{OnLoadError, ShutdownSwitch};
use sibyl_setup::args::{
    drafter_kind, value_name, DeviceArgs, DraftKind, LmArgs, ModelArgs, NgramArgs, RetrievalArgs,
};
use sibyl_setup::{draft_kinds, init_threads, load_model};
use sibyl_verifier::{DrafterEndpoint, VerifierService};
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, env = "SIBYL_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Address of the `sibyl.v1.Gateway` gRPC API.
    #[arg(long, env = "SIBYL_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Drafters the server runs, comma-separated (`ngram,suffix`); by default the n-gram
    /// drafter, and the retrieval drafter when there is a --datastore.
    #[arg(long, env = "SIBYL_DRAFT", value_parser = drafter_kind(), value_delimiter = ',')]
    pub draft: Vec<DraftKind>,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub verifier: VerifierArgs,

    #[command(flatten)]
    pub ngram: NgramArgs,

    /// With a datastore, a retrieval drafter runs beside the n-gram drafter.
    #[command(flatten)]
    pub retrieval: RetrievalArgs,

    #[command(flatten)]
    pub suffix: SuffixStateArgs,

    #[command(flatten)]
    pub limits: GatewayLimitArgs,

    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    init_threads(args.model.threads);
    let name = served_name(&args.model, args.limits.served_model_name.as_ref());
    let chat_template = args.limits.chat_template()?;
    // By default the n-gram drafter, and the retrieval drafter when there is a datastore.
    let mut kinds = draft_kinds(&args.draft)?;
    if kinds.is_empty() {
        kinds.push(DraftKind::Ngram);
        if !args.retrieval.datastores.is_empty() {
            kinds.push(DraftKind::Retrieval);
        }
    }
    // The roles talk over loopback ports that any local process could reach: they show
    // each other a token made for this run.
    let token = InternalToken::from_text(&format!("{:032x}", rand::random::<u128>()))?;
    let (runtime, telemetry) = runtime("serve", &args.telemetry)?;
    let result = runtime.block_on(async move {
        args.limits.spawn_metrics().await?;
        // The model file first, once, so the three roles do not race to fetch it.
        let model = args.model.clone();
        let path = tokio::task::spawn_blocking(move || model.locate()).await??;
        let mut model = args.model.clone();
        model.model = path.to_string_lossy().into_owned();
        let device = args.device.device;

        let http = bind(args.http_addr, "HTTP API").await?;
        let grpc = bind(args.grpc_addr, "gRPC API").await?;
        let verifier_listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "verifier").await?;
        let verifier_addr = verifier_listener.local_addr()?;
        // Keys and certificates are read before any role starts: a bad file is the first
        // thing said.
        let mut gateway_config = args.limits.config(
            name.clone(),
            vec![format!("http://{verifier_addr}").parse()?],
            args.drain.timeout(),
        )?;
        gateway_config.internal_token = Some(token.clone());

        let stop = ShutdownSwitch::default();
        let mut roles = RoleTasks::default();
        let mut endpoints = Vec::new();
        let mut drafters_text = Vec::new();
        let mut suffixes = Vec::new();
        for kind in kinds {
            let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "drafter").await?;
            let addr = listener.local_addr()?;
            let (service, load, suffix) = drafter_role(
                kind,
                &args.ngram,
                &args.retrieval,
                &args.suffix,
                &LmArgs::default(),
                model.clone(),
            )?;
            if let Some(state) = suffix {
                state.spawn_upkeep();
                suffixes.push(state);
            }
            roles.spawn(
                "drafter",
                sibyl_drafter::serve(
                    listener,
                    service.requiring(Some(token.clone())),
                    load,
                    OnLoadError::Fail,
                    stop.stopped(),
                ),
            );
            let kind = value_name(kind);
            endpoints.push(format!("{kind}=http://{addr}").parse::<DrafterEndpoint>()?);
            drafters_text.push(format!("{kind} drafter {addr}"));
        }
        let mut config = args.verifier.config(name.clone(), endpoints)?;
        config.internal_token = Some(token.clone());
        let verifier_model = model.clone();
        roles.spawn(
            "verifier",
            sibyl_verifier::serve(
                verifier_listener,
                VerifierService::new(config),
                move || load_model(&verifier_model, device),
                OnLoadError::Fail,
                stop.stopped(),
            ),
        );
        let tls = gateway_config.tls.is_some();
        let access = match &gateway_config.api_keys {
            Some(keys) => format!("API key required ({} in --api-key-file)", keys.len()),
            None => "open, no API key (--api-key-file)".to_string(),
        };
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        roles.spawn(
            "gateway",
            sibyl_gateway::serve(
                grpc,
                http,
                gateway_config,
                gateway_text_loader(model, chat_template),
                OnLoadError::Fail,
                stop.stopped(),
            ),
        );
        tracing::info!("loading {name}");
        // Until every role serves, or one ends first (a failed load, say).
        let ended = tokio::select! {
            () = until_serving(verifier_addr, grpc_addr, tls) => {
                let drafters = drafters_text.join(", ");
                let (scheme, over) = if tls { ("https", ", TLS") } else { ("http", "") };
                let message = format!(
                    "sibyl serve: {name} ready\n  OpenAI HTTP API  {scheme}://{http_addr}/v1\n  Anthropic API    {scheme}://{http_addr} (/v1/messages)\n  gRPC gateway     {grpc_addr} (sibyl.v1.Gateway{over})\n  verifier         {verifier_addr}, {drafters} (loopback)\n  access           {access}\n"
                );
                // One write, and a closed stdout is no reason to stop serving (`println!`
                // writes piece by piece and panics when the reader has gone).
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(message.as_bytes()).and_then(|()| stdout.flush());
                None
            }
            first = roles.first_ended() => Some(first),
        };
        // Then until a signal, or until a role ends: then stop them all.
        let first = match ended {
            Some(first) => first,
            None => tokio::select! {
                () = shutdown_signal() => Ok(()),
                first = roles.first_ended() => first,
            },
        };
        stop.trigger();
        // The gateway ends the streams still open at the drain timeout; the rest end soon
        // after.
        let deadline = tokio::time::Instant::now() + args.drain.timeout() + DRAIN_GRACE;
        let outcome = roles.finish(first, deadline).await;
        for state in suffixes {
            let _ = tokio::task::spawn_blocking(move || state.save()).await;
        }
        outcome
    });
    drop(telemetry);
    result
}

/// How long `sibyl serve` waits for one of its roles to say SERVING before asking again.
const READY_WAIT: Duration = Duration::from_secs(2);

/// What `sibyl serve` gives its gateway to follow the verifier to SERVING where it cannot
/// ask it (over TLS: it holds no authority for the gateway's certificate). The gateway
/// checks its verifier every 0.5 s while that does not answer.
const TLS_GATEWAY_FOLLOWS: Duration = Duration::from_secs(1);

/// Returns once the verifier at `verifier`, then the gateway at `gateway`, say SERVING.
async fn until_serving(verifier: SocketAddr, gateway: SocketAddr, tls: bool) {
    loop {
        if !sibyl_proto::client::wait_until_serving(verifier, READY_WAIT).await {
            continue;
        }
        if tls {
            tokio::time::sleep(TLS_GATEWAY_FOLLOWS).await;
            return;
        }
        if sibyl_proto::client::wait_until_serving(gateway, READY_WAIT).await {
            return;
        }
    }
}

/// The roles `sibyl serve` runs as tasks, known by name.
#[derive(Default)]
struct RoleTasks {
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl RoleTasks {
    fn spawn<E>(
        &mut self,
        role: &'static str,
        serving: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: std::error::Error + Send + Sync + 'static,
    {
        let task = self
            .tasks
            .spawn(async move { serving.await.map_err(anyhow::Error::from) });
        self.names.insert(task.id(), role);
    }

    /// How the first role to end ended (an error names the role); never ready while none
    /// runs.
    async fn first_ended(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next_with_id().await {
            Some(joined) => self.outcome(joined),
            None => std::future::pending().await,
        }
    }

    fn outcome(
        &self,
        joined: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let (id, result) = match joined {
            Ok((id, result)) => (id, result),
            Err(error) => (error.id(), Err(anyhow::Error::from(error))),
        };
        let role = self.names.get(&id).copied().unwrap_or("role");
        result.with_context(|| format!("the {role} failed"))
    }

    /// Waits for the roles still running until `deadline` (those left then are aborted):
    /// `first`, how the first one ended, unless it was fine and a later one failed.
    async fn finish(
        mut self,
        first: anyhow::Result<()>,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        let mut outcome = first;
        while let Ok(Some(joined)) =
            tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await
        {
            let result = self.outcome(joined);
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }
}
