//! The retrieval and LM drafters as a user runs them: `sibyl index` builds a datastore from
//! a folder, `sibyl generate --draft retrieval` and `sibyl drafter --kind retrieval`
//! processes draft from it, beside n-gram and LM drafter processes, without changing the
//! output, and datastores that do not fit are refused.

use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient};
use sibyl_tests::{generate_text, serve_banner, Processes, RoleProcesses};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SHAPES: &str = r#"import math


class Circle:
    """A circle of a given radius."""

    def __init__(self, radius):
        self.radius = radius

    def area(self):
        return math.pi * self.radius ** 2

    def perimeter(self):
        return 2 * math.pi * self.radius


class Rectangle:
    """A rectangle of a given width and height."""

    def __init__(self, width, height):
        self.width = width
        self.height = height

    def area(self):
        return self.width * self.height

    def perimeter(self):
        return 2 * (self.width + self.height)
"#;

fn sibyl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sibyl"))
        .args(args)
        .env("SIBYL_LOG", "warn")
        .output()
        .expect("running sibyl")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn model_path() -> String {
    let path = sibyl_tests::test_model_path().expect("test model");
    path.to_string_lossy().into_owned()
}

/// A corpus folder: two Python files, a binary file, and a `test` folder to exclude.
fn corpus(dir: &Path) -> PathBuf {
    let root = dir.join("corpus");
    std::fs::create_dir_all(root.join("test")).unwrap();
    std::fs::write(root.join("shapes.py"), SHAPES).unwrap();
    std::fs::write(
        root.join("greet.py"),
        "def greet(name):\n    return f\"Hello, {name}!\"\n",
    )
    .unwrap();
    std::fs::write(root.join("blob.bin"), [0u8, 159, 146, 150, 0, 1]).unwrap();
    std::fs::write(root.join("test").join("test_shapes.py"), "assert True\n").unwrap();
    root
}

/// Indexes the corpus under `dir` for the test model; returns the datastore's path.
fn index(dir: &Path, model: &str) -> PathBuf {
    let corpus = corpus(dir);
    let store = dir.join("corpus.sibyl");
    let output = sibyl(&[
        "index",
        "--input",
        corpus.to_str().unwrap(),
        "--exclude",
        "test",
        "--model",
        model,
        "--output",
        store.to_str().unwrap(),
    ]);
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("indexed 2 files"), "{text}");
    assert!(text.contains("1 skipped"), "{text}");
    store
}

#[test]
fn generate_with_a_datastore_prints_what_plain_decoding_prints() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let store = index(dir.path(), &model);
    let prompt = &SHAPES[..SHAPES.find("class Rectangle").unwrap() + 40];
    let common = [
        "generate",
        "--model",
        &model,
        "--prompt",
        prompt,
        "--max-tokens",
        "48",
        "--datastore",
        store.to_str().unwrap(),
    ];
    let plain = sibyl(&[&common[..], &["--draft", "none"]].concat());
    assert!(plain.status.success(), "{}", stderr(&plain));
    for draft in ["retrieval", "ngram,retrieval"] {
        // Fixed sizing verifies every draft, so drafts are really checked.
        let args = [&common[..], &["--draft", draft, "--draft-sizing", "fixed"]].concat();
        let speculative = sibyl(&args);
        let text = stderr(&speculative);
        assert!(speculative.status.success(), "{text}");
        assert_eq!(
            String::from_utf8_lossy(&speculative.stdout),
            String::from_utf8_lossy(&plain.stdout),
            "--draft {draft}"
        );
        let proposed: u64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("retrieval: ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no retrieval line: {text}"));
        assert!(proposed > 0, "{text}");
    }
}

#[test]
fn datastores_that_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let base = ["generate", "--model", &model, "--prompt", "def f():"];
    let output = sibyl(&[&base[..], &["--draft", "retrieval"]].concat());
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("needs --datastore"),
        "{}",
        stderr(&output)
    );

    let garbage = dir.path().join("garbage.sibyl");
    std::fs::write(&garbage, SHAPES).unwrap();
    let args = [
        "--draft",
        "retrieval",
        "--datastore",
        garbage.to_str().unwrap(),
    ];
    let output = sibyl(&[&base[..], &args].concat());
    let text = stderr(&output);
    assert!(!output.status.success());
    assert!(
        text.contains("not a sibyl datastore") && text.contains("garbage.sibyl"),
        "{text}"
    );

    // Built for SmolLM2's tokenizer, served for Qwen's: the drafter does not start serving.
    let store = index(dir.path(), &model);
    let output = sibyl(&[
        "drafter",
        "--kind",
        "retrieval",
        "--datastore",
        store.to_str().unwrap(),
        "--model",
        "qwen2.5-coder-0.5b",
        "--grpc-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--load-retry-ms",
        "0",
    ]);
    let text = stderr(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("was built with tokenizer"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// A greedy gRPC request for `prompt`, speculating or not.
fn greedy_request(prompt: &str, max_tokens: u32, mode: pb::SpeculationMode) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        max_tokens,
        sampling: Some(pb::SamplingParams::default()),
        speculation: Some(pb::Speculation {
            mode: mode as i32,
            drafters: Vec::new(),
        }),
        ..pb::GenerateRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_kinds_of_drafter_process_compete_for_the_verifier() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let store = index(dir.path(), &model);
    let retrieval: &[&str] = &["retrieval", "--datastore", store.to_str().unwrap()];
    let ngram: &[&str] = &["ngram"];
    // The test model drafting for itself: its drafts are the target's own tokens.
    let lm: &[&str] = &["lm", "--draft-model", &model];
    let roles = RoleProcesses::spawn_drafters(
        env!("CARGO_BIN_EXE_sibyl").as_ref(),
        &model,
        &[retrieval, ngram, lm],
        // A drafter running the target's own model is never ahead of it: the verifier
        // waits for its blocks (at most 2 s a step) instead of going on without them.
        &[
            ("SIBYL_DRAFT_SIZING", "fixed"),
            ("SIBYL_DRAFT_WAIT_MS", "2000"),
        ],
    )
    .unwrap();
    let mut client = roles.serving_gateway().await.unwrap();
    let prompt = &SHAPES[..SHAPES.find("class Rectangle").unwrap() + 40];
    let request = |mode| greedy_request(prompt, 64, mode);
    let (plain, _) = generate_text(&mut client, request(pb::SpeculationMode::Off), |_| {})
        .await
        .unwrap();
    let (speculative, summary) =
        generate_text(&mut client, request(pb::SpeculationMode::On), |_| {})
            .await
            .unwrap();
    assert_eq!(speculative, plain);
    for kind in ["retrieval", "ngram", "lm"] {
        let drafter = summary
            .drafters
            .iter()
            .find(|d| d.kind == kind)
            .unwrap_or_else(|| panic!("{:?}", summary.drafters));
        assert_eq!(drafter.state(), pb::DrafterState::Connected, "{drafter:?}");
        assert!(drafter.blocks_received > 0, "{drafter:?}");
    }
    let lm = summary.drafters.iter().find(|d| d.kind == "lm").unwrap();
    assert!(lm.accepted_tokens > 0, "{lm:?}");
}

/// `sibyl serve ARGS` on free ports: the process, its banner's lines and its gRPC address.
async fn serve(args: &[&str], envs: &[(&str, &str)]) -> (Processes, Vec<String>, String) {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_sibyl"))
        .arg("serve")
        .args(args)
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .env("SIBYL_LOG", "warn")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sibyl starts");
    let banner = serve_banner(&mut serve, 5).await;
    let processes = Processes(vec![serve]);
    let (lines, grpc) = banner.unwrap();
    (processes, lines, grpc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_datastore_runs_a_retrieval_drafter_too() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let store = index(dir.path(), &model);
    let (_processes, lines, grpc) = serve(
        &["--model", &model, "--datastore", store.to_str().unwrap()],
        &[],
    )
    .await;
    let verifier = lines.iter().find(|l| l.contains("verifier")).unwrap();
    assert!(
        verifier.contains("ngram drafter") && verifier.contains("retrieval drafter"),
        "{lines:?}"
    );
    let mut client = GatewayClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(SHAPES[..120].into())),
        max_tokens: 24,
        sampling: Some(pb::SamplingParams::default()),
        ..pb::GenerateRequest::default()
    };
    let (_, summary) = generate_text(&mut client, request, |_| {}).await.unwrap();
    let kinds: Vec<&str> = summary.drafters.iter().map(|d| d.kind.as_str()).collect();
    assert_eq!(kinds, ["ngram", "retrieval"], "{:?}", summary.drafters);
    assert!(summary
        .drafters
        .iter()
        .all(|d| d.state() == pb::DrafterState::Connected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_suffix_drafter_drafts_what_it_generated_before() {
    let model = model_path();
    let (_processes, lines, grpc) = serve(
        &["--model", &model, "--draft", "suffix"],
        &[("SIBYL_DRAFT_SIZING", "fixed")],
    )
    .await;
    let verifier = lines.iter().find(|l| l.contains("verifier")).unwrap();
    assert!(
        verifier.contains("suffix drafter") && !verifier.contains("ngram"),
        "{lines:?}"
    );
    let mut client = GatewayClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let request = |mode| greedy_request(&SHAPES[..300], 48, mode);
    let (plain, _) = generate_text(&mut client, request(pb::SpeculationMode::Off), |_| {})
        .await
        .unwrap();
    // The first speculative request's prompt and output join the drafter's index when its
    // session ends; a later one with the same prompt then has its whole output drafted.
    let mut accepted = Vec::new();
    for _ in 0..4 {
        let (text, summary) = generate_text(&mut client, request(pb::SpeculationMode::On), |_| {})
            .await
            .unwrap();
        assert_eq!(text, plain);
        let suffix = summary.drafters.iter().find(|d| d.kind == "suffix");
        let suffix = suffix.unwrap_or_else(|| panic!("{:?}", summary.drafters));
        assert_eq!(suffix.state(), pb::DrafterState::Connected, "{suffix:?}");
        accepted.push(suffix.accepted_tokens);
        // Its own context alone gives the first request about 20 of its 48 tokens.
        if accepted.len() > 1 && suffix.accepted_tokens >= 36.max(accepted[0] + 8) {
            return;
        }
    }
    panic!("no request drafted most of the earlier output: accepted {accepted:?}");
}

/// A `sibyl drafter --kind suffix` process on `addr`, its metrics on `metrics`, with more
/// arguments; stderr goes to `log`.
fn suffix_drafter(
    model: &str,
    (addr, metrics): (&str, &str),
    more: &[&str],
    log: &Path,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_sibyl"))
        .args(["drafter", "--kind", "suffix", "--model", model])
        .args(["--grpc-addr", addr, "--metrics-addr", metrics])
        .args(more)
        .env("SIBYL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("starting a drafter")
}

/// Opens a draft stream on `addr` as a verifier would, with `context`; returns the first
/// block's best branch (what follows the context), and ends the session.
async fn first_draft(addr: &str, fingerprint: &str, vocab: u32, context: &[u32]) -> Vec<u32> {
    use pb::drafter_client::DrafterClient;
    let mut client = DrafterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (send, receive) = tokio::sync::mpsc::channel(4);
    send.send(pb::DraftRequest {
        message: Some(pb::draft_request::Message::Open(pb::DraftOpen {
            context_tokens: context.to_vec(),
            tokenizer_fingerprint: fingerprint.into(),
            vocab_size: vocab,
            max_block_tokens: 8,
            max_branches: 3,
            max_tokens_ahead: 8,
        })),
    })
    .await
    .unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(receive);
    let mut blocks = client.draft(stream).await.unwrap().into_inner();
    let block = blocks.message().await.unwrap().expect("a block");
    drop(send);
    let offset = context.len() - block.anchor as usize;
    let best = block.branches.first().map(|b| b.tokens.clone());
    best.map(|tokens| tokens[offset.min(tokens.len())..].to_vec())
        .unwrap_or_default()
}

/// [`first_draft`] until it proposes something (what reaches a drafter from its peers
/// comes a moment later), for at most 10 s; the last answer.
async fn drafted_within_10s(
    addr: &str,
    fingerprint: &str,
    vocab: u32,
    context: &[u32],
) -> Vec<u32> {
    for _ in 0..100 {
        let drafted = first_draft(addr, fingerprint, vocab, context).await;
        if !drafted.is_empty() {
            return drafted;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Vec::new()
}

/// The Prometheus sample `name` on the `/metrics` page at `addr` (0 when absent).
async fn metric(addr: &str, name: &str) -> f64 {
    let page = sibyl_tests::http(addr.parse().unwrap(), "GET", "/metrics", &[], None).await;
    let text = page.map(|response| response.body).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suffix_drafters_share_what_they_index_keep_it_across_restarts_and_catch_up() {
    let model = model_path();
    let text = sibyl_engine::load_text(Path::new(&model)).unwrap();
    let fingerprint = sibyl_proto::fingerprint(text.tokenizer.fingerprint());
    let vocab = text.config.vocab_size as u32;
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = [0, 1].map(|_| sibyl_tests::free_port().unwrap().to_string());
    let peers = format!("http://{a},http://{b}");
    let snapshot = dir.path().join("b.snapshot");
    let snapshot_arg = snapshot.to_str().unwrap();
    let port = || sibyl_tests::free_port().unwrap().to_string();
    let metrics = port();
    let mut processes = Processes(vec![
        suffix_drafter(
            &model,
            (&a, &port()),
            &["--suffix-peers", &peers],
            &dir.path().join("a.log"),
        ),
        suffix_drafter(
            &model,
            (&b, &metrics),
            &["--suffix-peers", &peers, "--suffix-snapshot", snapshot_arg],
            &dir.path().join("b.log"),
        ),
    ]);
    for addr in [&a, &b] {
        let serving = sibyl_proto::client::wait_until_serving(
            addr.parse().unwrap(),
            std::time::Duration::from_secs(120),
        );
        assert!(serving.await, "{addr} not SERVING");
    }

    // A session on A ends: its context is one finished generation, which A sends to its
    // peers (itself among them, found out and skipped).
    let document: Vec<u32> = (1000..1300).collect();
    assert!(first_draft(&a, &fingerprint, vocab, &document)
        .await
        .is_empty());
    // A later session on B, whose context ends as part of it did, gets what followed.
    let context = [7, 1100, 1101, 1102, 1103];
    let drafted = drafted_within_10s(&b, &fingerprint, vocab, &context).await;
    assert_eq!(drafted, (1104..1112).collect::<Vec<u32>>());
    let received = "sibyl_drafter_shared_documents_total{outcome=\"received\"}";
    assert_eq!(metric(&metrics, received).await, 1.0);
    assert!(metric(&metrics, "sibyl_suffix_index_documents").await <= 2.0);

    // B stops (SIGTERM, as Kubernetes stops a pod) and writes its snapshot; a new B with
    // no peers starts from it.
    let b_process = processes.0.remove(1);
    let pid = b_process.id().to_string();
    let mut b_process = b_process;
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(b_process.wait().unwrap().success());
    assert!(snapshot.exists(), "no snapshot at shutdown");
    processes.0.push(suffix_drafter(
        &model,
        (&b, &port()),
        &["--suffix-snapshot", snapshot_arg],
        &dir.path().join("b2.log"),
    ));
    let serving = sibyl_proto::client::wait_until_serving(
        b.parse().unwrap(),
        std::time::Duration::from_secs(120),
    );
    assert!(serving.await);
    assert_eq!(
        first_draft(&b, &fingerprint, vocab, &context).await,
        (1104..1112).collect::<Vec<u32>>()
    );
    let log = std::fs::read_to_string(dir.path().join("b2.log")).unwrap();
    assert!(log.contains("suffix index restored"), "{log}");

    // A damaged snapshot is refused with a message; the drafter serves, empty.
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    let damaged = dir.path().join("damaged.snapshot");
    std::fs::write(&damaged, bytes).unwrap();
    let c = sibyl_tests::free_port().unwrap().to_string();
    processes.0.push(suffix_drafter(
        &model,
        (&c, &port()),
        &["--suffix-snapshot", damaged.to_str().unwrap()],
        &dir.path().join("c.log"),
    ));
    let serving = sibyl_proto::client::wait_until_serving(
        c.parse().unwrap(),
        std::time::Duration::from_secs(120),
    );
    assert!(serving.await);
    assert!(first_draft(&c, &fingerprint, vocab, &context)
        .await
        .is_empty());
    let log = std::fs::read_to_string(dir.path().join("c.log")).unwrap();
    assert!(
        log.contains("snapshot refused") && log.contains("checksum"),
        "{log}"
    );

    // A new replica, with no snapshot, catches up from its peers (A holds the document).
    let d = port();
    let peers = format!("http://{a},http://{d}");
    processes.0.push(suffix_drafter(
        &model,
        (&d, &port()),
        &["--suffix-peers", &peers],
        &dir.path().join("d.log"),
    ));
    let serving = sibyl_proto::client::wait_until_serving(
        d.parse().unwrap(),
        std::time::Duration::from_secs(120),
    );
    assert!(serving.await);
    let drafted = drafted_within_10s(&d, &fingerprint, vocab, &context).await;
    assert_eq!(drafted, (1104..1112).collect::<Vec<u32>>());
    let log = std::fs::read_to_string(dir.path().join("d.log")).unwrap();
    assert!(log.contains("caught up from a peer"), "{log}");
}
