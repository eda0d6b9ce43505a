"""What each optional feature of an artifact adds to the exported loader, whose bytes count toward the cap.

For every subset of golfquant.export.LOADER_FEATURES (salient column groups, the Hadamard rotation), with every codec
and with the two a default artifact uses (zlib for the manifest, rans for the codes): the bytes of the readable
loader, of the minified one and of the self-extracting packed one (`export-loader --packed`). `export-loader
--artifact A` includes only the features A uses, so an artifact without them pays nothing.

    .venv/bin/python benchmarks/loader_bytes.py      # seconds; writes loader_bytes.json, prints a markdown table
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from golfquant.atomic import atomic_write_text
from golfquant.export import LOADER_FEATURES, loader_source, packed_loader

OUT = Path(__file__).with_suffix(".json")
CODECS = {"every codec": None, "zlib + rans": ("zlib", "rans")}


def main() -> None:
    rows = []
    for label, codecs in CODECS.items():
        for n in range(len(LOADER_FEATURES) + 1):
            for features in itertools.combinations(LOADER_FEATURES, n):
                rows.append({"codecs": label, "features": list(features),
                             "readable": len(loader_source(False, codecs, features)),
                             "minified": len(loader_source(True, codecs, features)),
                             "packed": packed_loader(codecs, features).packed_bytes})
    atomic_write_text(OUT, json.dumps(rows, indent=1) + "\n")
    print("| codecs | features | readable | minified | packed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['codecs']} | {' + '.join(r['features']) or 'none'} | {r['readable']:,} | {r['minified']:,} | "
              f"{r['packed']:,} |")


if __name__ == "__main__":
    main()
