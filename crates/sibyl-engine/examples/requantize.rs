//! Writes a GGUF file with every tensor of one quantized type converted to another (through
//! f32, with candle's quantizers, as ggml quantizes without an importance matrix); every
//! other tensor and all metadata are copied. Used to time the kernels of a type on real
//! weights where no file of that type is at hand: a Q4_K_M file converted from `q4k` to
//! `q5k` has the tensor types of a Q5_K_M file (Q5_K, with Q6_K where Q4_K_M has it too).
//!
//! `cargo run --release -p sibyl-engine --example requantize -- --input IN.gguf \
//!      --output OUT.gguf --from q4k --to q5k`

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use std::path::PathBuf;

#[derive(clap::Parser)]
struct Args {
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// The type to convert: q4_0, q4k, q5k, q6k, q8_0.
    #[arg(long, value_parser = dtype)]
    from: GgmlDType,
    /// The type to convert to (same names).
    #[arg(long, value_parser = dtype)]
    to: GgmlDType,
}

fn dtype(name: &str) -> Result<GgmlDType, String> {
    Ok(match name {
        "q4_0" => GgmlDType::Q4_0,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        "q8_0" => GgmlDType::Q8_0,
        _ => return Err(format!("unknown type {name}: q4_0, q4k, q5k, q6k or q8_0")),
    })
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let mut reader = std::io::BufReader::new(std::fs::File::open(&args.input)?);
    let content = gguf_file::Content::read(&mut reader)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|name| content.tensor_infos[*name].offset);
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    let mut converted = 0;
    for name in names {
        let tensor = content.tensor(&mut reader, name, &Device::Cpu)?;
        let tensor = if tensor.dtype() == args.from {
            converted += 1;
            QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, args.to)?
        } else {
            tensor
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.output)?);
    gguf_file::write(&mut out, &metadata, &tensor_refs)?;
    println!(
        "{converted} of {} tensors converted from {:?} to {:?}: {}",
        tensors.len(),
        args.from,
        args.to,
        args.output.display()
    );
    Ok(())
}
