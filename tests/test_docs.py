"""Every `REF x.y` citation in the code and docs names a section of docs/reference.md, and nothing cites the
reference file that lived outside the repository. Text only: no torch, runs in well under a second."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
SKIPPED_DIRS = {"__pycache__", "runs", "logs", "demos", "checkpoints", "assets", "wandb"}
CITATION = re.compile(r"\bREF(?:ERENCE)?\s+(?:sections?\s+)?(\d+(?:\.\d+)*(?:\s*(?:,|and|-|/)\s*\d+(?:\.\d+)*)*)")
NUMBER = re.compile(r"\d+(?:\.\d+)*")


def source_files() -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in SKIPPED_DIRS]
        files += [Path(directory) / n for n in names if n.endswith((".py", ".md", ".sh", ".toml")) or n == "Makefile"]
    return sorted(files)


def sections(text: str) -> dict[str, str]:
    """Section number ("9", "9.1") -> its text up to the next heading."""
    parts = re.split(r"^(#{2,3}) (\d+(?:\.\d+)?)\.? ", text, flags=re.MULTILINE)
    return {parts[i + 1]: parts[i + 2] for i in range(1, len(parts), 3)}


def missing_target(number: str, found: dict[str, str]) -> bool:
    """x and x.y are headings; x.y.z is item z of the numbered list in section x.y."""
    levels = number.split(".")
    if len(levels) <= 2:
        return number not in found
    section = found.get(".".join(levels[:2]))
    return section is None or not re.search(rf"^\s*{levels[2]}\. ", section, flags=re.MULTILINE)


def test_every_citation_names_an_existing_section():
    found = sections(REFERENCE.read_text())
    assert {"1", "1.1", "5.4", "9", "9.1"} <= set(found)
    cited, broken = 0, []
    for path in source_files():
        if path == Path(__file__).resolve():
            continue
        for line_number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in CITATION.finditer(line):
                for number in NUMBER.findall(match.group(1)):
                    cited += 1
                    if missing_target(number, found):
                        broken.append(f"{path.relative_to(ROOT)}:{line_number}: REF {number}")
    assert cited > 100, f"only {cited} citations found: is the pattern still right?"
    assert not broken, "citations of sections missing from docs/reference.md:\n" + "\n".join(broken)


def test_nothing_cites_the_reference_outside_the_repository():
    outside = [f"{path.relative_to(ROOT)}:{n}" for path in source_files() if path != Path(__file__).resolve()
               for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
               if "shared/REFERENCE" in line or "REFERENCE.md" in line]
    assert not outside, "cite docs/reference.md instead of a file outside the repository:\n" + "\n".join(outside)


def test_numbered_items_are_found_by_the_lookup():
    text = "## 9. GRPO\n\n### 9.1 Advantages\n\n1. first\n2. second\n\n### 9.2 Ratios\n"
    found = sections(text)
    assert set(found) == {"9", "9.1", "9.2"}
    assert not missing_target("9.1.2", found)
    assert missing_target("9.1.3", found) and missing_target("9.2.1", found) and missing_target("9.3", found)
