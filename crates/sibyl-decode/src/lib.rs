//! The in-process decode loop: prompt processing, then draft, merge, verify, keep, emit.
//!
//! This is the step loop of the architecture with every drafter in the same process. The
//! verifier service of the services issue drives the same loop with remote drafters.

mod session;

pub use session::{
    generate, DrafterReport, FinishReason, GenerateError, GenerationConfig, GenerationReport,
};
