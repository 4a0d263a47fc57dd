//! Batch invariance and cache handling of the tree forward pass, on tiny random models.

use candle_core::quantized::GgmlDType;
use sibyl_engine::testkit::{tensor_test_device, tiny_model, tiny_model_on, TinyModelConfig};
use sibyl_engine::{Architecture, EngineError, KvCache, LogitRows, Model, Sequence, TreeInput};

/// Every model twice: on the CPU engine and on the tensor engine (`tiny_model_on`), which
/// the same properties must hold for.
fn models() -> Vec<(String, Model)> {
    let device = tensor_test_device();
    let mut models = Vec::new();
    let mut add = |name: String, config: TinyModelConfig| {
        models.push((name.clone(), tiny_model(&config).unwrap()));
        models.push((
            format!("{name}/tensor"),
            tiny_model_on(&config, &device).unwrap(),
        ));
    };
    for architecture in [Architecture::Qwen2, Architecture::Llama] {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let config = TinyModelConfig {
                architecture,
                dtype,
                ..TinyModelConfig::default()
            };
            add(format!("{architecture:?}/{dtype:?}"), config);
        }
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K] {
            let k_quants = TinyModelConfig {
                architecture,
                dtype,
                hidden_size: 256,
                intermediate_size: 512,
                num_heads: 4,
                num_kv_heads: 1,
                ..TinyModelConfig::default()
            };
            add(format!("{architecture:?}/{dtype:?}"), k_quants);
        }
    }
    // Qwen3: its heads here are wider than hidden / heads, as in the real models (the 0.6B
    // model: 16 heads of 128 on a hidden size of 1024).
    let qwen3 = [
        TinyModelConfig {
            head_dim: Some(24),
            ..TinyModelConfig::default()
        },
        TinyModelConfig {
            dtype: GgmlDType::Q4K,
            hidden_size: 256,
            intermediate_size: 512,
            num_heads: 4,
            num_kv_heads: 1,
            head_dim: Some(128),
            ..TinyModelConfig::default()
        },
    ];
    for config in qwen3 {
        let config = TinyModelConfig {
            architecture: Architecture::Qwen3,
            ..config
        };
        add(format!("Qwen3/{:?}", config.dtype), config);
    }
    models
}

fn prompt(vocab: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

/// Logits of each token of `tokens` computed one token per forward (plain decoding).
fn one_at_a_time(model: &Model, prefix: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    model
        .forward(&mut cache, &TreeInput::chain(prefix), LogitRows::None)
        .unwrap();
    tokens
        .iter()
        .map(|&t| {
            model
                .forward(&mut cache, &TreeInput::chain(&[t]), LogitRows::All)
                .unwrap()
        })
        .collect()
}

#[test]
fn chain_logits_are_bit_identical_to_one_token_at_a_time() {
    for (name, model) in models() {
        let vocab = model.vocab_size();
        let prefix = prompt(vocab, 9);
        let tokens = prompt(vocab, 64)
            .into_iter()
            .map(|t| (t * 5 + 3) % vocab as u32)
            .collect::<Vec<_>>();
        let alone = one_at_a_time(&model, &prefix, &tokens);
        for len in [2, 7, 64] {
            let mut cache = model.new_cache();
            model
                .forward(&mut cache, &TreeInput::chain(&prefix), LogitRows::None)
                .unwrap();
            let chained = model
                .forward(
                    &mut cache,
                    &TreeInput::chain(&tokens[..len]),
                    LogitRows::All,
                )
                .unwrap();
            for (i, row) in chained.chunks(vocab).enumerate() {
                assert_eq!(row, alone[i].as_slice(), "{name}: chain of {len}, node {i}");
            }
        }
    }
}

#[test]
fn tree_nodes_are_bit_identical_to_their_path_decoded_alone() {
    for (name, model) in models() {
        let vocab = model.vocab_size() as u32;
        let prefix = prompt(vocab as usize, 5);
        // root 0 -> {1, 2}; 1 -> {3}; 2 -> {4, 5}; 5 -> {6}
        let tokens = vec![4, 9, 10, 20, 30, 31, 40];
        let parents = vec![None, Some(0), Some(0), Some(1), Some(2), Some(2), Some(5)];
        let mut cache = model.new_cache();
        model
            .forward(&mut cache, &TreeInput::chain(&prefix), LogitRows::None)
            .unwrap();
        let tree = model
            .forward(
                &mut cache,
                &TreeInput::tree(tokens.clone(), parents.clone()),
                LogitRows::All,
            )
            .unwrap();
        for node in 0..tokens.len() {
            let mut path = vec![node];
            while let Some(p) = parents[*path.last().unwrap()] {
                path.push(p);
            }
            path.reverse();
            let path_tokens: Vec<u32> = path.iter().map(|&i| tokens[i]).collect();
            let alone = one_at_a_time(&model, &prefix, &path_tokens);
            let row = &tree[node * vocab as usize..(node + 1) * vocab as usize];
            assert_eq!(row, alone.last().unwrap().as_slice(), "{name}: node {node}");
        }
    }
}

#[test]
fn keeping_a_later_branch_equals_a_cache_built_from_that_branch() {
    for (name, model) in models() {
        let vocab = model.vocab_size();
        let prefix = prompt(vocab, 6);
        let tokens = vec![1, 2, 3, 4, 5];
        // root 0 -> {1 -> 2, 3 -> 4}
        let parents = vec![None, Some(0), Some(1), Some(0), Some(3)];
        let mut cache = model.new_cache();
        model
            .forward(&mut cache, &TreeInput::chain(&prefix), LogitRows::None)
            .unwrap();
        model
            .forward(
                &mut cache,
                &TreeInput::tree(tokens, parents),
                LogitRows::All,
            )
            .unwrap();
        cache.keep_path(prefix.len(), 5, &[0, 3, 4]).unwrap();
        assert_eq!(cache.len(), prefix.len() + 3);
        let next = model
            .forward(&mut cache, &TreeInput::chain(&[7]), LogitRows::All)
            .unwrap();
        let mut fresh = model.new_cache();
        let mut sequence = prefix.clone();
        sequence.extend([1, 4, 5, 7]);
        let expected = model
            .forward(&mut fresh, &TreeInput::chain(&sequence), LogitRows::Last)
            .unwrap();
        assert_eq!(next, expected, "{name}");
    }
}

#[test]
fn truncating_the_cache_equals_never_having_run_the_suffix() {
    let (_, model) = models().remove(0);
    let tokens = prompt(model.vocab_size(), 20);
    let mut cache = model.new_cache();
    model
        .forward(&mut cache, &TreeInput::chain(&tokens), LogitRows::None)
        .unwrap();
    cache.truncate(12);
    let after = model
        .forward(&mut cache, &TreeInput::chain(&[3]), LogitRows::All)
        .unwrap();
    let mut fresh = model.new_cache();
    let mut sequence = tokens[..12].to_vec();
    sequence.push(3);
    let expected = model
        .forward(&mut fresh, &TreeInput::chain(&sequence), LogitRows::Last)
        .unwrap();
    assert_eq!(after, expected);
}

#[test]
fn a_copied_prefix_continues_as_the_prefix_computed_afresh() {
    for (name, model) in models() {
        let tokens = prompt(model.vocab_size(), 24);
        let mut cache = model.new_cache();
        model
            .forward(&mut cache, &TreeInput::chain(&tokens), LogitRows::None)
            .unwrap();
        for len in [0, 1, 9, 23, 24] {
            // Half copied at once, the rest appended to it.
            let mut copy = cache.prefix(len / 2);
            assert_eq!(copy.copy_from(&cache, len), len > len / 2, "{name}");
            assert_eq!(copy.len(), len, "{name}");
            let next = [5, 7, 2];
            let reused = model
                .forward(&mut copy, &TreeInput::chain(&next), LogitRows::All)
                .unwrap();
            let mut fresh = model.new_cache();
            let mut sequence = tokens[..len].to_vec();
            sequence.extend(next);
            let expected = model
                .forward(&mut fresh, &TreeInput::chain(&sequence), LogitRows::All)
                .unwrap();
            let vocab = model.vocab_size();
            assert_eq!(reused, expected[len * vocab..], "{name}, prefix {len}");
            assert_eq!(copy.size_in_bytes(), fresh.size_in_bytes(), "{name}");
        }
        // The original is untouched, and a prefix longer than it is all of it.
        assert_eq!(cache.len(), 24);
        assert_eq!(cache.prefix(99).len(), 24);
    }
}

#[test]
fn bad_inputs_are_refused_and_leave_the_cache_untouched() {
    let (_, model) = models().remove(0);
    let mut cache = model.new_cache();
    let vocab = model.vocab_size() as u32;
    let cases = [
        (TreeInput::chain(&[]), "at least one"),
        (TreeInput::chain(&[1, vocab]), "outside the vocabulary"),
        (TreeInput::tree(vec![1, 2], vec![None, Some(1)]), "parent"),
        (TreeInput::tree(vec![1, 2], vec![None, Some(5)]), "parent"),
    ];
    for (input, expected) in cases {
        let error = model
            .forward(&mut cache, &input, LogitRows::All)
            .unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
        assert_eq!(cache.len(), 0);
    }
    let long = vec![1u32; model.config().context_length + 1];
    assert!(matches!(
        model.forward(&mut cache, &TreeInput::chain(&long), LogitRows::Last),
        Err(EngineError::ContextOverflow { .. })
    ));
    assert!(cache.keep_path(0, 3, &[0]).is_err());
}

/// A small deterministic generator for the random batches below.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// A random tree of `len` nodes: each node's parent is an earlier node or the prefix.
fn random_tree(rng: &mut Lcg, vocab: usize, len: usize) -> TreeInput {
    let tokens = (0..len).map(|_| rng.below(vocab) as u32).collect();
    let parents = (0..len)
        .map(|i| match i {
            0 => None,
            _ => Some(rng.below(i)),
        })
        .collect();
    TreeInput::tree(tokens, parents)
}

#[test]
fn every_sequence_of_a_random_batch_gets_the_logits_and_cache_it_gets_alone() {
    let mut rng = Lcg(11);
    for (name, model) in models() {
        let vocab = model.vocab_size();
        for round in 0..6 {
            let count = 1 + rng.below(5);
            // Per sequence: a cache with a prefix of its own length, and its new nodes.
            let mut caches = Vec::new();
            let mut inputs = Vec::new();
            let mut rows = Vec::new();
            for _ in 0..count {
                let mut cache = model.new_cache();
                let prefix_len = rng.below(40);
                if prefix_len > 0 {
                    let prefix: Vec<u32> =
                        (0..prefix_len).map(|_| rng.below(vocab) as u32).collect();
                    model
                        .forward(&mut cache, &TreeInput::chain(&prefix), LogitRows::None)
                        .unwrap();
                }
                caches.push(cache);
                let len = 1 + rng.below(12);
                inputs.push(random_tree(&mut rng, vocab, len));
                rows.push([LogitRows::All, LogitRows::Last, LogitRows::None][rng.below(3)]);
            }
            let mut alone_caches: Vec<KvCache> = caches.iter().map(|c| c.prefix(c.len())).collect();
            let alone: Vec<Vec<f32>> = alone_caches
                .iter_mut()
                .zip(&inputs)
                .zip(&rows)
                .map(|((cache, input), &rows)| model.forward(cache, input, rows).unwrap())
                .collect();
            let mut batch: Vec<Sequence<'_>> = caches
                .iter_mut()
                .zip(&inputs)
                .zip(&rows)
                .map(|((cache, input), &rows)| Sequence { cache, input, rows })
                .collect();
            let batched = model.forward_batch(&mut batch).unwrap();
            assert_eq!(batched, alone, "{name}: round {round}, {count} sequences");
            for (i, (cache, alone_cache)) in caches.iter().zip(&alone_caches).enumerate() {
                assert_eq!(cache.len(), alone_cache.len(), "{name}: sequence {i}");
                let next = TreeInput::chain(&[1]);
                let after = model
                    .forward(&mut cache.prefix(cache.len()), &next, LogitRows::All)
                    .unwrap();
                let after_alone = model
                    .forward(
                        &mut alone_cache.prefix(alone_cache.len()),
                        &next,
                        LogitRows::All,
                    )
                    .unwrap();
                assert_eq!(after, after_alone, "{name}: cache of sequence {i}");
            }
        }
    }
}

#[test]
fn a_bad_sequence_fails_the_batch_before_any_cache_changes() {
    let (_, model) = models().remove(0);
    let vocab = model.vocab_size() as u32;
    let mut good = model.new_cache();
    let mut other = model.new_cache();
    let fine = TreeInput::chain(&[1, 2]);
    let bad = TreeInput::chain(&[3, vocab]);
    let mut batch = [
        Sequence {
            cache: &mut good,
            input: &fine,
            rows: LogitRows::All,
        },
        Sequence {
            cache: &mut other,
            input: &bad,
            rows: LogitRows::All,
        },
    ];
    let error = model.forward_batch(&mut batch).unwrap_err();
    assert!(
        error.to_string().contains("outside the vocabulary"),
        "{error}"
    );
    assert_eq!((good.len(), other.len()), (0, 0));
    assert!(model.forward_batch(&mut []).unwrap().is_empty());
}

#[test]
fn the_tensor_engine_computes_the_model_the_cpu_engine_computes() {
    // Different kernels (candle's on the tensor engine, sibyl's on the CPU engine; on a GPU
    // activations are rounded to 8 bits in other blocks), so not bit for bit: the same
    // logits to within rounding (up to 4% of the largest seen on a GPU, Q4_0), and mostly
    // the same greedy choices.
    let models = models();
    for pair in models.chunks(2) {
        let [(name, cpu), (_, tensor)] = pair else {
            unreachable!("models come in pairs")
        };
        let tokens = prompt(cpu.vocab_size(), 40);
        let logits = |model: &Model| {
            model
                .forward(
                    &mut model.new_cache(),
                    &TreeInput::chain(&tokens),
                    LogitRows::All,
                )
                .unwrap()
        };
        let (expected, found) = (logits(cpu), logits(tensor));
        assert_eq!(expected.len(), found.len(), "{name}");
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = expected
            .iter()
            .zip(&found)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{name}: largest logit {scale}, largest difference {worst}");
        assert!(worst <= 0.06 * scale, "{name}: {worst} against {scale}");
        let vocab = cpu.vocab_size();
        let agree = expected
            .chunks(vocab)
            .zip(found.chunks(vocab))
            .filter(|(a, b)| sibyl_spec::argmax(a) == sibyl_spec::argmax(b))
            .count();
        assert!(
            agree * 10 >= tokens.len() * 9,
            "{name}: {agree} of {}",
            tokens.len()
        );
    }
}
