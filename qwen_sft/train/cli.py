"""``qwen-sft train CONFIG.yaml [key=value …]``: the training engine driven by a typed YAML config.

    qwen-sft train configs/train/lora_tiny_cpu.yaml output_dir=out/tiny max_steps=4

CONFIG.yaml holds flat ``option: value`` pairs whose names are exactly the flags of ``python train.py``
(see ``python train.py --help``); ``key=value`` pairs after it override the file.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\noptions (YAML keys):")
        from qwen_sft.train.args import _parser

        _parser().print_help()
        return 0 if argv else 2
    from qwen_sft.train.args import parse_yaml

    return run_and_report("qwen-sft train", lambda: parse_yaml(argv[0], argv[1:]))


def run_and_report(prog: str, make_config) -> int:
    """Build the config, train; one line per problem on stderr. Exit 2: configuration (types, conflicts, missing
    files or weights, an unreadable YAML); 1: data, saving or the rehearsal; 0: trained. Both entry points use it."""
    from qwen_sft.trace.rehearse import RehearsalError
    from qwen_sft.train.data import DataError
    from qwen_sft.train.run import SaveError, run
    from qwen_sft.train.validate import ConfigError

    try:
        config = make_config()
    except (ValueError, OSError) as exc:  # ConfigError, or the YAML file itself
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        run(config)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (DataError, SaveError, RehearsalError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
