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

`text_pipeline` then builds the per-replica DatasetFn: WordPiece-tokenize once (the preset's vocabulary,
in tf.data) and cache, shuffle (seeded), then batch examples of similar length together and pad each
batch only to its bucket's length (a multiple of `bucket_width`), not to `max_length`.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import II, MISSING

from trainer.config import DataOptions, ranged
from trainer.data import DataBundle, DataError, DatasetFn, per_replica_batch_size, pipeline_seed
from trainer.lazy import lazy_module

np = lazy_module("numpy")  # loaded when data is built: register_configs needs none

log = logging.getLogger(__name__)

PADDING_MODES = ("bucket", "max_length")


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
# Tokenization and batching in tf.data
# ---------------------------------------------------------------------------------------------


def bucket_lengths(max_length: int, bucket_width: int) -> List[int]:
    """The padded lengths a batch can have: multiples of `bucket_width` below max_length, and max_length."""
    if bucket_width < 1:
        raise DataError(f"data.bucket_width={bucket_width}: must be >= 1")
    return list(range(bucket_width, max_length, bucket_width)) + [max_length]


def text_pipeline(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer,
    *,
    max_length: int,
    global_batch_size: int,
    seed: int,
    training: bool,
    padding: str = "bucket",
    bucket_width: int = 8,
) -> DatasetFn:
    """(texts, labels) -> InputContext -> per-replica batches ({token_ids, padding_mask, segment_ids}, label).

    Order of work: shard, tokenize (in batches of 512, WordPiece from the preset) and pack as
    [CLS] tokens[:max_length - 2] [SEP], cache, shuffle (seeded; reshuffled each epoch from the seed),
    repeat (training), group by length, split into per-replica batches.

    Length grouping: consecutive examples of the same bucket form one group of
    per-replica batch × local replicas, padded to the bucket's length, then split into exactly
    `local replicas` per-replica batches; so the replicas of one step get the same shape, and a batch
    wastes fewer than `bucket_width` positions per example. Training drops nothing (the groups are
    formed after repeat); evaluation flushes partial groups at the end, so every eval example is seen
    once. The order depends only on the data and the seed, always (tokenization runs once, before the
    cache, so determinism costs nothing): the trainer's resume-by-skip relies on that.
    """
    import tensorflow as tf

    if padding not in PADDING_MODES:
        raise DataError(f"data.padding={padding!r} is not one of {list(PADDING_MODES)}")
    if max_length < 3:
        raise DataError(f"data.max_length={max_length}: need room for [CLS], one token and [SEP] (>= 3)")
    cls_id, sep_id, pad_id = (int(tokenizer.cls_token_id), int(tokenizer.sep_token_id), int(tokenizer.pad_token_id))
    texts = np.asarray(list(texts), dtype=object).astype(str)
    labels = np.asarray(labels, dtype=np.int32)
    lengths = bucket_lengths(max_length, bucket_width)

    def tokenize(text_batch, label_batch):
        return tokenizer(text_batch), label_batch

    def pack(token_ids, label):
        token_ids = tf.concat([[cls_id], token_ids[: max_length - 2], [sep_id]], axis=0)
        features = {
            "token_ids": token_ids,
            "padding_mask": tf.ones_like(token_ids),
            "segment_ids": tf.zeros_like(token_ids),
        }
        return features, label

    padding_values = (
        {"token_ids": tf.constant(pad_id, tf.int32), "padding_mask": tf.constant(0, tf.int32),
         "segment_ids": tf.constant(0, tf.int32)},
        tf.constant(0, tf.int32),
    )

    def make(ctx: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        per_replica = per_replica_batch_size(global_batch_size, ctx)
        local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines if ctx is not None else 1
        group = per_replica * local_replicas

        def split_group(x, y):
            """One group -> exactly `local_replicas` per-replica batches of one length. The last eval
            group may be short: its trailing parts are then empty (0, length) batches, rather than the
            (0, 0) placeholders tf.distribute would give a replica that gets nothing, which the
            encoder's [CLS] slice cannot take."""
            size = tf.shape(y)[0]

            def part(i):
                start = tf.minimum(tf.cast(i, tf.int32) * per_replica, size)
                end = tf.minimum(start + per_replica, size)
                return tf.nest.map_structure(lambda t: t[start:end], (x, y))

            return tf.data.Dataset.range(local_replicas).map(part)

        ds = tf.data.Dataset.from_tensor_slices((texts, labels))
        if ctx is not None and ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        ds = ds.batch(512).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
        ds = ds.map(pack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
        if training:
            ds = ds.shuffle(len(labels), seed=pipeline_seed(seed, ctx), reshuffle_each_iteration=True).repeat()
        if padding == "bucket":
            ds = ds.bucket_by_sequence_length(
                element_length_func=lambda x, y: tf.shape(x["token_ids"])[0],
                bucket_boundaries=[n + 1 for n in lengths],  # bucket i holds lengths <= lengths[i]
                bucket_batch_sizes=[group] * (len(lengths) + 1),
                padding_values=padding_values,
                pad_to_bucket_boundary=True,  # pads to boundary - 1 = lengths[i]
                drop_remainder=training,
            )
        else:
            shapes = ({"token_ids": [max_length], "padding_mask": [max_length], "segment_ids": [max_length]}, [])
            ds = ds.padded_batch(group, padded_shapes=shapes, padding_values=padding_values, drop_remainder=training)
        if local_replicas > 1:
            ds = ds.flat_map(split_group)
        options = tf.data.Options()
        options.deterministic = True
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    return make


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
# Word-list language identification (the offline default)
# ---------------------------------------------------------------------------------------------

# Language code -> (file under dict_dir, the Debian package that installs it).
WORDLISTS: Dict[str, Tuple[str, str]] = {
    "en": ("american-english", "wamerican"),
    "en_GB": ("british-english", "wbritish"),
    "fr": ("french", "wfrench"),
    "de": ("ngerman", "wngerman"),
    "es": ("spanish", "wspanish"),
    "it": ("italian", "witalian"),
    "pt": ("portuguese", "wportuguese"),
    "nl": ("dutch", "wdutch"),
    "sv": ("swedish", "wswedish"),
    "da": ("danish", "wdanish"),
    "pl": ("polish", "wpolish"),
    "ca": ("catalan", "wcatalan"),
}


def uncased_form(word: str) -> str:
    """What an uncased BERT tokenizer sees: lowercased, accents stripped (NFD, combining marks removed)."""
    decomposed = unicodedata.normalize("NFD", word.lower())
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


@functools.lru_cache(maxsize=16)
def uncased_forms(path: Path) -> Dict[str, str]:
    """A word list's words keyed by their uncased form (the first spelling of each form wins).
    Cached: reading and normalizing a list of ~350k words takes seconds. Treat it as read-only."""
    forms: Dict[str, str] = {}
    for word in read_wordlist(path):
        forms.setdefault(uncased_form(word), word)
    return forms


def read_wordlist(path: Path) -> List[str]:
    """Single alphabetic words: drops possessives (Aaron's), elisions (dell'asola), compounds
    (bec-d'âne): those punctuation patterns would give the language away without reading the word."""
    with open(path, encoding="utf-8") as f:
        return [w for w in (line.strip() for line in f) if w.isalpha()]


def language_id_words(
    languages: Sequence[str], dict_dir: str, train_per_class: int, eval_per_class: int, words_per_example: int,
    split_seed: int
):
    """Returns (train_texts, train_labels), (eval_texts, eval_labels); label i is languages[i].

    Words whose uncased form is in more than one list are dropped (their label would be a guess); each
    language's remaining words are permuted with `split_seed`, and eval and train take disjoint slices.
    """
    unknown = [lang for lang in languages if lang not in WORDLISTS]
    if unknown:
        raise DataError(f"data.languages has {unknown}, which have no known word list; choose from {sorted(WORDLISTS)}")
    if len(set(languages)) != len(languages) or len(languages) < 2:
        raise DataError(f"data.languages={list(languages)}: need at least two distinct languages")
    if words_per_example < 1:
        raise DataError(f"data.words_per_example={words_per_example}: must be >= 1")
    folder = Path(dict_dir)
    by_form: List[Dict[str, str]] = []
    for lang in languages:
        name, package = WORDLISTS[lang]
        path = folder / name
        if not path.is_file():
            raise DataError(f"no word list for {lang!r} at {path}. Fix: apt-get install "
                            f"{package} (or set data.dict_dir)")
        by_form.append(uncased_forms(path))
    counts: Dict[str, int] = {}
    for forms in by_form:
        for form in forms:
            counts[form] = counts.get(form, 0) + 1
    rng = np.random.default_rng(split_seed)
    need = (train_per_class + eval_per_class) * words_per_example
    splits = {"train": ([], []), "eval": ([], [])}
    for label, (lang, forms) in enumerate(zip(languages, by_form)):
        words = sorted(word for form, word in forms.items() if counts[form] == 1)
        if len(words) < need:
            raise DataError(
                f"the {lang} word list has {len(words)} usable words, fewer than the {need} needed; lower "
                "data.train_per_class / data.eval_per_class / data.words_per_example"
            )
        words = [words[i] for i in rng.permutation(len(words))[:need]]
        examples = [" ".join(words[i : i + words_per_example]) for i in range(0, need, words_per_example)]
        for split, chunk in (("eval", examples[:eval_per_class]), ("train", examples[eval_per_class:])):
            splits[split][0].extend(chunk)
            splits[split][1].extend([label] * len(chunk))
    return tuple((texts, np.asarray(labels, np.int32)) for texts, labels in (splits["train"], splits["eval"]))


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


# ---------------------------------------------------------------------------------------------
# CSV / TSV / JSON Lines files
# ---------------------------------------------------------------------------------------------

FILE_FORMATS = ("csv", "tsv", "jsonl")
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FILE_FORMATS:
            raise DataError(f"data.format={fmt!r} is not one of {['auto', *FILE_FORMATS]}")
        return fmt
    found = _SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(f"cannot tell the format of {path} from its suffix; set data.format to "
                        f"one of {list(FILE_FORMATS)}")
    return found


def read_records(path: str, fmt: str = "auto") -> List[dict]:
    """Rows of a CSV/TSV file (with a header) or objects of a JSON Lines file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {path!r} does not exist; set data.train_path / data.eval_path to "
                        "a CSV, TSV or JSONL file")
    fmt = _file_format(p, fmt)
    with open(p, encoding="utf-8", newline="") as f:
        if fmt in ("csv", "tsv"):
            return list(csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"))
        records = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{number} is not valid JSON ({e.msg}); each line must be one "
                                "JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{p}:{number} is a JSON {type(record).__name__}, not an object with named fields")
            records.append(record)
        return records


def _columns(records: List[dict], path: str, text_column: str, label_column: str) -> Tuple[List[str], list]:
    if not records:
        raise DataError(f"{path} has no rows")
    texts, labels = [], []
    for number, record in enumerate(records, 1):
        for column, key in ((text_column, "text_column"), (label_column, "label_column")):
            if column not in record:
                raise DataError(
                    f"{path}: row {number} has no column {column!r} (data.{key}); its columns are {sorted(record)}"
                )
        if record[label_column] in (None, ""):
            raise DataError(f"{path}: row {number} has an empty {label_column!r}")
        texts.append("" if record[text_column] is None else str(record[text_column]))
        labels.append(record[label_column])
    return texts, labels


def _as_int(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def encode_labels(train: list, evaluation: list,
                  label_names: Optional[Sequence[str]]) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Raw labels -> class ids. `label_names` fixes the order of string labels; without it, integer
    labels are used as they are and string labels are numbered in sorted order of the training set."""
    if label_names:
        index = {str(name): i for i, name in enumerate(label_names)}
    elif all(_as_int(v) is not None for v in train + evaluation):
        ids = [np.asarray([_as_int(v) for v in values], np.int32) for values in (train, evaluation)]
        if min(int(a.min()) for a in ids if a.size) < 0:
            raise DataError("integer labels must be >= 0 (a negative label usually marks an unlabelled row)")
        top = max(int(a.max()) for a in ids if a.size)
        return ids[0], ids[1], [str(i) for i in range(top + 1)]
    else:
        index = {name: i for i, name in enumerate(sorted({str(v) for v in train}))}
    encoded = []
    for values, split in ((train, "training"), (evaluation, "eval")):
        unknown = sorted({str(v) for v in values} - index.keys())
        if unknown:
            hint = "add them to data.label_names" if label_names else "they do not occur in the training data"
            raise DataError(f"{split} labels {unknown[:10]} are not known classes {sorted(index)[:20]}: {hint}")
        encoded.append(np.asarray([index[str(v)] for v in values], np.int32))
    names = [name for name, _ in sorted(index.items(), key=lambda item: item[1])]
    return encoded[0], encoded[1], names


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
    train_texts, train_raw = _columns(read_records(train_path, format), train_path, text_column, label_column)
    if eval_path:
        eval_texts, eval_raw = _columns(read_records(eval_path, format), eval_path, text_column, label_column)
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


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets
# ---------------------------------------------------------------------------------------------

# name -> (text column, labelled eval split)
KNOWN_TFDS = {"glue/sst2": ("sentence", "validation"), "imdb_reviews": ("text", "test")}


def _load_tfds_split(tfds, builder, split: str, text_column: str, label_column: str, limit: Optional[int]):
    ds = builder.as_dataset(split=split, shuffle_files=False)
    if limit:
        ds = ds.take(limit)
    texts, labels = [], []
    for example in tfds.as_numpy(ds):
        text = example[text_column]
        texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        labels.append(int(example[label_column]))
    labels = np.asarray(labels, np.int32)
    if labels.size and labels.min() < 0:
        raise DataError(f"tfds {builder.name} split {split!r} has unlabelled examples (label -1); use a labelled split")
    return texts, labels


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
        train = _load_tfds_split(tfds, builder, train_split, text_column, label_column, max_train_examples)
        evaluation = (
            _load_tfds_split(tfds, builder, eval_split, text_column, label_column, max_eval_examples) if eval_split
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
