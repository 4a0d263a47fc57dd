//! The target model: the process's compute threads and loading the model file.

use crate::args::ModelArgs;
use sibyl_engine::LoadOptions;

/// Sets the compute thread count for the whole process. Must run before any model work:
/// candle sizes its thread pool from `CANDLE_NUM_THREADS` when the pool first starts.
pub fn init_threads(threads: Option<usize>) {
    if let Some(threads) = threads {
        // SAFETY: called at the start of `run`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", threads.to_string()) };
    }
}

/// Finds (fetching if needed) and loads the model of `args`.
pub fn load_model(
    args: &ModelArgs,
    device: sibyl_engine::Device,
) -> anyhow::Result<sibyl_engine::LoadedModel> {
    let path = args.locate()?;
    let options = LoadOptions {
        requantize_slow_types: !args.keep_slow_types,
        device,
    };
    Ok(sibyl_engine::load(&path, &options)?)
}
