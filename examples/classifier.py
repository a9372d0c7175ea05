"""The classifier of Keras' "Writing a training loop from scratch" guide, on the Trainer: the guide's
~57-line hand-written loop (tape, gradients, apply, metrics, eval) becomes the Trainer's default step.

Run: python examples/classifier.py [--steps N] [--run-dir DIR] [--precision mixed_bfloat16]
"""
import argparse

from trainer import Trainer  # first: it quiets TensorFlow's start-up logs
from trainer.data import load_mnist_format

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--run-dir", default=None)
parser.add_argument("--precision", default="float32")
args = parser.parse_args()

(x_train, y_train, x_test, y_test), where = load_mnist_format("fashion_mnist")  # real data, offline
flat = lambda x, y: (tf.reshape(tf.cast(x, tf.float32) / 255.0, (-1, 784)), tf.cast(y, tf.int32))
train = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(60000, seed=0).batch(64, drop_remainder=True)
         .map(flat))
test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256).map(flat)


def build_model():  # the guide's model: 784 -> 64 -> 64 -> 10 logits (float32 under any precision)
    inputs = keras.Input((784,), name="digits")
    x = keras.layers.Dense(64, activation="relu")(inputs)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10, dtype="float32", name="predictions")(x))


trainer = Trainer(model=build_model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=lambda: keras.optimizers.SGD(1e-3 * 100),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  precision=args.precision, run_dir=args.run_dir, log_every=max(args.steps // 10, 1),
                  progress_bar=False)
logs = trainer.fit(train, test, steps=args.steps)
print(f"eval accuracy {logs['accuracy']:.4f}, loss {logs['loss']:.4f} on {where}")
