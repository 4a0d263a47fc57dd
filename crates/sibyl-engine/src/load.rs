use crate::{gguf, ChatTemplate, EngineError, LoadOptions, Model, TextTokenizer};

/// Everything loaded from one model file: weights, tokenizer, chat template.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    /// The chat template of the file, if it has one.
    pub chat_template: Option<ChatTemplate>,
}

/// Loads a GGUF file: weights, tokenizer and chat template.
pub fn load(path: &std::path::Path, options: &LoadOptions) -> Result<LoadedModel, EngineError> {
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
