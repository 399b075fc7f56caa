"""python -m training {teacher,distill,export,pairs,classifier,feature-net,optdigits-net} ..."""

import importlib
import sys

from dmd2.cli import run_cli


def main() -> None:
    commands = {"teacher": "training.teacher", "distill": "training.distill", "export": "training.export",
                "pairs": "training.pairs", "classifier": "training.classifier", "feature-net": "training.feature_net",
                "optdigits-net": "training.optdigits_net"}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m training {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(commands[sys.argv[1]])
    from training.runs import RunError

    run_cli(lambda: module.main(sys.argv[2:]), extra_errors=(RunError,))


if __name__ == "__main__":
    main()
