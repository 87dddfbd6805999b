"""Per-image CPU time of SC_FrequencySplit at 512² and 1024², batch 1 and 4, signed and paper modes.

The 'x fft2' column relates the node to one plain FFT of the same data, a ratio that survives busy cores.
Run: COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_frequency.py [--repeats N]
The node is taken from ComfyUI's registry after ComfyUI's own loader imported the pack.
"""
import argparse
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(PACK_ROOT))  # behind ComfyUI, see standalone/host.py

from standalone.runner import init_comfyui, quiet_comfyui_logging  # noqa: E402

MODES = {"signed": {"mode": "signed", "window": "circle", "cutoff_unit": "fraction", "low_cutoff": 0.2,
                    "high_cutoff": 0.02, "channels": "colour"},
         "paper": {"mode": "paper (EqDiff official)", "window": "circle", "cutoff_unit": "fraction",
                   "low_cutoff": 0.2, "high_cutoff": 0.02, "channels": "colour"}}


def best_seconds(call, repeats):
    """Fastest of several runs after a warm-up: the least disturbed by other work on shared cores."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: per-core time; extra threads on busy shared cores "
                             "mostly add synchronisation waits)")
    args = parser.parse_args()

    nodes = init_comfyui(PACK_ROOT)
    quiet_comfyui_logging()
    import torch

    torch.set_num_threads(args.threads)
    node = nodes.NODE_CLASS_MAPPINGS["SC_FrequencySplit"]()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, best of {args.repeats}; "
          "'x fft2' = node time / one bare torch.fft.fft2 of the same batch")
    print(f"{'side':>6} {'batch':>5} {'mode':>7} {'ms / image':>11} {'x fft2':>7}")
    for side in (512, 1024):
        for batch in (1, 4):
            images = torch.rand(batch, side, side, 3, generator=generator)
            channel_first = images.movedim(-1, 1).contiguous()
            fft_seconds = best_seconds(lambda: torch.fft.fft2(channel_first), args.repeats)
            for name, inputs in MODES.items():
                seconds = best_seconds(lambda: node.split(images, **inputs), args.repeats)
                print(f"{side:>6} {batch:>5} {name:>7} {1000 * seconds / batch:>11.1f} "
                      f"{seconds / fft_seconds:>7.2f}")


if __name__ == "__main__":
    main()
