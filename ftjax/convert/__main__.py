"""python -m ftjax.convert SRC DST [--family=bert]: convert pretrained weights, print the count."""

import sys

from ftjax import cli


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--family=")]
    family = next((a.split("=", 1)[1] for a in argv if a.startswith("--family=")), "bert")
    if len(args) != 2:
        print("usage: python -m ftjax.convert SRC DST [--family=bert]", file=sys.stderr)
        return 2
    from ftjax.convert import write_converted

    with cli.user_errors():
        n = write_converted(args[0], args[1], family)
    print(f"{n:,} parameters written to {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
