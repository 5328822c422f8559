"""MkDocs hooks: the benchmark plots live beside their records in benchmarks/results/; add them
to the site (under results/) so that the results page can show them without copies in docs/.
A page in docs/ that mkdocs.yml's nav does not list yet goes to the end of the nav under its
first heading, so a new page is never left out of the site (nor fails the strict build)."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _listed(nav) -> set[str]:
    """Every file the nav names, at any depth."""
    names = set()
    for entry in nav or []:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        names |= _listed(value) if isinstance(value, list) else {value}
    return names


def on_config(config):
    docs = Path(config["docs_dir"])
    listed = _listed(config["nav"])
    for page in sorted(docs.glob("*.md")):
        if page.name not in listed:
            heading = next((line[2:].strip() for line in page.read_text().splitlines()
                            if line.startswith("# ")), page.stem)  # fmt: skip
            config["nav"].append({heading: page.name})
    return config


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
