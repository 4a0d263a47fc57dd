use crate::gguf::SamplingDefaults;
use crate::{gguf, ChatTemplate, EngineError, LoadOptions, Model, ModelConfig, TextTokenizer};

/// Everything loaded from one model file: weights, tokenizer, chat template.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    /// The chat template of the file, if it has one.
    pub chat_template: Option<ChatTemplate>,
}

/// What a model file says about text, without its weights: enough for a gateway (tokenize,
/// render chats, check limits) or a drafter (check the tokenizer).
pub struct TextModel {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// The sampling the file recommends for requests that set none.
    pub sampling: SamplingDefaults,
}

/// Loads a GGUF file: weights, tokenizer and chat template.
pub fn load(path: &std::path::Path, options: &LoadOptions) -> Result<LoadedModel, EngineError> {
    contain_panics(path, || load_model(path, options))
}

fn load_model(path: &std::path::Path, options: &LoadOptions) -> Result<LoadedModel, EngineError> {
    let file = gguf::ModelFile::open(path)?;
    let model = Model::from_gguf(&file, options)?;
    let tokenizer = TextTokenizer::from_gguf(&file)?;
    let chat_template = ChatTemplate::from_gguf(&file, &tokenizer)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
    })
}

/// Loads the configuration, tokenizer and chat template of a GGUF file, not its weights.
pub fn load_text(path: &std::path::Path) -> Result<TextModel, EngineError> {
    contain_panics(path, || read_text(path))
}

fn read_text(path: &std::path::Path) -> Result<TextModel, EngineError> {
    let file = gguf::ModelFile::open(path)?;
    let config = file.config()?;
    let tokenizer = TextTokenizer::from_gguf(&file)?;
    let chat_template = ChatTemplate::from_gguf(&file, &tokenizer)?;
    Ok(TextModel {
        config,
        tokenizer,
        chat_template,
        sampling: file.sampling_defaults(),
    })
}

/// Runs a load, turning a panic inside it (a dependency's parser meeting a malformed file,
/// such as a GGUF alignment of 0) into a load error: a bad file leaves the role running
/// and saying NOT_SERVING, as any other bad file does.
fn contain_panics<T>(
    path: &std::path::Path,
    load: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|panic| {
        Err(EngineError::Malformed {
            path: path.to_path_buf(),
            reason: panic_message(panic.as_ref()),
        })
    })
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
