//! The `sibyl.v1.Gateway` gRPC service.

use crate::generation::{Api, Ending, Gateway, GatewayError, Generation, Output, PromptInput};
use crate::params::{Grammar, Rendering, Sampling, Speculation};
use sibyl_engine::ChatMessage;
use sibyl_proto::auth::KeyId;
use sibyl_proto::v1::{self as pb, generate_request::Input, generate_response::Event};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The `sibyl.v1.Gateway` service; UNAVAILABLE until [`GatewayService::set_ready`].
#[derive(Clone, Default)]
pub struct GatewayService {
    gateway: Arc<OnceLock<Arc<Gateway>>>,
}

impl GatewayService {
    /// Serves requests with `gateway` from now on.
    pub fn set_ready(&self, gateway: Arc<Gateway>) {
        let _ = self.gateway.set(gateway);
    }

    /// The gateway, once it is loaded.
    pub fn ready(&self) -> Option<&Arc<Gateway>> {
        self.gateway.get()
    }

    fn gateway(&self) -> Result<&Arc<Gateway>, Status> {
        self.gateway
            .get()
            .ok_or_else(|| Status::unavailable("the gateway is still loading its tokenizer"))
    }
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::InvalidRequest(message)
            | GatewayError::PayloadTooLarge(message)
            | GatewayError::InvalidParam { message, .. } => Status::invalid_argument(message),
            error @ GatewayError::ModelNotFound { .. } => Status::not_found(error.to_string()),
            error @ (GatewayError::Unavailable(_) | GatewayError::ShuttingDown) => {
                Status::unavailable(error.to_string())
            }
            GatewayError::Verifier(status) => status,
            error @ GatewayError::Internal(_) => Status::internal(error.to_string()),
        }
    }
}

impl TryFrom<pb::GenerateRequest> for Generation {
    type Error = Status;

    fn try_from(request: pb::GenerateRequest) -> Result<Self, Status> {
        let prompt = match request.input {
            Some(Input::Prompt(text)) => PromptInput::Text(text),
            Some(Input::Tokens(tokens)) => PromptInput::Tokens(tokens.ids),
            Some(Input::Infill(infill)) => PromptInput::Infill {
                prefix: infill.prefix,
                suffix: infill.suffix,
            },
            Some(Input::Chat(chat)) => {
                let messages: Vec<ChatMessage> = chat
                    .messages
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect();
                let variables = match chat.template_variables_json.trim() {
                    "" => None,
                    json => Some(serde_json::from_str(json).map_err(|e| {
                        Status::invalid_argument(format!(
                            "`template_variables_json` is not a JSON object: {e}"
                        ))
                    })?),
                };
                let rendering = Rendering {
                    add_generation_prompt: chat.add_generation_prompt,
                    continue_final_message: chat.continue_final_message,
                    chat_template_kwargs: variables,
                };
                let options = rendering.options(&messages, Vec::new())?;
                PromptInput::Chat { messages, options }
            }
            None => {
                return Err(Status::invalid_argument(
                    "set `prompt`, `chat`, `tokens` or `infill`",
                ))
            }
        };
        Ok(Self {
            model: Some(request.model),
            prompt,
            max_tokens: (request.max_tokens > 0).then_some(request.max_tokens as usize),
            sampling: Sampling::from_wire(request.sampling).map_err(Status::from)?,
            speculation: Speculation::from_wire(request.speculation).map_err(Status::from)?,
            stop: request.stop,
            details: request.details,
            prefix_cache: request.prefix_cache,
            logprobs: request.logprobs,
            prompt_logprobs: request.prompt_logprobs,
            grammar: request
                .grammar
                .map(Grammar::from_wire)
                .transpose()
                .map_err(Status::from)?,
            prediction: (!request.prediction.is_empty()).then_some(request.prediction),
            ending: Ending {
                min_tokens: request.min_tokens,
                ignore_eos: request.ignore_eos,
                stop_token_ids: request.stop_token_ids,
                include_stop_string: request.include_stop_string,
                at_window: false,
            }
            .checked()
            .map_err(Status::from)?,
            api: Api::Grpc,
            request_id: String::new(),
            key_id: None,
        })
    }
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let request_id = sibyl_telemetry::trace::request_id(request.metadata());
        let key_id = request.extensions().get::<KeyId>().cloned();
        let mut generation = Generation::try_from(request.into_inner())?;
        generation.request_id = request_id;
        generation.key_id = key_id;
        let (_, outputs) = self.gateway()?.generate(generation).await?;
        let (sender, receiver) = mpsc::channel(16);
        crate::generation::forward(outputs, sender, |output| {
            output.map_err(Status::from).map(|output| {
                let event = match output {
                    Output::Text {
                        text,
                        tokens,
                        logprobs,
                    } => Event::Delta(pb::TextDelta {
                        text,
                        tokens,
                        logprobs: logprobs.iter().map(Into::into).collect(),
                    }),
                    Output::Done(summary) => Event::Summary(pb::GenerateSummary {
                        finish_reason: pb::FinishReason::from(summary.finish_reason) as i32,
                        usage: Some(pb::Usage {
                            prompt_tokens: summary.prompt_tokens,
                            cached_tokens: summary.cached_tokens,
                            completion_tokens: summary.completion_tokens,
                            accepted_prediction_tokens: summary.accepted_prediction_tokens,
                            rejected_prediction_tokens: summary.rejected_prediction_tokens,
                        }),
                        steps: summary.steps,
                        drafters: summary.drafters.into_iter().map(Into::into).collect(),
                        seed: summary.seed,
                        prompt_time: Some(sibyl_proto::duration(summary.prompt_time)),
                        decode_time: Some(sibyl_proto::duration(summary.decode_time)),
                        draft_wait_p50: Some(sibyl_proto::duration(summary.draft_wait_p50)),
                        draft_wait_p99: Some(sibyl_proto::duration(summary.draft_wait_p99)),
                        token_ids: summary.token_ids,
                        step_micros: summary.step_micros,
                        prompt_logprobs: summary
                            .prompt_logprobs
                            .iter()
                            .flat_map(|p| &p.rest)
                            .map(Into::into)
                            .collect(),
                    }),
                };
                pb::GenerateResponse { event: Some(event) }
            })
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let gateway = self.gateway()?;
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelCard {
                id: gateway.model_name().to_string(),
                context_length: u32::try_from(gateway.context_length()).unwrap_or(u32::MAX),
            }],
        }))
    }
}
