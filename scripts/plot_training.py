#!/usr/bin/env python3
"""plot_training.py - the loss curves of the trained demo adapters (train_log.json beside each,
written by train_hydralora.py) as one PNG: tests/fixtures/adapters/trained/loss.png.

    .venv-train/bin/python scripts/plot_training.py
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = os.path.join(ROOT, "tests/fixtures/adapters/trained")


def smooth(xs, w=10):
    return [sum(xs[max(0, i - w + 1): i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(xs))]


def main() -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, label in (("lora", "LoRA"), ("hydra", "HydraLoRA")):
        log = json.load(open(os.path.join(D, kind, "train_log.json")))
        loss = log["loss"]
        name = (f"{label} r={log['r']}" + (f" K={log['K']}" if kind == "hydra" else "") +
                f", {log['trainable_params'] / 1e6:.2f} M params, {log['train_seconds'] / 60:.0f} min on "
                f"{log['threads']} thread{'s' if log['threads'] > 1 else ''}")
        line, = ax.plot(range(1, len(loss) + 1), loss, alpha=0.25)
        ax.plot(range(1, len(loss) + 1), smooth(loss), color=line.get_color(), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 8, mixed tasks)")
    ax.set_ylabel("loss on answer tokens")
    ax.set_title("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), 2-core CPU VM")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(D, "loss.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
