"""Transfer learning on real data: does a backbone pretrained on some classes help learn others?

1. Pretrain ResNet-20 on Fashion-MNIST classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat).
2. Fine-tune it on classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) with a small training set:
   recipe=resnet_finetune (new head, backbone frozen for the first 20 steps while the head warms up, then
   trained at backbone_lr_mult x the head's rate), from the checkpoint of step 1 (trainer.init_from).
3. Train the same model on the same classes-5-9 images for the same number of steps from scratch
   (recipe=resnet: the from-scratch recipe, its own warmup + cosine schedule).
Both at two data sizes and several seeds; then fine-tuning with lower backbone rates for comparison.

Every run is the real CLI (`python -m trainer ...`); the commands are printed, and each run folder keeps
its metrics.jsonl. Eval accuracy is on the full Fashion-MNIST test images of the classes concerned.

Run: python examples/transfer_demo.py [--out runs/transfer_demo] [--regimes 100:50 500:100] [--seeds 0 1]
(about 20-25 minutes on 2 busy CPU cores; finished runs are re-used when run again with the same --out)
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(args, run_dir: Path) -> dict:
    """Runs `python -m trainer ARGS` into run_dir (re-uses a finished run) and returns its final eval row."""
    cmd = [sys.executable, "-m", "trainer", *args, "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    print("$ python -m trainer " + " ".join(shlex.quote(a) for a in cmd[3:]), flush=True)
    metrics = run_dir / "metrics.jsonl"
    if not (metrics.exists() and (run_dir / "done").exists()):
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"run failed ({result.returncode}):\n{result.stderr[-4000:]}")
        (run_dir / "done").write_text(f"{time.perf_counter() - start:.1f}\n")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    final = [r for r in rows if r["split"] == "eval"][-1]
    final["seconds"] = float((run_dir / "done").read_text())
    print(f"  -> eval accuracy {final['accuracy']:.4f} at step {final['step']} ({final['seconds']:.0f}s)", flush=True)
    return final


def _mean(rows, key="accuracy"):
    return statistics.mean(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/transfer_demo"))
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--regimes", nargs="+", default=["100:50", "500:100"],
                        help="IMAGES:STEPS: classes-5-9 training images used, and fine-tune / from-scratch steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--backbone-lr-mult", type=float, default=1.0,
                        help="fine-tuning's backbone rate (x the head's)")
    parser.add_argument("--compare-mults", type=float, nargs="*", default=[0.1, 0.3],
                        help="also fine-tune with these backbone rates (first regime, first seed)")
    opts = parser.parse_args()

    source, target = "[0,1,2,3,4]", "[5,6,7,8,9]"
    print(f"Pretraining on Fashion-MNIST classes {source} (all 30000 training images)", flush=True)
    pretrain_dir = opts.out / "pretrain"
    pretrain = run(
        ["recipe=resnet", f"data.classes={source}", "data.num_classes=5", f"trainer.max_steps={opts.pretrain_steps}",
         "trainer.eval_every=0", f"trainer.checkpoint_every={opts.pretrain_steps}"],
        pretrain_dir,
    )

    def target_args(images, steps, seed):
        return [f"seed={seed}", f"data.classes={target}", "data.num_classes=5", f"data.train_limit={images}",
                f"trainer.max_steps={steps}", "trainer.eval_every=0", f"trainer.checkpoint_every={steps}"]

    def finetune(images, steps, seed, mult):
        args = ["recipe=resnet_finetune", f"trainer.init_from={pretrain_dir}", f"finetune.backbone_lr_mult={mult}"]
        return run(args + target_args(images, steps, seed),
                   opts.out / f"finetune_{images}img_{steps}steps_mult{mult:g}_seed{seed}")

    table = []
    for regime in opts.regimes:
        images, steps = (int(v) for v in regime.split(":"))
        tuned, scratch = [], []
        for seed in opts.seeds:
            print(f"\nClasses {target}: {images} training images, {steps} steps, seed {seed}", flush=True)
            tuned.append(finetune(images, steps, seed, opts.backbone_lr_mult))
            scratch.append(run(["recipe=resnet", *target_args(images, steps, seed)],
                               opts.out / f"scratch_{images}img_{steps}steps_seed{seed}"))
        table.append((images, steps, tuned, scratch))
    first_images, first_steps = (int(v) for v in opts.regimes[0].split(":"))
    others = {}
    for mult in opts.compare_mults:
        print(f"\nBackbone rate x{mult:g} ({first_images} images, {first_steps} steps, seed {opts.seeds[0]})",
              flush=True)
        others[mult] = finetune(first_images, first_steps, opts.seeds[0], mult)

    print(f"\nPretrained on classes 0-4 ({opts.pretrain_steps} steps): eval accuracy {pretrain['accuracy']:.4f}")
    print(f"Classes 5-9, eval accuracy on their 5000 test images; seeds {opts.seeds}; "
          f"fine-tuned = recipe=resnet_finetune, backbone_lr_mult={opts.backbone_lr_mult:g}:")
    print(f"  {'train images':>12s} {'steps':>5s} | {'from scratch':>24s} | {'fine-tuned':>24s} | {'gain':>7s}")
    for images, steps, tuned, scratch in table:
        fmt = lambda rows: f"{_mean(rows):.4f} (" + ", ".join(f"{r['accuracy']:.4f}" for r in rows) + ")"
        print(f"  {images:12d} {steps:5d} | {fmt(scratch):>24s} | {fmt(tuned):>24s} | "
              f"{_mean(tuned) - _mean(scratch):+7.4f}")
    if others:
        row = {opts.backbone_lr_mult: table[0][2][0], **others}
        print(f"Backbone rate ({first_images} images, {first_steps} steps, seed {opts.seeds[0]}): "
              + ", ".join(f"x{m:g}: {r['accuracy']:.4f}" for m, r in sorted(row.items())))


if __name__ == "__main__":
    main()
