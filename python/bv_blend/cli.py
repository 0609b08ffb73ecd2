"""The `bv-blend` command: `train` (one flag per GRPOConfig field, `--config` for YAML) and
`tasks` (list the built-in tasks)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from bv_blend.config import GRPOConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bv-blend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train a causal LM with GRPO",
        description="Train with GRPO. Every flag can also be set in the --config YAML file "
                    "(key = flag name with underscores); flags override the file.")
    train.add_argument("--config", help="YAML file of settings")
    for field in dataclasses.fields(GRPOConfig):
        default = field.default
        # Values stay strings here and are converted by GRPOConfig.from_dict, the same path a
        # YAML file takes; SUPPRESS keeps flags that were not given out of the overrides.
        kwargs = dict(dest=field.name, default=argparse.SUPPRESS, metavar=field.name.upper(),
                      help=f"{field.metadata['help']} (default: {default})")
        if "nargs" in field.metadata:
            kwargs["nargs"] = field.metadata["nargs"]
        elif isinstance(default, bool) or field.name == "bf16":
            # `--bf16` alone means true; `--bf16 false` is also accepted.
            kwargs.update(nargs="?", const="true")
        train.add_argument("--" + field.name.replace("_", "-"), **kwargs)
    commands.add_parser("tasks", help="list the built-in tasks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    if command == "tasks":
        from bv_blend.tasks import TASKS
        for task in TASKS.values():
            print(f"{task.name:16s} {task.description}")
        return 0

    from bv_blend import distributed
    from bv_blend.rewards import RewardFunctionError
    from bv_blend.trainer import GRPOTrainer, TrainingInterrupted

    config_path = args.pop("config")
    try:
        config = (GRPOConfig.from_yaml(config_path, **args) if config_path
                  else GRPOConfig.from_dict(args))
        GRPOTrainer(config=config).train()
    # ValueError: a bad setting or input file (CheckpointError included); OSError: a file or
    # directory the run needs cannot be read or written.
    except (ValueError, OSError, RewardFunctionError) as err:
        print(f"bv-blend: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        print(f"bv-blend: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # before training started, when Ctrl-C has its default meaning
        print("bv-blend: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        distributed.cleanup()
    return 0
