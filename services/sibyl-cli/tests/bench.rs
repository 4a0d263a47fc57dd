//! `sibyl bench` as a user runs it: the files it writes follow the documented schema, the
//! distributed path through a gateway measures the same outputs, Ctrl-C keeps what was
//! measured, and bad input fails before any work.

use sibyl_tests::RoleProcesses;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ITEMS: &str = concat!(
    r#"{"id": "chat-1", "category": "chat", "format": "chat", "prompt": "Name three colours.", "turns": ["Name three colours.", "Now three animals."]}"#,
    "\n",
    r#"{"id": "code-1", "category": "code", "format": "completion", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"}"#,
    "\n",
    r#"{"id": "code-2", "category": "code", "format": "completion", "prompt": "def is_even(n):\n"}"#,
    "\n",
    r#"{"id": "code-3", "category": "code", "format": "completion", "prompt": "class Stack:\n"}"#,
    "\n",
);

/// A fresh directory holding the test dataset.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sibyl-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("items.jsonl"), ITEMS).unwrap();
    dir
}

fn model_path() -> String {
    let path = sibyl_tests::test_model_path().expect("test model");
    path.to_string_lossy().into_owned()
}

fn bench(dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sibyl"));
    command
        .args(["bench", "--dataset"])
        .arg(dir.join("items.jsonl"))
        .arg("--out")
        .arg(dir.join("out"))
        .args(extra);
    command
}

fn results(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("out/results.json")).expect("results.json");
    serde_json::from_str(&text).expect("results.json is JSON")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The figures every summary (overall, per category) carries.
fn assert_summary(summary: &serde_json::Value, total: u64) {
    for key in [
        "tokens_per_s",
        "mean_accepted_tokens",
        "step_p50_ms",
        "step_p99_ms",
    ] {
        assert!(summary[key].as_f64().unwrap() > 0.0, "{key}: {summary}");
    }
    assert!(summary["speedup_geomean"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["identical"], total, "{summary}");
    assert_eq!(summary["total"], total, "{summary}");
}

/// Checks the documented schema of `results.json` for configs plain and ngram over
/// [`ITEMS`] (limited to `code_items` code prompts).
fn assert_schema(json: &serde_json::Value, code_items: u64) {
    assert!(json["model"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(json["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert!(json["machine"]["threads"].as_u64().unwrap() >= 1);
    assert_eq!(json["max_tokens"], 16);
    assert_eq!(json["temperature"], 0.0);
    assert_eq!(json["interrupted"], false);
    assert_eq!(json["config_names"], serde_json::json!(["plain", "ngram"]));
    assert_eq!(json["category_names"], serde_json::json!(["chat", "code"]));
    for config in ["plain", "ngram"] {
        let results = &json["configs"][config];
        assert_summary(&results["overall"], 1 + code_items);
        assert_summary(&results["categories"]["chat"], 1);
        assert_summary(&results["categories"]["code"], code_items);
    }
    assert_eq!(
        json["configs"]["plain"]["overall"]["mean_accepted_tokens"],
        1.0
    );
    assert_eq!(json["configs"]["plain"]["overall"]["speedup_geomean"], 1.0);
    let ngram = &json["configs"]["ngram"]["drafters"]["ngram"];
    assert!(ngram["proposed"].as_u64().unwrap() >= ngram["accepted"].as_u64().unwrap());
    assert!(ngram["acceptance_rate"].as_f64().unwrap() <= 1.0);
    assert_eq!(json["mismatches"], serde_json::json!([]));
    let items = json["items"].as_array().unwrap();
    assert_eq!(items.len() as u64, 2 * (1 + code_items));
    for item in items {
        for key in ["id", "category", "config"] {
            assert!(item[key].is_string(), "{key}: {item}");
        }
        assert!(item["tokens"].as_u64().unwrap() >= 1, "{item}");
        assert!(item["decode_s"].as_f64().unwrap() > 0.0, "{item}");
        assert!(item["steps"].as_u64().unwrap() >= 1, "{item}");
        assert_eq!(item["identical"], true, "{item}");
    }
    // The conversation's second turn ran after the model's own first answer.
    let chat = items.iter().find(|i| i["id"] == "chat-1").unwrap();
    assert_eq!(chat["turns"], 2);
    assert!(chat["tokens"].as_u64().unwrap() >= 2, "{chat}");
}

#[test]
fn real_weights_bench_writes_results_report_and_chart() {
    let dir = workdir("files");
    let output = bench(
        &dir,
        &[
            "--model",
            &model_path(),
            "--max-tokens",
            "16",
            "--configs",
            "ngram",
            "--limit",
            "2",
        ],
    )
    .output()
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let json = results(&dir);
    assert_schema(&json, 2);
    assert_eq!(json["backend"], "in-process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("| **overall** | 3 |"), "{stdout}");
    let report = std::fs::read_to_string(dir.join("out/report.md")).unwrap();
    assert_eq!(report.trim(), stdout.trim());
    assert!(report.contains("Every output is identical to plain decoding, token for token."));
    let svg = std::fs::read_to_string(dir.join("out/speedup.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.contains("overall") && svg.contains("ngram"));
    // Without --concurrency the run is the sequential one alone.
    assert!(json["configs"]["plain"].get("concurrency").is_none());
    assert!(!report.contains("concurrency"), "{report}");
    assert!(!dir.join("out/concurrency.svg").exists());
}

#[test]
fn real_weights_bench_at_concurrency_2_gives_each_request_its_output_alone() {
    let dir = workdir("concurrency");
    let output = bench(
        &dir,
        &[
            "--model",
            &model_path(),
            "--max-tokens",
            "16",
            "--configs",
            "ngram",
            "--limit",
            "2",
            "--concurrency",
            "1,2",
            "--prefix-cache",
        ],
    )
    .output()
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let json = results(&dir);
    // The sequential run's results are all there, as without the flag.
    assert_schema(&json, 2);
    for config in ["plain", "ngram"] {
        let runs = json["configs"][config]["concurrency"].as_array().unwrap();
        let levels: Vec<u64> = runs
            .iter()
            .map(|r| r["concurrency"].as_u64().unwrap())
            .collect();
        assert_eq!(levels, [1, 2], "{config}");
        for run in runs {
            assert_eq!(run["identical"], true, "{config}: {run}");
            assert_eq!(run["mismatches"], 0, "{config}: {run}");
            // chat-1's two turns and two code prompts.
            assert_eq!(run["requests"], 4, "{config}: {run}");
            for key in [
                "aggregate_tokens_per_s",
                "request_tokens_per_s_p50",
                "ttft_p50_ms",
                "itl_p50_ms",
                "mean_batch",
            ] {
                assert!(run[key].as_f64().unwrap() > 0.0, "{config} {key}: {run}");
            }
            // Absent only when no step had every session decoding.
            let decoding = &run["decode_tokens_per_s"];
            assert!(
                decoding.is_null() || decoding.as_f64().unwrap() > 0.0,
                "{run}"
            );
            if run["concurrency"] == 1 {
                assert!(decoding.as_f64().unwrap() > 0.0, "{run}");
            }
        }
        assert_prefix_cache(&json["configs"][config]["prefix_cache"], config);
    }
    let report = std::fs::read_to_string(dir.join("out/report.md")).unwrap();
    assert!(
        report.contains("## Throughput against concurrency"),
        "{report}"
    );
    assert!(report.contains("| ngram | 2 |"), "{report}");
    let svg = std::fs::read_to_string(dir.join("out/concurrency.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.contains("ngram") && svg.contains("concurrency 2"));
    assert!(report.contains("## Prefix cache"), "{report}");
}

/// The prefix cache's figures of a config run on [`ITEMS`] (limit 2): every output as
/// without it, and chat-1's second turn starts from its first turn's prompt and answer.
fn assert_prefix_cache(figures: &serde_json::Value, config: &str) {
    assert_eq!(figures["identical"], true, "{config}: {figures}");
    assert_eq!(figures["requests"], 4, "{config}: {figures}");
    assert!(figures["later_turn_ttft_p50_ms"]["on"].as_f64().unwrap() > 0.0);
    let cached = figures["cached_tokens"].as_u64().unwrap();
    let prompt = figures["prompt_tokens"].as_u64().unwrap();
    assert!(cached > 0 && cached < prompt, "{config}: {figures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_weights_bench_through_a_gateway_measures_the_distributed_path() {
    let model = model_path();
    let roles = RoleProcesses::spawn(env!("CARGO_BIN_EXE_sibyl").as_ref(), &model, 1).unwrap();
    roles
        .wait_until_serving(Duration::from_secs(120))
        .await
        .unwrap();
    let dir = workdir("gateway");
    let url = format!("http://{}", roles.gateway);
    let mut command = bench(
        &dir,
        &[
            "--gateway",
            &url,
            "--max-tokens",
            "16",
            "--limit",
            "2",
            "--concurrency",
            "2",
            "--prefix-cache",
        ],
    );
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let json = results(&dir);
    assert_schema(&json, 2);
    assert_eq!(json["backend"], url.as_str());
    assert_eq!(json["model"], "smollm2-135m");
    // Two streams open at once give every request's output alone; the client sees no
    // forward passes.
    let runs = json["configs"]["plain"]["concurrency"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["identical"], true, "{run}");
        assert!(run["ttft_p50_ms"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["mean_batch"].is_null(), "{run}");
    }
    assert_prefix_cache(&json["configs"]["plain"]["prefix_cache"], "plain");
}

#[test]
fn real_weights_ctrl_c_keeps_the_prompts_finished() {
    let dir = workdir("interrupt");
    let mut child = bench(&dir, &["--model", &model_path(), "--max-tokens", "64"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // The results are written after each prompt: wait for the first.
    let finished = |dir: &Path| {
        std::fs::read_to_string(dir.join("out/results.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|json| json["items"].as_array().is_some_and(|i| !i.is_empty()))
    };
    while !finished(&dir) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no results written"
        );
        assert!(child.try_wait().unwrap().is_none(), "bench ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let signal = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signal.success());
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("interrupted: the results of the"), "{text}");
    let json = results(&dir);
    assert_eq!(json["interrupted"], true);
    let items = json["items"].as_array().unwrap();
    assert!(!items.is_empty() && items.len() < 8, "{}", items.len());
    assert_eq!(items.len() % 2, 0, "only whole prompts are kept");
    assert!(std::fs::read_to_string(dir.join("out/report.md"))
        .unwrap()
        .contains("**Interrupted**"));
}

#[test]
fn a_bad_concurrency_is_refused_before_any_work() {
    let dir = workdir("bad-concurrency");
    let env = [("SIBYL_CACHE_DIR", "/nonexistent/sibyl-cache")];
    let cases: [(&str, &str); 4] = [
        ("0", "concurrency must be at least 1"),
        ("1,,2", "`` is not a positive integer"),
        ("two", "`two` is not a positive integer"),
        ("", "`` is not a positive integer"),
    ];
    for (value, expected) in cases {
        let args = ["--concurrency", value, "--model", "qwen2.5-coder-1.5b"];
        let output = bench(&dir, &args).envs(env).output().unwrap();
        let text = stderr(&output);
        assert!(!output.status.success(), "{value:?}");
        assert!(text.contains(expected), "{value:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
    }
}

#[test]
fn bad_input_is_refused_before_any_work() {
    let dir = workdir("bad");
    // A model that would need a download: every check must come first.
    let env = [("SIBYL_CACHE_DIR", "/nonexistent/sibyl-cache")];
    let cases: [(&[&str], &str); 6] = [
        (&["--configs", "oracle"], "unknown config `oracle`"),
        (
            &["--max-tokens", "0"],
            "'--max-tokens <MAX_TOKENS>': must be at least 1",
        ),
        (
            &["--temperature", "-1"],
            "--temperature must be a number at least 0",
        ),
        (
            &["--categories", "poetry"],
            "no item has the category `poetry`",
        ),
        (&["--limit", "0"], "'--limit <LIMIT>': must be at least 1"),
        (
            &["--draft-min-value", "2"],
            "'--draft-min-value <DRAFT_MIN_VALUE>': must be in [0, 1]",
        ),
    ];
    for (args, expected) in cases {
        let output = bench(&dir, &[args, &["--model", "qwen2.5-coder-1.5b"]].concat())
            .envs(env)
            .output()
            .unwrap();
        let text = stderr(&output);
        assert!(!output.status.success(), "{args:?}");
        assert!(text.contains(expected), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
    }
    std::fs::write(dir.join("items.jsonl"), "{\"id\": 1}\n").unwrap();
    let output = bench(&dir, &[]).envs(env).output().unwrap();
    assert!(
        stderr(&output).contains("items.jsonl:1: not a benchmark item"),
        "{}",
        stderr(&output)
    );
    std::fs::write(dir.join("items.jsonl"), ITEMS).unwrap();
    let output = bench(&dir, &["--gateway", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("cannot reach the gateway at http://127.0.0.1:1"),
        "{text}"
    );
}
