"""Several one-process training runs in one Python process: ``python tests/train_many.py ARGS -- ARGS -- ...``, each
ARGS the flags of rpo_fast/train.py. The imports and DeepSpeed's initialisation (most of a tiny run's time) are
paid once; each run builds its own Trainer and engine, as a fresh process would."""

import sys

from rpo_fast import train  # noqa: E402

if __name__ == "__main__":
    argv, runs = sys.argv[1:], [[]]
    for a in argv:
        if a == "--":
            runs.append([])
        else:
            runs[-1].append(a)
    for args in runs:
        train.main(args)
