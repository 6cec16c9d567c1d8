"""Times a training step of model.py's `conv` and `resnet20` rebuilt in PyTorch, for bench.py's
PyTorch column. PyTorch is optional: bench.py runs this file in its own process only when torch is
importable (`pip install torch`; it is not in requirements.txt).

    python benchmarks/torch_step.py --model resnet20 --norm_type group --batch_size 2

Prints one JSON object: {"step_ms": the median round's ms per step, "rounds": [ms per round]}.

The nets have the layers, shapes and parameter counts of model.py's (same 'same'-sized outputs,
LeakyReLU(0.2), dropout 0.5 in `conv`, 1x1 conv + norm shortcuts in `resnet20`), in channels_last
memory format, trained with torch.optim.Adam(1e-3) at its defaults and cross-entropy on a fixed
random batch, on as many threads as cores, as a PyTorch user would run them on a CPU.
"""
import argparse
import json
import os
import time

import torch
from torch import nn

MODELS = {"conv": (32, 3, 32), "resnet20": (32, 3, 8)}  # size, C, GN groups: bench.py's MODELS
NUM_CLASSES = 10


def norm(norm_type, channels, groups):
    if norm_type == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)  # torch's 0.1 is Keras's 0.9
    return nn.GroupNorm(groups, channels, eps=1e-5)


def conv_net(norm_type, groups):
    """model.conv_net: four 4x4 stride-2 convs + LeakyReLU + norm + dropout; fc 512, 128, 32, n."""
    layers, channels = [], 3
    for filters in (64, 128, 256, 512):
        layers += [nn.Conv2d(channels, filters, 4, stride=2, padding=1),
                   nn.LeakyReLU(0.2), norm(norm_type, filters, groups), nn.Dropout(0.5)]
        channels = filters
    layers.append(nn.Flatten())
    features = channels * 2 * 2
    for units in (512, 128, 32):
        layers += [nn.Linear(features, units), nn.LeakyReLU(0.2)]
        features = units
    layers.append(nn.Linear(features, NUM_CLASSES))
    return nn.Sequential(*layers)


def conv_norm(in_channels, filters, kernel_size, stride, norm_type, groups):
    return nn.Sequential(nn.Conv2d(in_channels, filters, kernel_size, stride=stride,
                                   padding=kernel_size // 2, bias=False),
                         norm(norm_type, filters, groups))


class ResidualBlock(nn.Module):
    """model.py's residual_block: conv-norm-ReLU, conv-norm, + shortcut, ReLU."""

    def __init__(self, in_channels, filters, stride, norm_type, groups):
        super().__init__()
        self.a = conv_norm(in_channels, filters, 3, stride, norm_type, groups)
        self.b = conv_norm(filters, filters, 3, 1, norm_type, groups)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == filters
                         else conv_norm(in_channels, filters, 1, stride, norm_type, groups))

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return torch.relu(self.shortcut(x) + y)


def resnet20(norm_type, groups):
    """model.resnet20: a 16-channel stem, three stages of three blocks (16, 32, 64), pool, fc."""
    layers = [conv_norm(3, 16, 3, 1, norm_type, groups), nn.ReLU()]
    channels = 16
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(ResidualBlock(channels, filters, stride, norm_type, groups))
            channels = filters
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)]
    return nn.Sequential(*layers)


def train_step_function(model_name, norm_type, batch_size):
    size, channels, groups = MODELS[model_name]
    builder = {"conv": conv_net, "resnet20": resnet20}[model_name]
    net = builder(norm_type, groups).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    images = torch.rand(batch_size, channels, size, size).to(memory_format=torch.channels_last)
    labels = torch.zeros(batch_size, dtype=torch.long)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        return loss
    return train_step


def seconds_per_step(step, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        loss = step()
    loss.item()
    return (time.perf_counter() - start) / repeats


def time_step(step, rounds, seconds_per_round):
    """ms per step in each of `rounds` rounds of about `seconds_per_round`, after a warm-up."""
    for _ in range(3):
        seconds_per_step(step, 1)
    repeats = max(1, round(seconds_per_round / seconds_per_step(step, 3)))
    return [1000 * seconds_per_step(step, repeats) for _ in range(rounds)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), required=True)
    parser.add_argument("--norm_type", choices=("batch", "group"), required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=0.2, help="seconds per round")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    step = train_step_function(args.model, args.norm_type, args.batch_size)
    rounds = time_step(step, args.rounds, args.seconds)
    print(json.dumps({"step_ms": sorted(rounds)[len(rounds) // 2], "rounds": rounds}))


if __name__ == "__main__":
    main()
