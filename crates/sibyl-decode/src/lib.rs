//! The in-process decode loop: prompt processing, then draft, merge, verify, keep, emit.
//!
//! [`Session`] is the step loop of the architecture, one step at a time: the verifier service
//! drives it with drafts gathered from remote drafters; [`generate`] drives it with drafters
//! in the same process.

mod session;

pub use session::{
    check_request, generate, generate_cancellable, DraftTiming, DrafterReport, FinishReason,
    GenerateError, GenerationConfig, GenerationReport, Learned, Session, SharedLearning, Step,
};
