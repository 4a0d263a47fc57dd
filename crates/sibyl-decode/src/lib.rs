//! The decode loop: prompt processing, then draft, merge, verify, keep, emit.
//!
//! [`Session`] is one generation as a state machine with no model in it; the [`Scheduler`]
//! runs many sessions with one forward pass per step (continuous batching). [`generate`] is
//! the scheduler with one session and drafters in the same process; the verifier service
//! drives the same scheduler with drafts gathered from remote drafters.

mod prefix;
mod scheduler;
mod session;

pub use prefix::PrefixCache;
pub use scheduler::{
    generate, generate_cancellable, Client, Finished, Scheduler, SchedulerConfig, StepStats,
};
pub use session::{
    check_request, measure_drafter, DraftTiming, DrafterReport, FinishReason, GenerateError,
    GenerationConfig, GenerationReport, Learned, PlannedStep, PromptChunk, Session, SharedLearning,
    Step, MAX_STOP_TOKENS, PROMPT_CHUNK, PROMPT_LOGPROB_ROWS,
};
