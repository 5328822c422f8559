"""MkDocs hook: the benchmark plots live beside their records in benchmarks/results/; add them to
the site (under results/) so that the results page can show them without copies in docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def on_files(files, config):
    for path in sorted(BENCHMARKS.glob("results/*/plot_*.*")):
        if path.suffix in (".png", ".svg"):
            files.append(
                File(
                    str(path.relative_to(BENCHMARKS)),  # results/<folder>/plot_...
                    src_dir=str(BENCHMARKS),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files
