"""Restore never runs code from a checkpoint and never reads outside its root, even when the files
and the commit record were rewritten by someone who can write the bucket."""

from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import pytest

from tests.trainkit.checkpoint.states import make_state, manager, rewrite_commit
from trainkit.checkpoint import UnsupportedCheckpointError
from trainkit.checkpoint.commit import step_dir_name
from trainkit.checkpoint.metadata import decode_metadata, encode_metadata

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def getattr_gadget(command: str) -> bytes:
    """A pickle that uses only globals the old metadata allow-list admitted (``builtins.getattr`` and
    a DCP class) to walk ``Metadata.__init__.__globals__`` to ``eval`` and run ``command``."""

    def global_(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def string(text: str) -> bytes:
        return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()

    def call_getattr(target: bytes, name: str) -> bytes:
        return global_("builtins", "getattr") + b"(" + target + string(name) + b"tR"

    def call(function: bytes, argument: str) -> bytes:
        return function + b"(" + string(argument) + b"tR"

    metadata_class = global_("torch.distributed.checkpoint.metadata", "Metadata")
    module_globals = call_getattr(call_getattr(metadata_class, "__init__"), "__globals__")
    builtins = call(call_getattr(module_globals, "get"), "__builtins__")
    evaluate = call(call_getattr(builtins, "get"), "eval")
    return b"\x80\x02" + call(evaluate, f"__import__('os').system({command!r})") + b"."


def seal(step_dir: Path, name: str, data: bytes, **record_fields: object) -> None:
    """Write ``data`` as ``name`` and recompute its checksum in the commit record, as anyone who can
    write the bucket can."""
    (step_dir / name).write_bytes(data)

    def reseal(record: dict) -> None:
        record["files"][name] = {
            "size": len(data),
            "block_bytes": 32 << 20,
            "checksum": "crc32",
            "block_checksums": [zlib.crc32(data)],
        }
        record.update(record_fields)

    rewrite_commit(step_dir, reseal)


def test_the_gadget_runs_code_when_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(getattr_gadget(f"touch {marker}"))  # the gadget is real: plain pickle runs it
    assert marker.exists()


@pytest.mark.parametrize("format_version", [2, 1])
def test_crafted_metadata_pickle_runs_nothing_during_restore(
    tmp_path: Path, format_version: int
) -> None:
    root, marker = tmp_path / "ckpt", tmp_path / "pwned"
    with manager(root, async_save=False) as ckpt:
        ckpt.save(1, make_state())
        ckpt.save(2, make_state())
    seal(
        root / step_dir_name(2),
        ".metadata",
        getattr_gadget(f"touch {marker}"),
        format_version=format_version,
    )
    refusal = r"metadata refused \(not JSON" if format_version == 2 else r"has pickled metadata"
    with pytest.warns(UserWarning, match=rf"step 2: .*{refusal}"):
        assert manager(root).restore(make_state()) == 1
    assert not marker.exists()


def test_only_pickled_metadata_steps_are_refused_not_silently_skipped(tmp_path: Path) -> None:
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state())
    seal(tmp_path / step_dir_name(1), ".metadata", pickle.dumps({}), format_version=1)
    with (
        pytest.warns(UserWarning, match="skipping checkpoint step 1"),
        pytest.raises(UnsupportedCheckpointError, match=r"step 1 .*pickled metadata"),
    ):
        manager(tmp_path).restore(make_state())


def test_metadata_round_trips_as_json(tmp_path: Path) -> None:
    with manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state())
    data = (tmp_path / step_dir_name(1) / ".metadata").read_bytes()
    assert data.startswith(b"{")
    metadata = decode_metadata(data, checkpoint_id="x")
    assert encode_metadata(metadata) == data
    with pytest.raises(ValueError, match=r"unknown dtype 'os\.system'"):
        decode_metadata(
            data.replace(b'"dtype":"float32"', b'"dtype":"os.system"', 1), checkpoint_id="x"
        )


@pytest.mark.parametrize("escape", ["../../outside.bin", "/etc/hostname", "a/../../outside.bin"])
def test_commit_record_naming_a_file_outside_the_step_is_refused(
    tmp_path: Path, escape: str
) -> None:
    root = tmp_path / "ckpt"
    with manager(root, async_save=False) as ckpt:
        ckpt.save(1, make_state())
        ckpt.save(2, make_state())
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")

    def point_outside(record: dict) -> None:
        record["files"][escape] = {
            "size": 6,
            "block_bytes": 32 << 20,
            "checksum": "crc32",
            "block_checksums": [zlib.crc32(b"secret")],
        }

    rewrite_commit(root / step_dir_name(2), point_outside)
    with pytest.warns(UserWarning, match=rf"step 2: .*{escape!r}.*outside the step directory"):
        assert manager(root).restore(make_state()) == 1
