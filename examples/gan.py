"""A GAN from Python: two models, two optimizers and a step of its own (trainer.recipes.gan.GAN, ~25 lines:
one `self.update(loss, tape, name)` per optimizer). Under mixed_float16 each optimizer has its own loss
scale; both optimizers, both scales and the step are in every checkpoint, so a killed run resumes exactly.

Run: python examples/gan.py [--steps N] [--run-dir DIR] [--precision mixed_float16] [--deterministic]
The same from the command line: python -m trainer recipe=gan
"""
import argparse

import trainer  # noqa: F401  (first: it quiets TensorFlow's start-up logs)

import keras  # noqa: E402

from trainer.recipes.gan import GAN, build_data, build_models  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--run-dir", default=None)
parser.add_argument("--precision", default="float32")
parser.add_argument("--checkpoint-every", type=int, default=500)
parser.add_argument("--deterministic", action="store_true")
args = parser.parse_args()

data = build_data(batch_size=64, latent_dim=32)  # Fashion-MNIST images (offline) with seeded noise
gan = GAN(
    models=lambda: build_models(latent_dim=32),  # {"generator": ..., "discriminator": ...}
    optimizer=lambda: keras.optimizers.Adam(2e-4, beta_1=0.5),  # called once per model
    precision=args.precision, run_dir=args.run_dir, deterministic=args.deterministic,
    log_every=max(args.steps // 10, 1), checkpoint_every=args.checkpoint_every, eval_steps=10,
    best_metric=None, progress_bar=False,
)
logs = gan.fit(data.train, data.eval, steps=args.steps, batch_size=data.batch_size)
print(f"discriminator accuracy on held-out real vs fake: {logs['d_accuracy']:.3f}; "
      f"weights fingerprint {gan.weights_fingerprint()}")
