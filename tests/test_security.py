"""Security: paths from input files never leave their roots; configs are parsed safely; checkpoints never
unpickle code; no remote code is ever run."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage import schemas
from storage.layout import RunLayout, shard_records
from storage.records import ImageRecord, Quarantined
from tasks.config import PlanConfig
from tasks.images import load_image
from tasks.stages.plan import plan_shards

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("flows", "tasks", "models", "kernels", "storage", "benchmarks", "examples")


@pytest.mark.parametrize(
    "file_name, reason, detail",
    [
        ("../secret.jpg", "unsafe_file_name", "contains '..'"),
        ("sub/../../secret.jpg", "unsafe_file_name", "contains '..'"),
        ("..\\secret.jpg", "unsafe_file_name", "contains '..'"),
        ("/etc/passwd", "unsafe_file_name", "is absolute"),
        ("C:\\Windows\\win.ini", "unsafe_file_name", "is absolute"),
        ("file:///etc/passwd", "unsafe_file_name", "is a URL"),
        ("file:secret.jpg", "unsafe_file_name", "is a URL"),
        ("s3://bucket/secret.jpg", "unsafe_file_name", "is a URL"),
        ("http://example.com/x.jpg", "unsafe_file_name", "is a URL"),
        ("link.jpg", "unsafe_path", "outside the image root"),
        ("linkdir/secret.jpg", "unsafe_path", "outside the image root"),
    ],
)
def test_file_names_never_escape_the_image_root(tmp_path, file_name, reason, detail):
    from tests.bad_images import noise_jpeg

    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.jpg").write_bytes(noise_jpeg(64, 48))
    (root / "good.jpg").write_bytes(noise_jpeg(64, 48))
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    os.symlink(tmp_path, root / "linkdir")
    images = [{"id": 1, "file_name": file_name, "width": 64, "height": 48},
              {"id": 2, "file_name": "good.jpg", "width": 64, "height": 48}]  # fmt: skip
    anns = [{"id": a, "image_id": a, "category_id": 1, "bbox": [1, 1, 5, 5]} for a in (1, 2)]
    det = tmp_path / "det.json"
    det.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "Person"}]})
    )
    layout = RunLayout(str(tmp_path / "out"), "ds", "key")
    plan_shards(str(det), layout, PlanConfig(), images_root=str(root))
    rows = schemas.from_table(pq.read_table(layout.quarantine("plan")), Quarantined)
    (q,) = [r for r in rows if not r.record.startswith("annotation")]  # its box follows it (unknown_image_id)
    assert (q.image_id, q.reason) == (1, reason) and detail in q.detail
    assert [r.file_name for r in shard_records(layout, 0)] == ["good.jpg"]
    # and at decoding time too (a plan written by an older version, or edited): the same refusal
    img, q2 = load_image(str(root), ImageRecord(1, file_name, 64, 48, 0), stage="verify")
    assert img is None and q2.reason == reason


def test_yaml_config_with_a_python_tag_is_refused_and_runs_nothing(tmp_path, capsys):
    from flows.cli import main

    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'threshold: !!python/object/apply:os.system ["touch {marker}"]\n')
    rc = main(
        [
            "plan",
            "--annotations",
            "x.json",
            "--images",
            ".",
            "--out",
            str(tmp_path / "o"),
            "--config",
            str(cfg),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "python/object/apply:os.system" in err[0]
    assert not marker.exists()


class _Payload:
    """Unpickling this runs a shell command (what a malicious .pth file does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reference_checkpoint_with_code_in_its_pickle_is_refused_unrun(tmp_path):
    import torch

    from models.rlipv2.convert import load_reference_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"cannot be loaded with weights_only=True"):
        load_reference_checkpoint(path)
    assert not marker.exists()


def _sources():
    for d in SOURCE_DIRS:
        yield from sorted((REPO / d).rglob("*.py"))


def _calls(text: str, name: str) -> list[str]:
    """Every call `name(...)` in the text with its arguments (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.start() : i])
    return out


def test_source_tree_never_trusts_remote_code_nor_unpickles():
    files = list(_sources())
    assert len(files) > 50
    trusts, loads, pretrained = [], [], []
    for p in files:
        text = p.read_text()
        rel = str(p.relative_to(REPO))
        for m in re.finditer(r"trust_remote_code\s*=\s*([^,\)\s]+)", text):
            trusts.append((rel, m.group(1)))
        loads += [(rel, c) for c in _calls(text, "torch.load")]
        pretrained += [(rel, m.group(1) + c) for m in re.finditer(r"(\w+)\.from_pretrained\(", text)
                       for c in _calls(text[m.start(1) + len(m.group(1)) :], ".from_pretrained")[:1]]  # fmt: skip
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text and "yaml.full_load" not in text, (
            rel
        )
        assert "pickle.load" not in text and "allow_pickle=True" not in text, rel
        assert "torch.hub.load" not in text, rel
    assert trusts and all(v == "False" for _, v in trusts), trusts  # set, and only ever to False
    assert loads and all("weights_only=True" in c for _, c in loads), loads
    # model weights come from safetensors: every from_pretrained of a model (not a tokenizer or processor) asks
    models = [
        (f, c) for f, c in pretrained if re.match(r"\w+(Model|ForConditionalGeneration)\.from_pretrained", c)
    ]
    assert len(models) >= 5, pretrained
    assert all("use_safetensors=True" in c for _, c in models), [
        x for x in models if "use_safetensors" not in x[1]
    ]


def test_the_training_reader_refuses_names_that_leave_the_image_root(tmp_path):
    from models.rlipv2.data import load_vg
    from storage.paths import safe_local_path

    src = json.loads((REPO / "examples" / "vg_tiny" / "relationships.json").read_text())
    for name, message in [
        ("../x.png", "contains '..'"),
        ("/etc/passwd", "is absolute"),
        ("s3://b/x.png", "is a URL"),
    ]:
        bad = [dict(src[0], file_name=name)] + src[1:]
        (tmp_path / "rel.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"image {src[0]['image_id']}: file_name .* {message}"):
            load_vg(tmp_path / "rel.json")
    # a symlink inside the root that points out of it: refused where the pixels are read (make_batch)
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", root / "a.png")
    with pytest.raises(ValueError, match=r"file_name 'a.png' resolves to .*secret.png, outside the root"):
        safe_local_path(str(root), "a.png")
    assert safe_local_path(str(REPO / "examples" / "vg_tiny" / "images"), src[0]["file_name"]).endswith(
        src[0]["file_name"]
    )
