//! The `sibyl` binary as a user runs it: bad input fails fast with a clear message, and
//! speculation does not change what `generate` prints.

use std::process::{Command, Output};

fn sibyl(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sibyl"));
    command.args(args);
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().expect("running sibyl")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_refused(args: &[&str], envs: &[(&str, &str)], expected: &str) {
    let output = sibyl(args, envs);
    let text = stderr(&output);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(text.contains(expected), "{args:?}: {text}");
    assert!(!text.contains("panicked"), "{args:?}: {text}");
}

/// Runs `args` with `--draft none` and `--draft DRAFT`; both must succeed and print the
/// same, non-empty text. Returns the speculative run's stderr.
fn assert_same_with_and_without_drafts(args: &[&str], draft: &str) -> String {
    let plain = sibyl(&[args, &["--draft", "none"]].concat(), &[]);
    let spec = sibyl(&[args, &["--draft", draft]].concat(), &[]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert!(spec.status.success(), "{}", stderr(&spec));
    assert!(!plain.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&spec.stdout),
        String::from_utf8_lossy(&plain.stdout)
    );
    stderr(&spec)
}

#[test]
fn zero_max_tokens_is_refused_before_any_work() {
    // A model name that would need a download: the check must come first.
    assert_refused(
        &[
            "generate",
            "--prompt",
            "hi",
            "--max-tokens",
            "0",
            "--model",
            "qwen2.5-coder-1.5b",
        ],
        &[("SIBYL_CACHE_DIR", "/nonexistent/sibyl-cache")],
        "'--max-tokens <MAX_TOKENS>': must be at least 1",
    );
}

#[test]
fn an_https_address_without_a_certificate_authority_is_refused_at_start() {
    let cache = [("SIBYL_CACHE_DIR", "/nonexistent/sibyl-cache")];
    let model = ["--model", "qwen2.5-coder-1.5b", "--load-retry-ms", "0"];
    assert_refused(
        &[
            &["verifier", "--drafter", "ngram=https://drafters:50061"][..],
            &model,
        ]
        .concat(),
        &cache,
        "give the certificate authority to trust with --tls-ca",
    );
    assert_refused(
        &[
            &["gateway", "--verifier", "https://verifier:50052"][..],
            &model,
        ]
        .concat(),
        &cache,
        "give the certificate authority to trust with --tls-ca",
    );
    assert_refused(
        &[
            &[
                "drafter",
                "--kind",
                "ngram",
                "--tls-cert",
                "/nonexistent/cert.pem",
            ][..],
            &model,
        ]
        .concat(),
        &cache,
        "--tls-key",
    );
}

#[test]
fn a_negative_temperature_is_refused_before_any_work() {
    assert_refused(
        &["generate", "--prompt", "hi", "--temperature", "-0.5"],
        &[("SIBYL_CACHE_DIR", "/nonexistent/sibyl-cache")],
        "temperature",
    );
    assert_refused(
        &["generate", "--prompt", "hi", "--top-p", "1.5"],
        &[("SIBYL_CACHE_DIR", "/nonexistent/sibyl-cache")],
        "top_p",
    );
}

#[test]
fn a_model_file_with_the_wrong_checksum_is_refused() {
    let cache = std::env::temp_dir().join(format!("sibyl-cli-cache-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("smollm2-135m.gguf"), b"corrupt").unwrap();
    assert_refused(
        &["generate", "--prompt", "hi", "--model", "smollm2-135m"],
        &[("SIBYL_CACHE_DIR", cache.to_str().unwrap())],
        "SHA-256",
    );
}

#[test]
fn an_unknown_model_lists_the_catalog() {
    assert_refused(
        &["generate", "--prompt", "hi", "--model", "gpt-9"],
        &[],
        "qwen2.5-coder-0.5b",
    );
}

#[test]
fn real_weights_a_prompt_longer_than_the_context_window_is_refused() {
    let prompt = "word ".repeat(9000);
    assert_refused(
        &["generate", "--prompt", &prompt, "--model", "smollm2-135m"],
        &[],
        "context window",
    );
}

#[test]
fn real_weights_speculation_prints_exactly_what_plain_decoding_prints() {
    let common = [
        "generate",
        "--model",
        "smollm2-135m",
        "--chat",
        "--max-tokens",
        "96",
        "--prompt",
        "Fix the bug: def add(a, b):\n    return a - b\nReturn the whole function.",
    ];
    let summary = assert_same_with_and_without_drafts(&common, "ngram");
    assert!(summary.contains("tokens/s") && summary.contains("mean accepted tokens per step"));
    assert!(summary.contains("ngram:"), "{summary}");
    let summary = assert_same_with_and_without_drafts(&common, "suffix");
    assert!(summary.contains("suffix:"), "{summary}");
}

#[test]
fn real_weights_every_kernel_set_prints_what_the_fastest_prints() {
    let args = [
        "generate",
        "--model",
        "smollm2-135m",
        "--max-tokens",
        "32",
        "--draft",
        "none",
        "--prompt",
        "def fibonacci(n):",
    ];
    let fastest = sibyl(&args, &[]);
    assert!(fastest.status.success(), "{}", stderr(&fastest));
    assert!(!fastest.stdout.is_empty());
    for set in ["portable", "avx2", "avx9000"] {
        let output = sibyl(&args, &[("SIBYL_KERNELS", set)]);
        assert!(output.status.success(), "{set}: {}", stderr(&output));
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&fastest.stdout),
            "SIBYL_KERNELS={set}"
        );
        if set == "avx9000" {
            assert!(
                stderr(&output).contains("unknown kernel set"),
                "{}",
                stderr(&output)
            );
        }
    }
}

#[test]
fn real_weights_a_seeded_sampled_run_prints_the_same_with_and_without_drafts() {
    let common = [
        "generate",
        "--model",
        "smollm2-135m",
        "--chat",
        "--max-tokens",
        "64",
        "--temperature",
        "0.8",
        "--top-p",
        "0.95",
        "--seed",
        "42",
        "--prompt",
        "Write a haiku about rust, then repeat it twice.",
    ];
    let plain = sibyl(&[&common[..], &["--draft", "none"]].concat(), &[]);
    let spec = sibyl(&[&common[..], &["--draft", "ngram"]].concat(), &[]);
    assert!(
        plain.status.success() && spec.status.success(),
        "{}",
        stderr(&spec)
    );
    assert!(!plain.stdout.is_empty());
    assert_eq!(spec.stdout, plain.stdout);
}

#[test]
fn real_weights_the_lm_drafter_prints_what_plain_decoding_prints() {
    let common = [
        "generate",
        "--model",
        "smollm2-135m",
        "--chat",
        "--max-tokens",
        "48",
        "--draft-sizing",
        "fixed",
        "--draft-model",
        "smollm2-135m",
        "--prompt",
        "Write a Python function that returns the square of a number.",
    ];
    let summary = assert_same_with_and_without_drafts(&common, "lm,ngram");
    // The target drafting for itself: every token it drafts is accepted.
    let line = summary
        .lines()
        .find(|l| l.starts_with("lm: "))
        .unwrap_or_else(|| panic!("{summary}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(numbers[0] > 0 && numbers[0] == numbers[1], "{line}");
}

#[test]
fn real_weights_an_lm_drafter_of_another_tokenizer_is_refused() {
    assert_refused(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--prompt",
            "hi",
            "--draft",
            "lm",
            "--draft-model",
            "qwen2.5-coder-0.5b",
        ],
        &[],
        "is not the target's",
    );
}
