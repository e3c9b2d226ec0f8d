"""``python -m dpokit`` — the same as the ``dpokit`` console script."""

from dpokit.cli import main

if __name__ == "__main__":
    main()
