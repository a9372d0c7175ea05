"""The text recipe's input pipeline (recipes/text.py, its data= options): (texts, labels) in memory ->
per-replica batches of token ids, WordPiece-tokenized once inside tf.data and batched by length so a batch is
padded only to its bucket's length. A module of its own to keep recipes/text.py short; its name starts with
`_`, so assemble.register_configs does not take it for a recipe.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from trainer.data import DataError, DatasetFn, per_replica_batch_size, pipeline_seed
from trainer.lazy import lazy_module

np = lazy_module("numpy")  # loaded when data is built: importing trainer.recipes.text needs none

PADDING_MODES = ("bucket", "max_length")


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
