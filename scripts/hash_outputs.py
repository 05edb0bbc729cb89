"""SHA-256 of every file under a folder, for proving that a change leaves outputs byte-identical.

    python scripts/hash_outputs.py bench-out/batch > before.txt   # ... change the code, rerun ...
    python scripts/hash_outputs.py bench-out/batch | diff before.txt -

Timings are the only thing allowed to differ: in metrics.jsonl the `tokens_per_second` field
is dropped before hashing."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def digest(path: Path) -> str:
    if path.name == "metrics.jsonl":
        rows = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"} for line in path.open()]
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    root = Path(sys.argv[1])
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        print(f"{digest(path)}  {path.relative_to(root)}")


if __name__ == "__main__":
    main()
