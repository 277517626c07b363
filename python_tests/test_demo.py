"""`python -m vse_cuda.demo` end to end on a small set: the printed recall table is sane."""

from __future__ import annotations

import re

import pytest

from vse_cuda import demo

IMAGES = 200


def printed_recalls(text: str) -> dict[str, list[float]]:
    """R@1, R@5, R@10 per direction, parsed from the demo's printed table."""
    rows = {}
    for direction in ("image->caption", "caption->image"):
        match = re.search(rf"^\s*{re.escape(direction)}((?:\s+[0-9.]+){{3}})\s*$", text, re.MULTILINE)
        assert match, f"no {direction} row in the demo's output:\n{text}"
        rows[direction] = [float(x) for x in match.group(1).split()]
    return rows


def test_demo_prints_sane_recall(capsys):
    returned = demo.main(["--images", str(IMAGES), "--seed", "1"])
    out = capsys.readouterr().out
    printed = printed_recalls(out)
    for direction, (r1, r5, r10) in printed.items():
        assert 0.0 <= r1 <= r5 <= r10 <= 100.0, (direction, r1, r5, r10)
        # Chance is K/IMAGES (0.5% at R@1, 5% at R@10); a working pipeline is far above it.
        assert r1 >= 20 * 100 / IMAGES, (direction, r1)
        assert r10 >= 10 * 100 * 10 / IMAGES, (direction, r10)
        assert [round(returned[direction][k], 1) for k in demo.RECALL_AT] == pytest.approx([r1, r5, r10])
    assert "Hardest image->caption negatives" in out
    hard_rows = re.findall(r"^\s+\d+\s+\d+\s+\d+\s+-?[0-9.]+\s+-?[0-9.]+\s+(?:yes|no)\s*$", out, re.MULTILINE)
    assert len(hard_rows) == 3, out


def test_demo_rejects_k_beyond_negatives():
    with pytest.raises(SystemExit):
        demo.main(["--images", "20", "--captions-per-image", "1", "--k", "20"])
