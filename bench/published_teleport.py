#!/usr/bin/env python3
"""Times the teleport of the published ICLR 2024 code (Rose-STL-Lab/Teleportation-Optimization,
gradient_descent_mlp_utils.teleport) on its own MNIST setting, for the side-by-side in
docs/performance.md: a 784-16-10-10 MLP without biases, LeakyReLU(0.1), a teleport batch of
200 images, 10 ascent steps at lr 1e-4, one thread. The images are uniform in [0, 1] like
ToTensor()'s (the cost does not depend on their values).

Usage: python3 bench/published_teleport.py CHECKOUT [--reps N]
  CHECKOUT: a checkout of that repository (not part of this project).
Prints JSON: {"teleport_ms": median over the reps, "reps": N, "torch": version}."""
import argparse
import json
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkout")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, args.checkout)
    import torch
    from torch import nn
    from gradient_descent_mlp_utils import init_param_MLP, teleport

    torch.set_num_threads(1)
    dim = [20, 28 * 28, 16, 10, 10]  # as teleport_optimization.py passes it
    sigma = nn.LeakyReLU(0.1)
    torch.manual_seed(0)
    x = torch.rand(28 * 28, 200)
    y = torch.randint(0, 10, (200,))
    times = []
    for rep in range(args.reps + 1):
        w = [t.detach().clone().requires_grad_(True) for t in init_param_MLP(dim, seed=54321 + rep)]
        start = time.perf_counter()
        teleport(w, x, y, 1e-4, dim, sigma, telestep=10)
        if rep > 0:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    print(json.dumps({"teleport_ms": 1e3 * statistics.median(times), "reps": args.reps,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
