"""Where the text recipe's examples come from (recipes/text.py builds its data= options from these): Debian's
word lists for offline language identification, CSV/TSV/JSON Lines files, and TensorFlow Datasets splits, each
read into memory as texts and integer labels, with the checks that say what to fix. A module of its own to
keep recipes/text.py short.
"""
from __future__ import annotations

import csv
import functools
import json
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from trainer.data import DataError
from trainer.lazy import lazy_module

np = lazy_module("numpy")  # loaded when data is built: importing trainer.recipes.text needs none


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


def read_columns(records: List[dict], path: str, text_column: str, label_column: str) -> Tuple[List[str], list]:
    """(texts, raw labels) of the rows of a file: every row must have both columns and a label."""
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


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets
# ---------------------------------------------------------------------------------------------

# name -> (text column, labelled eval split)
KNOWN_TFDS = {"glue/sst2": ("sentence", "validation"), "imdb_reviews": ("text", "test")}


def load_tfds_split(tfds, builder, split: str, text_column: str, label_column: str, limit: Optional[int]):
    """(texts, labels) of one TFDS split, at most `limit` examples; a split with unlabelled examples is refused."""
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
