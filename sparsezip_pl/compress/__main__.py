"""``python -m sparsezip_pl.compress``: the registered methods, where each acts, and its options."""

import dataclasses

from sparsezip_pl.compress.registry import methods


def main() -> None:
    print("| method | side | what it does | options (compressor.<method>.<option>) |")
    print("|---|---|---|---|")
    for name, spec in methods().items():
        options = ", ".join(field.name for field in dataclasses.fields(spec.config)) or "-"
        print(f"| {name} | {spec.side} | {spec.summary} | {options} |")


if __name__ == "__main__":
    main()
