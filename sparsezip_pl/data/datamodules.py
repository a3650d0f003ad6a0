"""Deprecated location of the data modules, which are Lightning code and live in
:mod:`sparsezip_pl.lit.datamodules`. Configs naming ``sparsezip_pl.data.datamodules.X`` still
read (with a deprecation warning); importing this module does not import Lightning."""

import warnings

_NAMES = ("EvalDataModule", "InstructDataModule", "MMEDataModule", "POPEDataModule")


def __getattr__(name: str):
    if name in _NAMES:
        warnings.warn(f"sparsezip_pl.data.datamodules.{name} moved to sparsezip_pl.lit.datamodules.{name}",
                      DeprecationWarning, stacklevel=2)
        from sparsezip_pl.lit import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
