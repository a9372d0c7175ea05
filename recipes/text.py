"""Text classification data for the transformer recipe: sources, and tokenization with length bucketing
inside tf.data.

Sources (conf/data/*.yaml), each read into memory as (texts, integer labels):
  * wordlist_langid (default, offline): which language a word is in, from Debian's spelling word lists
    (wamerican, wfrench, wngerman, wspanish, witalian under /usr/share/dict). Real words; words spelled
    the same in two languages (after the lowercasing and accent stripping that the uncased tokenizer
    does) are dropped, so every label can be told from the tokens the model sees.
  * csv / jsonl: files with a text column and a label column (names configurable); labels are integers
    or strings (mapped to ids in `label_names` order, else sorted).
  * text_tfds: a TensorFlow Datasets text data set (glue/sst2, imdb_reviews, ...) already prepared in
    `data_dir`; needs `pip install tensorflow-datasets`.

`text_pipeline` (recipes/_text_pipeline.py) then builds the per-replica DatasetFn: WordPiece-tokenize once
(the preset's vocabulary, in tf.data) and cache, shuffle (seeded), then batch examples of similar length
together and pad each batch only to its bucket's length (a multiple of `bucket_width`), not to `max_length`.
The sources' readers are in recipes/_text_sources.py; their builders are here, the `_target_`s of
conf/data/*.yaml, beside the `predict_inputs` and `class_names` that trainer.predict finds in that module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from omegaconf import II, MISSING

from trainer.config import DataOptions, ranged
from trainer.data import DataBundle, DataError
from trainer.lazy import lazy_module
from trainer.recipes._text_pipeline import text_pipeline
from trainer.recipes._text_sources import (KNOWN_TFDS, encode_labels, language_id_words, load_tfds_split,
                                           read_columns, read_records)

np = lazy_module("numpy")  # loaded when data is built: register_configs needs none

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config schemas
# ---------------------------------------------------------------------------------------------


@dataclass
class TextDataConfig(DataOptions):
    """What every text source shares: the tokenizer's preset, lengths, batching, classes."""

    preset: str = II("model.preset")  # the tokenizer comes from the encoder's own preset
    # tokens per example including [CLS] and [SEP]; longer texts are truncated
    max_length: int = ranged(128, "[3, inf)")
    batch_size: int = ranged(32, "[1, inf)")  # global batch, split across replicas
    padding: str = "bucket"  # bucket: pad to the bucket's length | max_length: every batch to max_length
    bucket_width: int = ranged(8, "[1, inf)")  # bucket lengths are multiples of this (and max_length)
    num_classes: Optional[int] = ranged(None, "[2, inf)")  # the model's output size (model.num_classes follows it)
    seed: int = ranged(II("seed"), "[0, 4294967295]")  # shuffling seed (follows the run's seed)


@dataclass
class WordlistDataConfig(TextDataConfig):
    _target_: str = "trainer.recipes.text.build_wordlist_data"
    # one class per language, in this order
    languages: List[str] = field(default_factory=lambda: ["en", "fr", "de", "es", "it"])
    dict_dir: str = "/usr/share/dict"  # where the Debian word lists (wamerican, wfrench, ...) are
    train_per_class: int = ranged(4000, "[1, inf)")  # training words per language
    eval_per_class: int = ranged(500, "[1, inf)")  # evaluation words per language (disjoint from the training words)
    # >1: each example is that many words of one language, space-separated
    words_per_example: int = ranged(1, "[1, inf)")
    # which words go to train and eval: fixed, whatever the training seed
    split_seed: int = ranged(0, "[0, 4294967295]")
    max_length: int = ranged(16, "[3, inf)")
    num_classes: Optional[int] = ranged(5, "[2, inf)")


@dataclass
class FileDataConfig(TextDataConfig):
    _target_: str = "trainer.recipes.text.build_file_data"
    format: str = "auto"  # auto (from the file suffix) | csv | tsv | jsonl
    train_path: str = MISSING  # the training file (.csv, .tsv, .jsonl)
    eval_path: Optional[str] = None  # None: hold out eval_fraction of the training file
    eval_fraction: float = ranged(0.1, "[0, 1)")  # share of the training rows held out when eval_path is unset
    text_column: str = "text"  # column (or JSON key) holding the text
    label_column: str = "label"  # column (or JSON key) holding the label: an integer 0..N-1 or a string
    label_names: Optional[List[str]] = None  # string labels in class-id order; None: integers, or sorted
    # which rows eval_fraction holds out: fixed, whatever the training seed
    split_seed: int = ranged(0, "[0, 4294967295]")


@dataclass
class TfdsDataConfig(TextDataConfig):
    _target_: str = "trainer.recipes.text.build_tfds_data"
    name: str = "glue/sst2"  # the TFDS data set (glue/sst2, imdb_reviews, or any text classification set)
    data_dir: Optional[str] = None  # where the prepared data set is (TFDS default: ~/tensorflow_datasets)
    download: bool = False  # true: let TFDS download and prepare it (needs the internet)
    text_column: Optional[str] = None  # None: the known column for `name` (sentence, text)
    label_column: str = "label"  # the feature holding the integer label
    train_split: str = "train"  # TFDS split to train on
    eval_split: Optional[str] = None  # None: the known labelled eval split for `name`
    max_train_examples: Optional[int] = ranged(None, "[1, inf)")  # read at most this many training examples; None: all
    max_eval_examples: Optional[int] = ranged(None, "[1, inf)")  # read at most this many eval examples; None: all
    num_classes: Optional[int] = ranged(2, "[2, inf)")


def register_configs(cs) -> None:
    cs.store(group="data", name="base_wordlist", node=WordlistDataConfig)
    cs.store(group="data", name="base_text_file", node=FileDataConfig)
    cs.store(group="data", name="base_tfds_text", node=TfdsDataConfig)


# ---------------------------------------------------------------------------------------------
# trainer.predict's inputs, and what every builder shares
# ---------------------------------------------------------------------------------------------


def predict_inputs(paths: Sequence[Path], data_cfg, batch_size: int):
    """(names, batches) for trainer.predict: each non-empty line of each text file is one example,
    tokenized as training does (the preset's WordPiece, [CLS] ... [SEP], data.max_length), padded per
    batch to data.max_length so the examples keep their order."""
    from trainer.recipes.transformer import load_tokenizer

    names, texts = [], []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                names.append(f"{path.name}:{number}")
                texts.append(line.strip())
    if not texts:
        raise DataError(f"{', '.join(map(str, paths))}: no non-empty lines to predict on")
    make = text_pipeline(texts, np.zeros(len(texts), np.int32), load_tokenizer(data_cfg["preset"]),
                         max_length=data_cfg["max_length"], global_batch_size=batch_size, seed=0, training=False,
                         padding="max_length")
    return names, make(None)


def class_names(data_cfg) -> Optional[List[str]]:
    """The word-list recipe's languages; None (class indices) for other sources."""
    languages = data_cfg.get("languages")
    return list(languages) if languages and str(data_cfg.get("_target_", "")).endswith("build_wordlist_data") else None


def _check_num_classes(num_classes: Optional[int], found: int, what: str) -> int:
    if num_classes is None:
        raise DataError(f"data.num_classes is not set; {what} has {found} classes: add data.num_classes={found}")
    if num_classes < found:
        raise DataError(f"data.num_classes={num_classes} but {what} has {found} classes: set data.num_classes={found}")
    return num_classes


def _bundle(
    train: Tuple[List[str], np.ndarray],
    evaluation: Optional[Tuple[List[str], np.ndarray]],
    *,
    preset: str,
    max_length: int,
    batch_size: int,
    padding: str,
    bucket_width: int,
    seed: int,
    description: str,
) -> DataBundle:
    from trainer.recipes.transformer import load_tokenizer, preset_max_length

    tokenizer = load_tokenizer(preset)
    positions = preset_max_length(preset)
    if positions is not None and max_length > positions:
        raise DataError(f"data.max_length={max_length} exceeds the {positions} positions of model.preset={preset!r}; "
                        f"set data.max_length<={positions}")
    common = dict(
        tokenizer=tokenizer, max_length=max_length, global_batch_size=batch_size, seed=seed,
        padding=padding, bucket_width=bucket_width,
    )
    pad_text = f"bucketed padding (multiples of {bucket_width})" if padding == "bucket" else "padded to max_length"
    return DataBundle(
        train=text_pipeline(*train, training=True, **common),
        eval=text_pipeline(*evaluation, training=False, **common) if evaluation is not None else None,
        batch_size=batch_size,
        train_examples=len(train[1]),
        description=f"{description}; WordPiece from {preset} in tf.data, max_length {max_length}, {pad_text}",
    )


# ---------------------------------------------------------------------------------------------
# The builders (the data= options' `_target_`s)
# ---------------------------------------------------------------------------------------------


def build_wordlist_data(
    preset: str,
    languages: Sequence[str] = ("en", "fr", "de", "es", "it"),
    dict_dir: str = "/usr/share/dict",
    train_per_class: int = 4000,
    eval_per_class: int = 500,
    words_per_example: int = 1,
    split_seed: int = 0,
    max_length: int = 16,
    batch_size: int = 32,
    padding: str = "bucket",
    bucket_width: int = 8,
    num_classes: Optional[int] = 5,
    seed: int = 0,
) -> DataBundle:
    """Language identification of words from Debian's word lists: real text, on the machine, offline."""
    languages = list(languages)
    if num_classes != len(languages):
        raise DataError(f"data.num_classes={num_classes} but data.languages has {len(languages)} entries: set "
                        f"data.num_classes={len(languages)}")
    train, evaluation = language_id_words(languages, dict_dir, train_per_class, eval_per_class, words_per_example,
                                          split_seed)
    unit = "words" if words_per_example == 1 else f"{words_per_example}-word phrases"
    return _bundle(
        train, evaluation, preset=preset, max_length=max_length, batch_size=batch_size, padding=padding,
        bucket_width=bucket_width, seed=seed,
        description=(
            f"language ID of {unit} from Debian word lists in {dict_dir} ({', '.join(languages)}): "
            f"{len(train[1])} train / {len(evaluation[1])} eval, {len(languages)} classes (chance "
            f"{1 / len(languages):.0%})"
        ),
    )


def build_file_data(
    preset: str,
    train_path: str,
    eval_path: Optional[str] = None,
    eval_fraction: float = 0.1,
    format: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    label_names: Optional[Sequence[str]] = None,
    split_seed: int = 0,
    max_length: int = 128,
    batch_size: int = 32,
    padding: str = "bucket",
    bucket_width: int = 8,
    num_classes: Optional[int] = None,
    seed: int = 0,
) -> DataBundle:
    """Labelled text from CSV/TSV/JSONL files; eval from `eval_path` or a seeded held-out fraction."""
    train_texts, train_raw = read_columns(read_records(train_path, format), train_path, text_column, label_column)
    if eval_path:
        eval_texts, eval_raw = read_columns(read_records(eval_path, format), eval_path, text_column, label_column)
        where = f"{train_path} (train) and {eval_path} (eval)"
    elif eval_fraction > 0:
        if not 0 < eval_fraction < 1:
            raise DataError(f"data.eval_fraction={eval_fraction}: must be in (0, 1), or set data.eval_path")
        order = np.random.default_rng(split_seed).permutation(len(train_texts))
        n_eval = max(1, int(round(eval_fraction * len(order))))
        if n_eval >= len(order):
            raise DataError(f"{train_path} has {len(order)} rows: too few to hold out an eval "
                            "fraction; set data.eval_path")
        eval_idx, train_idx = order[:n_eval], order[n_eval:]
        eval_texts, eval_raw = [train_texts[i] for i in eval_idx], [train_raw[i] for i in eval_idx]
        train_texts, train_raw = [train_texts[i] for i in train_idx], [train_raw[i] for i in train_idx]
        where = f"{train_path} ({eval_fraction:.0%} held out for eval, split_seed {split_seed})"
    else:
        eval_texts, eval_raw, where = [], [], f"{train_path} (no eval set)"
    train_labels, eval_labels, names = encode_labels(train_raw, eval_raw, label_names)
    num_classes = _check_num_classes(num_classes, len(names), f"{train_path}")
    log.info("Classes: %s", ", ".join(f"{i}={n}" for i, n in enumerate(names)))
    return _bundle(
        (train_texts, train_labels), (eval_texts, eval_labels) if eval_texts else None,
        preset=preset, max_length=max_length, batch_size=batch_size, padding=padding, bucket_width=bucket_width,
        seed=seed,
        description=f"text classification from {where}: {len(train_labels)} train / {len(eval_labels)} "
                    f"eval, {num_classes} classes",
    )


def build_tfds_data(
    preset: str,
    name: str = "glue/sst2",
    data_dir: Optional[str] = None,
    download: bool = False,
    text_column: Optional[str] = None,
    label_column: str = "label",
    train_split: str = "train",
    eval_split: Optional[str] = None,
    max_train_examples: Optional[int] = None,
    max_eval_examples: Optional[int] = None,
    max_length: int = 128,
    batch_size: int = 32,
    padding: str = "bucket",
    bucket_width: int = 8,
    num_classes: Optional[int] = 2,
    seed: int = 0,
) -> DataBundle:
    """A TFDS text classification set, read from `data_dir` (prepared beforehand unless download=true)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "data=text_tfds needs TensorFlow Datasets, which is not installed: pip install tensorflow-datasets "
            "(or pip install -e '.[tfds]'); offline, use data=csv or data=jsonl instead"
        ) from None
    known_text, known_eval = KNOWN_TFDS.get(name, (None, None))
    text_column = text_column or known_text
    eval_split = eval_split or known_eval
    if text_column is None:
        raise DataError(f"tfds {name!r}: set data.text_column (known defaults exist only for {sorted(KNOWN_TFDS)})")

    def unreadable(error: Exception) -> DataError:
        return DataError(
            f"tfds {name!r} could not be read from data_dir={data_dir or '~/tensorflow_datasets'} "
            f"({type(error).__name__}: {str(error)[:300]}). Prepare it where there is internet "
            f"(tfds build {name.split('/')[0]}) and copy the folder here, point data.data_dir at it, "
            "or set data.download=true when online"
        )

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare()
        features = builder.info.features
    except Exception as e:
        raise unreadable(e) from None
    if text_column not in features or label_column not in features:
        raise DataError(f"tfds {name!r} has features {sorted(features)}; set data.text_column / data.label_column")
    try:
        train = load_tfds_split(tfds, builder, train_split, text_column, label_column, max_train_examples)
        evaluation = (
            load_tfds_split(tfds, builder, eval_split, text_column, label_column, max_eval_examples) if eval_split
            else None
        )
    except DataError:
        raise
    except Exception as e:
        raise unreadable(e) from None
    found = getattr(features[label_column], "num_classes", None) or int(train[1].max()) + 1
    num_classes = _check_num_classes(num_classes, found, f"tfds {name!r}")
    return _bundle(
        train, evaluation, preset=preset, max_length=max_length, batch_size=batch_size, padding=padding,
        bucket_width=bucket_width, seed=seed,
        description=(
            f"tfds {name} from {data_dir or '~/tensorflow_datasets'}: {len(train[1])} train ({train_split}) / "
            f"{len(evaluation[1]) if evaluation else 0} eval ({eval_split}), {num_classes} classes"
        ),
    )
