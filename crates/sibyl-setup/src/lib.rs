//! What the `sibyl` commands share: the model, drafter and speculation flags, loading the
//! target model, and making in-process drafters.

pub mod args;
pub mod drafters;
pub mod model;
pub mod progress;

pub use drafters::{draft_kinds, tokenizer_id, DrafterSettings, DrafterSources};
pub use model::{init_threads, load_model};
