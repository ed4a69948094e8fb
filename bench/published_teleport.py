#!/usr/bin/env python3
"""Times the teleport of the published ICLR 2024 code (Rose-STL-Lab/Teleportation-Optimization,
gradient_descent_mlp_utils.teleport) on its own MNIST setting, for the side-by-side in
docs/performance.md: a 784-16-10-10 MLP without biases, LeakyReLU(0.1), a teleport batch of
200 images, 10 ascent steps at lr 1e-4, one thread. The images are uniform in [0, 1] like
ToTensor()'s (the cost does not depend on their values).

Usage: python3 bench/published_teleport.py CHECKOUT [--reps N]
  CHECKOUT: a checkout of that repository (not part of this project).
       python3 bench/published_teleport.py --regression CHECKOUT [--reps N]
  the NeurIPS 2022 code instead (Rose-STL-Lab/Symmetry-Teleportation,
  teleportation.teleport_MLP) on its multi-layer regression: dims 4,5,6,7,8, seeds
  n*n*12345 for n < 5, 5 GD steps at lr 1e-4, then the teleport (8 ascent steps, lr 1e-7),
  as multi_layer_regression.py does.
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
    parser.add_argument("--regression", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, args.checkout)
    if args.regression:
        return regression(args.reps)
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


def regression(reps):
    import torch
    from torch import nn
    from teleportation import teleport_MLP

    torch.set_num_threads(1)
    sigma = nn.LeakyReLU(0.1)
    dim = [4, 5, 6, 7, 8]

    def loss(w, x, y):
        h = x
        for m in w[:-1]:
            h = sigma(torch.matmul(m, h))
        return 0.5 * torch.norm(y - torch.matmul(w[-1], h)) ** 2

    times = []
    for rep in range(reps // 5 + 2):
        for n in range(5):
            torch.manual_seed(n * n * 12345)
            w = [torch.rand(dim[i + 2], dim[i + 1], requires_grad=True) for i in range(len(dim) - 2)]
            x = torch.rand(dim[1], dim[0], requires_grad=True)
            y = torch.rand(dim[-1], dim[0], requires_grad=True)
            for _ in range(5):  # the script teleports at epoch 5
                g = torch.autograd.grad(loss(w, x, y), inputs=w)
                w = [a - 1e-4 * b for a, b in zip(w, g)]
            start = time.perf_counter()
            teleport_MLP(w, x, y, 1e-7, dim, loss, 8)
            if rep > 0:  # the first round is a warm-up
                times.append(time.perf_counter() - start)
    print(json.dumps({"teleport_ms": 1e3 * statistics.median(times), "reps": len(times),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
