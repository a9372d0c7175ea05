"""Train your own Keras model on your own tf.data pipeline with trainer's loop, no Hydra.

Run: python examples/custom_model.py [RUN_DIR]
"""
import sys

from trainer import Trainer  # first: it quiets TensorFlow's C++ start-up logs (the CUDA line on a CPU machine)
from trainer.data import load_mnist_format

import keras  # noqa: E402 - after trainer on purpose
import tensorflow as tf  # noqa: E402


class SmallConvNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.body = keras.Sequential([keras.layers.Reshape((28, 28, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
                                      keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                                      keras.layers.Dense(64, activation="relu")])
        self.head = keras.layers.Dense(10, dtype="float32")  # float32 logits under any precision

    def call(self, x, training=False):
        return self.head(self.body(x, training=training))


(x_train, y_train, x_test, y_test), where = load_mnist_format("fashion_mnist")  # real data, offline
to_float = lambda x, y: (tf.cast(x, tf.float32) / 255.0, tf.cast(y, tf.int32))
train = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(60000, seed=0).map(to_float)
         .batch(128, drop_remainder=True))
test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).map(to_float).batch(512)

trainer = Trainer(model=SmallConvNet, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=lambda: keras.optimizers.Adam(1e-3),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  precision="mixed_bfloat16", run_dir=sys.argv[1] if len(sys.argv) > 1 else None, log_every=100,
                  eval_every=250)
logs = trainer.fit(train, test, steps=int(sys.argv[2]) if len(sys.argv) > 2 else 500)
print(f"eval accuracy {logs['accuracy']:.4f} on {where}")
