"""Converters between foreign checkpoint formats and run directories (`python -m convert`).

raven_files.py reads and writes Huginn / Raven directories, importer.py and exporter.py turn them into
run directories and back, logits.py writes a run's logits and latents, cli.py is the command line.
The layout itself (names, shapes, config fields) is looped_models/raven.py; docs/pretrained.md
explains it all.
"""

from convert.cli import main
from convert.exporter import export_raven
from convert.importer import import_raven
from convert.logits import logits_and_latents, run_logits

__all__ = ["export_raven", "import_raven", "logits_and_latents", "main", "run_logits"]
